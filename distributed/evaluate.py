"""Scoring a model, in one place: the input it sees (input_size, prepare_batch), its logits on images with or
without test-time augmentation (predict), the metrics of a prediction (metrics), a saved model scored on a split
of the data it was trained on (score_model), and the test report. The loop's validation, `emotune train`'s test,
ensembles, the search report, predict and the bench all score through here."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from torch import nn
from torchvision.transforms.v2 import functional as TF

from distributed import storage
from distributed.augment import augment
from distributed.config import TrainConfig
from distributed.model_names import native_size
from distributed.results import save_figure, write_json, write_table

MEAN = {1: (0.449,), 3: (0.485, 0.456, 0.406)}
STD = {1: (0.226,), 3: (0.229, 0.224, 0.225)}
TENCROP_FRACTION = 11 / 12  # the FER2013 convention: 44-px crops of 48-px faces


def input_size(cfg: TrainConfig) -> int:
    """The side of the square images the network is fed: image_size, or the architecture's native size."""
    return cfg.image_size or native_size(cfg.model)


def prepare_batch(x_uint8: torch.Tensor, cfg: TrainConfig, device: torch.device,
                  augment_with: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B,C,S,S] -> normalised float on the device at input_size(cfg), resized batch-wise there (never per
    image on the CPU). With a generator, the batch is augmented on the device first (on [0, 1] pixels)."""
    size = input_size(cfg)
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    if augment_with is not None:
        x = augment(x, augment_with)
    mean = torch.tensor(MEAN[cfg.in_channels], device=device).view(1, -1, 1, 1)
    std = torch.tensor(STD[cfg.in_channels], device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, cfg: TrainConfig, device, batch_size: int = 256,
            tta: str = "none") -> torch.Tensor:
    """Logits for uint8 images, in batches. With test-time augmentation (tta_views) the result is the log of the
    mean softmax over the views: still logits (argmax and softmax work on them), averaged as probabilities."""
    device = torch.device(device)
    net.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = prepare_batch(x[start:start + batch_size], cfg, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            if tta == "none":
                out.append(net(xb).float())
            else:
                views = tta_views(xb, tta)
                out.append(torch.stack([net(v).float().softmax(1) for v in views]).mean(0).log())
    return torch.cat(out) if out else torch.empty(0)


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of a prepared batch [B, C, S, S] to average over: the batch and its mirror (flip), or ten-crop
    (four corners and the centre at TENCROP_FRACTION of the side, and the same of the mirror), each crop resized
    back to S so the model sees its usual input size."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, TF.horizontal_flip(x)]
    side = x.shape[-1]
    crop = round(side * TENCROP_FRACTION)
    return [F.interpolate(v, size=(side, side), mode="bilinear", align_corners=False)
            for v in TF.ten_crop(x, [crop, crop])]


def metrics(y_true: np.ndarray, y_pred: np.ndarray, prefix: str) -> dict:
    """{prefix_acc, prefix_macro_f1, prefix_count} of one prediction (macro-F1 over the classes that occur)."""
    return {f"{prefix}_acc": float(accuracy_score(y_true, y_pred)),
            f"{prefix}_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            f"{prefix}_count": int(len(y_true))}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> list[list[int]]:
    """The confusion matrix (rows: true class, columns: predicted) as plain lists, as a model file keeps it."""
    return confusion_matrix(y_true, y_pred, labels=list(range(classes))).tolist()


@dataclass
class Scored:
    """A model's predictions on one split: labels, predicted classes, class names, the split's groups (FER2013's
    PublicTest/PrivateTest, else None) and the config the model was trained with."""
    y_true: np.ndarray
    y_pred: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None
    config: TrainConfig


def score_model(model_file: str | Path, split: str = "test", tta: str | None = None, device="cpu",
                data=None) -> Scored:
    """A saved model (best_model.pt or final_model.pt; a path or a URI) on the validation or test split of the data
    and split its config names. tta None: the model's own setting. data: that data, already decoded."""
    from distributed.data import load_data
    from distributed.modelfile import load_model
    from distributed.splits import make_splits

    with tempfile.TemporaryDirectory() as tmp:
        local = str(model_file)
        if storage.is_uri(local):
            local = os.path.join(tmp, storage.name(model_file))
            storage.download(str(model_file), local)
        net, cfg, names, _ = load_model(local, device=device)
    splits = make_splits(data or load_data(cfg), cfg)
    x, y = (splits.test_x, splits.test_y) if split == "test" else (splits.val_x, splits.val_y)
    logits = predict(net, torch.from_numpy(x), cfg, device, tta=tta or cfg.tta)
    groups = splits.test_groups if split == "test" else None
    return Scored(np.asarray(y), logits.argmax(1).cpu().numpy(), list(names), groups, cfg)


def validation_confusion(model_file: str | Path) -> tuple[np.ndarray, list[str], bool]:
    """A saved model's confusion matrix on its validation split -> (matrix, class names, scored again). The loop
    keeps the best epoch's matrix in best_model.pt (val_confusion; the first fold's under cv_folds); a file without
    one (final_model.pt, or written by an older emotune) is scored again, which decodes its data."""
    from distributed.modelfile import MODEL_FORMAT, load_file

    with tempfile.TemporaryDirectory() as tmp:
        local = str(model_file)
        if storage.is_uri(local):
            local = os.path.join(tmp, storage.name(model_file))
            storage.download(str(model_file), local)
        blob = load_file(local, MODEL_FORMAT)
    if blob.get("val_confusion"):
        return np.asarray(blob["val_confusion"]), list(blob["class_names"]), False
    scored = score_model(model_file, "val")
    return np.asarray(confusion(scored.y_true, scored.y_pred, len(scored.class_names))), scored.class_names, True


def write_test_report(out: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str],
                      groups: np.ndarray | None = None) -> dict:
    """One evaluation on the test split: accuracy, macro-F1, sklearn's per-class report (text and JSON) and the
    confusion matrix (CSV and PNG); per group too (e.g. FER2013 PublicTest / PrivateTest) when groups are given."""
    labels = list(range(len(class_names)))
    parts = {"all": np.ones(len(y_true), bool)}
    if groups is not None:
        parts.update({str(g): groups == g for g in sorted(set(groups.tolist()))})
    summary = {}
    for part, mask in parts.items():
        suffix = "" if part == "all" else f"_{part}"
        yt, yp = y_true[mask], y_pred[mask]
        summary[part] = metrics(yt, yp, "test")
        report = classification_report(yt, yp, labels=labels, target_names=class_names, zero_division=0, digits=4)
        storage.write_text(out / f"classification_report{suffix}.txt", report)
        write_json(classification_report(yt, yp, labels=labels, target_names=class_names, zero_division=0,
                                         output_dict=True), out / f"classification_report{suffix}.json")
        cm = confusion_matrix(yt, yp, labels=labels)
        rows = [{"true": name, **{pred: int(cm[i, j]) for j, pred in enumerate(class_names)}}
                for i, name in enumerate(class_names)]
        write_table(rows, out / f"confusion_matrix{suffix}", parquet=False)  # a K x K matrix needs no Parquet copy
        plot_confusion(cm, class_names, out / f"confusion_matrix{suffix}.png",
                       f"test {part}: acc {summary[part]['test_acc']:.3f}, macro-F1 {summary[part]['test_macro_f1']:.3f}")
    write_json(summary, out / "test_metrics.json")
    return summary


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    save_figure(fig, path)

"""Model files and checkpoints. Both are plain dicts of tensors and numbers, so `torch.load(weights_only=True)`
reads them and nothing in them executes.

A model file (best_model.pt, final_model.pt) is a model_blob: weights, the config that made them, the class names;
save_model writes one, load_model reads it back as a model. A checkpoint directory (one per epoch) holds the
training state (state.pt, to resume: training_state), the best model so far (best_model.pt) and the epochs'
reports (history.json); save_state writes it, load_state reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distributed.config import HISTORY_FILE, TrainConfig
from distributed.errors import ModelFileError
from distributed.models import create_model

MODEL_FORMAT = "emotune-model/1"
STATE_FORMAT = "emotune-state/1"
STATE_FILE, BEST_FILE = "state.pt", "best_model.pt"  # one checkpoint directory: save_state / load_state
FINAL_FILE = "final_model.pt"  # beside best_model.pt at the end of `emotune train`


def model_blob(net: nn.Module, cfg: TrainConfig, class_names: list[str], metrics: dict,
               val_confusion: list[list[int]] | None = None) -> dict:
    """A self-describing model file: weights (copied to CPU), the config that made them, the class names, the
    metrics of its epoch and, from the loop, its validation confusion matrix (what the search report draws)."""
    net = getattr(net, "module", net)
    blob = {"format": MODEL_FORMAT, "model": cfg.model,
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
            "config": cfg.to_dict(), "class_names": list(class_names),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}}
    if val_confusion is not None:
        blob["val_confusion"] = val_confusion
    return blob


def save_model(path: str | Path, blob: dict) -> None:
    """A model_blob -> a model file that load_model reads."""
    torch.save(blob, Path(path))


# ---------------------------------------------------------------------------------------------- checkpoints

def model_state(net: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None = None) -> dict:
    """One model's part of a training state: weights, optimizer state, EMA weights (None without EMA)."""
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None}


def load_model_state(state: dict, net: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> None:
    """The inverse of model_state: a model_state dict back into the model, its optimizer and its EMA."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])


def training_state(epoch: int, folds: list[dict], best: dict | None, bad_epochs: int, history: list[dict]) -> dict:
    """What a run resumes from: each fold's model_state (fold 1's at the top level, the others under other_folds),
    the epoch done, the best so far ({"value", "epoch"}), epochs without improvement and every epoch's metrics."""
    first, *others = folds
    return {"epoch": epoch, **first, "other_folds": others, "best": best, "bad_epochs": bad_epochs,
            "history": history}


def fold_states(state: dict) -> list[dict]:
    """The model_state of each fold in a training_state, fold 1 first."""
    return [state] + state.get("other_folds", [])


def save_state(directory: str | Path, state: dict, best_blob: dict) -> None:
    """One checkpoint: the training state (to resume), the best model so far (to keep) and the epochs' reports so
    far as JSON (HISTORY_FILE: read without torch where a trial's result.json lost epochs)."""
    torch.save({"format": STATE_FORMAT, **state}, Path(directory) / STATE_FILE)
    save_model(Path(directory) / BEST_FILE, best_blob)
    (Path(directory) / HISTORY_FILE).write_text(json.dumps(state["history"]))


def load_state(directory: str | Path) -> tuple[dict, dict]:
    """The pair save_state wrote: (training state, best model blob)."""
    return load_file(Path(directory) / STATE_FILE, STATE_FORMAT), load_file(Path(directory) / BEST_FILE, MODEL_FORMAT)


def checkpoint_state(checkpoint) -> tuple[dict, dict] | None:
    """A Ray checkpoint's pair (training state, best model blob), None without a checkpoint: how a trial under Tune
    and a Ray Train worker resume (each hands its own get_checkpoint() here)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


def final_weights(state: dict) -> dict:
    """The last epoch's weights; its EMA weights when EMA was on (what evaluation used)."""
    if state.get("ema") is None:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}


def final_blob(state: dict, best: dict) -> dict:
    """final_model.pt: best_model.pt's description (config, classes) with the last epoch's (EMA) weights and
    metrics."""
    return dict(best, state_dict=final_weights(state), metrics=state["history"][-1])


# -------------------------------------------------------------------------------------------------- reading

def load_file(path: str | Path, expected: str | tuple[str, ...]) -> dict:
    """weights_only=True: a file carrying pickled code is refused and nothing in it executes. `expected`: the
    format string(s) accepted."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; pass the best_model.pt or final_model.pt of an `emotune train` run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code, RuntimeError for non-torch files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "it holds pickled objects or code" if "Weights only load failed" in reason else reason[:120]
        raise ModelFileError(f"{path}: not an emotune file, refused by safe (weights_only) loading ({what}); pass a "
                             f"best_model.pt or final_model.pt written by `emotune train`") from None
    formats = (expected,) if isinstance(expected, str) else expected
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise ModelFileError(f"{path}: not an emotune file (expected format {' or '.join(formats)}); pass a "
                             f"best_model.pt or final_model.pt written by `emotune train`")
    return obj


def load_model(path: str | Path, device="cpu"):
    """-> (model in eval mode, TrainConfig, class names, saved metrics)."""
    return model_from_blob(load_file(path, MODEL_FORMAT), device)


def model_from_blob(blob: dict, device="cpu"):
    """A model_blob dict -> (model in eval mode, TrainConfig, class names, saved metrics)."""
    cfg = TrainConfig.from_dict(blob["config"])
    # pretrained/weights_path are irrelevant here: the state dict carries every weight.
    net = create_model(cfg.model, len(blob["class_names"]), in_channels=cfg.in_channels, dropout=cfg.dropout)
    net.load_state_dict(blob["state_dict"])
    return net.to(device).eval(), cfg, blob["class_names"], blob.get("metrics", {})

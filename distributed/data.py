"""Datasets: decode once into numpy, split, and augment batches on the device.

`decode_data(data)` turns a `kind:PATH` string into `Decoded` uint8 arrays. The driver decodes it once and
puts it in Ray's object store, so every worker on a node maps the same memory instead of decoding again.
`make_splits` carves the stratified validation set from train on each worker as index arrays (cheap, seeded,
identical everywhere, and no copy of the images). Augmentation runs on whole batches on the training device, so
a GPU is never waiting on a per-image CPU pipeline.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from torchvision.transforms import v2

from distributed import storage

PROGRESS_FROM = 5000  # decodes of at least this many images report their progress
FER2013_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


class DataError(ValueError):
    """Bad data or data spec from the user: one line naming the problem and the fix. The CLI exits 2."""


@dataclass
class Decoded:
    """Everything decoded once, before any split. Plain numpy so Ray's object store shares it zero-copy."""

    train_x: np.ndarray  # uint8 [N, C, S, S]
    train_y: np.ndarray  # int64 [N], index into class_names
    test_x: np.ndarray  # uint8 [M, C, S, S]
    test_y: np.ndarray  # int64 [M]
    class_names: list[str]
    test_groups: np.ndarray | None = None  # str [M], e.g. FER2013 PublicTest/PrivateTest, else None
    train_names: list[str] | None = None  # imagefolder: each training image's path under the folder (manifest's path)
    train_groups: np.ndarray | None = None  # str [N]: who each training image shows (cfg.group_by), else None


@dataclass
class Splits:
    """Train and validation as indices into the decoded training images `x` (shared, never copied); labels `y`
    re-indexed to class_names. The test split is its own (small) arrays. With cfg.val_from the validation images
    are a group of the test split instead (`val_images`), and val_idx is empty."""
    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    test_groups: np.ndarray | None = None
    val_images: tuple[np.ndarray, np.ndarray] | None = None  # (x, y) taken from the test split (val_from)

    @property
    def train_y(self) -> np.ndarray:
        return self.y[self.train_idx]

    @property
    def train_x(self) -> np.ndarray:  # a copy: for inspection, not for the loop
        return self.x[self.train_idx]

    @property
    def val_x(self) -> np.ndarray:
        return self.val_images[0] if self.val_images is not None else self.x[self.val_idx]

    @property
    def val_y(self) -> np.ndarray:
        return self.val_images[1] if self.val_images is not None else self.y[self.val_idx]


# -- synthetic faces --------------------------------------------------------------------------------------

# Per-class expression prototypes, jittered per sample. Neighbouring expressions share cues on purpose
# (angry/disgust: low frowning brows; fear/surprise: wide eyes, raised brows; sad/disgust: drooping mouth),
# so a CNN has to combine cues and the task is learnable but not solved at epoch 1.
#              eye_open brow_gap brow_slope mouth_curve mouth_open mouth_width
_EXPRESSIONS = {
    "angry":    (0.60, 0.11, -0.30, -0.03, 0.00, 0.19),
    "disgust":  (0.65, 0.12, -0.18, -0.08, 0.03, 0.21),
    "fear":     (1.30, 0.21, 0.25, -0.03, 0.07, 0.27),
    "happy":    (0.80, 0.16, 0.00, 0.10, 0.04, 0.29),
    "sad":      (0.80, 0.16, 0.28, -0.08, 0.00, 0.20),
    "surprise": (1.40, 0.23, 0.05, 0.00, 0.13, 0.17),
    "neutral":  (1.00, 0.15, 0.00, 0.00, 0.00, 0.22),
}
_JITTER = np.array([0.20, 0.03, 0.14, 0.045, 0.035, 0.035], dtype=np.float32)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Antialiased inside-mask from a signed distance (positive inside), ~`edge` wide ramp."""
    return np.clip(0.5 + d / edge, 0.0, 1.0)


def _draw_faces(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one grey face per label, all at once: every per-sample parameter is an [N, 1, 1] array."""
    n = len(labels)
    f32 = np.float32

    def uniform(low, high):
        return rng.uniform(low, high, (n, 1, 1)).astype(f32)

    def normal(std):
        return (rng.standard_normal((n, 1, 1)) * std).astype(f32)

    proto = np.array([_EXPRESSIONS[name] for name in FER2013_CLASSES], dtype=f32)[labels]  # [N, 6]
    p = proto + rng.standard_normal(proto.shape).astype(f32) * _JITTER
    eye_open, brow_gap, brow_slope, curve, mouth_open, mouth_w = (p[:, i, None, None] for i in range(6))
    eye_open, mouth_open, mouth_w = np.maximum(eye_open, 0.2), np.maximum(mouth_open, 0.0), np.maximum(mouth_w, 0.1)

    # Pixel centres in [-1, 1], then into each face's own frame (inverse pose: shift, rotate, scale).
    c = (np.arange(size, dtype=f32) + 0.5) / size * 2 - 1
    gx, gy = c[None, None, :], c[None, :, None]
    angle, scale = normal(np.deg2rad(8)), uniform(0.85, 1.1)
    dx, dy = normal(0.06), normal(0.06)
    cos, sin = np.cos(angle), np.sin(angle)
    x = ((gx - dx) * cos + (gy - dy) * sin) / scale
    y = (-(gx - dx) * sin + (gy - dy) * cos) / scale
    ax = np.abs(x)  # faces are mirror-symmetric: draw the right eye/brow and get the left for free
    edge = 2.0 / size

    rx, ry = uniform(0.56, 0.68), uniform(0.74, 0.86)
    face = _soft((1 - np.sqrt((x / rx) ** 2 + ((y - 0.02) / ry) ** 2)) * 0.6, edge)

    eye_x, eye_y, eye_w = uniform(0.26, 0.32), uniform(-0.22, -0.14), uniform(0.11, 0.15)
    eye_h = 0.075 * eye_open
    eye = _soft((1 - np.sqrt(((ax - eye_x) / eye_w) ** 2 + ((y - eye_y) / eye_h) ** 2)) * eye_h, edge)

    # Brow: a thick segment above the eye; slope > 0 lifts the inner end (sad, fear), < 0 lowers it (angry).
    brow_y = eye_y - eye_h - brow_gap + brow_slope * (ax - eye_x)
    brow = _soft(np.minimum(0.035 - np.abs(y - brow_y), 0.15 - np.abs(ax - eye_x)), edge)

    # Mouth: a parabola (curve > 0 lifts the corners: smile) thickened in the middle by the opening.
    mouth_y = uniform(0.38, 0.46)
    t = 1 - (x / mouth_w) ** 2
    mid = mouth_y - curve * (1 - t)
    lips = _soft(np.minimum(0.03 + mouth_open * np.clip(t, 0, 1) - np.abs(y - mid), 0.4 * mouth_w * t), edge)
    inside = _soft(np.minimum(mouth_open * np.clip(t, 0, 1) - 0.01 - np.abs(y - mid), 0.4 * mouth_w * t), edge)

    skin, bg = uniform(0.55, 0.8), uniform(0.1, 0.5)
    img = bg + (skin - bg) * face
    img = img + (uniform(0.1, 0.3) - img) * np.maximum(eye, brow)
    img = img + (skin * 0.45 - img) * lips
    img = img + (uniform(0.0, 0.12) - img) * inside

    # Nuisances a real camera adds: a lighting gradient, contrast/brightness and sensor noise.
    light = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(f32)
    img = img + uniform(0.0, 0.25) * (np.cos(light) * gx + np.sin(light) * gy)
    img = (img - 0.5) * uniform(0.6, 1.2) + 0.5 + normal(0.06)
    img = img + rng.standard_normal(img.shape, dtype=f32) * uniform(0.01, 0.07)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def load_synthetic(path: str, in_channels: int, size: int, seed: int) -> Decoded:
    """Procedural 7-expression faces (300/class train, 100/class test); needs no files, so it is the default."""
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)  # independent streams for train and test
    k = len(FER2013_CLASSES)
    train_y, test_y = np.repeat(np.arange(k), 300), np.repeat(np.arange(k), 100)
    # Drawn at 48 px like FER2013 and resized after: the same faces at every size, and drawing at 224 px
    # would need GBs of float temporaries.
    train_x = _draw_faces(train_y, 48, np.random.default_rng(train_seq))
    test_x = _draw_faces(test_y, 48, np.random.default_rng(test_seq))
    return Decoded(_fit(train_x, in_channels, size), train_y.astype(np.int64), _fit(test_x, in_channels, size),
                test_y.astype(np.int64), list(FER2013_CLASSES))


# -- decoding files -----------------------------------------------------------------------------------------

def _decode(source, mode: str, size: int) -> np.ndarray | str:
    """Decode a file path or encoded bytes to uint8 [C, size, size]; on failure return the reason instead."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    # Any decoder failure (truncated, not an image, bad header, missing bytes) means "unreadable": the caller
    # counts and skips it, because a few bad files in a 30k-image scrape should not kill a run.
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_all(sources: list, names: list[str], in_channels: int, size: int, where: str):
    """Decode in threads; skip unreadable items with one warning.

    PIL's codecs release the GIL, so threads pay off on real photos (1.6x on 2 cores for 256px JPEGs); on
    tiny 48px PNGs Python overhead dominates and they roughly break even. Chunks keep the per-task cost low.
    Returns (images uint8 [n, C, S, S], kept: bool [len(sources)]).
    """
    mode = "L" if in_channels == 1 else "RGB"
    chunks = [sources[i:i + 256] for i in range(0, len(sources), 256)]
    decoded = []
    # A long decode (FER2013: 35,887 images, a minute on 2 cores) says how far it is, on stderr, every ~10%.
    step = math.ceil(len(chunks) / 10) if len(sources) >= PROGRESS_FROM else 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, chunk in enumerate(pool.map(lambda c: [_decode(s, mode, size) for s in c], chunks), 1):
            decoded += chunk
            if step and (i % step == 0 or i == len(chunks)):
                print(f"decoding {where}: {len(decoded):,}/{len(sources):,} images", file=sys.stderr, flush=True)
    kept = np.array([not isinstance(d, str) for d in decoded], dtype=bool)
    bad = [f"{name}: {d}" for name, d in zip(names, decoded) if isinstance(d, str)]
    images = [d for d in decoded if not isinstance(d, str)]
    out = np.stack(images) if images else np.zeros((0, in_channels, size, size), np.uint8)
    return out, Kept(kept, bad)


def read_images(paths: list[str], in_channels: int = 1, size: int = 48) -> np.ndarray:
    """Decode files for prediction exactly as training data was decoded: uint8 [N, C, size, size].

    Unlike a dataset, an unreadable file here is an error: the user named it and expects an answer for it.
    """
    mode = "L" if in_channels == 1 else "RGB"
    out = []
    for path in paths:
        decoded = _decode(str(path), mode, size)
        if isinstance(decoded, str):
            raise DataError(f"{path}: cannot read this image ({decoded}); pass PNG/JPEG files")
        out.append(decoded)
    return np.stack(out) if out else np.zeros((0, in_channels, size, size), np.uint8)


def _fit(grey: np.ndarray, in_channels: int, size: int) -> np.ndarray:
    """uint8 [N, S0, S0] grey -> [N, C, size, size]: PIL bilinear resize (as for files), grey replicated for RGB."""
    if grey.shape[-1] != size:
        grey = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey])
    return np.ascontiguousarray(np.repeat(grey[:, None], in_channels, axis=1))


def _labels_to_ids(labels: list[str], class_names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[name] for name in labels], dtype=np.int64)


@dataclass
class Kept:
    """Which decoded items were readable, and why the others were not."""
    mask: np.ndarray  # bool [n]
    problems: list[str]

    def __iter__(self):
        return iter(self.mask)


def _keep_readable(labels: list[str], kept: Kept, where: str) -> list[str]:
    """Labels of the decoded items; a class whose every image was unreadable is an error, not a silent gap. A few
    unreadable files among good ones are skipped with one warning (after the error check: an error says it all)."""
    readable = [label for label, ok in zip(labels, kept.mask) if ok]
    lost = sorted(set(labels) - set(readable))
    if lost:
        raise DataError(f"{where}: class {lost[0]!r} has no readable images; replace its files or remove the class")
    if kept.problems:
        warnings.warn(f"skipped {len(kept.problems)} unreadable files in {where} (e.g. {kept.problems[0]})",
                      stacklevel=3)
    return readable


def load_imagefolder(path: str, in_channels: int, size: int, seed: int) -> Decoded:
    """PATH/train/<class>/* and PATH/test/<class>/*, any image size or mode."""
    if storage.is_uri(path):
        root, splits = path.rstrip("/"), _listed_imagefolder(path.rstrip("/"))
    else:
        root, splits = Path(path), _local_imagefolder(Path(path))
    _check_imagefolder_classes(root, splits)
    arrays, names = [], []
    for split in ("train", "test"):
        _, files, labels = splits[split]
        where = f"{root}/{split}"
        sources = _read_all(files) if storage.is_uri(path) else [str(f) for f in files]
        x, kept = _decode_all(sources, [str(f).rsplit("/", 1)[-1] for f in files], in_channels, size, where)
        arrays += [x, _labels_to_ids(_keep_readable(labels, kept, where), class_names=splits["train"][0])]
        # paths relative to the root, as a manifest.csv beside the folder names them (group_by)
        names.append([str(f)[len(str(root)) + 1:] for f, ok in zip(files, kept) if ok])
    return Decoded(*arrays, class_names=splits["train"][0], train_names=names[0])


def _read_all(locations: list[str]) -> list[bytes]:
    """Object-store files, fetched in threads (each read waits on the network, not the CPU)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(storage.read_bytes, locations))


def _listed_imagefolder(root: str) -> dict:
    """An imagefolder on s3:// or gs://: one listing of every key under root."""
    if not storage.is_dir(root):
        raise DataError(f"imagefolder:{root}: nothing there; pass a location holding train/<class>/ and test/<class>/")
    found: dict = {}
    for rel in storage.list_files(root):
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] in ("train", "test") and not parts[2].startswith("."):
            found.setdefault(parts[0], {}).setdefault(parts[1], []).append(storage.join(root, rel))
    splits = {}
    for split in ("train", "test"):
        if split not in found:
            raise DataError(f"{root}/{split}: missing; an imagefolder needs {split}/<class>/<images> under {root}")
        classes = sorted(found[split])
        files = [f for c in classes for f in sorted(found[split][c])]
        labels = [c for c in classes for _ in found[split][c]]
        splits[split] = (classes, files, labels)
    return splits


def _local_imagefolder(root: Path) -> dict:
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: no such directory; pass a folder holding train/<class>/ "
                        "and test/<class>/")
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; an imagefolder needs {split}/<class>/<images> under {root}")
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"{folder}: no class folders; put images in {folder}/<class_name>/")
        files, labels = [], []
        for name in classes:
            found = sorted(f for f in (folder / name).iterdir() if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"{folder / name}: empty class folder; add images or delete the folder")
            files += found
            labels += [name] * len(found)
        splits[split] = (classes, files, labels)
    return splits


def _check_imagefolder_classes(root, splits: dict) -> None:
    class_names = splits["train"][0]
    extra = sorted(set(splits["test"][0]) - set(class_names))
    if extra:
        raise DataError(f"{root}/test: classes {', '.join(extra)} are not in train/; add them there "
                        "or remove them from test/")
    if len(class_names) < 2:
        raise DataError(f"{root}/train: only one class ({class_names[0]!r}); a classifier needs at least "
                        "2 class folders")


# -- parquet ------------------------------------------------------------------------------------------------

def _read_parquet(file: str, need_usage: bool) -> dict:
    """Read the image, label (and usage) columns with pyarrow (local or object store); check the columns before
    reading any data."""
    fs, inner = storage.filesystem(file)
    try:
        columns = pq.read_schema(inner, filesystem=fs).names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file}: not a readable parquet file ({str(exc).splitlines()[0]}); check the file") from None
    for name in ("image", "label") + (("usage",) if need_usage else ()):
        if name not in columns:
            hint = "rows with usage 'Training' go to train, the rest to test" if name == "usage" else \
                "image holds encoded image bytes, label the class name"
            raise DataError(f"{file}: no {name!r} column (columns: {', '.join(columns)}); {hint}")
    wanted = ["image", "label"] + (["usage"] if "usage" in columns else [])
    table = pq.read_table(inner, columns=wanted, filesystem=fs)
    out = {name: table.column(name).to_pylist() for name in wanted}
    if any(label is None for label in out["label"]):
        raise DataError(f"{file}: {out['label'].count(None)} rows have no label; fill in or drop those rows")
    out["label"] = [str(label) for label in out["label"]]
    out["row"] = list(range(len(table)))  # for naming unreadable rows after the usage filter
    return out


def load_parquet(path: str, in_channels: int, size: int, seed: int) -> Decoded:
    """A .parquet file with a usage column, or a directory with train.parquet and test.parquet."""
    where = path.rstrip("/")
    if storage.is_dir(where):
        files = storage.join(where, "train.parquet"), storage.join(where, "test.parquet")
        for file in files:
            if not storage.is_file(file):
                raise DataError(f"{where}: no {storage.name(file)}; a parquet directory needs train.parquet and "
                                f"test.parquet")
        train, test = _read_parquet(files[0], need_usage=False), _read_parquet(files[1], need_usage=False)
        train_at, test_at = str(files[0]), str(files[1])
    elif storage.is_file(where):
        rows = _read_parquet(where, need_usage=True)
        is_train = [usage == "Training" for usage in rows["usage"]]
        train, test = ({k: [v for v, t in zip(col, is_train) if t == keep] for k, col in rows.items()}
                       for keep in (True, False))
        if not train["label"] or not test["label"]:
            missing = "Training" if not train["label"] else "non-Training (e.g. PublicTest)"
            raise DataError(f"{where}: no rows with usage {missing}; the single-file form splits train/test by usage")
        train_at, test_at = f"{where} (usage Training)", f"{where} (usage != Training)"
    else:
        raise DataError(f"parquet:{path}: no such file or directory; pass a .parquet file or a folder with "
                        "train.parquet and test.parquet")

    class_names = sorted(set(train["label"]))  # sorted, like imagefolder, so both forms of a dataset agree
    extra = sorted(set(test["label"]) - set(class_names))
    if extra:
        raise DataError(f"{test_at}: labels {', '.join(extra)} never occur in train; fix the labels "
                        "or add training rows")
    if len(class_names) < 2:
        raise DataError(f"{train_at}: only one label ({class_names[0]!r}); a classifier needs at least 2 classes")

    arrays, kept = [], None
    for rows, at in ((train, train_at), (test, test_at)):
        names = [f"row {i}" for i in rows["row"]]
        x, kept = _decode_all(rows["image"], names, in_channels, size, at)
        arrays += [x, _labels_to_ids(_keep_readable(rows["label"], kept, at), class_names)]
    groups = None
    if "usage" in test:  # kept is the test split's mask here
        groups = np.array([str(u) for u, ok in zip(test["usage"], kept) if ok], dtype=str)
    return Decoded(*arrays, class_names=class_names, test_groups=groups)


# -- the original Kaggle fer2013.csv -------------------------------------------------------------------------

def load_fer2013_csv(path: str, in_channels: int, size: int, seed: int) -> Decoded:
    """Kaggle's fer2013.csv: emotion (0-6), pixels (2304 space-separated ints), Usage."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"fer2013_csv:{path}: no such file; pass the Kaggle fer2013.csv (emotion,pixels,Usage)")
    pixels, emotions, usages = [], [], []
    with open(file, newline="") as f, warnings.catch_warnings():
        # np.fromstring only warns on a malformed number and returns what it parsed; the count check reports it
        warnings.simplefilter("ignore", DeprecationWarning)
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
        if missing:
            raise DataError(f"{file}: no {missing[0]!r} column (header: {','.join(header)}); "
                            "expected Kaggle's emotion,pixels,Usage")
        at_e, at_p, at_u = header.index("emotion"), header.index("pixels"), header.index("Usage")
        for row_no, row in enumerate(reader, start=1):
            if not row:
                continue
            where = f"{file}: row {row_no} (line {reader.line_num})"
            if len(row) < len(header):
                raise DataError(f"{where} has {len(row)} fields, expected {len(header)}; fix or drop that row")
            values = np.fromstring(row[at_p], dtype=np.int32, sep=" ")
            if values.size != 48 * 48:
                raise DataError(f"{where} has {values.size} pixel values, expected 2304 (48x48); fix or drop that row")
            if values.min() < 0 or values.max() > 255:
                raise DataError(f"{where} has pixel values outside 0..255; fix or drop that row")
            if row[at_e].strip() not in {"0", "1", "2", "3", "4", "5", "6"}:
                raise DataError(f"{where} has emotion {row[at_e]!r}, expected 0..6; fix or drop that row")
            pixels.append(values.astype(np.uint8))
            emotions.append(int(row[at_e]))
            usages.append(row[at_u].strip())
    is_train = np.array([u == "Training" for u in usages], dtype=bool)
    if not is_train.any() or is_train.all():
        raise DataError(f"{file}: Usage must hold both Training and test rows (PublicTest/PrivateTest)")
    x = _fit(np.stack(pixels).reshape(-1, 48, 48), in_channels, size)
    y = np.array(emotions, dtype=np.int64)
    return Decoded(x[is_train], y[is_train], x[~is_train], y[~is_train], list(FER2013_CLASSES),
                test_groups=np.array(usages, dtype=str)[~is_train])


DATASETS: dict[str, Callable[[str, int, int, int], Decoded]] = {
    "synthetic": load_synthetic,
    "imagefolder": load_imagefolder,
    "parquet": load_parquet,
    "fer2013_csv": load_fer2013_csv,
}


def load_data(cfg) -> Decoded:
    """The data a TrainConfig names, decoded (the one place that reads the fields in config.DECODE_FIELDS)."""
    decoded = decode_data(cfg.data, in_channels=cfg.in_channels, size=cfg.data_size, seed=cfg.seed)
    if cfg.group_by:
        decoded.train_groups = read_groups(decoded, cfg.group_by, cfg.data)
    return decoded


def decode_data(data: str = "synthetic", in_channels: int = 1, size: int = 48, seed: int = 0) -> Decoded:
    """`kind` or `kind:PATH` -> Decoded. `seed` only matters for generated data."""
    kind, _, path = data.partition(":")
    try:
        loader = DATASETS[kind]
    except KeyError:
        raise DataError(f"unknown data kind {kind!r} in data={data!r}; choose from "
                        f"{', '.join(k if k == 'synthetic' else k + ':PATH' for k in DATASETS)}") from None
    if kind != "synthetic" and not path:
        raise DataError(f"data={data!r}: {kind} needs a path, e.g. {kind}:/data/fer2013")
    if in_channels not in (1, 3):
        raise DataError(f"in_channels={in_channels}: use 1 (grayscale) or 3 (RGB)")
    return loader(path if storage.is_uri(path) else os.path.expanduser(path), in_channels, size, seed)


# -- groups: who each training image shows --------------------------------------------------------------------

def read_groups(decoded: Decoded, group_by: str, data: str) -> np.ndarray:
    """cfg.group_by -> one group name per training image. `re:REGEX` is searched in the file name and its first
    capture group (or the whole match) names the group; any other value is a column of the manifest.csv beside
    the imagefolder, matched on the image's path under the folder (the manifest's `path` column)."""
    kind, _, root = data.partition(":")
    names = decoded.train_names
    if names is None:
        raise DataError(f"group_by={group_by!r}: groups come from file names or a manifest.csv, which only "
                        f"imagefolder data has ({kind} given); remove group_by or use imagefolder:PATH")
    if group_by.startswith("re:"):
        try:
            pattern = re.compile(group_by[3:])
        except re.error as exc:
            raise DataError(f"group_by={group_by!r}: not a regular expression ({exc}); fix the pattern") from None
        found = [pattern.search(Path(n).name) for n in names]
        groups = [(m.group(1) if pattern.groups else m.group(0)) if m else None for m in found]
        missing = [n for n, g in zip(names, groups) if not g]
        if missing:
            what = "none" if len(missing) == len(names) else f"{len(missing)}"
            raise DataError(f"group_by={group_by!r} matches {what} of the {len(names)} training file names "
                            f"(e.g. not {Path(missing[0]).name!r}); every image needs a group: fix the pattern")
    else:
        manifest = storage.join(root if storage.is_uri(root) else os.path.expanduser(root), "manifest.csv")
        if not storage.is_file(manifest):
            raise DataError(f"group_by={group_by!r}: no {manifest} to read that column from; add one (columns path,"
                            f"{group_by}) or group by file name with group_by: 're:REGEX'")
        reader = csv.DictReader(io.StringIO(storage.read_text(manifest), newline=""))
        columns = reader.fieldnames or []
        for column in ("path", group_by):
            if column not in columns:
                raise DataError(f"{manifest}: no {column!r} column (columns: {', '.join(columns)}); "
                                f"set group_by to one of them, or to 're:REGEX' on file names")
        table = {row["path"]: row[group_by] for row in reader}
        groups = [table.get(n) for n in names]
        missing = [n for n, g in zip(names, groups) if not g]
        if missing:
            raise DataError(f"{manifest}: {len(missing)} training images have no {group_by!r} (e.g. {missing[0]}); "
                            f"add their rows (path relative to the folder)")
    return np.array(groups, dtype=str)


# -- splits -------------------------------------------------------------------------------------------------

def make_splits(decoded: Decoded, cfg, fold: int = 0) -> Splits:
    """Keep cfg.classes (re-indexed in that order), choose the validation set, cap train at cfg.train_limit. The
    images are not copied: train and validation are index arrays.

    Validation is, by precedence: the test group cfg.val_from (FER2013's PublicTest; the test split keeps the
    rest), fold `fold` of cfg.cv_folds, or a stratified val_fraction of train. With cfg.group_by no group (person)
    is on both sides (scikit-learn's StratifiedGroupKFold; for one split, its first of round(1/val_fraction)
    folds). Every choice is seeded, so every worker and every trial computes the same split.
    The test set is never touched otherwise, so every trial of a search is scored on the same images.
    """
    y, test_x, test_y, test_groups = decoded.train_y, decoded.test_x, decoded.test_y, decoded.test_groups
    names, classes = list(decoded.class_names), list(cfg.classes)
    candidates = np.arange(len(y))
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise DataError(f"classes: unknown class {unknown[0]!r}; available: {', '.join(names)}")
        if len(set(classes)) != len(classes):
            raise DataError(f"classes: {classes} names a class twice; list each once")
        remap = np.full(len(names), -1, dtype=np.int64)
        remap[[names.index(c) for c in classes]] = np.arange(len(classes))
        keep_test = remap[test_y] >= 0
        y = remap[y]
        candidates = np.flatnonzero(y >= 0)
        test_x, test_y = test_x[keep_test], remap[test_y[keep_test]]
        test_groups = test_groups[keep_test] if test_groups is not None else None
        names = classes
    if len(names) < 2:
        raise DataError(f"classes: {names} leaves fewer than 2 classes; keep at least 2")

    val_images = None
    try:
        if cfg.val_from:
            train_idx, val_idx = candidates, candidates[:0]
            test_x, test_y, test_groups, val_images = split_test(test_x, test_y, test_groups, cfg)
        else:
            groups = decoded.train_groups if cfg.group_by else None
            train_idx, val_idx = validation_split(candidates, y[candidates], groups, names, cfg, fold)
        if 0 < cfg.train_limit < len(train_idx):
            train_idx, _ = train_test_split(train_idx, train_size=cfg.train_limit, stratify=y[train_idx],
                                            random_state=cfg.seed)
    except ValueError as exc:  # sklearn: a class too small to stratify, or a split smaller than the class count
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0]
        raise DataError(f"cannot split {len(candidates)} training images {np.bincount(y[candidates]).tolist()} "
                        f"stratified (val_fraction={cfg.val_fraction}, cv_folds={cfg.cv_folds}, "
                        f"train_limit={cfg.train_limit}): {reason}") from None
    return Splits(decoded.train_x, y, train_idx, val_idx, test_x, test_y, names, test_groups, val_images)


def validation_split(candidates: np.ndarray, y: np.ndarray, groups: np.ndarray | None, names: list[str], cfg,
                     fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions in `candidates`: fold `fold` of cfg.cv_folds, or one val_fraction split;
    grouped when `groups` is given (one entry per training image, indexed like the decoded arrays)."""
    if groups is None:
        if not cfg.cv_folds:
            return tuple(train_test_split(candidates, test_size=cfg.val_fraction, stratify=y, random_state=cfg.seed))
        folds = StratifiedKFold(cfg.cv_folds, shuffle=True, random_state=cfg.seed).split(candidates, y)
    else:
        groups = groups[candidates]
        lonely = [names[c] for c in range(len(names)) if len(set(groups[y == c])) < 2]
        if lonely:
            raise DataError(f"group_by={cfg.group_by!r} leaves class {lonely[0]!r} with fewer than 2 groups, so it "
                            f"cannot be on both sides of the validation split; add people to it or drop it (classes)")
        k = cfg.cv_folds or max(2, round(1 / cfg.val_fraction))
        if len(set(groups)) < k:
            raise DataError(f"group_by={cfg.group_by!r} finds {len(set(groups))} groups, too few for {k} folds; "
                            f"lower cv_folds or raise val_fraction")
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": a fold may lack it
            warnings.simplefilter("ignore", UserWarning)
            folds = list(StratifiedGroupKFold(k, shuffle=True, random_state=cfg.seed).split(candidates, y, groups))
    train_pos, val_pos = list(folds)[fold]
    return candidates[train_pos], candidates[val_pos]


def split_test(test_x, test_y, test_groups, cfg):
    """cfg.val_from: validation is that group of the test split (FER2013's PublicTest), the test report the rest."""
    present = sorted(set(test_groups.tolist())) if test_groups is not None else []
    if cfg.val_from not in present:
        raise DataError(f"val_from={cfg.val_from!r}: the test split has groups {present or 'none (no usage column)'}; "
                        f"use one of them, or leave val_from empty to carve validation from train")
    if cfg.cv_folds or cfg.group_by:
        raise DataError(f"val_from={cfg.val_from!r} fixes the validation set, so cv_folds and group_by have "
                        f"nothing to split; set one or the other")
    val = test_groups == cfg.val_from
    return test_x[~val], test_y[~val], test_groups[~val], (test_x[val], test_y[val])


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights, float32 [num_classes], averaging 1 over the classes present (absent: 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return (weights / weights[counts > 0].mean()).astype(np.float32)


# -- batch augmentation on the device -----------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip + affine, brightness/contrast and erasing, drawn per sample, applied to the whole batch.

    x: float [B, C, H, W] in [0, 1] on any device. The random numbers come from `generator` (on its own
    device, CPU by default) and are moved to x's device, so a seeded run augments identically on CPU and GPU.
    """
    b, c, h, w = x.shape
    r = torch.rand(b, 12, generator=generator, device=generator.device if generator else "cpu").to(x.device)
    out = x.float()

    # Flip and affine in one resample. affine_grid maps output to input coordinates in [-1, 1].
    flip = torch.where(r[:, 0] < 0.5, -1.0, 1.0)
    angle = (r[:, 1] * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * r[:, 2]
    shift = (r[:, 3:5] * 2 - 1) * 0.16  # +-8% of the side: the grid spans 2 units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    # border padding: a black wedge in the corner would be an artifact the model could learn
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness = (0.8 + 0.4 * r[:, 5]).view(b, 1, 1, 1)
    contrast = (0.8 + 0.4 * r[:, 6]).view(b, 1, 1, 1)
    out = out * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp(0, 1)

    # Random erasing: one rectangle (2-20% of the area, aspect 0.3-3.3) in a quarter of the samples,
    # built as broadcast row/column masks; filled with the image's mean grey so it adds no new intensity cue.
    area = 0.02 + 0.18 * r[:, 8]
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * r[:, 9])
    eh = (torch.sqrt(area * ratio) * h).clamp(max=h)
    ew = (torch.sqrt(area / ratio) * w).clamp(max=w)
    top, left = r[:, 10] * (h - eh), r[:, 11] * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    in_rows = (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
    in_cols = (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
    erase = (in_rows & in_cols & (r[:, 7] < 0.25).view(b, 1, 1)).unsqueeze(1)
    out = torch.where(erase, mean.clamp(0, 1), out)
    return out.to(x.dtype)


def mix_transform(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """(x, y) -> (x_mixed, y_soft [B, num_classes]) via torchvision's MixUp/CutMix; None when both are off."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

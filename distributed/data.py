"""Datasets: DATASETS = {kind: loader}; decode once into numpy; who each training image shows (groups).

`decode_data(data)` turns a `kind:PATH` string into `Decoded` uint8 arrays. The driver decodes it once and
puts it in Ray's object store, so every worker on a node maps the same memory instead of decoding again.
splits.py carves validation from it as index arrays; augment.py works on batches on the training device.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from distributed import storage
from distributed.config import check_field
from distributed.errors import DataError
from distributed.groups import read_groups
from distributed.synthetic import draw_dataset

PROGRESS_FROM = 5000  # decodes of at least this many images report their progress
FER2013_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


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


# -- synthetic faces (drawn in synthetic.py) -------------------------------------------------------------

def load_synthetic(path: str, in_channels: int, size: int, seed: int) -> Decoded:
    """Procedural 7-expression faces (300/class train, 100/class test); needs no files, so it is the default."""
    train_x, train_y, test_x, test_y = draw_dataset(seed)
    return Decoded(_fit(train_x, in_channels, size), train_y, _fit(test_x, in_channels, size), test_y,
                   list(FER2013_CLASSES))


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
            if len(pixels) % PROGRESS_FROM == 0:  # Kaggle's file: 35,887 rows, no count before the end
                print(f"decoding {file}: {len(pixels):,} rows", file=sys.stderr, flush=True)
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
        decoded.train_groups = read_groups(decoded.train_names, cfg.group_by, cfg.data)
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
    check_field("in_channels", in_channels, "in_channels")  # the knob's rule: 1 or 3
    return loader(path if storage.is_uri(path) else os.path.expanduser(path), in_channels, size, seed)

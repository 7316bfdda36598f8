"""Splits of the decoded data: validation carved from train (stratified, seeded, by group when asked, k-fold) or
taken from a test group (FER2013's PublicTest), as index arrays into the shared images; class weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from distributed.data import DataError, Decoded

REFIT_DRAW = 7919  # added to the seed of a refit run's train_limit draw (see make_splits)


@dataclass
class Splits:
    """Train and validation as indices into the decoded training images `x` (shared, never copied; `val_x` gathers
    a copy of the validation images); labels `y` re-indexed to class_names. The test split is its own (small)
    arrays. With cfg.val_from the validation images are a group of the test split instead (`val_images`), and
    val_idx is empty."""
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


def make_splits(decoded: Decoded, cfg, fold: int = 0) -> Splits:
    """Keep cfg.classes (re-indexed in that order), choose the validation set, cap train at cfg.train_limit. The
    images are not copied: train and validation are index arrays (`val_x` then gathers the validation images).

    Validation is, by precedence: the test group cfg.val_from (FER2013's PublicTest; the test split keeps the
    rest), fold `fold` of cfg.cv_folds, or a stratified val_fraction of train, which cfg.refit trains on too.
    With cfg.group_by no group (person) is on both sides (scikit-learn's StratifiedGroupKFold; for one split, its
    first of round(1/val_fraction) folds). Every choice is seeded, so every worker and every trial computes the
    same split.
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
            if validation_trains(cfg):  # the split still scores each epoch (in-sample), but every image trains
                if cfg.cv_folds:
                    raise DataError(f"refit trains on every training image, so cv_folds={cfg.cv_folds} has no fold "
                                    f"to hold out; set one or the other")
                train_idx = candidates
        if 0 < cfg.train_limit < len(train_idx):
            # refit: another draw than the split's, whose seed would take exactly the images it left out
            train_idx, _ = train_test_split(train_idx, train_size=cfg.train_limit, stratify=y[train_idx],
                                            random_state=cfg.seed + (REFIT_DRAW if validation_trains(cfg) else 0))
    except ValueError as exc:  # sklearn: a class too small to stratify, or a split smaller than the class count
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0]
        raise DataError(f"cannot split {len(candidates)} training images {np.bincount(y[candidates]).tolist()} "
                        f"stratified (val_fraction={cfg.val_fraction}, cv_folds={cfg.cv_folds}, "
                        f"train_limit={cfg.train_limit}): {reason}") from None
    return Splits(decoded.train_x, y, train_idx, val_idx, test_x, test_y, names, test_groups, val_images)


def validation_trains(cfg) -> bool:
    """cfg.refit on a carved validation split: it trains on those images too, so its val_ figures choose nothing
    (the loop keeps the last epoch). A test group (val_from) is never trained on."""
    return bool(cfg.refit) and not cfg.val_from


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

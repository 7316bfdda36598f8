"""One flat TrainConfig: the single definition of every training knob.

The CLI, the worker loop, the search spaces and every saved result use this class. Unknown keys are an
error (with a "did you mean"), types are checked and values range-checked, so a typo never silently
trains the default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distributed.errors import ConfigError, ModelError, did_you_mean
from distributed.model_names import check_name


def knob(default, help: str, *, low=None, high=None, choices=None, low_open=False):
    """A config field with its doc, range ([low, high], or (low, high] with low_open) and allowed values."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "low_open": low_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


FREEZE_MODES = ("none", "frozen", "progressive")
BALANCE_MODES = ("none", "loss", "sampler")
SCHEDULES = ("onecycle", "cosine", "constant", "wsd")
TTA_MODES = ("none", "flip", "tencrop")
# Every metric a run reports and which direction is better: the loop's best epoch, the search's mode, ASHA and the
# leaderboard all read this one map.
METRIC_MODES = {"val_acc": "max", "val_macro_f1": "max", "val_loss": "min"}
METRICS = tuple(METRIC_MODES)
# Beside a checkpoint's state.pt: the epochs' reports up to it as plain JSON, which results.read_trials reads (no
# torch) where a trial's result.json in a bucket lacks epochs (a driver killed before uploading it).
HISTORY_FILE = "history.json"
# Fields that decide what the decoded data holds: the launcher decodes once and shares the result with every trial
# only when none of these is searched.
DECODE_FIELDS = ("data", "in_channels", "data_size", "seed", "group_by")

# Trial drivers run only on nodes declaring this resource (the non-spot head of a cluster file), so losing a spot
# worker never kills a driver. Plenty of slots: it says *where*, concurrency is planned elsewhere.
DRIVER_RESOURCE = "emotune_driver"
DRIVER_SLOTS = 1000


def better(metric: str, value: float, than: float | None) -> bool:
    """Whether `value` beats `than` (None: nothing yet) under the metric's direction."""
    if than is None:
        return True
    return value < than if METRIC_MODES[metric] == "min" else value > than


@dataclass
class Scaling:
    """How one training run is spread: `workers` DDP processes, each with these CPUs/GPUs (fractions allowed)."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        # Measured on an H200 (BENCHMARKS.md): NCCL refuses two DDP ranks on one device ("invalid usage").
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ConfigError(f"scaling: {self.workers} DDP workers with gpus_per_worker {self.gpus_per_worker:g} "
                              f"would put two ranks on one GPU, which NCCL refuses; use gpus_per_worker: 1 (one "
                              f"GPU per rank), or workers: 1 to pack several one-worker trials on a GPU")

    def worker_resources(self) -> dict:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass
class TrainConfig:
    # what to train on
    model: str = knob("small_cnn", "architecture name; `emotune list-models` lists them (default: the quick one)")
    data: str = knob("synthetic", "synthetic | imagefolder:PATH | parquet:PATH | fer2013_csv:PATH")
    classes: list = knob([], "subset of class names to keep (empty = all)")
    in_channels: int = knob(1, "1 = grayscale faces, 3 = RGB photos", choices=(1, 3))
    data_size: int = knob(48, "side in pixels that images are decoded and stored at", low=16, high=512)
    image_size: int = knob(0, "side the model sees; batches are resized on the device (0 = model's native)",
                           low=0, high=512)
    val_fraction: float = knob(0.15, "stratified validation split carved from train", low=0.01, high=0.5)
    train_limit: int = knob(0, "use at most this many training images, stratified (0 = all)", low=0)
    group_by: str = knob("", "keep each group (person) on one side of the validation split: a column of "
                         "manifest.csv beside an imagefolder (e.g. subject), or re:REGEX on the file name whose "
                         "first group names it (e.g. 're:^(S\\d+)_'); empty = images split one by one")
    cv_folds: int = knob(0, "k-fold cross-validation (by group when group_by is set): k models train side by side "
                         "and each epoch reports their mean (0 = one validation split)", low=0, high=20)
    val_from: str = knob("", "validate on this test group instead of carving from train (FER2013: PublicTest, so "
                         "the test report is PrivateTest); empty = carve val_fraction from train")
    refit: bool = knob(False, "train on the carved validation split too (a chosen config's final model: nothing "
                       "left to choose, so nothing held out); the last epoch's weights are the model and val_ figures "
                       "are on trained images. A search rejects it; with val_from nothing changes (that set is held out)")
    keep_last: bool = knob(False, "the model kept is the last epoch's, not the best validation epoch's, and nothing "
                           "stops early: for a config whose length is already decided (a final stage), where the "
                           "best of 40-80 epochs on ~100 validation faces is partly noise (BENCHMARKS.md 5); "
                           "validation still scores every epoch, held out. refit implies it")
    # optimisation
    epochs: int = knob(10, "training epochs", low=1, high=10_000)
    batch_size: int = knob(64, "per-worker batch size", low=1, high=4096)
    lr_head: float = knob(1e-3, "peak learning rate of the classifier head (AdamW)", low=0, high=10, low_open=True)
    # None (YAML null) = backbone_lr()'s rule; annotated float, which search_space.py reads to search it
    lr_backbone: float = knob(None, "peak learning rate of every other stage; unset (null): lr_head for a model "
                              "trained from scratch (one rate), 1e-4 for a body that starts from trained weights "
                              "(pretrained or weights_path)", low=0, high=10, low_open=True)
    weight_decay: float = knob(1e-4, "AdamW weight decay", low=0, high=1)
    schedule: str = knob("onecycle", "learning-rate schedule: onecycle, cosine (both stretch over the whole run), "
                                     "constant, or wsd (warm-up 1 epoch, stable, decay over the last fifth: before the "
                                     "decay, the rate does not depend on the run's length, so ASHA's rungs compare "
                                     "like with like)", choices=SCHEDULES)
    warmup_pct: float = knob(0.3, "OneCycle: fraction of steps spent warming up", low=0.01, high=0.9)
    grad_clip: float = knob(0.0, "clip the gradient norm to this (0 = off)", low=0)
    amp: bool = knob(True, "mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = knob(True, "channels_last memory format on CUDA (ignored on CPU; 1.7x for ResNet-50)")
    ema_decay: float = knob(0.0, "EMA of weights used for evaluation (0 = off)", low=0, high=0.99999)
    early_stop_patience: int = knob(0, "stop after this many epochs without improvement (0 = off)", low=0)
    monitor: str = knob("val_acc", "metric that picks the best epoch and drives early stopping", choices=METRICS)
    tta: str = knob("none", "test-time augmentation of the final test evaluation and of predict: none, flip "
                    "(mean with the mirror image) or tencrop (corners, centre and their mirrors)", choices=TTA_MODES)
    # regularisation
    dropout: float = knob(0.5, "dropout of the classifier head", low=0, high=0.95)
    mixup_alpha: float = knob(0.0, "MixUp Beta(alpha, alpha) (0 = off)", low=0, high=10)
    cutmix_alpha: float = knob(0.0, "CutMix Beta(alpha, alpha) (0 = off)", low=0, high=10)
    label_smoothing: float = knob(0.0, "cross-entropy label smoothing", low=0, high=0.5)
    augment: bool = knob(True, "flips, small affine, brightness/contrast, random erasing (on the device)")
    class_balance: str = knob("none", "counter class imbalance by weighted loss or sampler", choices=BALANCE_MODES)
    # distillation
    teacher: str = knob("", "a model or ensemble file (local path or URI) the loss also learns from: on every "
                        "augmented, mixed batch the network matches the teacher's mean class probabilities "
                        "(a final stage's distilled single model; empty = off)")
    teacher_weight: float = knob(0.5, "with a teacher: the share of the loss that matches it (KL divergence); the "
                                 "rest is the labels' cross-entropy (1 = the teacher alone)", low=0, high=1)
    # transfer learning
    pretrained: bool = knob(False, "start from torchvision's ImageNet weights")
    weights_path: str = knob("", "load backbone weights from this local file instead of downloading")
    freeze: str = knob("none", "none = fine-tune all; frozen = head only; progressive = unfreeze stage by stage",
                       choices=FREEZE_MODES)
    unfreeze_start: int = knob(10, "progressive: epoch (1-based) at which the first backbone stage unfreezes",
                               low=1, high=10_000)
    unfreeze_every: int = knob(10, "progressive: epochs between unfreezing further stages", low=1, high=10_000)
    # reproducibility
    seed: int = knob(0, "seeds the split, initialisation, sampling and augmentation", low=0)

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of TrainConfig keys, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, fields)}")
            kwargs[key] = check_value(fields[key], raw, f"{where}: {key}")
        if "model" in kwargs:
            check_model_name(kwargs["model"], f"{where}: model")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_yaml(path), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, pairs: list[str]) -> "TrainConfig":
        """Apply `--set key=value` strings (see parse_overrides)."""
        return TrainConfig.from_dict({**self.to_dict(), **parse_overrides(pairs)}, where="--set")

    def save(self, path: str | Path, header: str = "") -> None:
        write_config(path, self.to_dict(), header)

    def backbone_lr(self) -> float:
        """The peak learning rate of every stage but the head: lr_backbone when set; else lr_head for a network
        trained from scratch, whose random body a lower rate only slows (`emotune train`'s defaults: test accuracy
        0.349 with the body at 1e-4, 0.550 at 1e-3), and 1e-4 for trained weights, which a head's rate would wash
        out. The one home of this rule: the loop's optimizer takes its rates from here."""
        if self.lr_backbone is not None:
            return self.lr_backbone
        return PRETRAINED_LR_BACKBONE if self.pretrained or self.weights_path else self.lr_head


PRETRAINED_LR_BACKBONE = 1e-4  # the transfer-learning default of backbone_lr()


def check_model_name(name: str, where: str) -> None:
    try:
        check_name(name)  # model_names, not the registry in models.py: naming a model imports no torch
    except ModelError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` strings -> {key: value}, each checked as TrainConfig checks it. Values are parsed as YAML
    scalars (so `1e-4` is a number)."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set lr_head=3e-4")
        try:
            changes[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            changes[key.strip()] = text
    checked = TrainConfig.from_dict(changes, where="--set")
    return {key: getattr(checked, key) for key in changes}


def check_field(name: str, value, where: str):
    """One value of a TrainConfig field, checked as from_dict checks it: for code that takes a field's value
    outside a TrainConfig (decode_data), so each field's range lives only in its knob()."""
    return check_value(field_spec(name), value, where)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_spec(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}[name]


NUMBER_FIX = "write a plain number, e.g. 64, 0.5 or 3e-4"


def as_number(raw: Any, kind: type, where: str):
    """Coerce YAML scalars to int/float. PyYAML reads `1e-4` as a string, so numeric strings are accepted."""
    if isinstance(raw, bool):
        raise ConfigError(f"{where}: expected a number, got {raw!r}; {NUMBER_FIX}")
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {raw!r}; {NUMBER_FIX}") from None
    if not isinstance(raw, (int, float)) or math.isnan(raw) or math.isinf(raw):
        raise ConfigError(f"{where}: expected a finite number, got {raw!r}; {NUMBER_FIX}")
    if kind is int:
        if float(raw) != int(raw):
            raise ConfigError(f"{where}: expected a whole number, got {raw!r}; write it without a fraction, e.g. 64")
        return int(raw)
    return float(raw)


def check_value(f: dataclasses.Field, raw: Any, where: str):
    if raw is None and f.default is None:  # a knob whose unset value means "decided elsewhere" (lr_backbone)
        return None
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list}[f.type]
    if kind is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {raw!r}")
        value = raw
    elif kind is str:
        if not isinstance(raw, str):
            example = raw[0] if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str) else "..."
            raise ConfigError(f"{where}: expected one string, got {raw!r}; write it as {f.name}: {example}")
        value = raw
    elif kind is list:
        if isinstance(raw, str):
            raw = [s.strip() for s in raw.split(",") if s.strip()]
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise ConfigError(f"{where}: expected a list of names, got {raw!r}")
        value = list(raw)
    else:
        value = as_number(raw, kind, where)
    check_range(f, value, where)
    return value


def check_range(f: dataclasses.Field, value, where: str) -> None:
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        bound = f"> {low}" if meta.get("low_open") else f">= {low}"
        raise ConfigError(f"{where}: {value!r} is out of range; it must be {bound}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {value!r} is out of range; it must be <= {high}")


def read_yaml(path: str | Path) -> Any:
    """A YAML file from a local path or a URI (s3://, gs://), read through the storage layer."""
    from distributed import storage

    path = str(path)
    if not storage.is_file(path):
        raise ConfigError(storage.why_missing(path))
    try:
        data = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}; fix the file's syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected YAML") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; write YAML into it (see the shipped search_spaces/*.yaml)")
    return data


def write_config(path: str | Path, values: dict[str, Any], header: str = "") -> None:
    """A TrainConfig's dict as YAML, each header line a comment. The writer of config files; `values` is a config
    already validated (`TrainConfig.to_dict`, or what a trial recorded of its own), not checked again here."""
    from distributed import storage

    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(values, sort_keys=False)
    storage.write_text(path, text)

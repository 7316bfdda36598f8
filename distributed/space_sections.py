"""The rules of each section of a search-space file (search_space.load_space reads the file and calls these): the
distributions of `space`, `objectives`/`metric`, `scaling`, `scheduler`, `final`, and the dotted `--set` that writes
into any of them. Each returns what it read; nothing here knows SearchSpace."""
from __future__ import annotations

from dataclasses import dataclass, field

from distributed.config import (
    METRIC_MODES,
    METRICS,
    ConfigError,
    Scaling,
    as_number,
    check_model_name,
    check_range,
    check_value,
    field_names,
    field_spec,
)
from distributed.errors import did_you_mean

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice", "quniform")
FINAL_KEYS = ("top_k", "epochs", "seeds", "train_limit", "refit", "keep_last", "distill")
# A final stage keeps each member's last epoch unless its space says final: {keep_last: false}: the search decided
# the length, and the best of 40-80 epochs on 100-200 validation faces is partly noise (BENCHMARKS.md 5, issue 22)
FINAL_KEEP_LAST = True
OBJECTIVE_METRICS = METRICS + ("num_params", "epoch_s")  # also read from each trial's reports


class SpaceError(ConfigError):
    """A search-space file is wrong; the message names the file, the key and the fix."""


@dataclass
class Param:
    name: str
    kind: str                 # one of DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    choices: list = field(default_factory=list)

    def suggest(self, trial, optuna_name: str):
        if self.kind == "choice":
            return trial.suggest_categorical(optuna_name, self.choices)
        if self.kind in ("int", "logint"):
            return trial.suggest_int(optuna_name, int(self.low), int(self.high), log=self.kind == "logint")
        return trial.suggest_float(optuna_name, self.low, self.high, log=self.kind == "loguniform", step=self.step)


@dataclass
class Objectives:
    metric: str = "val_acc"
    mode: str = "max"
    objectives: list = field(default_factory=list)


def mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpaceError(f"{where}: expected a mapping, got {value!r}")
    return value


def known_keys(section: dict, allowed, where: str) -> None:
    """Unknown keys are an error, never ignored: a typo would silently keep the default."""
    for key in section:
        if key not in allowed:
            raise SpaceError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}")


def known_field(name: str, where: str):
    if name not in field_names():
        raise SpaceError(f"{where}: unknown TrainConfig key {name!r}{did_you_mean(name, field_names())}")
    return field_spec(name)


def bounded(raw, kind, low, high, where: str):
    value = as_number(raw, kind, where)
    if not low <= value <= high:
        raise SpaceError(f"{where}: {value!r} is out of range [{low}, {high}]")
    return value


def parse_param(name: str, spec, where: str) -> Param:
    f = known_field(name, where.rsplit(".", 1)[0] + f".{name}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: expected one distribution such as {{loguniform: [1.0e-4, 1.0e-2]}} or "
                         f"{{choice: [a, b]}}; got {spec!r} (constants belong in fixed)")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}{did_you_mean(kind, DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}.choice: expected a non-empty list of values")
        choices = [check_value(f, v, f"{where}.choice") for v in args]
        if name == "model":
            for v in choices:
                check_model_name(v, f"{where}.choice")
        return Param(name, kind, choices=choices)
    if f.type not in ("int", "float"):
        raise SpaceError(f"{where}: {name} is a {f.type}; only `choice` can search it")
    if not isinstance(args, list) or len(args) not in (2, 3):
        raise SpaceError(f"{where}.{kind}: expected [low, high]" + (" or [low, high, step]" if kind == "quniform" else ""))
    numeric = int if kind in ("int", "logint") else float
    if numeric is int and f.type != "int":
        raise SpaceError(f"{where}: {kind} needs an integer field; {name} is a float, use uniform or loguniform")
    low, high = (as_number(v, numeric, f"{where}.{kind}") for v in args[:2])
    step = as_number(args[2], float, f"{where}.{kind}") if len(args) == 3 else None
    if len(args) == 3 and kind != "quniform":
        raise SpaceError(f"{where}.{kind}: expected [low, high]; use quniform for a step")
    if low >= high:
        raise SpaceError(f"{where}: low ({low}) must be < high ({high}); swap them, or use a constant in fixed")
    if kind in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{where}: {kind} needs low > 0, got {low}")
    for bound in (low, high):
        try:
            check_range(f, bound, where)
        except ConfigError as exc:
            raise SpaceError(f"{where}: bound {bound} is outside {name}'s valid range "
                             f"({str(exc).rsplit('; ', 1)[-1]})") from None
    return Param(name, kind, low=low, high=high, step=step)


def parse_objectives(doc: dict, where: str) -> tuple[str, str, list[tuple[str, str]]]:
    """-> (metric, mode, objectives): the first objective is the metric ASHA and the pick use."""
    s = Objectives()
    if "objectives" in doc:
        objs = doc["objectives"]
        if not isinstance(objs, list) or not objs:
            raise SpaceError(f"{where}: objectives: expected a list like [{{val_acc: max}}, {{num_params: min}}]")
        for item in objs:
            if not isinstance(item, dict) or len(item) != 1:
                raise SpaceError(f"{where}: objectives: each entry is one {{metric: max|min}}, got {item!r}")
            (metric, mode), = item.items()
            check_metric(metric, mode, f"{where}: objectives", OBJECTIVE_METRICS)
            if metric in [m for m, _ in s.objectives]:
                raise SpaceError(f"{where}: objectives: {metric} is named twice; keep one {{{metric}: max|min}}")
            s.objectives.append((metric, mode))
        s.metric, s.mode = s.objectives[0]
        # a metric/mode beside objectives is the first objective; one that says otherwise would be ignored
        clash = [k for k, v in (("metric", s.metric), ("mode", s.mode)) if k in doc and doc[k] != v]
        if clash:
            raise SpaceError(f"{where}: {clash[0]}: {doc[clash[0]]!r} is not the first objective's "
                             f"({s.metric}: {s.mode}), which is what the search uses; remove "
                             f"{' and '.join(k for k in ('metric', 'mode') if k in doc)}, or put it first in objectives")
    else:
        s.metric, s.mode = doc.get("metric", "val_acc"), doc.get("mode", None)
        if not isinstance(s.metric, str):
            raise SpaceError(f"{where}: metric: expected one name, e.g. metric: val_acc, got {s.metric!r}")
        if s.mode is None:
            s.mode = METRIC_MODES.get(s.metric, "max")
        check_metric(s.metric, s.mode, f"{where}: metric", METRICS)
        s.objectives = [(s.metric, s.mode)]
    if s.metric not in METRICS:
        raise SpaceError(f"{where}: objectives: the first objective drives ASHA and must be one of {', '.join(METRICS)}")
    return s.metric, s.mode, s.objectives


def check_metric(metric, mode, where: str, allowed) -> None:
    if metric not in allowed:
        raise SpaceError(f"{where}: unknown metric {metric!r}{did_you_mean(str(metric), allowed)}")
    if mode not in ("max", "min"):
        raise SpaceError(f"{where}: mode for {metric} must be max or min, got {mode!r}")


def parse_scaling(scaling: dict, where: str) -> tuple[Scaling, str]:
    """-> (Scaling, worker_group)."""
    known_keys(scaling, ("workers", "cpus_per_worker", "gpus_per_worker", "worker_group"), where)
    values = dict(workers=int(bounded(scaling.get("workers", 1), int, 1, 4096, f"{where}.workers")),
                  cpus_per_worker=bounded(scaling.get("cpus_per_worker", 1), float, 0, 1024, f"{where}.cpus_per_worker"),
                  gpus_per_worker=bounded(scaling.get("gpus_per_worker", 0), float, 0, 64, f"{where}.gpus_per_worker"))
    try:
        scaled = Scaling(**values)
    except ConfigError as exc:
        raise SpaceError(f"{where.rsplit(': ', 1)[0]}: {exc}") from None
    group = scaling.get("worker_group", "auto")
    if group not in ("auto", "always", "never"):
        raise SpaceError(f"{where}.worker_group: {group!r} is not one of auto, always, never")
    if group == "never" and scaled.workers > 1:
        raise SpaceError(f"{where}.worker_group: never needs workers: 1 (DDP needs a worker group)")
    return scaled, group


def parse_scheduler(spec, where: str, epochs: int) -> dict | None:
    """-> ASHA's {max_t, grace_period, reduction_factor}, or None for no scheduler; max_t defaults to epochs."""
    if spec in (None, "none", "fifo"):
        return None
    if not isinstance(spec, dict) or set(spec) != {"asha"}:
        raise SpaceError(f"{where}: expected `none` or {{asha: {{max_t, grace_period, reduction_factor}}}}")
    asha = mapping(spec["asha"], f"{where}.asha")
    known_keys(asha, ("max_t", "grace_period", "reduction_factor"), f"{where}.asha")
    max_t = int(bounded(asha.get("max_t", epochs), int, 1, 100_000, f"{where}.asha.max_t"))
    grace = int(bounded(asha.get("grace_period", 1), int, 1, 100_000, f"{where}.asha.grace_period"))
    rf = bounded(asha.get("reduction_factor", 3), float, 1.01, 100, f"{where}.asha.reduction_factor")
    if grace > max_t:
        raise SpaceError(f"{where}.asha: grace_period ({grace}) must be <= max_t ({max_t})")
    return {"max_t": max_t, "grace_period": grace, "reduction_factor": rf}


def read_scalar(text: str):
    """A --set value as YAML reads it (so 3 is a number), the text itself where YAML cannot."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_final(final: dict, where: str, search_epochs: int) -> dict:
    """The final stage: {top_k, epochs, seeds, train_limit, refit, keep_last, distill}; epochs defaults to the search's own
    budget (fixed.epochs) and may not be below it (the final stage trains the winners longer, never shorter);
    train_limit defaults to 0, every training image (a search may train on a subset to go faster); refit (default
    false): the members train on the validation split too (TrainConfig.refit); keep_last (default FINAL_KEEP_LAST):
    each member is its last epoch, not its best validation epoch (TrainConfig.keep_last); distill (default false):
    the single model is one more run of the best config that learns from the members' ensemble too
    (TrainConfig.teacher)."""
    known_keys(final, FINAL_KEYS, where)
    top_k = int(bounded(final.get("top_k", 0), int, 0, 100, f"{where}.top_k"))
    epochs = int(bounded(final.get("epochs", search_epochs), int, 1, 100_000, f"{where}.epochs"))
    if epochs < search_epochs:
        raise SpaceError(f"{where}.epochs: {epochs} is below the search's own {search_epochs} (fixed.epochs); the "
                         f"final stage trains the winners at the full budget, so give at least {search_epochs}")
    seeds = int(bounded(final.get("seeds", 1), int, 1, 100, f"{where}.seeds"))
    train_limit = int(bounded(final.get("train_limit", 0), int, 0, 10**9, f"{where}.train_limit"))
    flags = {name: final.get(name, default)
             for name, default in (("refit", False), ("keep_last", FINAL_KEEP_LAST), ("distill", False))}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise SpaceError(f"{where}.{name}: {value!r} is not true or false")
    return {"top_k": top_k, "epochs": epochs, "seeds": seeds, "train_limit": train_limit, **flags}


SECTIONS = ("num_samples", "metric", "mode", "scaling", "scheduler", "search", "final")
SET_MARK = "__set__"


def set_sections(doc: dict, overrides: list[str]) -> list[str]:
    """`--set` pairs that name a section of the space (`scaling.workers=2`, `scheduler.asha.grace_period=4`,
    `search.seed=3`, `final.top_k=3`, `num_samples=16`, `scheduler=none`) are written into the document before it
    is checked, so they pass the same checks as the file; the others (TrainConfig fields, pinned for every trial)
    are returned."""
    fields = []
    for pair in overrides:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS or not sep:
            fields.append(pair)
            continue
        node = doc
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # e.g. scheduler: none, then --set scheduler.asha.max_t=12
            node = node[part]
        node[parts[-1]] = read_scalar(text)
        doc[SET_MARK] = True
    return fields

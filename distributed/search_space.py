"""Search-space YAML files -> validated SearchSpace -> Optuna define-by-run sampling.

One file is the whole experiment (metric, budget, scaling, scheduler, fixed values and the space). Keys of
`fixed`, `space` and `by_model` are TrainConfig names. Everything is checked here, without starting Ray, so a
typo costs a second instead of a cluster launch.

Conditional parameters (`by_model`) are sampled define-by-run: a trial only samples the parameters of the
architecture it drew, under the Optuna name "<model>/<param>" (Ray unflattens that into {model: {param: v}}).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from distributed.config import (
    ConfigError,
    Scaling,
    TrainConfig,
    check_value,
    field_spec,
    parse_overrides,
    read_yaml,
)
from distributed.errors import did_you_mean
from distributed.model_names import BACKBONES
from distributed.space_sections import (
    FINAL_KEEP_LAST,
    SET_MARK,
    Param,
    SpaceError,
    bounded,
    known_field,
    known_keys,
    mapping,
    parse_final,
    parse_objectives,
    parse_param,
    parse_scaling,
    parse_scheduler,
    set_sections,
)

TOP_KEYS = ("name", "description", "metric", "mode", "num_samples", "scaling", "scheduler", "search", "fixed",
            "space", "by_model", "points_to_evaluate", "objectives", "final")


def param_key(model: str, name: str) -> str:
    """A model's own parameter as the searcher names it. Ray Tune nests "model/name" into {model: {name: value}}
    (trial_config reads it there, results.flatten_params un-nests it for the leaderboard)."""
    return f"{model}/{name}"


@dataclass
class SearchSpace:
    path: str
    name: str
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 16
    scaling: Scaling = field(default_factory=Scaling)
    worker_group: str = "auto"          # auto | always | never (run one-worker trials without a DDP group)
    asha: dict | None = None            # {max_t, grace_period, reduction_factor} or None
    seed: int = 0
    n_startup_trials: int = 8
    algorithm: str = "tpe"              # tpe | random
    fixed: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)      # name -> Param
    by_model: dict = field(default_factory=dict)    # model -> {name -> Param | constant}
    points: list = field(default_factory=list)
    objectives: list = field(default_factory=list)  # [(metric, mode)], >1 means multi-objective
    # The final stage (ensemble.final_stage): the top_k configs retrained at `epochs` (the full budget) on
    # train_limit training images (0: all of them, whatever the search used) with `seeds` seeds each, then tested
    # once and ensembled; refit: they train on the validation split too; keep_last: each is its last epoch;
    # distill: the single model is one more run that learns from their ensemble. top_k 0: no final stage.
    final: dict = field(default_factory=lambda: {"top_k": 0, "epochs": None, "seeds": 1, "train_limit": 0,
                                                 "refit": False, "keep_last": FINAL_KEEP_LAST, "distill": False})

    # -- sampling ---------------------------------------------------------------------------------------

    def define_by_run(self, trial) -> dict:
        """Optuna define-by-run function: samples the shared parameters, then the drawn architecture's own."""
        values = {name: p.suggest(trial, name) for name, p in self.params.items()}
        model = values.get("model", self.fixed.get("model"))
        constants = {}
        for name, spec in self.by_model.get(model, {}).items():
            if isinstance(spec, Param):
                spec.suggest(trial, param_key(model, name))
            else:
                constants[param_key(model, name)] = spec
        return constants or None

    def trial_config(self, sampled: dict) -> TrainConfig:
        """Tune's (unflattened) sample -> the trial's TrainConfig, checked here once; it travels as itself to the
        loop (in the trial's process, or pickled to a Ray Train worker group)."""
        flat = {k: v for k, v in sampled.items() if k in self.params}
        model = flat.get("model", self.fixed.get("model"))
        own = sampled.get(model, {}) if isinstance(sampled.get(model), dict) else {}
        return TrainConfig.from_dict({**self.fixed, **flat, **own}, where=f"{self.path}: trial")

    def optuna_points(self) -> list[dict]:
        """points_to_evaluate in Optuna's flat parameter names (conditional ones prefixed by their model)."""
        out = []
        for point in self.points:
            model = point.get("model", self.fixed.get("model"))
            own = self.by_model.get(model, {})
            out.append({(param_key(model, k) if k in own and k not in self.params else k): v for k, v in point.items()})
        return out

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def epochs(self) -> int:
        return int(self.fixed.get("epochs", TrainConfig().epochs))

    def searches(self, keys) -> bool:
        """Whether any of these TrainConfig keys varies between trials (in space or in a by_model section)."""
        varying = set(self.params) | {k for own in self.by_model.values() for k in own}
        return bool(varying & set(keys))

    def warnings(self) -> list[str]:
        """Legal but probably unintended: ASHA judging trials while their learning rate is still warming up, or
        before their backbone ever trains. Either way the first rung compares trials that have not yet learnt."""
        if not self.asha:
            return []
        out = []
        grace = self.asha["grace_period"]
        models = self.model_choices()
        for model in models:
            if "onecycle" not in self.value_span("schedule", model):
                continue
            # OneCycle peaks after warmup_pct of all steps; the latest peak the space allows is what matters
            warmup_end = max(self.value_span("warmup_pct", model)) * max(self.value_span("epochs", model))
            if grace < warmup_end:
                out.append(f"{self.path}: scheduler.asha.grace_period ({grace}) ends inside the OneCycle warm-up "
                           f"(warmup_pct x epochs up to {warmup_end:g} epochs) for {model}: ASHA would cut trials "
                           f"before their learning rate peaks; raise grace_period or lower warmup_pct")
                break  # one line per space: the fix is the same for every model
        for model in models:
            if model not in BACKBONES:
                continue
            freeze = self.value_span("freeze", model)
            if "progressive" not in freeze:
                continue
            start = self.value_span("unfreeze_start", model)
            latest = max(start) if start else TrainConfig().unfreeze_start
            if grace < latest:
                out.append(f"{self.path}: scheduler.asha.grace_period ({grace}) ends before the first unfreeze "
                           f"(unfreeze_start up to {latest}) for {model}: ASHA would judge trials before their "
                           f"backbone ever trains; raise grace_period or lower unfreeze_start")
        return out

    def model_choices(self) -> list[str]:
        if "model" in self.params:
            return list(self.params["model"].choices)
        return [self.fixed.get("model", TrainConfig().model)]

    def check_weights(self) -> None:
        """The weights any trial will load are fetched (or refused) now, before Ray starts: for every model, against
        every shape it can take here (in_channels and classes: fixed, a by_model constant or searched). A backbone's
        file is loaded into torchvision's own model, whatever the shape, so it is read once (ImageNet files are big)."""
        for model in self.model_choices():
            if not any(self.value_span("weights_path", model)) and True not in self.value_span("pretrained", model):
                continue  # nothing to load (the name is checked already): no torch
            from distributed.models import check_weights

            shapes = list(itertools.product(self.value_span("in_channels", model), self.value_span("classes", model)))
            for channels, classes in shapes[:1] if model in BACKBONES else shapes:
                check_weights(TrainConfig.from_dict({**self.fixed, "model": model, "in_channels": channels,
                                                     "classes": classes,
                                                     "pretrained": True in self.value_span("pretrained", model)}),
                              weights_paths=self.value_span("weights_path", model))

    def value_span(self, key: str, model: str) -> list:
        spec = self.by_model.get(model, {}).get(key, self.params.get(key))
        if isinstance(spec, Param):
            return list(spec.choices) if spec.kind == "choice" else [spec.low, spec.high]
        if spec is not None:
            return [spec]
        return [self.fixed.get(key, getattr(TrainConfig(), key))]


# ------------------------------------------------------------------------------------------------ loading

def find_space(space: str) -> str:
    """A search space by path or URI, or by the name of one shipped with emotune (`quick` = its quick.yaml)."""
    if "://" in space or Path(space).expanduser().exists():
        return space
    shipped = spaces_dir() / (space if space.endswith((".yaml", ".yml")) else f"{space}.yaml")
    if "/" not in space and shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in spaces_dir().glob("*.yaml"))
    raise ConfigError(f"{space}: no such file, nor a space shipped with emotune; pass a YAML path or one of: "
                      f"{', '.join(names)}")


def spaces_dir() -> Path:
    """The shipped search spaces: inside the installed package, or the checkout's search_spaces/ folder."""
    here = Path(__file__).resolve().parent
    installed = here / "search_spaces"
    return installed if installed.is_dir() else here.parent / "search_spaces"


def load_space(path: str | Path, overrides: list[str] = ()) -> SearchSpace:
    """Read and validate a search-space file. `overrides` ("key=value") pin TrainConfig fields: the value goes to
    `fixed` and the key leaves the searched space (e.g. `--set data=parquet:/data/fer2013`)."""
    where = str(path)
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise SpaceError(f"{where}: expected a mapping with keys like name, metric, space; got {type(doc).__name__}")
    known_keys(doc, TOP_KEYS, where)
    overrides = set_sections(doc, overrides)
    if doc.pop(SET_MARK, False):
        where = f"{where} (with --set)"
    if "space" not in doc and "by_model" not in doc:
        raise SpaceError(f"{where}: no `space` section; add at least one parameter to search, e.g. "
                         f"space: {{lr_head: {{loguniform: [1.0e-4, 1.0e-2]}}}}")

    pinned = parse_overrides(overrides)

    fixed = dict(mapping(doc.get("fixed", {}), f"{where}: fixed"))
    fixed.update(pinned)
    TrainConfig.from_dict(fixed, where=f"{where}: fixed")
    params = {}
    for name, spec in mapping(doc.get("space", {}), f"{where}: space").items():
        if name in pinned:
            continue
        if name in fixed:
            raise SpaceError(f"{where}: space.{name}: also given in fixed; keep it in one of the two")
        params[name] = parse_param(name, spec, f"{where}: space.{name}")

    by_model = {}
    for model, own in mapping(doc.get("by_model", {}), f"{where}: by_model").items():
        if "model" in pinned and model != pinned["model"]:
            continue  # --set model=X: the other models' sections are not searched
        if "model" not in pinned and ("model" not in params or model not in params["model"].choices):
            raise SpaceError(f"{where}: by_model.{model}: {model!r} is not among space.model's choices; "
                             f"add it there or remove this section")
        by_model[model] = {}
        for name, spec in mapping(own, f"{where}: by_model.{model}").items():
            if name in pinned:
                continue
            w = f"{where}: by_model.{model}.{name}"
            if name == "model" or name in params:
                raise SpaceError(f"{w}: already searched in space; a conditional parameter must be only here")
            if name in fixed:
                raise SpaceError(f"{w}: also given in fixed; keep it in one of the two")
            if isinstance(spec, dict):
                by_model[model][name] = parse_param(name, spec, w)
            else:
                by_model[model][name] = check_value(known_field(name, w), spec, w)

    if fixed.get("refit") or "refit" in params or any("refit" in own for own in by_model.values()):
        raise SpaceError(f"{where}: refit trains on the validation images, so the trials could not be compared; "
                         f"drop it here and set final: {{refit: true}} to refit the winners")
    s = SearchSpace(path=where, name=str(doc.get("name") or Path(path).stem), fixed=fixed, params=params,
                    by_model=by_model)
    s.metric, s.mode, s.objectives = parse_objectives(doc, where)
    s.num_samples = int(bounded(doc.get("num_samples", s.num_samples), int, 1, 100_000, f"{where}: num_samples"))
    s.scaling, s.worker_group = parse_scaling(mapping(doc.get("scaling", {}), f"{where}: scaling"), f"{where}: scaling")
    s.asha = parse_scheduler(doc.get("scheduler", "none"), f"{where}: scheduler", s.epochs())
    search = mapping(doc.get("search", {}), f"{where}: search")
    known_keys(search, ("seed", "n_startup_trials", "algorithm"), f"{where}: search")
    s.seed = int(bounded(search.get("seed", 0), int, 0, 2**31, f"{where}: search.seed"))
    s.n_startup_trials = int(bounded(search.get("n_startup_trials", min(8, s.num_samples)), int, 0, 100_000,
                                     f"{where}: search.n_startup_trials"))
    s.algorithm = search.get("algorithm", "tpe")
    if s.algorithm not in ("tpe", "random"):
        raise SpaceError(f"{where}: search.algorithm: {s.algorithm!r} is not one of tpe, random")
    s.points = parse_points(s, doc.get("points_to_evaluate", []), f"{where}: points_to_evaluate", pinned)
    s.final = parse_final(mapping(doc.get("final", {}), f"{where}: final"), f"{where}: final", s.epochs())
    return s


def parse_points(s: SearchSpace, points, where: str, pinned=()) -> list[dict]:
    """The points checked against the space; a parameter pinned by --set is left out of each (the --set wins), and
    with --set model=X a point written for another model is dropped (its parameters are that model's)."""
    if not isinstance(points, list):
        raise SpaceError(f"{where}: expected a list of {{param: value}} mappings")
    out = []
    for i, point in enumerate(points):
        w = f"{where}[{i}]"
        point = mapping(point, w)
        if "model" in pinned and point.get("model", pinned["model"]) != pinned["model"]:
            continue
        point = {k: v for k, v in point.items() if k not in pinned}
        model = point.get("model", s.fixed.get("model"))
        own = s.by_model.get(model, {}) if isinstance(model, str) else {}
        checked = {}
        for key, value in point.items():
            spec = s.params.get(key) or own.get(key)
            if not isinstance(spec, Param):
                owners = [m for m, params in s.by_model.items() if isinstance(params.get(key), Param)]
                if owners:  # searched, but only for some models: the point must say which
                    raise SpaceError(f"{w}.{key}: searched only for {', '.join(owners)} (by_model); add "
                                     f"model: {owners[0]} to this point")
                raise SpaceError(f"{w}.{key}: not a searched parameter of this space"
                                 f"{did_you_mean(key, list(s.params) + list(own))}")
            checked[key] = check_value(field_spec(key), value, f"{w}.{key}")
            if spec.kind == "choice" and checked[key] not in spec.choices:
                raise SpaceError(f"{w}.{key}: {value!r} is not among the choices {spec.choices}")
            if spec.kind != "choice" and not spec.low <= checked[key] <= spec.high:
                raise SpaceError(f"{w}.{key}: {value!r} is outside the searched range [{spec.low}, {spec.high}]")
        out.append(checked)
    return out

"""Every shipped search space, and every bench space (bench/spaces), validates and samples through real Optuna into
valid TrainConfigs."""
from __future__ import annotations

import optuna
import pytest
from conftest import REPO, SPACES
from ray.tune.utils.util import unflatten_dict

from distributed.cli import main
from distributed.config import ConfigError, TrainConfig
from distributed.search_space import Param, SpaceError, load_space

FILES = sorted(SPACES.glob("*.yaml")) + sorted((REPO / "bench" / "spaces").glob("*.yaml"))


def sample(space, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """(Tune's unflattened sample, its TrainConfig) for n define-by-run trials of a real study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    for point in space.optuna_points():
        study.enqueue_trial(point)
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run(trial) or {}
        sampled = unflatten_dict({**trial.params, **constants})
        out.append((trial.params, space.trial_config(sampled)))
        study.tell(trial, 0.5)
    return out


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_every_space_checks_and_converts(path, capsys):
    assert main(["check-space", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out
    space = load_space(path)
    assert space.warnings() == []
    for params, cfg in sample(space, 12):
        for name, p in space.params.items():
            value = getattr(cfg, name)
            assert value in p.choices if p.kind == "choice" else p.low <= value <= p.high
    if space.points:  # the warm start is evaluated first, exactly as written
        params, config = sample(space, 1)[0]
        for key, value in space.points[0].items():
            assert getattr(config, key) == pytest.approx(value)


SHIPPED = sorted(SPACES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_space_tries_the_plain_recipe_first(path, monkeypatch):
    """The plain recipe, one long run, beat the CPU searches at equal work (BENCHMARKS.md section 5): every shipped
    space evaluates it as a point, so not searching is always one of the trials. A point names every searched key
    of the recipe (Optuna would draw the rest); what the space does not search must already be the recipe's."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.quality import PLAIN  # the overrides the benchmark trained the plain recipe with

    # AdamW's decoupled decay at the config's default (1e-4 x lr 1e-3 per step) stands for Adam's 0: a log-scaled
    # weight_decay has no 0, and the spaces that do not search it keep the default
    recipe = {**PLAIN, "weight_decay": TrainConfig().weight_decay}
    space = load_space(path)

    def plain(point: dict) -> bool:
        model = point.get("model", space.fixed.get("model"))
        own = space.by_model.get(model, {})
        searched = {k for k, spec in {**space.params, **own}.items() if isinstance(spec, Param)}
        constants = {k: v for k, v in own.items() if not isinstance(v, Param)}
        cfg = TrainConfig.from_dict({**space.fixed, **constants, **point})
        resolved = {**cfg.to_dict(), "lr_backbone": cfg.backbone_lr()}
        return all((key in point or key not in searched) and resolved[key] == want for key, want in recipe.items())

    assert any(plain(point) for point in space.points), f"{path.name}: no point is the plain recipe {recipe}"


def test_multi_arch_samples_only_the_drawn_architectures_parameters():
    space = load_space(SPACES / "multi_arch.yaml")
    seen = set()
    for params, config in sample(space, 60):
        model = params["model"]
        seen.add(model)
        conditional = {k.split("/")[0] for k in params if "/" in k}
        assert conditional <= {model}, params
        for name, spec in space.by_model[model].items():
            value = getattr(config, name)
            if hasattr(spec, "kind"):
                assert spec.low <= value <= spec.high or value in spec.choices
            else:
                assert value == spec
    assert seen == set(space.params["model"].choices)


def test_overrides_pin_a_searched_value():
    space = load_space(SPACES / "quick.yaml", ["lr_head=0.005", "epochs=2"])
    assert "lr_head" not in space.params and space.fixed["lr_head"] == 0.005 and space.epochs() == 2


def test_set_reaches_every_section_through_the_files_own_checks():
    """--set section.key=value for the space's own sections (not TrainConfig fields), as if the file said it."""
    space = load_space(SPACES / "quick.yaml", ["scaling.workers=2", "scaling.worker_group=always", "search.seed=7",
                                                "scheduler.asha.grace_period=2", "final.top_k=1", "final.epochs=9",
                                                "final.refit=true", "final.keep_last=false", "num_samples=3",
                                                "epochs=4"])
    assert space.scaling.workers == 2 and space.worker_group == "always" and space.asha["grace_period"] == 2
    assert space.seed == 7 and space.fixed["epochs"] == 4
    assert space.final["top_k"] == 1 and space.final["epochs"] == 9 and space.num_samples == 3
    assert space.final["refit"] is True and load_space(SPACES / "quick.yaml").final["refit"] is False
    assert space.final["keep_last"] is False
    assert load_space(SPACES / "quick.yaml", ["final.keep_last=true"]).final["keep_last"] is True
    assert load_space(SPACES / "quick.yaml", ["scheduler=none"]).asha is None
    for pair, message in (("scheduler.asha.grace_period=0", r"\(with --set\): scheduler\.asha\.grace_period: 0 is out "
                                                            r"of range"),
                          ("search.sed=1", r"\(with --set\): search: unknown key 'sed'; did you mean 'seed'\?"),
                          ("final.epochs=1", r"final\.epochs: 1 is below the search's own"),
                          ("final.refit=often", r"final\.refit: 'often' is not true or false"),
                          ("final.keep_last=1", r"final\.keep_last: 1 is not true or false"),
                          # refit trains on the validation images: a search's trials could not be compared
                          ("refit=true", r"refit trains on the validation images, so the trials could not be "
                                         r"compared; drop it here and set final: \{refit: true\}")):
        with pytest.raises(SpaceError, match=message):
            load_space(SPACES / "quick.yaml", [pair])


def test_set_wins_over_the_points_and_sections_it_pins(tmp_path):
    """--set key=value leaves the searched space: a point naming the key keeps its other values, and --set model=X
    keeps only X's by_model section and X's points (a point for another model would misread its parameters)."""
    path = tmp_path / "two.yaml"
    path.write_text("""space:
  model: {choice: [small_cnn, resnet18]}
  lr_head: {loguniform: [1.0e-4, 1.0e-2]}
by_model:
  small_cnn: {dropout: {uniform: [0.1, 0.5]}}
  resnet18: {lr_backbone: {loguniform: [1.0e-5, 1.0e-3]}}
points_to_evaluate:
  - {model: small_cnn, lr_head: 1.0e-3, dropout: 0.3}
  - {model: resnet18, lr_head: 2.0e-3, lr_backbone: 1.0e-4}
""")
    assert load_space(path, ["lr_head=5e-3"]).points == [{"model": "small_cnn", "dropout": 0.3},
                                                          {"model": "resnet18", "lr_backbone": 1.0e-4}]
    pinned = load_space(path, ["model=small_cnn"])
    assert list(pinned.by_model) == ["small_cnn"] and pinned.points == [{"lr_head": 1.0e-3, "dropout": 0.3}]
    assert pinned.optuna_points() == [{"lr_head": 1.0e-3, "small_cnn/dropout": 0.3}]
    assert load_space(path, ["model=resnet18"]).points == [{"lr_head": 2.0e-3, "lr_backbone": 1.0e-4}]


def test_weights_are_checked_against_each_shape_the_model_takes_in_the_space(tmp_path):
    """A weights file is checked against the model as its trials build it: in_channels from a by_model constant
    or each searched value, not only the fixed one."""
    import torch

    from distributed.models import ModelError, create_model

    rgb = tmp_path / "rgb.pt"
    torch.save(create_model("small_cnn", 7, in_channels=3).state_dict(), rgb)

    def space(text: str):
        (tmp_path / "w.yaml").write_text(text)
        return load_space(tmp_path / "w.yaml")

    # every trial builds a 3-channel small_cnn (a by_model constant): the file fits
    space("space: {model: {choice: [small_cnn, baseline_cnn]}, lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n"
          f"by_model: {{small_cnn: {{in_channels: 3, weights_path: {rgb}}}}}\n").check_weights()
    # in_channels searched over 1 and 3: the 1-channel trials could not load it
    with pytest.raises(ModelError, match=r"block1.0.weight is \[16, 3, 3, 3\] in the file, \[16, 1, 3, 3\]"):
        space(f"fixed: {{model: small_cnn, weights_path: {rgb}}}\n"
              "space: {in_channels: {choice: [1, 3]}, lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n").check_weights()


def test_asha_grace_period_before_first_unfreeze_warns(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scheduler: {asha: {max_t: 20, grace_period: 2}}\n"
                    "fixed: {model: resnet18, freeze: progressive, epochs: 20, warmup_pct: 0.1}\n"
                    "space: {unfreeze_start: {int: [2, 8]}, lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    (warning,) = load_space(path).warnings()
    assert "grace_period (2) ends before the first unfreeze" in warning and "resnet18" in warning


def test_multi_objective_space(tmp_path):
    path = tmp_path / "mo.yaml"
    path.write_text("objectives: [{val_acc: max}, {num_params: min}]\nfixed: {epochs: 2}\n"
                    "space: {model: {choice: [small_cnn, baseline_cnn]}}\n")
    space = load_space(path)
    assert space.multi_objective and space.objectives == [("val_acc", "max"), ("num_params", "min")]
    assert space.metric == "val_acc"


@pytest.mark.parametrize("text, message", [
    ("space: {lr_head: {loguniform: [1.0e-2, 1.0e-4]}}", "space.lr_head: low (0.01) must be < high (0.0001)"),
    ("space: {lr_head: {loguniform: [-1, 1]}}", "loguniform needs low > 0"),
    ("space: {dropout: {uniform: [0.1, 2.0]}}", "bound 2.0 is outside dropout's valid range"),
    ("space: {lr_head: {logunifrom: [1.0e-4, 1.0e-2]}}",
     "unknown distribution 'logunifrom'; did you mean 'loguniform'?"),
    ("space: {lr_head: {loguniform: [small, big]}}", "expected a number, got 'small'"),
    ("space: {lr_hed: {uniform: [0.1, 0.2]}}", "unknown TrainConfig key 'lr_hed'; did you mean 'lr_head'?"),
    ("space: {model: {choice: [resnet50, resnet500]}}", "unknown model 'resnet500'"),
    ("space: {epochs: {uniform: [1, 3]}}\nfixed: {epochs: 3}", "space.epochs: also given in fixed"),
    ("spaces: {}", "unknown key 'spaces'; did you mean 'space'?"),
    ("search: {seeds: 1}\nspace: {dropout: {uniform: [0.1, 0.2]}}", "search: unknown key 'seeds'; did you mean 'seed'?"),
    ("scaling: {worker: 2}\nspace: {dropout: {uniform: [0.1, 0.2]}}",
     "scaling: unknown key 'worker'; did you mean 'workers'?"),
    ("scheduler: {asha: {max_time: 3}}\nspace: {dropout: {uniform: [0.1, 0.2]}}",
     "scheduler.asha: unknown key 'max_time'; did you mean 'max_t'?"),
    ("metric: val_accuracy\nspace: {dropout: {uniform: [0.1, 0.2]}}", "unknown metric 'val_accuracy'"),
    ("scheduler: {asha: {max_t: 3, grace_period: 5}}\nspace: {dropout: {uniform: [0.1, 0.2]}}",
     "grace_period (5) must be <= max_t (3)"),
])
def test_bad_spaces_are_refused_with_the_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_space(path)
    assert message in str(exc.value) and str(path) in str(exc.value)
    assert main(["check-space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


# (the field searched, the space's section, whether the launcher may decode once and share the images)
SHARING = [
    ("lr_head", "space: {lr_head: {loguniform: [1.0e-4, 1.0e-2]}}", True),
    ("data", "space: {data: {choice: [synthetic, 'imagefolder:/data/faces']}}", False),
    ("in_channels", "space: {in_channels: {choice: [1, 3]}}", False),
    ("data_size", "space: {data_size: {choice: [48, 64]}}", False),
    ("seed", "space: {seed: {int: [0, 3]}}", False),
    ("group_by", "space: {group_by: {choice: ['', 're:^(S[0-9]+)_']}}", False),
    ("data_size", "space: {model: {choice: [small_cnn, baseline_cnn]}}\nby_model: {small_cnn: {data_size: 64}}", False),
    # splits are made per trial from the shared images: searching them does not change what is decoded
    ("classes", "space: {classes: {choice: ['happy,sad', 'happy,sad,neutral']}}", True),
    ("val_fraction", "space: {val_fraction: {uniform: [0.1, 0.3]}}", True),
]


@pytest.mark.parametrize("searched, section, shared", SHARING, ids=[f"{k}-{'shared' if v else 'own'}"
                                                                    for k, _, v in SHARING])
def test_decoded_data_is_shared_only_when_nothing_that_shapes_it_is_searched(tmp_path, searched, section, shared):
    """The launcher decodes once and hands every trial the same images only when no trial could want others."""
    from distributed.config import DECODE_FIELDS

    path = tmp_path / "s.yaml"
    path.write_text(f"fixed: {{epochs: 2}}\n{section}\n")
    space = load_space(path)
    assert space.searches([searched])
    assert space.searches(DECODE_FIELDS) is not shared


def test_every_field_that_shapes_the_data_is_a_sharing_case():
    from distributed.config import DECODE_FIELDS

    assert {searched for searched, _, shared in SHARING if not shared} == set(DECODE_FIELDS)


def test_decode_fields_are_the_fields_load_data_reads():
    """DECODE_FIELDS is what load_data reads: a field it read but the list missed would let trials that searched
    it share images decoded for another value."""
    from distributed.config import DECODE_FIELDS
    from distributed.data import load_data

    read = []

    class Recording(TrainConfig):
        def __getattribute__(self, name):
            if name in TrainConfig.__dataclass_fields__:
                read.append(name)
            return super().__getattribute__(name)

    load_data(Recording(data="synthetic", data_size=16))
    assert set(read) == set(DECODE_FIELDS)

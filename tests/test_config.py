import pytest
import yaml

from distributed.config import ConfigError, TrainConfig, did_you_mean, parse_overrides


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(model="emotion_cnn48", lr_head=3e-4, classes=["happy", "sad"], mixup_alpha=0.2, amp=False)
    cfg.save(tmp_path / "c.yaml", header="a header\nline two")
    text = (tmp_path / "c.yaml").read_text()
    assert text.startswith("# a header\n# line two\n")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


def test_scientific_notation_strings_are_numbers(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; it must still be a number here.
    (tmp_path / "c.yaml").write_text("lr_head: 1e-4\nepochs: 3\n")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["lr_head"] == "1e-4"
    assert TrainConfig.load(tmp_path / "c.yaml").lr_head == pytest.approx(1e-4)


@pytest.mark.parametrize("values, message", [
    ({"lr_haed": 1e-3}, "unknown key 'lr_haed'; did you mean 'lr_head'?"),
    ({"epochs": "ten"}, "epochs: expected a number, got 'ten'"),
    ({"epochs": 2.5}, "epochs: expected a whole number"),
    ({"amp": "yes"}, "amp: expected true or false"),
    ({"lr_head": -0.1}, "lr_head: -0.1 is out of range; it must be > 0"),
    ({"lr_head": 0}, "lr_head: 0.0 is out of range; it must be > 0"),
    ({"dropout": 1.5}, "dropout: 1.5 is out of range; it must be <= 0.95"),
    ({"freeze": "half"}, "freeze: 'half' is not one of none, frozen, progressive"),
    ({"model": "resnet51"}, "unknown model 'resnet51'; did you mean 'resnet50'?"),
])
def test_bad_values_are_rejected_clearly(values, message):
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(values)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_overrides():
    cfg = TrainConfig().with_overrides(["lr_head=3e-4", "classes=happy,sad", "pretrained=true", "epochs=4"])
    assert (cfg.lr_head, cfg.classes, cfg.pretrained, cfg.epochs) == (3e-4, ["happy", "sad"], True, 4)
    with pytest.raises(ConfigError, match="expected key=value"):
        TrainConfig().with_overrides(["lr_head"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig().with_overrides(["batchsize=3"])


def test_overrides_are_parsed_once_into_checked_values():
    # the search space pins exactly these values: only the keys given, typed as TrainConfig types them
    assert parse_overrides(["lr_head=1e-4", "epochs=2", "weights_path="]) == {
        "lr_head": 1e-4, "epochs": 2, "weights_path": ""}
    with pytest.raises(ConfigError, match="--set: epochs: expected a number, got 'two'"):
        parse_overrides(["epochs=two"])


def test_did_you_mean_hints_then_lists():
    assert did_you_mean("epoch", ["epochs", "seed"]) == "; did you mean 'epochs'?"
    assert did_you_mean("zzz", ["seed", "epochs"]) == "; valid keys: epochs, seed"
    assert did_you_mean("epoch", ["seed", "epochs"], choose_from=True) == "; did you mean 'epochs'? choose from epochs, seed"
    assert did_you_mean("zzz", ["seed", "epochs"], choose_from=True) == "; choose from epochs, seed"


def test_yaml_syntax_error_names_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlr_head: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error \(line \d+"):
        TrainConfig.load(tmp_path / "bad.yaml")


def test_unset_lr_backbone_survives_every_round_trip_and_follows_the_model(tmp_path):
    cfg = TrainConfig()
    assert cfg.lr_backbone is None
    cfg.save(tmp_path / "c.yaml")
    assert "lr_backbone: null" in (tmp_path / "c.yaml").read_text()
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg == TrainConfig.from_dict(cfg.to_dict())
    assert TrainConfig(lr_backbone=1e-3).with_overrides(["lr_backbone=null"]).lr_backbone is None
    with pytest.raises(ConfigError, match="lr_backbone: 0.0 is out of range; it must be > 0"):
        TrainConfig.from_dict({"lr_backbone": 0})
    # from scratch: one rate; trained weights (ImageNet or a file): 1e-4; set: as set
    assert TrainConfig(model="emotion_cnn48", lr_head=3e-3).backbone_lr() == 3e-3
    assert TrainConfig(model="resnet18", lr_head=3e-3).backbone_lr() == 3e-3
    assert TrainConfig(model="resnet18", lr_head=3e-3, pretrained=True).backbone_lr() == 1e-4
    assert TrainConfig(model="small_cnn", lr_head=3e-3, weights_path="w.pt").backbone_lr() == 1e-4
    assert TrainConfig(model="resnet18", pretrained=True, lr_backbone=1e-5).backbone_lr() == 1e-5

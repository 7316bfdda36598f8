import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SHARED, Payload
from torch import nn

from distributed.config import TrainConfig, field_spec
from distributed.models import (
    IN_CHANNELS,
    ModelError,
    check_weights,
    create_model,
    describe_models,
    list_models,
    native_size,
    stages,
)

SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
needs_weights = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"{SHARED_WEIGHTS} is absent")


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_at_native_size(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1)
    size = native_size(name)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stages(model)[0].parameters())


def test_rgb_backbone():
    model = create_model("resnet18", num_classes=5, in_channels=3)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 5)


@pytest.mark.parametrize("name", ["baseline_cnn", "emotion_cnn48"])
def test_scratch_cnns_accept_other_sizes(name):
    # `image_size` may differ from the native 48
    assert create_model(name, num_classes=3).eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3)


class DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("name", list_models())
def test_stages_cover_every_parameter_once_head_first(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7, in_channels=1)
    parts = stages(DDPLike(model))
    assert len(parts) >= 4
    ids = [id(p) for part in parts for p in part.parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    # the head holds the final K-way Linear
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert final.out_features == 7 and any(m is final for m in parts[0].modules())
    # the stem (first conv) comes last
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert any(m is first_conv for m in parts[-1].modules())


def test_describe_models():
    rows = {row["name"]: row for row in describe_models()}
    assert list(rows) == list_models()
    assert rows["baseline_cnn"]["native_size"] == 48 and rows["baseline_cnn"]["kind"] == "scratch"
    assert rows["resnet50"]["native_size"] == 224 and rows["resnet50"]["kind"] == "backbone"
    assert rows["baseline_cnn"]["params"] == sum(p.numel() for p in create_model("baseline_cnn", 7).parameters())


def test_emotion_cnn48_has_about_6_7M_parameters():
    model = create_model("emotion_cnn48", num_classes=7)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 12
    assert abs(sum(p.numel() for p in model.parameters()) - 6.7e6) <= 0.03 * 6.7e6


def test_emotion_cnn48_head_dropout_scales_with_knob():
    ps = [m.p for m in create_model("emotion_cnn48", 7, dropout=0.5).classifier if isinstance(m, nn.Dropout)]
    assert ps == pytest.approx([0.5, 0.35, 0.25, 0.15, 0.1])
    ps = [m.p for m in create_model("emotion_cnn48", 7, dropout=0.25).classifier if isinstance(m, nn.Dropout)]
    assert ps == pytest.approx([0.25, 0.175, 0.125, 0.075, 0.05])


@needs_weights
def test_grey_model_matches_rgb_model_on_replicated_image(tmp_path, monkeypatch):
    # an empty cache and no network: weights_path must win over pretrained=True
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rgb = create_model("mobilenet_v2", 7, in_channels=3, pretrained=True, weights_path=str(SHARED_WEIGHTS)).eval()
    grey = create_model("mobilenet_v2", 7, in_channels=1, weights_path=str(SHARED_WEIGHTS)).eval()
    grey.head.load_state_dict(rgb.head.state_dict())  # the heads are fresh, random
    x = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


@needs_weights
def test_pretrained_loads_from_torch_home_cache(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(SHARED_WEIGHTS, checkpoints / SHARED_WEIGHTS.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_model("mobilenet_v2", 7, in_channels=1, pretrained=True)
    state = torch.load(SHARED_WEIGHTS, map_location="cpu", weights_only=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    torch.testing.assert_close(convs[-1].weight, state["features.18.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(convs[0].weight, state["features.0.0.weight"].sum(1, keepdim=True))


def test_pretrained_without_cache_or_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("EMOTUNE_OFFLINE", "1")  # the same answer on a machine that could download the file
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"mobilenet_v2-b0353104\.pth.*hub/checkpoints") as info:
        create_model("mobilenet_v2", 7, pretrained=True)
    assert time.monotonic() - start < 20  # must fail, not hang, without network
    assert "\n" not in str(info.value) and "weights_path" in str(info.value)


def test_scratch_model_has_no_pretrained_weights_but_reloads_its_own(tmp_path):
    with pytest.raises(ModelError, match="no pretrained weights"):
        create_model("baseline_cnn", 7, pretrained=True)
    model = create_model("baseline_cnn", 7)
    torch.save(model.state_dict(), tmp_path / "baseline.pt")
    again = create_model("baseline_cnn", 7, weights_path=str(tmp_path / "baseline.pt"))
    torch.testing.assert_close(again.block1[0].weight, model.block1[0].weight)


def test_unknown_model_suggests_a_name():
    with pytest.raises(ModelError, match=r"unknown model 'resnet_18'; did you mean 'resnet18'\?.*vgg16"):
        create_model("resnet_18", 7)
    with pytest.raises(ModelError, match="unknown model"):
        native_size("nope")


def test_model_names_and_the_registry_agree():
    """model_names (torch-free: configs and search spaces check names against it) lists exactly what MODELS builds:
    every scratch name has its network and every network its name; every backbone is a torchvision model with a
    way to cut it into stages, and every family of cuts serves some backbone."""
    import torchvision

    from distributed import model_names
    from distributed.models import CUTS, MODELS, SCRATCH_NETS, cut_for

    assert list(MODELS) == list_models() == list(model_names.NAMES)
    assert set(SCRATCH_NETS) == set(model_names.SCRATCH)
    for name in model_names.BACKBONES:
        assert callable(getattr(torchvision.models, name)) and cut_for(name) in CUTS.values()
    assert {f for f in CUTS if any(n.startswith(f) for n in model_names.BACKBONES)} == set(CUTS)
    with pytest.raises(KeyError, match="no family"):
        cut_for("densenet121")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        create_model("resnet18", 7, weights_path=str(tmp_path / "missing.pth"))


def test_weights_file_that_does_not_fit(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    expected = (r"does not fit resnet18: \d+ missing keys \(bn1.weight, .*; 1 wrong shape keys \(conv1.weight\); "
                r"conv1.weight is \[1\] in the file, \[64, 3, 7, 7\] in resnet18; pass torchvision's resnet18 weights")
    with pytest.raises(ModelError, match=expected) as info:
        create_model("resnet18", 7, weights_path=str(tmp_path / "other.pth"))
    assert "\n" not in str(info.value)


def saved(tmp_path, name: str, num_classes: int = 7, in_channels: int = 1) -> str:
    """A state dict of a fresh `name`, as torch.save(model.state_dict()) writes it."""
    path = tmp_path / f"{name}-{num_classes}-{in_channels}.pt"
    torch.save(create_model(name, num_classes, in_channels=in_channels).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", ["small_cnn", "baseline_cnn", "emotion_cnn48"])
def test_check_weights_accepts_a_scratch_models_own_file_whatever_its_head_before_the_data_is_known(tmp_path, name):
    # before decoding, the number of classes is unknown unless `classes` lists them: any head size passes
    for k in (3, 7):
        check_weights(TrainConfig(model=name, weights_path=saved(tmp_path, name, k)))
    check_weights(TrainConfig(model=name, weights_path=saved(tmp_path, name, 3), classes=["a", "b", "c"]))


@pytest.mark.parametrize("cfg, key", [
    ({"model": "small_cnn"}, "block1.0.weight is [64, 1, 3, 3] in the file, [16, 1, 3, 3] in small_cnn"),
    ({"model": "baseline_cnn", "in_channels": 3}, "block1.0.weight is [64, 1, 3, 3] in the file, [64, 3, 3, 3]"),
    ({"model": "baseline_cnn", "classes": ["happy", "sad"]}, "classifier.10.weight is [7, 256] in the file, [2, 256]"),
    ({"model": "emotion_cnn48"}, "50 missing keys (block3.6.weight, block3.7.weight, block3.7.bias, ...)"),
])
def test_check_weights_refuses_a_scratch_file_that_does_not_fit_before_any_worker(tmp_path, cfg, key):
    weights = saved(tmp_path, "baseline_cnn")
    with pytest.raises(ModelError) as info:
        check_weights(TrainConfig(**cfg, weights_path=weights))
    message = str(info.value)
    assert key in message and f"does not fit {cfg['model']}" in message and "\n" not in message
    assert message.endswith(f"pass a state_dict() saved from {cfg['model']} with the same in_channels and classes, "
                            f"or remove weights_path")
    with pytest.raises(ModelError, match="does not fit"):  # the worker would have refused it the same way
        create_model(cfg["model"], len(cfg.get("classes", [])) or 7, in_channels=cfg.get("in_channels", 1),
                     weights_path=weights)


def test_check_weights_checks_every_weights_path_a_search_may_give(tmp_path):
    good, bad = saved(tmp_path, "small_cnn"), saved(tmp_path, "baseline_cnn")
    cfg = TrainConfig(model="small_cnn")
    check_weights(cfg, weights_paths=["", good])
    with pytest.raises(ModelError, match=f"weights_path {bad}: does not fit small_cnn"):
        check_weights(cfg, weights_paths=["", good, bad])
    with pytest.raises(ModelError, match="no such file"):
        check_weights(cfg, weights_paths=[good, str(tmp_path / "missing.pt")])


def test_check_weights_refuses_pretrained_for_a_model_without_imagenet_weights(tmp_path):
    with pytest.raises(ModelError, match="pretrained: small_cnn has no ImageNet weights.*set pretrained: false"):
        check_weights(TrainConfig(model="small_cnn", pretrained=True))
    # a search that may draw pretrained with no file is refused too, even if one of its choices names a file
    with pytest.raises(ModelError, match="has no ImageNet weights"):
        check_weights(TrainConfig(model="small_cnn", pretrained=True), weights_paths=[saved(tmp_path, "small_cnn"), ""])
    check_weights(TrainConfig(model="small_cnn", pretrained=True, weights_path=saved(tmp_path, "small_cnn")))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_create_model_refuses_a_channel_count_no_stem_takes(name):
    with pytest.raises(ModelError, match=rf"{name}: in_channels 2 is not supported; use 1 \(grey\) or 3 \(RGB\)"):
        create_model(name, 7, in_channels=2)


def test_config_offers_exactly_the_channel_counts_the_models_take():
    # two homes on purpose (config must not import torch to check a YAML); this keeps them one rule
    assert tuple(field_spec("in_channels").metadata["choices"]) == IN_CHANNELS


def test_scratch_models_build_without_torchvision():
    # torchvision costs about 1.3 s to import on top of torch; only the backbones need it
    code = ("import sys; from distributed.models import create_model; "
            "[create_model(n, 7) for n in ('small_cnn', 'baseline_cnn', 'emotion_cnn48')]; "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'; "
            "create_model('resnet18', 7); assert 'torchvision' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_weights_file_with_arbitrary_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    torch.save(Payload(marker), tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="not a loadable weights file"):
        create_model("resnet18", 7, weights_path=str(tmp_path / "evil.pth"))
    assert not marker.exists()

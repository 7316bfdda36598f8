import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distributed.models import ModelError, create_model, describe_models, list_models, native_size, stages

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
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


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        create_model("resnet18", 7, weights_path=str(tmp_path / "missing.pth"))


def test_weights_file_that_does_not_fit(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    expected = r"does not fit resnet18: \d+ missing keys \(bn1.weight, .*; 1 wrong shape keys \(conv1.weight\)"
    with pytest.raises(ModelError, match=expected) as info:
        create_model("resnet18", 7, weights_path=str(tmp_path / "other.pth"))
    assert "\n" not in str(info.value)


def touch(path):
    Path(path).touch()


class Payload:
    """Unpickling this calls touch(marker): what a malicious .pth could do with os.system instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return touch, (str(self.marker),)


def test_weights_file_with_arbitrary_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    torch.save(Payload(marker), tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="not a loadable weights file"):
        create_model("resnet18", 7, weights_path=str(tmp_path / "evil.pth"))
    assert not marker.exists()

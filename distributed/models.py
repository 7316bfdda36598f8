"""MODELS = {name: builder}; create_model(name, ...) builds one, stages(model) splits it for unfreezing.

Two CNNs are trained from scratch at 48x48; seven torchvision backbones get a fresh head and run at 224x224.
Every model has a `stages()` method: the head first, then backbone stages from deep to shallow, the stem last.
The training loop uses it for `freeze` (frozen: only stages[0] trains; progressive: stages[1], stages[2], ...
unfreeze one at a time) and for differential learning rates (stages[0] gets lr_head, the rest lr_backbone).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

# torchvision (about 1.3 s to import on top of torch) is imported only where a backbone needs it: building a scratch
# CNN, or any code that just imports this module, never pays for it
import torch
from torch import nn

from distributed.errors import ModelError
from distributed.model_names import BACKBONES, SCRATCH, check_name, native_size

# what every stem takes: grey faces, or RGB (a backbone's grey stem is its RGB conv summed over R, G and B)
IN_CHANNELS = (1, 3)


# -- scratch CNNs (48x48 faces) ------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # no conv bias: the BatchNorm right after it has its own shift
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def linear_bn_relu(fin: int, fout: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(fin, fout), nn.BatchNorm1d(fout), nn.ReLU(inplace=True), nn.Dropout(dropout)]


class BaselineCNN(nn.Module):
    """3 blocks of 2 conv 3x3 (64/128/256), each block max-pooled: 48 -> 6, then 9216 -> 512 -> 256 -> K.

    `small_cnn` is the same shape at a quarter of the width (16/32/64, FC 2304 -> 128 -> 64): about 40x fewer
    FLOPs, so a CPU search finishes in minutes (the quick default and the CPU tests use it)."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.5,
                 widths: tuple = (64, 128, 256), hidden: tuple = (512, 256)):
        super().__init__()
        blocks, cin = [], in_channels
        for cout in widths:
            blocks.append(nn.Sequential(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout),
                                        nn.MaxPool2d(2), nn.Dropout(0.25)))
            cin = cout
        self.block1, self.block2, self.block3 = blocks
        self.classifier = nn.Sequential(
            # identity at 48x48; lets `image_size` differ from the native size without a shape error
            nn.AdaptiveAvgPool2d(6),
            nn.Flatten(),
            *linear_bn_relu(widths[-1] * 6 * 6, hidden[0], dropout),
            *linear_bn_relu(hidden[0], hidden[1], dropout),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block3(self.block2(self.block1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.classifier, self.block3, self.block2, self.block1]


class EmotionCNN48(nn.Module):
    """12 conv layers in 5 blocks (32..512 channels), global average pool, 512-1024-512-256-128-K MLP.

    About 6.67 M parameters at K=7. Spatial dropout rises with depth (0.1 -> 0.2); the head's dropouts are
    0.5/0.35/0.25/0.15/0.1 at dropout=0.5 and scale with the `dropout` knob so one number tunes them all.
    """

    # (out channels, conv layers, spatial dropout); the first four blocks halve the side: 48 -> 3
    BLOCKS = ((32, 2, 0.1), (64, 2, 0.125), (128, 3, 0.15), (256, 3, 0.175), (512, 2, 0.2))

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.5):
        super().__init__()
        blocks, cin = [], in_channels
        for i, (cout, n_convs, p) in enumerate(self.BLOCKS):
            layers = []
            for j in range(n_convs):
                layers += conv_bn_relu(cin if j == 0 else cout, cout)
            pool = nn.MaxPool2d(2) if i < 4 else nn.AdaptiveAvgPool2d(1)
            blocks.append(nn.Sequential(*layers, pool, nn.Dropout2d(p)))
            cin = cout
        self.block1, self.block2, self.block3, self.block4, self.block5 = blocks
        scale = dropout / 0.5
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            *linear_bn_relu(512, 1024, 0.35 * scale),
            *linear_bn_relu(1024, 512, 0.25 * scale),
            *linear_bn_relu(512, 256, 0.15 * scale),
            *linear_bn_relu(256, 128, 0.1 * scale),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
            x = block(x)
        return self.classifier(x)

    def stages(self) -> list[nn.Module]:
        return [self.classifier, self.block5, self.block4, self.block3, self.block2, self.block1]


def build_scratch(name, cls, num_classes, in_channels, dropout, pretrained, weights_path) -> nn.Module:
    if pretrained and not weights_path:
        raise ModelError(f"{name} is trained from scratch and has no pretrained weights; "
                         f"set pretrained=false, or pass weights_path=FILE with a saved state dict of this model")
    model = cls(num_classes, in_channels, dropout)
    if weights_path:
        load_into(model, read_state_dict(weights_path), name, f"weights_path {weights_path}")
    return model


# -- torchvision backbones (224x224) -------------------------------------------------------------------


class Backbone(nn.Module):
    """A torchvision body cut into stages (stem first) plus a fresh head: head(flatten(pool(body(x))))."""

    def __init__(self, parts: list[nn.Module], features: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(*parts)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # BatchNorm first: pretrained features have ImageNet statistics, far from what a fresh Linear expects
        self.head = nn.Sequential(nn.BatchNorm1d(features), nn.Dropout(dropout), nn.Linear(features, num_classes))
        nn.init.xavier_uniform_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.body(x)), 1))

    def stages(self) -> list[nn.Module]:
        return [self.head, *reversed(self.body)]


def resnet_parts(net) -> tuple[list[nn.Module], int]:
    # the recipe unfreezes layer4, layer3, layer2, then everything: the stem rides with layer1
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [stem, net.layer2, net.layer3, net.layer4], net.fc.in_features


def vgg_parts(net) -> tuple[list[nn.Module], int]:
    # VGG's own classifier flattens 512x7x7 = 25088 features into 4096-wide layers (~120 M parameters);
    # a global average pool down to 512 features keeps the head light, like every other backbone here
    parts, current = [], []
    for layer in net.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            parts.append(nn.Sequential(*current))
            current = []
    return parts, 512


def chunked_parts(net, n: int = 4) -> tuple[list[nn.Module], int]:
    # mobile nets have 9 to 19 blocks in `features`; 4 chunks give progressive unfreezing a few steps
    blocks = list(net.features)
    chunks = [c for c in (blocks[i * len(blocks) // n:(i + 1) * len(blocks) // n] for i in range(n)) if c]
    last_conv = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)][-1]
    return [nn.Sequential(*c) for c in chunks], last_conv.out_channels


# how a torchvision body is cut into stages, by family: the start of the backbone's name
CUTS = {"vgg": vgg_parts, "resnet": resnet_parts, "mobilenet": chunked_parts, "efficientnet": chunked_parts}


def cut_for(name: str) -> Callable[[nn.Module], tuple[list[nn.Module], int]]:
    for family, cut in CUTS.items():
        if name.startswith(family):
            return cut
    raise KeyError(f"backbone {name}: no family in models.CUTS says how to cut it into stages; add one")


def build_backbone(name, cut, num_classes, in_channels, dropout, pretrained, weights_path) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    # weights go into torchvision's own module names, before the head is replaced and the stem made grey
    if weights_path:
        load_into(net, read_state_dict(weights_path), name, f"weights_path {weights_path}")
    elif pretrained:
        state, source = download_imagenet(name)
        load_into(net, state, name, source)
    parts, features = cut(net)
    model = Backbone(parts, features, num_classes, dropout)
    if in_channels == 1:
        to_grayscale(model)
    return model


OFFLINE = "EMOTUNE_OFFLINE"  # set (air-gapped machines, tests): use the cache only, never download


def download_imagenet(name: str) -> tuple[dict, str]:
    # IMAGENET1K_V1, not DEFAULT: the classic weights transfer-learning recipes start from, and the same for
    # every backbone (DEFAULT is a different, later file for resnet50 and mobilenet_v2, which would also miss
    # an offline cache holding the V1 file)
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    file_name = weights.url.split("/")[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        if os.environ.get(OFFLINE) and not (cache / file_name).is_file():
            raise FileNotFoundError(f"{OFFLINE} is set and the file is not in the cache")
        # cached in $TORCH_HOME/hub/checkpoints after the first download; the hash is checked on download
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # no network (URLError), bad hash (RuntimeError), corrupt cache (UnpicklingError)
        raise ModelError(
            f"{name}: could not get ImageNet weights {file_name} ({type(exc).__name__}: {first_line(exc)}); "
            f"place torchvision's file {file_name} ({weights.url}) in {cache}/ ($TORCH_HOME/hub/checkpoints/), "
            f"or pass weights_path=FILE") from None
    return state, f"ImageNet weights {cache / file_name}"


def check_weights(cfg, weights_paths: list[str] | None = None, num_classes: int | None = None) -> None:
    """Make sure the weights a run will load exist and fit, before any worker starts (exit 2, not a traceback in a
    worker); N workers on a node then share one downloaded file instead of racing to fetch it.

    weights_paths: every value a search may give weights_path for cfg.model ("" = none), checked instead of
    cfg.weights_path. num_classes: the size of a scratch model's head, which its file holds too; before the data is
    decoded it is len(cfg.classes) when classes are listed, else unknown and any head size in the file passes."""
    builder(cfg.model)
    for path in dict.fromkeys([cfg.weights_path] if weights_paths is None else weights_paths):
        if path:
            state = read_state_dict(path)
            check_fit(fit_skeleton(cfg, state, num_classes), state, cfg.model, f"weights_path {path}")
        elif cfg.pretrained:
            if cfg.model not in BACKBONES:
                raise ModelError(f"pretrained: {cfg.model} has no ImageNet weights (it is trained from scratch); "
                                 f"set pretrained: false, or choose one of {', '.join(BACKBONES)}")
            download_imagenet(cfg.model)


def fit_skeleton(cfg, state: dict, num_classes: int | None) -> nn.Module:
    """cfg.model as it stands when weights_path is loaded into it, on the meta device (shapes only: nothing is
    allocated or initialised, so even VGG19 takes milliseconds)."""
    with torch.device("meta"):
        if cfg.model in BACKBONES:  # build_backbone loads the file into torchvision's own model, before the new head
            import torchvision

            return getattr(torchvision.models, cfg.model)(weights=None)
        classes = num_classes or len(cfg.classes)
        model = create_model(cfg.model, max(classes, 2), in_channels=cfg.in_channels)
        if classes >= 2:
            return model
        # the data decides the head's size and is not decoded yet: take the file's, so only the rest is checked
        head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + ".weight"
        if head not in state or state[head].dim() != 2 or state[head].shape[0] < 2:
            return model
        return create_model(cfg.model, state[head].shape[0], in_channels=cfg.in_channels)


def to_grayscale(model: nn.Module) -> None:
    """Swap the first RGB conv for a 1-channel one whose kernel is the sum over R, G and B.

    A grey image x then gives exactly what the RGB conv gives on (x, x, x), so pretrained features carry over.
    """
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    grey = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, grey)


# -- weights files -------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict:
    if not Path(path).is_file():
        raise ModelError(f"weights_path {path}: no such file; check the path, or remove weights_path")
    try:
        # weights_only: a .pth from the internet is a pickle; this refuses anything but tensors and containers
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, EOFError... for a bad file
        raise ModelError(f"weights_path {path}: not a loadable weights file "
                         f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"weights_path {path}: expected a state dict (parameter name -> tensor), "
                         f"got {type(state).__name__}")
    return state


def load_into(model: nn.Module, state: dict, name: str, source: str) -> None:
    """load_state_dict(strict=True), with a one-line summary instead of PyTorch's list of every key."""
    check_fit(model, state, name, source)
    model.load_state_dict(state, strict=True)


def check_fit(model: nn.Module, state: dict, name: str, source: str) -> None:
    own = model.state_dict()
    problems = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "wrong shape": [k for k in own if k in state and state[k].shape != own[k].shape],
    }
    if any(problems.values()):
        summary = "; ".join(f"{len(keys)} {kind} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                            for kind, keys in problems.items() if keys)
        if problems["wrong shape"]:
            key = problems["wrong shape"][0]
            summary += f"; {key} is {list(state[key].shape)} in the file, {list(own[key].shape)} in {name}"
        fix = (f"pass torchvision's {name} weights" if name in BACKBONES else
               f"pass a state_dict() saved from {name} with the same in_channels and classes, or remove weights_path")
        raise ModelError(f"{source}: does not fit {name}: {summary}; {fix}")


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


# -- registry ------------------------------------------------------------------------------------------

# the network of each scratch name in model_names.SCRATCH
SCRATCH_NETS = {
    "small_cnn": functools.partial(BaselineCNN, widths=(16, 32, 64), hidden=(128, 64)),
    "baseline_cnn": BaselineCNN,
    "emotion_cnn48": EmotionCNN48,
}

# keyed by model_names, the one list of names: a name without a network or a cut fails here, at import
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(build_scratch, name, SCRATCH_NETS[name]) for name in SCRATCH},
    **{name: functools.partial(build_backbone, name, cut_for(name)) for name in BACKBONES},
}


def builder(name: str) -> Callable[..., nn.Module]:
    check_name(name)  # unknown name -> ModelError, the message config and search spaces give too
    return MODELS[name]


def create_model(name: str, num_classes: int, in_channels: int = 1, dropout: float = 0.5,
                 pretrained: bool = False, weights_path: str = "") -> nn.Module:
    """Build `name` with a `num_classes` head. weights_path wins over pretrained; neither = random init."""
    build = builder(name)
    # only what a model itself needs; a knob's policy (dropout <= 0.95) is TrainConfig's, checked before this call
    if num_classes < 2:
        raise ModelError(f"{name}: num_classes must be >= 2, got {num_classes}")
    if in_channels not in IN_CHANNELS:
        raise ModelError(f"{name}: in_channels {in_channels} is not supported; use 1 (grey) or 3 (RGB)")
    return build(num_classes=num_classes, in_channels=in_channels, dropout=dropout,
                 pretrained=pretrained, weights_path=weights_path)


def list_models() -> list[str]:
    return list(MODELS)


def describe_models() -> list[dict]:
    rows = []
    for name in MODELS:
        # on the meta device nothing is allocated or initialised: counting VGG19 takes milliseconds, not seconds
        with torch.device("meta"):
            model = create_model(name, num_classes=7, in_channels=1)
        rows.append({"name": name, "params": sum(p.numel() for p in model.parameters()),
                     "native_size": native_size(name), "kind": "backbone" if name in BACKBONES else "scratch"})
    return rows


def stages(model: nn.Module) -> list[nn.Module]:
    """Head first, then backbone stages deep to shallow, stem last. Unwraps DDP's `.module`."""
    return getattr(model, "module", model).stages()

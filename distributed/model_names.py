"""The architectures by name, and what a config check needs to know of each without building it: the ground floor
under models.py. No torch: `emotune check-space` and TrainConfig name a model in milliseconds, not seconds.

models.MODELS builds one network per name listed here (tests/test_models.py checks that the two agree).
"""
from __future__ import annotations

from distributed.errors import ModelError, did_you_mean

# trained from scratch on 48x48 faces
SCRATCH = ("small_cnn", "baseline_cnn", "emotion_cnn48")
# torchvision.models.<name> with a fresh head, at 224x224; only these have ImageNet weights (`pretrained`)
BACKBONES = ("vgg16", "vgg19", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")
NAMES = SCRATCH + BACKBONES


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ModelError(f"unknown model {name!r}{did_you_mean(name, NAMES, choose_from=True)}")


def native_size(name: str) -> int:
    """The side the model is built for: 48 for the scratch CNNs, ImageNet's 224 for the backbones."""
    check_name(name)
    return 224 if name in BACKBONES else 48

"""Batch augmentation on the training device: flips, small affine, brightness/contrast and random erasing drawn per
sample, and MixUp/CutMix (torchvision). A GPU never waits on a per-image CPU pipeline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip + affine, brightness/contrast and erasing, drawn per sample, applied to the whole batch.

    x: float [B, C, H, W] in [0, 1] on any device. The random numbers come from `generator` (on its own
    device, CPU by default) and are moved to x's device, so a seeded run augments identically on CPU and GPU.
    """
    b, c, h, w = x.shape
    r = torch.rand(b, 12, generator=generator, device=generator.device if generator else "cpu").to(x.device)
    out = x.float()

    # Flip and affine in one resample. affine_grid maps output to input coordinates in [-1, 1].
    flip = torch.where(r[:, 0] < 0.5, -1.0, 1.0)
    angle = (r[:, 1] * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * r[:, 2]
    shift = (r[:, 3:5] * 2 - 1) * 0.16  # +-8% of the side: the grid spans 2 units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    # border padding: a black wedge in the corner would be an artifact the model could learn
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness = (0.8 + 0.4 * r[:, 5]).view(b, 1, 1, 1)
    contrast = (0.8 + 0.4 * r[:, 6]).view(b, 1, 1, 1)
    out = out * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp(0, 1)

    # Random erasing: one rectangle (2-20% of the area, aspect 0.3-3.3) in a quarter of the samples,
    # built as broadcast row/column masks; filled with the image's mean grey so it adds no new intensity cue.
    area = 0.02 + 0.18 * r[:, 8]
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * r[:, 9])
    eh = (torch.sqrt(area * ratio) * h).clamp(max=h)
    ew = (torch.sqrt(area / ratio) * w).clamp(max=w)
    top, left = r[:, 10] * (h - eh), r[:, 11] * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    in_rows = (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
    in_cols = (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
    erase = (in_rows & in_cols & (r[:, 7] < 0.25).view(b, 1, 1)).unsqueeze(1)
    out = torch.where(erase, mean.clamp(0, 1), out)
    return out.to(x.dtype)


def mix_transform(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """(x, y) -> (x_mixed, y_soft [B, num_classes]) via torchvision's MixUp/CutMix; None when both are off."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

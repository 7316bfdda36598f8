"""Procedurally drawn 48x48 faces in the 7 FER2013 expression classes: the default data, needing no files.

Deterministic from the seed; train and test come from independent random streams.
"""
from __future__ import annotations

import numpy as np

# Per-class expression prototypes, jittered per sample. Neighbouring expressions share cues on purpose
# (angry/disgust: low frowning brows; fear/surprise: wide eyes, raised brows; sad/disgust: drooping mouth),
# so a CNN has to combine cues and the task is learnable but not solved at epoch 1.
#              eye_open brow_gap brow_slope mouth_curve mouth_open mouth_width
_EXPRESSIONS = {
    "angry":    (0.60, 0.11, -0.30, -0.03, 0.00, 0.19),
    "disgust":  (0.65, 0.12, -0.18, -0.08, 0.03, 0.21),
    "fear":     (1.30, 0.21, 0.25, -0.03, 0.07, 0.27),
    "happy":    (0.80, 0.16, 0.00, 0.10, 0.04, 0.29),
    "sad":      (0.80, 0.16, 0.28, -0.08, 0.00, 0.20),
    "surprise": (1.40, 0.23, 0.05, 0.00, 0.13, 0.17),
    "neutral":  (1.00, 0.15, 0.00, 0.00, 0.00, 0.22),
}
_JITTER = np.array([0.20, 0.03, 0.14, 0.045, 0.035, 0.035], dtype=np.float32)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Antialiased inside-mask from a signed distance (positive inside), ~`edge` wide ramp."""
    return np.clip(0.5 + d / edge, 0.0, 1.0)


def _draw_faces(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one grey face per label, all at once: every per-sample parameter is an [N, 1, 1] array."""
    n = len(labels)
    f32 = np.float32

    def uniform(low, high):
        return rng.uniform(low, high, (n, 1, 1)).astype(f32)

    def normal(std):
        return (rng.standard_normal((n, 1, 1)) * std).astype(f32)

    proto = np.array([_EXPRESSIONS[name] for name in _EXPRESSIONS], dtype=f32)[labels]  # [N, 6]
    p = proto + rng.standard_normal(proto.shape).astype(f32) * _JITTER
    eye_open, brow_gap, brow_slope, curve, mouth_open, mouth_w = (p[:, i, None, None] for i in range(6))
    eye_open, mouth_open, mouth_w = np.maximum(eye_open, 0.2), np.maximum(mouth_open, 0.0), np.maximum(mouth_w, 0.1)

    # Pixel centres in [-1, 1], then into each face's own frame (inverse pose: shift, rotate, scale).
    c = (np.arange(size, dtype=f32) + 0.5) / size * 2 - 1
    gx, gy = c[None, None, :], c[None, :, None]
    angle, scale = normal(np.deg2rad(8)), uniform(0.85, 1.1)
    dx, dy = normal(0.06), normal(0.06)
    cos, sin = np.cos(angle), np.sin(angle)
    x = ((gx - dx) * cos + (gy - dy) * sin) / scale
    y = (-(gx - dx) * sin + (gy - dy) * cos) / scale
    ax = np.abs(x)  # faces are mirror-symmetric: draw the right eye/brow and get the left for free
    edge = 2.0 / size

    rx, ry = uniform(0.56, 0.68), uniform(0.74, 0.86)
    face = _soft((1 - np.sqrt((x / rx) ** 2 + ((y - 0.02) / ry) ** 2)) * 0.6, edge)

    eye_x, eye_y, eye_w = uniform(0.26, 0.32), uniform(-0.22, -0.14), uniform(0.11, 0.15)
    eye_h = 0.075 * eye_open
    eye = _soft((1 - np.sqrt(((ax - eye_x) / eye_w) ** 2 + ((y - eye_y) / eye_h) ** 2)) * eye_h, edge)

    # Brow: a thick segment above the eye; slope > 0 lifts the inner end (sad, fear), < 0 lowers it (angry).
    brow_y = eye_y - eye_h - brow_gap + brow_slope * (ax - eye_x)
    brow = _soft(np.minimum(0.035 - np.abs(y - brow_y), 0.15 - np.abs(ax - eye_x)), edge)

    # Mouth: a parabola (curve > 0 lifts the corners: smile) thickened in the middle by the opening.
    mouth_y = uniform(0.38, 0.46)
    t = 1 - (x / mouth_w) ** 2
    mid = mouth_y - curve * (1 - t)
    lips = _soft(np.minimum(0.03 + mouth_open * np.clip(t, 0, 1) - np.abs(y - mid), 0.4 * mouth_w * t), edge)
    inside = _soft(np.minimum(mouth_open * np.clip(t, 0, 1) - 0.01 - np.abs(y - mid), 0.4 * mouth_w * t), edge)

    skin, bg = uniform(0.55, 0.8), uniform(0.1, 0.5)
    img = bg + (skin - bg) * face
    img = img + (uniform(0.1, 0.3) - img) * np.maximum(eye, brow)
    img = img + (skin * 0.45 - img) * lips
    img = img + (uniform(0.0, 0.12) - img) * inside

    # Nuisances a real camera adds: a lighting gradient, contrast/brightness and sensor noise.
    light = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(f32)
    img = img + uniform(0.0, 0.25) * (np.cos(light) * gx + np.sin(light) * gy)
    img = (img - 0.5) * uniform(0.6, 1.2) + 0.5 + normal(0.06)
    img = img + rng.standard_normal(img.shape, dtype=f32) * uniform(0.01, 0.07)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def draw_dataset(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (train_x, train_y, test_x, test_y): 300 train and 100 test faces per class, uint8 [N, 1, 48, 48]."""
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)  # independent streams for train and test
    k = len(_EXPRESSIONS)
    train_y, test_y = np.repeat(np.arange(k), 300), np.repeat(np.arange(k), 100)
    # Drawn at 48 px like FER2013 and resized after: the same faces at every size, and drawing at 224 px
    # would need GBs of float temporaries.
    train_x = _draw_faces(train_y, 48, np.random.default_rng(train_seq))
    test_x = _draw_faces(test_y, 48, np.random.default_rng(test_seq))
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)

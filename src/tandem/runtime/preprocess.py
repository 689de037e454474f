"""The one preprocessing function, in NumPy, used by training and inference alike.

    from tandem.images import to_pixels
    pixels = to_pixels(images, size=28, channels=1)     # anything -> uint8 (N, H, W, C)   (tandem.images)
    x = preprocess(pixels, mean=0.5, std=0.5)           # uint8 (N, H, W, C) -> float32 (N, C, H, W)
    x = preprocess(rgb, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])   # one value per channel

The parameters travel in the bundle's manifest (`preprocessing`), so the runtime repeats exactly what
training did.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tandem.errors import UserError


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> list[float]:
    # Plain Python on purpose: NumPy's per-call overhead would be most of a batch-1 preprocess.
    try:
        values = [float(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else [float(value)]
    except (TypeError, ValueError):
        raise UserError(f"preprocessing {name} must be a number or one number per channel, got {value!r}") from None
    if len(values) not in (1, channels):
        raise UserError(f"preprocessing {name} has {len(values)} values; give one, or one per channel ({channels})")
    if not all(math.isfinite(v) and (v > 0 or name != "std") for v in values):
        raise UserError(f"preprocessing {name} must be finite{' and > 0' if name == 'std' else ''}, got {value}")
    return values


def preprocess(pixels: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """uint8 pixels (N, H, W, C) -> float32 (N, C, H, W) scaled to (pixel / 255 - mean[c]) / std[c].

    `mean` and `std` are each one number, or one value per channel.
    """
    if pixels.ndim != 4:
        raise ValueError(f"preprocess wants (N, H, W, C) pixels, got shape {pixels.shape}")
    channels = pixels.shape[-1]
    mean_c, std_c = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if len(mean_c) != len(std_c):  # one of them per channel: repeat the other
        mean_c, std_c = mean_c * (channels // len(mean_c)), std_c * (channels // len(std_c))
    # One converting copy straight into NCHW order, then a multiply and a subtract in place: this runs on
    # every batch served, so no further copies.
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    if len(std_c) == 1:
        x *= np.float32(1.0 / (255.0 * std_c[0]))
        x -= np.float32(mean_c[0] / std_c[0])
    else:
        x *= np.array([1.0 / (255.0 * s) for s in std_c], np.float32)[:, None, None]
        x -= np.array([m / s for m, s in zip(mean_c, std_c)], np.float32)[:, None, None]
    return x

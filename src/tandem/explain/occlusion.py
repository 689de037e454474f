"""Occlusion in the runtime (ONNX Runtime, batched; never imports torch): which parts of an image the answer rests on.

    predictor = Predictor.load("bundle/", precision="fp32")
    result = occlusion(predictor, predictor.pixels("cat.png")[0])          # explain the predicted class
    result = occlusion(predictor, pixels, target=3, window=4, stride=2)    # or another class
    result.heatmap        # float32 (H, W): mean drop of the class's probability when a window over the pixel is black

A window of black (raw pixel 0, then the bundle's preprocessing) slides over the image; every occluded copy and
the image itself run through the model in one batch. Each pixel's value is the mean, over the windows that cover
it, of (probability of the image - probability of the occluded copy). This is Captum's Occlusion (Zeiler & Fergus
2014) on the softmax output, window positions and edge windows included, so the two agree to float precision
(tests/test_explain.py checks it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.errors import UserError
from tandem.runtime.predictor import softmax
from tandem.runtime.preprocess import preprocess

# Occluded copies of one image, at most: 13 x 13 = 169 at the defaults on 28 x 28. A window of 4 on a 224-pixel
# photo would make 12,321; give such images a larger window (window_for).
MAX_OCCLUDED = 4096
# Input bytes per ONNX Runtime call: the animals' 170 copies are one run; a large photo's copies are split.
_RUN_BYTES = 64 << 20
# Window masks up to this size are cached (8 sets at most): 1 MiB holds 1,337 positions of 28 x 28.
_CACHED_MASK_BYTES = 1 << 20


@dataclass(frozen=True)
class OcclusionMap:
    heatmap: np.ndarray        # float32 (H, W): mean drop of the target's probability when a window over the pixel is black
    target: int                # the class explained (default: the predicted class)
    probabilities: np.ndarray  # float32 (classes,) of the unoccluded image
    window: int
    stride: int


def class_index(text: str | None, labels: list[str]) -> int | None:
    """A class named by its label (exact, then ignoring case) or by its index as ASCII digits; None stays None
    (explain the predicted class). A UserError naming some labels otherwise."""
    if text is None:
        return None
    if text in labels:
        return labels.index(text)
    folded = [label.casefold() for label in labels]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    digits = text.strip()
    if digits.isascii() and digits.isdigit() and int(digits) < len(labels):
        return int(digits)
    shown = ", ".join(labels[:20]) + (f" ... ({len(labels)} in all)" if len(labels) > 20 else "")
    raise UserError(f"target {text[:64]!r} is not a label of this model; give one of {shown} (or its index, "
                    f"0 to {len(labels) - 1})")


def window_for(image_size: int) -> tuple[int, int]:
    """A window and stride that keep about 13 x 13 positions at any image size: (4, 2) at 28 pixels."""
    window = max(1, round(image_size / 7))
    return window, max(1, window // 2)


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Where windows start along one axis, as Captum places them: every stride from 0 until the axis is covered
    (the last window may be cut off by the edge)."""
    return np.arange(math.ceil((length - window) / stride) + 1) * stride


def window_masks(height: int, width: int, window: int, stride: int) -> np.ndarray:
    """bool (positions, H, W): True where each window covers; read-only. Small sets (the animals' 169 x 28 x 28)
    are built once and shared; a large photo's are built per call, so a server does not keep them."""
    positions = len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))
    if positions * height * width <= _CACHED_MASK_BYTES:
        return _cached_masks(height, width, window, stride)
    return _build_masks(height, width, window, stride)


@functools.lru_cache(maxsize=8)
def _cached_masks(height: int, width: int, window: int, stride: int) -> np.ndarray:
    return _build_masks(height, width, window, stride)


def _build_masks(height: int, width: int, window: int, stride: int) -> np.ndarray:
    ys, xs = window_starts(height, window, stride), window_starts(width, window, stride)
    masks = np.zeros((len(ys), len(xs), height, width), bool)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            masks[i, j, y:y + window, x:x + window] = True
    masks = masks.reshape(-1, height, width)
    masks.flags.writeable = False
    return masks


def check_window(height: int, width: int, window: int, stride: int) -> int:
    """The number of occluded copies; a UserError for a window or stride that cannot work here."""
    if not (isinstance(window, (int, np.integer)) and isinstance(stride, (int, np.integer))):
        raise UserError(f"the occlusion window and stride must be whole numbers, got {window!r} and {stride!r}")
    if not 1 <= window <= min(height, width):
        raise UserError(f"occlusion window {window} does not fit a {height} x {width} image; give 1 to {min(height, width)}")
    if not 1 <= stride <= window:
        raise UserError(f"occlusion stride {stride} must be from 1 to the window ({window}), or pixels go uncovered")
    count = len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))
    if count > MAX_OCCLUDED:
        suggested = window_for(max(height, width))
        raise UserError(f"occlusion with window {window} and stride {stride} makes {count:,} copies of this "
                        f"{height} x {width} image (at most {MAX_OCCLUDED:,}); use a larger window and stride, e.g. "
                        f"window {suggested[0]} and stride {suggested[1]}")
    return count


def occlusion(predictor: Any, pixels: np.ndarray, target: int | None = None, window: int = 4,
              stride: int = 2, fill: np.ndarray | None = None) -> OcclusionMap:
    """Explain one image, uint8 (H, W, C) at the bundle's size (`predictor.pixels(x)[0]`), by occlusion.

    predictor: a tandem.runtime.Predictor (its ONNX Runtime session, preprocessing and labels are used).
    target: the class index to explain (default: the class the model predicts for the image).
    fill: uint8 (H, W, C), what the window shows instead of the image (tandem.explain.baselines.fill_images: a
    blurred or mean image); default black.
    """
    pixels = np.asarray(pixels)
    shape = (predictor.image_size, predictor.image_size, predictor.channels)
    if pixels.dtype != np.uint8 or pixels.shape != shape:
        raise UserError(f"occlusion takes one image as uint8 pixels of shape {shape} (predictor.pixels(x)[0]); "
                        f"got {pixels.dtype} {pixels.shape}")
    height, width, _ = shape
    check_window(height, width, window, stride)
    classes = len(predictor.labels)
    if target is not None and not (isinstance(target, (int, np.integer)) and 0 <= target < classes):
        raise UserError(f"target class {target!r} is not a class index of this model (0 to {classes - 1})")
    masks = window_masks(height, width, window, stride)
    # Row 0 is the image itself; row 1 + k has window k black. Black before preprocessing, as a photo would be.
    batch = np.empty((len(masks) + 1, *shape), np.uint8)
    batch[0] = pixels
    if fill is None:
        np.multiply(pixels, ~masks[..., None], out=batch[1:], casting="unsafe")
    else:
        if np.shape(fill) != shape:
            raise UserError(f"occlusion's fill is one image of shape {shape}; got {np.shape(fill)}")
        batch[1:] = np.where(masks[..., None], np.asarray(fill, np.uint8), pixels)
    probabilities = _probabilities(predictor, batch)
    if target is None:
        target = int(np.argmax(probabilities[0]))
    drops = probabilities[0, target].astype(np.float64) - probabilities[1:, target]
    coverage = masks.sum(axis=0, dtype=np.float64)
    heatmap = np.tensordot(drops, masks, axes=1) / coverage
    return OcclusionMap(heatmap.astype(np.float32), int(target), probabilities[0].astype(np.float32),
                        int(window), int(stride))


def _probabilities(predictor: Any, batch: np.ndarray) -> np.ndarray:
    """Softmax over the model's logits for a batch of uint8 images: one ONNX Runtime call per _RUN_BYTES."""
    per_image = batch[0].size * 4
    step = max(1, _RUN_BYTES // per_image)
    runs = [predictor.session.run(None, {predictor.input_name: preprocess(batch[i:i + step], predictor.mean,
                                                                          predictor.std)})[0]
            for i in range(0, len(batch), step)]
    return softmax(np.concatenate(runs).astype(np.float32, copy=False))

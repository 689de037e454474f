"""Maps that know nothing of the model, and what removed pixels become: the yardsticks of faithfulness (NumPy and
Pillow; never imports torch).

    maps = model_free_maps(pixels, seed=0)        # {"random": ..., "brightness": ..., "edge": ...}, each (N, H, W)
    fill = fill_images("blur", pixels)            # uint8 (N, H, W, C): what a deleted pixel is set to

A map earns trust only by beating maps that ignore the model. On the animals 60% of the pixels are black, so a
random order spends most deletion steps removing nothing, and a map of pixel brightness "beats random" without
looking at the network (issue 19). Hence three model-free baselines: a seeded random map, the pixel's brightness
(the mean over channels) and an edge map (the Sobel gradient magnitude of the grey image). And three fills, so
that no method is favoured by sharing the metric's reference: black (raw 0), blur (the image under a Gaussian
blur of sigma = side / 10 pixels, 2.8 on 28 pixels: its shape is gone, its brightness is not) and mean (the
training split's mean image where the data is reachable, else each image's own mean value, said in the report).
"""

from __future__ import annotations

import numpy as np

BASELINES = ("random", "brightness", "edge")
FILLS = ("black", "blur", "mean")
FILL_TEXT = {"black": "black (raw 0)", "blur": "the image blurred (Gaussian, sigma = side / 10)",
             "mean": "the mean image"}
BLUR_FRACTION = 0.1   # the blur's sigma as a fraction of the image's side


def brightness_maps(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) float32: each pixel's mean over its channels, brightest first in an order."""
    return np.asarray(pixels, np.float32).mean(axis=-1)


def edge_maps(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) float32: the Sobel gradient magnitude of each grey image (edges replicated at the border)."""
    grey = brightness_maps(pixels)
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    # Sobel: a central difference across, smoothed [1, 2, 1] along.
    dx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    dy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return np.hypot(dx, dy).astype(np.float32)


def random_maps(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(N, H, W) float32 of seeded uniform noise: a random order of the pixels."""
    return np.random.default_rng(seed).random((n, height, width), dtype=np.float32)


def model_free_maps(pixels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Each baseline's maps of uint8 images (N, H, W, C), in BASELINES' order."""
    n, height, width = np.shape(pixels)[:3]
    return {"random": random_maps(n, height, width, seed), "brightness": brightness_maps(pixels),
            "edge": edge_maps(pixels)}


def blurred(pixels: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """uint8 (N, H, W, C): each image under a Gaussian blur (Pillow), sigma default side / 10."""
    from PIL import Image, ImageFilter

    pixels = np.asarray(pixels, np.uint8)
    sigma = BLUR_FRACTION * pixels.shape[1] if sigma is None else sigma
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        channels = [Image.fromarray(np.ascontiguousarray(image[..., c])).filter(ImageFilter.GaussianBlur(sigma))
                    for c in range(image.shape[-1])]
        out[i] = np.stack([np.asarray(c) for c in channels], axis=-1)
    return out


def fill_images(fill: str, pixels: np.ndarray, data_mean: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, H, W, C): what each image's removed pixels become under `fill` (one of FILLS).

    mean: `data_mean` (float (H, W, C), the training split's mean image) where given, else each image's own mean
    value in every pixel."""
    pixels = np.asarray(pixels, np.uint8)
    if fill == "black":
        return np.zeros_like(pixels)
    if fill == "blur":
        return blurred(pixels)
    if fill == "mean":
        if data_mean is not None:
            mean = np.clip(np.rint(np.asarray(data_mean, np.float64)), 0, 255).astype(np.uint8)
            return np.broadcast_to(mean, pixels.shape).copy()
        per_image = np.rint(pixels.reshape(len(pixels), -1).mean(1)).astype(np.uint8)
        return np.broadcast_to(per_image[:, None, None, None], pixels.shape).copy()
    raise ValueError(f"unknown fill {fill!r}; one of {', '.join(FILLS)}")


def data_mean_image(bundle, manifest: dict) -> np.ndarray | None:
    """The training split's mean image, float (H, W, C), or None where the bundle's data cannot be read here."""
    from tandem.errors import UserError
    from tandem.explain.data import bundle_splits, split_pixels

    try:
        train = bundle_splits(bundle, manifest).train
        pixels, _ = split_pixels(train)
    except (UserError, OSError, KeyError, ValueError):
        return None
    return pixels.astype(np.float64).mean(axis=0) if len(pixels) else None

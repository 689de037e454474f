"""The one preprocessing function, in NumPy, used by training and inference alike.

Two steps, both here so that the two sides cannot drift apart:

    pixels = to_pixels(images, size=28, channels=1)     # anything -> uint8 (N, H, W, C)
    x = preprocess(pixels, mean=0.5, std=0.5)           # uint8 (N, H, W, C) -> float32 (N, C, H, W)

The parameters travel in the bundle's manifest (`preprocessing`), so the runtime repeats exactly what
training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tandem.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def preprocess(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels (N, H, W, C) -> float32 (N, C, H, W) scaled to (pixel / 255 - mean) / std."""
    if pixels.ndim != 4:
        raise ValueError(f"preprocess wants (N, H, W, C) pixels, got shape {pixels.shape}")
    scale = np.float32(1.0 / (255.0 * std))
    shift = np.float32(mean / std)
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    x *= scale
    x -= shift
    return np.ascontiguousarray(x)


def _pil_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def _fit_pil(image: Any, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        # Palette, alpha, 16-bit: flatten onto black, the background of the embedded animals.
        if "A" in image.getbands() or image.mode == "P":
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    image = image.convert(_pil_mode(channels))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Read one image file -> uint8 (size, size, channels). Raises UserError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _fit_pil(image, size, channels)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def _fit_array(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    """One image as an array (H, W) or (H, W, C) of pixel values 0..255 -> uint8 (size, size, channels)."""
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or array.size == 0:
            raise UserError(f"images must be numeric pixel arrays, got dtype {array.dtype}")
        lo, hi = float(np.min(array)), float(np.max(array))
        if lo < 0 or hi > 255:
            raise UserError(f"pixel values must lie in 0..255, got {lo:g}..{hi:g}; pass raw pixels, not normalised ones")
        array = np.rint(array).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise UserError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")
    if array.shape[:2] == (size, size) and (
        (channels == 1 and array.ndim == 2) or (channels == 3 and array.ndim == 3 and array.shape[-1] == 3)
    ):
        return array[..., None] if array.ndim == 2 else array
    from PIL import Image

    return _fit_pil(Image.fromarray(array), size, channels)


def to_pixels(images: Any, size: int, channels: int) -> np.ndarray:
    """Images in any supported form -> uint8 (N, size, size, channels).

    Accepts a NumPy array of one image (H, W[, C]) or a batch (N, H, W[, C]) of pixel values 0..255,
    a PIL image, a file path, or a list mixing those.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)):
            # (H, W) or (H, W, C): one image (no real image is 4 pixels wide).
            images = images[None]
        if images.ndim not in (3, 4):
            raise UserError(f"an image batch must be (N, H, W) or (N, H, W, C); got shape {images.shape}")
        if images.dtype == np.uint8 and images.shape[1:3] == (size, size):
            if images.ndim == 3 and channels == 1:
                return np.ascontiguousarray(images[..., None])
            if images.ndim == 4 and images.shape[-1] == channels:
                return np.ascontiguousarray(images)
        return np.stack([_fit_array(image, size, channels) for image in images])
    if isinstance(images, (str, Path)) or hasattr(images, "getbands"):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            out.append(load_image(item, size, channels))
        elif hasattr(item, "getbands"):  # a PIL image
            out.append(_fit_pil(item, size, channels))
        elif isinstance(item, np.ndarray):
            out.append(_fit_array(item, size, channels))
        else:
            raise UserError(f"cannot treat {type(item).__name__} as an image; pass arrays, PIL images or paths")
    if not out:
        raise UserError("no images given")
    return np.stack(out)


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside a folder, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files stay, folders become their image files (recursively, sorted). Missing paths raise UserError."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders of images")
    return files

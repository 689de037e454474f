"""One image (a file, encoded bytes, an array or a PIL image) into uint8 pixels, as training and prediction
both read it. Torch-free. The rules are tandem.images' (see its docstring); tandem.images.folders decodes many
files in a process pool through load_image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
RESIZE_MODES = ("squash", "crop", "pad")
# Pillow's modes for 16-bit greyscale PNGs (and "I", how older Pillows open them): 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
CHANNEL_COUNTS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA: what a channel axis may hold

_MOVE_CHANNELS = "np.moveaxis(a, 0, -1) for one channel-first image, a[..., None] for a batch of grey images"


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise UserError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    return resize


# --- pixel values -------------------------------------------------------------------------------------


def as_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of any dtype -> uint8 0..255 by the rules in the module docstring, or a UserError."""
    if array.dtype == np.uint8 or array.size == 0:
        return array.astype(np.uint8, copy=False)
    if array.dtype == np.bool_:
        raise UserError("boolean arrays are not images; pass uint8 0..255 (e.g. mask.astype(np.uint8) * 255)")
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(value / 257): 65535 -> 255
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise UserError(f"integer pixel values must lie in 0..255 (or be uint16 for 16-bit images); got {lo}..{hi}")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.min(array)), float(np.max(array))
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails this too
            raise UserError(f"float pixel values must lie in 0..1, got {lo:g}..{hi:g}; pass floats in 0..1, or uint8 "
                            "0..255 (for 0..255 floats: a.round().astype(np.uint8)), not normalised values")
        return np.rint(array * 255.0).astype(np.uint8)
    raise UserError(f"images must be numeric pixel arrays, got dtype {array.dtype}")


# --- one PIL image -> uint8 (size, size, channels) -----------------------------------------------------


def _eight_bit(image: Any) -> Any:
    """Any PIL mode -> "L" or "RGB" with 8-bit values, rescaling 16-bit and flattening alpha onto black."""
    from PIL import Image

    if image.mode in ("L", "RGB"):
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image)
        if image.mode in SIXTEEN_BIT_MODES:
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise UserError(f"{image.mode} image values must lie in 0..65535, got {values.min()}..{values.max()}")
            values = values.astype(np.uint16)
        return Image.fromarray(as_uint8(values))
    if image.mode == "1":
        return image.convert("L")
    if "A" in image.getbands() or "a" in image.getbands() or image.mode == "P":
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _upright(image: Any, in_place: bool) -> Any:
    """Apply the EXIF orientation (phone photos are often stored sideways with a tag saying so)."""
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) in (1, None):  # 0x0112: Orientation
        return image
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
        return image
    return ImageOps.exif_transpose(image)


def _square(image: Any, size: int, resize: str) -> Any:
    from PIL import Image, ImageOps

    if image.size == (size, size):
        return image
    if resize == "squash" or image.width == image.height:
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if resize == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    return ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color=0)


def fit_pil(image: Any, size: int, channels: int, resize: str = "crop", in_place: bool = False) -> np.ndarray:
    """One PIL image -> uint8 (size, size, channels): upright, 8-bit, flattened, converted, resized.

    in_place=True lets the EXIF turn modify `image` (for images this module opened itself).
    """
    return _finish(_upright(image, in_place), size, channels, resize)


def _finish(image: Any, size: int, channels: int, resize: str) -> np.ndarray:
    image = _square(_eight_bit(image).convert("L" if channels == 1 else "RGB"), size, resize)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _draft(image: Any, size: int, channels: int, resize: str) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when that keeps >= 2x the pixels needed.

    crop and squash need both sides >= 2 * size; pad needs the long side >= 2 * size. A no-op for other
    formats. Asking for "L" decodes only the luma channel (JPEG's Y is the same ITU-R 601 luma as convert("L")).
    """
    width, height = image.size
    scale = 2 * size / (max(width, height) if resize == "pad" else min(width, height))
    image.draft("L" if channels == 1 else "RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def load_image(path: str | Path, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """Read one image file -> uint8 (size, size, channels). Raises a UserError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            return _decode_opened(image, size, channels, resize)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(_folder_message(path)) from None
    except UserError as err:
        raise UserError(f"image {path}: {err}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as err:
        if path.is_dir():  # where opening a folder is not an IsADirectoryError (Windows: PermissionError)
            raise UserError(_folder_message(path)) from None
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def _decode_opened(image: Any, size: int, channels: int, resize: str) -> np.ndarray:
    """An image Image.open has just read the header of -> uint8 (size, size, channels)."""
    _draft(image, size, channels, resize)  # before load, and before the EXIF turn: scale is orientation-free
    image.load()
    return fit_pil(image, size, channels, resize, in_place=True)


def decode_image_bytes(data: bytes, size: int, channels: int, resize: str = "crop",
                       max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """An encoded image in memory (what a camera or a browser sends) -> (uint8 (size, size, channels), format).

    Raises a UserError saying what is wrong. max_pixels: refuse larger images before decoding them.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError("the image is empty; send the bytes of a PNG, JPEG or BMP file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise UserError(f"the image is {width}x{height} pixels, more than the {max_pixels} this server "
                                "decodes; send a smaller image")
            fmt = image.format or "unknown"  # read before the EXIF turn, which may replace the image's data
            return _decode_opened(image, size, channels, resize), fmt
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - untrusted bytes: a crafted file can make Pillow raise anything
        if isinstance(err, UnidentifiedImageError):
            raise UserError("the bytes are not an image file; send a PNG, JPEG, BMP, GIF, WebP or TIFF") from None
        if isinstance(err, Image.DecompressionBombError):
            raise UserError(f"the image has more pixels than this server decodes ({max_pixels or 'Pillow: 179M'}); "
                            "send a smaller image") from None
        raise UserError(f"cannot decode the image ({type(err).__name__}: {err}); send an intact image file (PNG, JPEG, BMP, GIF, WebP, TIFF)") from None


def _folder_message(path: Path) -> str:
    return (f"{path} is a folder, not an image file; pass the image files in it, or use "
            "Predictor.predict_files / `tandem predict` for folders")


# --- arrays and mixed inputs ---------------------------------------------------------------------------


def _fit_array(array: np.ndarray, size: int, channels: int, resize: str) -> np.ndarray:
    """One uint8 image (H, W) or (H, W, 1|2|3|4) -> uint8 (size, size, channels); PIL only when needed."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape[:2] == (size, size):
        if array.ndim == 2:
            # L -> RGB in Pillow repeats the value, so this is what the PIL path would give.
            return array[..., None] if channels == 1 else np.repeat(array[..., None], 3, axis=-1)
        if channels == 3 and array.shape[-1] == 3:
            return array
    from PIL import Image

    # (H, W, 2) becomes an "LA" image, (H, W, 4) "RGBA": alpha is flattened as for files. Arrays carry no EXIF.
    return _finish(Image.fromarray(np.ascontiguousarray(array)), size, channels, resize)


def batch_pixels(batch: np.ndarray, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """A known batch (N, H, W), (N, H, W, C) or (N, C, H, W), C in 1..4 -> uint8 (N, size, size, channels).

    For data sets: the first axis is always the batch; an empty batch is refused. Values are checked once
    for the whole batch, and a batch that already has the right size and channels is not touched image by
    image.
    """
    check_resize(resize)
    if batch.ndim == 4 and batch.shape[1] in CHANNEL_COUNTS and batch.shape[-1] not in CHANNEL_COUNTS:
        batch = batch.transpose(0, 2, 3, 1)  # NCHW, as tensor pipelines hold images
    if batch.ndim not in (3, 4) or (batch.ndim == 4 and batch.shape[-1] not in CHANNEL_COUNTS):
        raise UserError(f"an image batch must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 2, 3, 4; "
                        f"got shape {batch.shape}")
    if len(batch) == 0:
        raise UserError("no images given")
    _check_has_pixels(batch.shape[1:3])
    batch = as_uint8(batch)
    if batch.ndim == 4 and batch.shape[-1] == 1:
        batch = batch[..., 0]
    if batch.shape[1:3] == (size, size):
        if batch.ndim == 3:
            return np.ascontiguousarray(batch[..., None] if channels == 1 else np.repeat(batch[..., None], 3, axis=-1))
        if channels == 3 and batch.shape[-1] == 3:
            return np.ascontiguousarray(batch)
    out = np.empty((len(batch), size, size, channels), np.uint8)
    for i, image in enumerate(batch):
        out[i] = _fit_array(image, size, channels, resize)
    return out


def _check_has_pixels(height_width: tuple) -> None:
    if 0 in height_width:  # would be resized to a black square without a word
        raise UserError(f"an image array of height {height_width[0]} and width {height_width[1]} has no pixels; "
                        "pass images with pixels")


def _one_image(array: np.ndarray) -> np.ndarray:
    """An array known to hold one image (a list item) -> (H, W[, C]); channel-first is unambiguous here."""
    if array.ndim == 3 and array.shape[0] in CHANNEL_COUNTS and array.shape[-1] not in CHANNEL_COUNTS:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in CHANNEL_COUNTS):
        _check_has_pixels(array.shape[:2])
        return as_uint8(array)
    raise UserError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 2, 3, 4; got {array.shape}")


def _as_batch(array: np.ndarray) -> np.ndarray:
    """A bare array -> a batch: (H, W) and (H, W, C) are one image; (2|3|4, H, W) is refused as ambiguous."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in CHANNEL_COUNTS):
        return array[None]  # one image (no real image is 1, 2, 3 or 4 pixels wide)
    if array.ndim == 3 and array.shape[0] in CHANNEL_COUNTS[1:]:
        raise UserError(f"an array of shape {array.shape} is either one channel-first image or {array.shape[0]} "
                        f"grey images; say which: {_MOVE_CHANNELS}")
    return array  # (N, H, W) grey images (including (1, H, W)), or 4-d: decided by batch_pixels


def _is_pil(item: Any) -> bool:
    return hasattr(item, "getbands") and hasattr(item, "mode")


def to_pixels(images: Any, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """Images in any supported form -> uint8 (N, size, size, channels).

    Accepts a NumPy array of one image (H, W[, C]) or a batch (N, H, W[, C]) or (N, C, H, W), C in
    1, 2, 3, 4 (grey, grey + alpha, RGB, RGBA), a PIL image, a file path, or a list mixing those (a list
    item may also be one (C, H, W) image). No images (an empty list or batch) is a UserError.
    """
    check_resize(resize)
    if isinstance(images, np.ndarray):
        return batch_pixels(_as_batch(images), size, channels, resize)
    if isinstance(images, (str, Path)) or _is_pil(images):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            out.append(load_image(item, size, channels, resize))
        elif _is_pil(item):
            out.append(fit_pil(item, size, channels, resize))
        elif isinstance(item, np.ndarray):
            out.append(_fit_array(_one_image(item), size, channels, resize))
        else:
            raise UserError(f"cannot treat {type(item).__name__} as an image; pass arrays, PIL images or paths")
    if not out:
        raise UserError("no images given")
    return np.stack(out)


# --- many files: a process pool, results in input order -------------------------------------------------

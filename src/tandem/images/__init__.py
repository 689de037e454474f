"""Decode images (files, arrays, PIL images) into uint8 pixels, and find image files. Torch-free.
One image: tandem.images.pixels; many files in a process pool: tandem.images.folders.

    from tandem.images import decode_files, expand_paths, to_pixels
    pixels = to_pixels(["cat.jpg", array, pil_image], size=64, channels=3, resize="crop")  # uint8 (N, 64, 64, 3)
    for path, pixels, error in decode_files(expand_paths(["photos/"]), 64, 3):  # a process pool, input order
        ...

How values are read, never guessed: uint8 as is; uint16 arrays and 16-bit PNGs as 0..65535 (rescaled,
value / 257); other integers must lie in 0..255; floats must lie in 0..1 (plt.imread, scikit-image);
anything else is refused with a message saying what to pass. EXIF orientation is applied. Non-square
images are cropped to their centre square, padded with black, or squashed (`RESIZE_MODES`); alpha and
palettes are flattened onto black, the background of the embedded animals. Files, PIL images and arrays
all go through the same function, so training and prediction see the same pixels.

A channel axis holds 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) values: an array (H, W, 2), as
np.asarray gives for an "LA" PNG, is one grey image with alpha, read as that PNG file is.
"""

from tandem.images.folders import (
    POOL_MIN_FILES,
    Decoded,
    decode_file_batches,
    decode_files,
    decode_task,
    expand_paths,
    image_files,
    pool_size,
)
from tandem.images.pixels import (
    CHANNEL_COUNTS,
    IMAGE_SUFFIXES,
    RESIZE_MODES,
    SIXTEEN_BIT_MODES,
    as_uint8,
    batch_pixels,
    check_resize,
    decode_image_bytes,
    fit_pil,
    load_image,
    to_pixels,
)

__all__ = ["CHANNEL_COUNTS", "Decoded", "IMAGE_SUFFIXES", "POOL_MIN_FILES", "RESIZE_MODES", "SIXTEEN_BIT_MODES",
           "as_uint8", "batch_pixels", "check_resize", "decode_file_batches", "decode_files", "decode_image_bytes",
           "decode_task", "expand_paths", "fit_pil", "image_files", "load_image", "pool_size", "to_pixels"]

"""Where images come from: the embedded animals, a folder of class sub-folders, or an .npz. Torch-free.

    data = load_dataset("photos/", size=64, channels=3, resize="crop")   # or "animals", or "arrays.npz"
    print(data.describe_decode())   # "decoded 5000 images in 41.2 s with 2 processes"

Folders are decoded in a process pool (tandem.images.decode_files) and kept in the decode cache
(tandem.data.cache), so the next command on the same, unchanged folder decodes nothing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.data import cache
from tandem.errors import UserError
from tandem.images import IMAGE_SUFFIXES, batch_pixels, check_resize, decode_files, image_files, pool_size

ANIMALS_FILE = Path(__file__).with_name("animal_mnist.npz")
# Class index -> name, from the data set's README (alphabetical, checked by eye).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def fingerprint(digest, labels: np.ndarray, classes: list[str]) -> str:
    """A hash already fed with the images (pixels, or their digests), finished with the labels and class names."""
    digest.update(labels.astype("<i8").tobytes())
    digest.update("\n".join(classes).encode())
    return digest.hexdigest()


@dataclass
class Dataset:
    """Images as uint8 (N, H, W, C) pixels, integer labels, class names, and where they came from.

    `decode` says how the pixels were obtained: {"files": image files found (0 for arrays), "images":
    images obtained, "decoded": files decoded by this call, "from_cache": bool, "seconds": wall time,
    "workers": decoding processes (0 when nothing was decoded)}.
    """

    pixels: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    decode: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset(self.pixels[index], self.labels[index], self.classes, self.source, self.decode)

    def fingerprint(self) -> str:
        """sha256 over pixels, labels and class names: which data a model saw, for provenance."""
        return fingerprint(hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes()), self.labels, self.classes)

    def describe_decode(self) -> str:
        """One line for the log: how the pixels were obtained and how long it took."""
        return describe_decode(self.decode, self.source, len(self))


def describe_decode(d: dict, source: str, count: int, streamed: bool = False) -> str:
    """One line for the log from a data set's `decode` record: how its images (or, streamed, their digests) were
    obtained and how long it took."""
    images, seconds = d.get("images", count), d.get("seconds", 0.0)
    workers = d.get("workers", 1)
    processes = f"{workers} process{'es' * (workers != 1)}"
    if streamed:
        if d.get("from_cache"):
            return f"streaming {images} images from disk (their digests from the cache in {seconds:.1f} s)"
        hashed = d.get("decoded", images)
        return f"streaming {images} images from disk (hashed {hashed} in {seconds:.1f} s with {processes})"
    if d.get("from_cache"):
        return f"{images} images from the decode cache in {seconds:.1f} s"
    if d.get("files"):
        return f"decoded {d['decoded']} images in {seconds:.1f} s with {processes}"
    return f"{images} images from {source} in {seconds:.1f} s (nothing to decode)"


def _arrays_decode(images: int, started: float) -> dict:
    return {"files": 0, "images": images, "decoded": 0, "from_cache": False,
            "seconds": time.perf_counter() - started, "workers": 0}


def load_animals(size: int = 28, channels: int = 1, resize: str = "crop") -> Dataset:
    started = time.perf_counter()
    with np.load(ANIMALS_FILE, allow_pickle=False) as arrays:
        x, y = arrays["x"], arrays["y"]
    pixels = batch_pixels(x, size, channels, resize)  # already 28x28 uint8: no per-image work at the default size
    return Dataset(pixels, y.astype(np.int64), list(ANIMAL_CLASSES), "animals", _arrays_decode(len(y), started))


def load_npz(path: Path, size: int, channels: int, resize: str = "crop") -> Dataset:
    """`x`: images (N, H, W), (N, H, W, C) or (N, C, H, W), read by tandem.images' rules; `y`: class indices."""
    started = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise UserError(f"{path} must hold arrays 'x' (images) and 'y' (labels); it has {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
            names = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} as an .npz of arrays ({err})") from None
    if x.ndim not in (3, 4) or len(x) != len(y) or y.ndim != 1:
        raise UserError(f"{path}: x must be (N, H, W[, C]) and y (N,), got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise UserError(f"{path}: y must hold class indices 0, 1, 2, ...")
    n_classes = int(y.max()) + 1 if len(y) else 0
    names = names or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise UserError(f"{path}: 'classes' names {len(names)} classes but y goes up to {n_classes - 1}")
    try:
        pixels = batch_pixels(x, size, channels, resize)
    except UserError as err:
        raise UserError(f"{path}: x: {err}") from None
    return Dataset(pixels, y.astype(np.int64), names, str(path), _arrays_decode(len(y), started))


def _class_files(root: Path) -> list[tuple[str, list[Path]]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders; put images in {root}/<class name>/*.png")
    files_by_class = [(d.name, image_files(d)) for d in class_dirs]
    for name, files in files_by_class:
        if not files:
            raise UserError(
                f"class '{name}' ({root / name}) has no images ({' '.join(IMAGE_SUFFIXES)}); add some or remove the folder"
            )
    if len(files_by_class) < 2:
        raise UserError(f"{root} has only one class ('{class_dirs[0].name}'); a classifier needs at least two")
    return files_by_class


def list_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """A folder of class sub-folders -> (class names, image files class by class and sorted by name, int64
    labels): the order both in-memory and streamed folders keep."""
    files_by_class = _class_files(root)
    classes = [name for name, _ in files_by_class]
    files = [path for _, paths in files_by_class for path in paths]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(paths) for _, paths in files_by_class])
    return classes, files, labels


def folder_settings(size: int, channels: int, resize: str, skip_bad_files: bool) -> dict:
    """The decode settings a folder's cache entries are keyed by (tandem.data.cache)."""
    return {"size": size, "channels": channels, "resize": resize, "skip_bad_files": skip_bad_files}


def check_skipped(classes: list[str], labels: np.ndarray, skipped: list[str]) -> None:
    """Warn about skipped unreadable files; a class left with no images is a UserError."""
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s), first {skipped[0]}", file=sys.stderr)
    present = set(np.unique(labels).tolist())
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(f"class '{name}' has no readable images left after skipping bad files")


def decode_each(files: list[Path], size: int, channels: int, resize: str, skip_bad_files: bool,
                workers: int | None, keep) -> tuple[np.ndarray, list[str]]:
    """The one decode loop of a class folder, held in memory or streamed: every file decoded (a process pool, in
    input order), each readable image handed to keep(i, pixels); an unreadable file is a UserError, or skipped
    with skip_bad_files. Returns which files were readable and the skipped paths."""
    good = np.ones(len(files), bool)
    skipped: list[str] = []
    decoded = decode_files(files, size, channels, resize, workers)
    try:
        for i, (path, image, error) in enumerate(decoded):
            if error is None:
                keep(i, image)
                continue
            if not skip_bad_files:
                raise UserError(f"{error}, or set data.skip_bad_files=true to skip bad files")
            good[i] = False
            skipped.append(str(path))
    finally:
        decoded.close()  # an error above stops the pool now, not when the generator is collected
    return good, skipped


def _decode_folder(files: list[Path], labels: np.ndarray, classes: list[str], size: int, channels: int,
                   resize: str, skip_bad_files: bool, workers: int | None) -> cache.DecodedFolder:
    pixels = np.empty((len(files), size, size, channels), np.uint8)

    def keep(i: int, image: np.ndarray) -> None:
        pixels[i] = image

    good, skipped = decode_each(files, size, channels, resize, skip_bad_files, workers, keep)
    return cache.DecodedFolder(pixels[good], labels[good], classes, skipped)


def load_folder(root: Path, size: int, channels: int, skip_bad_files: bool = False, resize: str = "crop",
                workers: int | None = None) -> Dataset:
    """One sub-folder per class, images inside (PNG, JPEG, BMP; any size; gray or colour); decoded in
    `workers` processes (default: every CPU), or read from the decode cache when nothing changed."""
    started = time.perf_counter()
    classes, files, labels = list_folder(root)
    settings = folder_settings(size, channels, resize, skip_bad_files)
    key = cache.content_key(root, files, classes, settings)
    where = cache.cache_file(root, settings)
    data = cache.read_cache(where, key)
    from_cache = data is not None and data.classes == classes
    if not from_cache:
        data = _decode_folder(files, labels, classes, size, channels, resize, skip_bad_files, workers)
        cache.write_cache(where, key, data)
    check_skipped(classes, data.labels, data.skipped)
    decode = {"files": len(files), "images": len(data.labels), "decoded": 0 if from_cache else len(data.labels),
              "from_cache": from_cache, "seconds": time.perf_counter() - started,
              "workers": 0 if from_cache else pool_size(len(files), workers)}
    return Dataset(data.pixels, data.labels, classes, str(root), decode)


def load_dataset(source: str, size: int, channels: int, skip_bad_files: bool = False, resize: str = "crop",
                 workers: int | None = None) -> Dataset:
    """Resolve `data.source`: 'animals', a folder, or an .npz file -> a Dataset at size x size x channels.

    Non-square images are resized by `resize` (tandem.images.RESIZE_MODES); folders decode in `workers`
    processes (default: every CPU) and are cached; `dataset.describe_decode()` says how it went.
    """
    check_resize(resize)
    if source == "animals":
        return load_animals(size, channels, resize)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {path} does not exist; give 'animals', a folder of class sub-folders, or an .npz")
    if path.is_dir():
        return load_folder(path, size, channels, skip_bad_files, resize, workers)
    if path.suffix.lower() == ".npz":
        return load_npz(path, size, channels, resize)
    raise UserError(f"data.source: {path} is neither a folder nor an .npz file")

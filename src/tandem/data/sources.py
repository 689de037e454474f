"""Where images come from: the embedded animals, a folder of class sub-folders, or an .npz. Torch-free."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.errors import UserError
from tandem.runtime.preprocess import IMAGE_SUFFIXES, image_files, load_image, to_pixels

ANIMALS_FILE = Path(__file__).with_name("animal_mnist.npz")
# Class index -> name, from the data set's README (alphabetical, checked by eye).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@dataclass
class Dataset:
    """Images as uint8 (N, H, W, C) pixels, integer labels, class names, and where they came from."""

    pixels: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset(self.pixels[index], self.labels[index], self.classes, self.source)

    def fingerprint(self) -> str:
        """sha256 over pixels, labels and class names: which data a model saw, for provenance."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.pixels).tobytes())
        digest.update(self.labels.astype("<i8").tobytes())
        digest.update("\n".join(self.classes).encode())
        return digest.hexdigest()


def load_animals(size: int = 28, channels: int = 1) -> Dataset:
    with np.load(ANIMALS_FILE, allow_pickle=False) as arrays:
        x, y = arrays["x"], arrays["y"]
    return Dataset(to_pixels(x, size, channels), y.astype(np.int64), list(ANIMAL_CLASSES), "animals")


def load_npz(path: Path, size: int, channels: int) -> Dataset:
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
    return Dataset(to_pixels(x, size, channels), y.astype(np.int64), names, str(path))


def load_folder(root: Path, size: int, channels: int, skip_bad_files: bool = False) -> Dataset:
    """One sub-folder per class, images inside (PNG, JPEG, BMP; any size; gray or colour)."""
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
    pixels, labels, bad = [], [], []
    for label, (_, files) in enumerate(files_by_class):
        for path in files:
            try:
                pixels.append(load_image(path, size, channels))
            except UserError as err:
                if not skip_bad_files:
                    raise UserError(f"{err}, or set data.skip_bad_files=true to skip bad files") from None
                bad.append(path)
                continue
            labels.append(label)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s), first {bad[0]}", file=sys.stderr)
    classes = [name for name, _ in files_by_class]
    present = set(labels)
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(f"class '{name}' has no readable images left after skipping bad files")
    return Dataset(np.stack(pixels), np.asarray(labels, dtype=np.int64), classes, str(root))


def load_dataset(source: str, size: int, channels: int, skip_bad_files: bool = False) -> Dataset:
    """Resolve `data.source`: 'animals', a folder, or an .npz file."""
    if source == "animals":
        return load_animals(size, channels)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {path} does not exist; give 'animals', a folder of class sub-folders, or an .npz")
    if path.is_dir():
        return load_folder(path, size, channels, skip_bad_files)
    if path.suffix.lower() == ".npz":
        return load_npz(path, size, channels)
    raise UserError(f"data.source: {path} is neither a folder nor an .npz file")

"""Deduplicate exact duplicates, then a seeded, stratified train/val/test split. Torch-free.

Duplicates are removed before splitting: a duplicate on both sides of the split inflates test
accuracy (the embedded animals hold 284 of them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tandem.data.sources import Dataset
from tandem.errors import UserError


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    duplicates_removed: int


def unique_index(pixels: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of every distinct image (byte for byte), in original order."""
    seen: dict[bytes, int] = {}
    for i, image in enumerate(pixels):
        seen.setdefault(hashlib.blake2b(image.tobytes(), digest_size=16).digest(), i)
    return np.fromiter(seen.values(), dtype=np.int64, count=len(seen))


def split_dataset(data: Dataset, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    keep = unique_index(data.pixels)
    removed = len(data) - len(keep)
    data = data.subset(keep)
    counts = np.bincount(data.labels, minlength=len(data.classes))
    if np.count_nonzero(counts) < 2:
        raise UserError(f"the data has {np.count_nonzero(counts)} class(es) with images; a classifier needs at least two")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in range(len(data.classes)):
        members = rng.permutation(np.flatnonzero(data.labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    index = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    if len(index["train"]) == 0 or len(index["test"]) == 0:
        raise UserError(f"only {len(data)} distinct images: too few to split into train and test; add images")
    return Splits(data.subset(index["train"]), data.subset(index["val"]), data.subset(index["test"]), removed)

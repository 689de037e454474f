"""Deduplicate exact duplicates, then a seeded, stratified train/val/test split. Torch-free.

Duplicates are removed before splitting: a duplicate on both sides of the split inflates test
accuracy (the embedded animals hold 284 of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
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


def pixel_digest(image: np.ndarray) -> bytes:
    """16-byte blake2b of one image's pixels (byte for byte): what deduplication compares."""
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def first_occurrences(digests: Iterable[bytes]) -> np.ndarray:
    """Index of the first occurrence of every distinct digest, in original order."""
    seen: dict[bytes, int] = {}
    for i, digest in enumerate(digests):
        seen.setdefault(digest, i)
    return np.fromiter(seen.values(), dtype=np.int64, count=len(seen))


def unique_index(pixels: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of every distinct image (byte for byte), in original order."""
    return first_occurrences(pixel_digest(image) for image in pixels)


def split_index(labels: np.ndarray, n_classes: int, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, np.ndarray]:
    """The seeded, stratified split of distinct images by their labels -> sorted positions into `labels`
    for "train", "val" and "test". Shared by in-memory data sets and streamed folders (tandem.data.stream)."""
    counts = np.bincount(labels, minlength=n_classes)
    if np.count_nonzero(counts) < 2:
        raise UserError(f"the data has {np.count_nonzero(counts)} class(es) with images; a classifier needs at least two")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in range(n_classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    index = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    if len(index["train"]) == 0 or len(index["test"]) == 0:
        raise UserError(f"only {len(labels)} distinct images: too few to split into train and test; add images")
    return index


def split_dataset(data: Dataset, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    keep = unique_index(data.pixels)
    removed = len(data) - len(keep)
    data = data.subset(keep)
    index = split_index(data.labels, len(data.classes), val_fraction, test_fraction, seed)
    return Splits(data.subset(index["train"]), data.subset(index["val"]), data.subset(index["test"]), removed)

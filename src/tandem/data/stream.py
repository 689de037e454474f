"""Image folders too large to hold in memory: file lists split exactly as the in-memory path splits. Torch-free.

    if should_stream(cfg.data.source, cfg.data.image_size, cfg.data.channels, cfg.data.stream):
        splits = load_split_files(cfg.data, seed)   # FileSplits: train / val / test FileDataset
    else:
        splits = split_dataset(load_dataset(...), ...)
    # or simply: splits = load_splits(cfg.data, seed)   # whichever of the two `data.stream` asks for

A FileDataset holds paths, labels and, for every image, a 16-byte blake2b digest of its decoded pixels;
the pixels themselves are decoded again batch by batch while training (tandem.train.loader). The digests
come from one pass over the folder through the same decoder and process pool as the in-memory path
(tandem.images.decode_files), holding no more than the pool's window of images at a time, and are kept
on disk next to the decode cache (same key, so the same rules decide when a folder changed; a
`.digests.npz` file, read without pickle). Deduplication (first occurrence of each digest) and the
seeded stratified split are tandem.data.split's own, so a streamed folder gives exactly the train, val
and test images, in the same order, that `split_dataset(load_dataset(folder))` gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.data import cache
from tandem.data.sources import (
    check_skipped,
    decode_each,
    describe_decode,
    fingerprint,
    folder_settings,
    list_folder,
    load_dataset,
)
from tandem.data.split import (
    Splits,
    first_occurrences,
    pixel_digest,
    split_dataset,
    split_index,
)
from tandem.errors import UserError
from tandem.images import check_resize, load_image, pool_size

DIGEST_SIZE = 16  # bytes of blake2b per image, as tandem.data.split.pixel_digest gives
STREAM_SETTINGS = ("auto", "on", "off")
# What the in-memory path holds per decoded uint8 value: the uint8 pixels plus the float32 tensor
# preprocessed from them (1 + 4 bytes). `auto` streams when that would pass a quarter of the free RAM.
IN_MEMORY_BYTES_PER_VALUE = 5


@dataclass
class FileDataset:
    """Image files still to be decoded: paths, int64 labels, class names, where they came from, and the
    16-byte digest of each file's decoded pixels (uint8 (N, 16)). Mirrors tandem.data.sources.Dataset.

    `size`, `channels` and `resize` say how to decode (tandem.images.load_image). `decode` says how the
    digests were obtained: {"files", "images", "decoded", "from_cache", "seconds", "workers", "streamed"}.
    """

    paths: list[str]
    labels: np.ndarray
    digests: np.ndarray
    classes: list[str]
    source: str
    size: int
    channels: int
    resize: str = "crop"
    decode: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> FileDataset:
        index = np.asarray(index, dtype=np.int64)
        return FileDataset([self.paths[i] for i in index.tolist()], self.labels[index], self.digests[index],
                           self.classes, self.source, self.size, self.channels, self.resize, self.decode)

    def fingerprint(self) -> str:
        """sha256 over the images' pixel digests, labels and class names: which data a model saw.

        Decoding every image again to hash its pixels would cost a pass over the folder, so this is not
        the in-memory Dataset.fingerprint of the same images (that one hashes the pixels themselves)."""
        digest = hashlib.sha256(b"tandem streamed folder 1\n")
        digest.update(np.ascontiguousarray(self.digests, dtype=np.uint8).tobytes())
        return fingerprint(digest, self.labels, self.classes)

    def describe_decode(self) -> str:
        """One line for the log: how the images' digests were obtained, and that the pixels stream."""
        return describe_decode(self.decode, self.source, len(self), streamed=True)

    def read(self, i: int) -> np.ndarray:
        """Decode image i -> uint8 (size, size, channels), the pixels the in-memory path holds for it.

        Raises a UserError if the file became unreadable or its pixels changed since it was hashed."""
        path = self.paths[i]
        try:
            pixels = load_image(path, self.size, self.channels, self.resize)
        except UserError as err:
            raise UserError(f"{err} (it was readable when the run listed the folder; leave the folder unchanged "
                            "while training)") from None
        if pixel_digest(pixels) != self.digests[i].tobytes():
            raise UserError(f"image {path} changed while training (its pixels are not those the split was made "
                            "from); leave the folder unchanged while training, then start the run again")
        return pixels


@dataclass
class FileSplits:
    train: FileDataset
    val: FileDataset
    test: FileDataset
    duplicates_removed: int


# --- when to stream ----------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of RAM available to new work: MemAvailable from /proc/meminfo, else free pages; None if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def in_memory_bytes(images: int, size: int, channels: int) -> int:
    """What the in-memory path holds for `images` images: uint8 pixels plus their float32 tensor."""
    return images * size * size * channels * IN_MEMORY_BYTES_PER_VALUE


def should_stream(source: str, size: int, channels: int, setting: str = "auto") -> bool:
    """`data.stream`: 'off' never streams; 'on' streams a folder (anything else is a UserError); 'auto'
    streams a folder whose images, held in memory (uint8 pixels + float32 tensor), would take more
    than a quarter of the available RAM."""
    if setting not in STREAM_SETTINGS:
        raise UserError(f"data.stream must be one of {', '.join(STREAM_SETTINGS)}; got {setting!r}")
    if setting == "off":
        return False
    path = Path(source).expanduser()
    folder = source != "animals" and path.is_dir()
    if setting == "on":
        if not folder:
            what = ("the embedded animals" if source == "animals" else
                    f"{path}, which does not exist" if not path.exists() else f"{path}, a file")
            raise UserError(f"data.stream=on streams image folders only, and data.source is {what}; point "
                            "data.source at a folder of class sub-folders, or set data.stream=auto")
        return True
    if not folder:
        return False
    _, files, _ = list_folder(path)
    free = available_memory()
    return free is not None and in_memory_bytes(len(files), size, channels) > free / 4


# --- the digest pass and its cache ---------------------------------------------------------------------------


@dataclass
class _Digests:
    digests: np.ndarray  # uint8 (files, 16); zeros where a file could not be read
    good: np.ndarray  # bool (files,)
    skipped: list[str]


def digest_file(root: Path, settings: dict) -> Path:
    """Where a folder's digests live: beside its decode-cache entry, under the same name."""
    where = cache.cache_file(root, settings)
    return where.with_name(f"{where.stem}.digests.npz")


def _read_digests(path: Path, key: str, n_files: int) -> _Digests | None:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if str(arrays["key"]) != key:
                return None
            found = _Digests(arrays["digests"], arrays["good"], [str(s) for s in arrays["skipped"]])
    except Exception:  # noqa: BLE001 - any damage is just a miss, as for the decode cache
        return None
    if (found.digests.dtype != np.uint8 or found.digests.shape != (n_files, DIGEST_SIZE)
            or found.good.dtype != np.bool_ or found.good.shape != (n_files,)):
        return None
    return found


def _write_digests(path: Path, key: str, found: _Digests) -> None:
    """Atomic, as the decode cache writes; a cache that cannot be written only costs time."""
    cache.write_npz(path, {"key": np.array(key), "digests": found.digests, "good": found.good,
                           "skipped": np.array(found.skipped, dtype=str)}, "digest cache", "hashing the folder again")


def _digest_folder(files: list[Path], size: int, channels: int, resize: str, skip_bad_files: bool,
                   workers: int | None) -> _Digests:
    """Decode every file once (the in-memory path's decoder and pool) and keep only each one's digest."""
    digests = np.zeros((len(files), DIGEST_SIZE), np.uint8)

    def keep(i: int, image: np.ndarray) -> None:
        digests[i] = np.frombuffer(pixel_digest(image), np.uint8)

    good, skipped = decode_each(files, size, channels, resize, skip_bad_files, workers, keep)
    return _Digests(digests, good, skipped)


def load_files(source: str, size: int, channels: int, skip_bad_files: bool = False, resize: str = "crop",
               workers: int | None = None) -> FileDataset:
    """A folder of class sub-folders -> a FileDataset of its readable images, in the in-memory path's order.

    The digests are computed in `workers` processes (default: every CPU) or read from the cache."""
    check_resize(resize)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise UserError(f"data.source: {root} is not a folder; only folders of class sub-folders can stream")
    started = time.perf_counter()
    classes, files, labels = list_folder(root)
    settings = folder_settings(size, channels, resize, skip_bad_files)
    key = cache.content_key(root, files, classes, settings)
    where = digest_file(root, settings)
    found = _read_digests(where, key, len(files))
    from_cache = found is not None
    if found is None:
        found = _digest_folder(files, size, channels, resize, skip_bad_files, workers)
        _write_digests(where, key, found)
    good = found.good
    check_skipped(classes, labels[good], found.skipped)
    paths = [str(p) for p, ok in zip(files, good.tolist()) if ok]
    decode = {"files": len(files), "images": len(paths), "decoded": 0 if from_cache else len(files),
              "from_cache": from_cache, "seconds": time.perf_counter() - started,
              "workers": 0 if from_cache else pool_size(len(files), workers), "streamed": True}
    return FileDataset(paths, labels[good], np.ascontiguousarray(found.digests[good]), classes, str(root),
                       size, channels, resize, decode)


def split_files(data: FileDataset, val_fraction: float, test_fraction: float, seed: int) -> FileSplits:
    """tandem.data.split.split_dataset for files: the same deduplication and the same split."""
    keep = first_occurrences(row.tobytes() for row in data.digests)
    removed = len(data) - len(keep)
    data = data.subset(keep)
    index = split_index(data.labels, len(data.classes), val_fraction, test_fraction, seed)
    return FileSplits(data.subset(index["train"]), data.subset(index["val"]), data.subset(index["test"]), removed)


def load_split_files(data_cfg: Any, seed: int, workers: int | None = None) -> FileSplits:
    """`cfg.data` (tandem.config.DataConfig) -> the folder's files, deduplicated and split by `seed`."""
    data = load_files(data_cfg.source, data_cfg.image_size, data_cfg.channels, data_cfg.skip_bad_files,
                      data_cfg.resize, workers)
    return split_files(data, data_cfg.val_fraction, data_cfg.test_fraction, seed)


def split_pixels(split: Any, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (all, or those at `index`) as uint8 (N, H, W, C), and their labels: from memory (Dataset),
    or decoded one file at a time (FileDataset, a streamed folder)."""
    index = np.arange(len(split.labels)) if index is None else np.asarray(index, dtype=np.int64)
    if hasattr(split, "pixels"):
        pixels = split.pixels[index]
    elif len(index):
        pixels = np.stack([split.read(int(i)) for i in index])
    else:
        pixels = np.zeros((0, split.size, split.size, split.channels), np.uint8)
    return pixels, np.asarray(split.labels)[index]


def load_splits(data_cfg: Any, seed: int, workers: int | None = None) -> Splits | FileSplits:
    """The run's data as `data.stream` asks: FileSplits (streamed) or Splits (in memory), the same images."""
    if should_stream(data_cfg.source, data_cfg.image_size, data_cfg.channels, data_cfg.stream):
        return load_split_files(data_cfg, seed, workers)
    data = load_dataset(data_cfg.source, data_cfg.image_size, data_cfg.channels, data_cfg.skip_bad_files,
                        resize=data_cfg.resize, workers=workers)
    return split_dataset(data, data_cfg.val_fraction, data_cfg.test_fraction, seed)


class DataChanged(UserError):
    """The run's data source holds other images than those its model was trained on: its test split would hold
    other images, some perhaps trained on, and every figure computed on it would describe nothing. `splits`
    holds what the source gives now (its decode record still describes the read)."""

    def __init__(self, message: str, splits: Splits | FileSplits) -> None:
        super().__init__(message)
        self.splits = splits


def same_images(splits: Splits | FileSplits, expected: str | None) -> bool:
    """Whether the training split is the one a run recorded (`data_fingerprint`; None: nothing to check)."""
    return not expected or splits.train.fingerprint() == expected


def load_checked_splits(data_cfg: Any, seed: int, expected: str | None,
                        workers: int | None = None) -> Splits | FileSplits:
    """load_splits, checked against the fingerprint a run recorded of its training images: the one way export,
    the FPGA path and the explanations read a trained model's data. Raises DataChanged when they differ, and
    UserError (from load_splits) when the data cannot be read."""
    splits = load_splits(data_cfg, seed, workers)
    if not same_images(splits, expected):
        raise DataChanged(f"the images in {data_cfg.source} changed since the model was trained", splits)
    return splits

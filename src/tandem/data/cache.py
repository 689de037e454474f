"""The decode cache: a folder's decoded pixels kept on disk, so `train --resume` and `export` do not decode
the same photos again. Torch-free.

    key = content_key(root, files, classes, settings)    # sha256 over the settings and every file's stat
    data = read_cache(cache_file(root, settings), key)   # DecodedFolder, or None on a miss
    write_cache(cache_file(root, settings), key, data)   # atomic; a warning (not an error) if it cannot

Where: $TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem (sub-folder `datasets/`).
One uncompressed .npz per folder and decode settings, read without pickle. The key covers the cache
format, the settings (size, channels, resize, skip_bad_files), the class folder names and every file's
relative path, byte size, mtime_ns and ctime_ns: adding, removing, touching or replacing a file is a miss,
and the stale entry is overwritten rather than left to pile up. The ctime is there because the mtime can
be set back (`touch -r`, `cp -p`, `rsync -t`, unpacking an archive): a file replaced by another of the same
size with its old mtime restored would otherwise serve the old pixels. Any write, rename or `touch`
updates the ctime and nothing short of changing the clock sets it back; a chmod updates it too, which
costs one decode. (On Windows st_ctime is the creation time: there only size and mtime tell.) A damaged
cache file is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.files import atomic_write

CACHE_FORMAT = 2  # bump when the decoding or the key changes (2: the key holds each file's ctime_ns)


@dataclass
class DecodedFolder:
    pixels: np.ndarray  # uint8 (N, size, size, channels)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    skipped: list[str]  # files that could not be read (with skip_bad_files)


def cache_dir() -> Path:
    if os.environ.get("TANDEM_CACHE_DIR"):
        return Path(os.environ["TANDEM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tandem"


def cache_file(root: Path, settings: dict) -> Path:
    """Where the entry for this folder and these settings lives (the key inside says whether it is current)."""
    slot = json.dumps({"root": str(Path(root).resolve()), **settings}, sort_keys=True)
    return cache_dir() / "datasets" / f"{hashlib.sha256(slot.encode()).hexdigest()[:32]}.npz"


def content_key(root: Path, files: list[Path], classes: list[str], settings: dict) -> str:
    """sha256 over the cache format, the settings, the class names and each file's path, size, mtime and ctime."""
    header = {"format": CACHE_FORMAT, "classes": classes, **settings}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for path in files:
        try:
            stat = path.stat()
            entry = f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n"
        except OSError:  # vanished since it was listed: decoding will name it
            entry = f"{path.relative_to(root).as_posix()}\0missing\n"
        digest.update(entry.encode())
    return digest.hexdigest()


def read_cache(path: Path, key: str) -> DecodedFolder | None:
    """The cached data if `path` holds an intact entry for `key`, else None (missing, stale or damaged)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if str(arrays["key"]) != key:
                return None
            data = DecodedFolder(arrays["pixels"], arrays["labels"].astype(np.int64),
                                 [str(c) for c in arrays["classes"]], [str(s) for s in arrays["skipped"]])
    except Exception:  # noqa: BLE001 - any damage (truncated zip, missing array, bad header) is just a miss
        return None
    if data.pixels.dtype != np.uint8 or data.pixels.ndim != 4 or len(data.pixels) != len(data.labels):
        return None
    return data


def write_npz(path: Path, arrays: dict[str, np.ndarray], what: str, redo: str) -> bool:
    """Store arrays atomically (temporary name in the same folder, fsync, rename). A cache that cannot be
    written costs only time: warn on stderr ("cannot write the <what> ... <redo> next time"), return False."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return True
    except OSError as err:
        print(f"warning: cannot write the {what} in {path.parent} ({err.strerror or err}); {redo} next time. "
              "Set TANDEM_CACHE_DIR to a writable folder to keep it", file=sys.stderr)
        return False


def write_cache(path: Path, key: str, data: DecodedFolder) -> bool:
    """Store a decoded folder (write_npz). str arrays are stored as fixed-width unicode: reading needs no pickle."""
    return write_npz(path, {"key": np.array(key), "pixels": data.pixels, "labels": data.labels.astype(np.int64),
                            "classes": np.array(data.classes, dtype=str), "skipped": np.array(data.skipped, dtype=str)},
                     "decode cache", "decoding again")

"""Atomic writes, DESIGN.md rule 5: write to a temporary name in the same folder, fsync the file, rename it over the
target, fsync the folder. A reader (or a crash) sees the old file or the new one, never half of one, and the rename
itself survives a power cut. Every writer of tandem goes through here; torch-free, imports nothing of tandem."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# .NAME.tmp-PID-RANDOM: a folder scan (the bundle's file hashes) can tell a writer's leftovers from real files.
_TEMPORARY = re.compile(r"\..+\.tmp-\d+-[0-9a-f]+$")


def temporary_name(path: Path) -> Path:
    """A fresh name beside path for its temporary copy (unique per process and call, so threads never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    return bool(_TEMPORARY.match(name))


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in this folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """with atomic_write(path) as handle: ... writes the file whole or not at all. The temporary file is created
    with the process's umask like any other, and removed if the block raises."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes a whole file ('w' or 'wb'), not mode {mode!r}")
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))

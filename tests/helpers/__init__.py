"""What the tests share: the repository, real images (a slice of the embedded animals), the real `tandem`
command in a fresh process, and PNG bytes (an image, or a decompression bomb's opening). Fixtures are in
tests/conftest.py; the server, PostgreSQL, network-namespace and torchrun helpers are modules beside this one."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from tandem.data.sources import ANIMALS_FILE

REPO = Path(__file__).resolve().parents[2]


def animals(per_class: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` distinct images of each of the first `classes` animals."""
    with np.load(ANIMALS_FILE) as arrays:
        x, y = arrays["x"], arrays["y"]
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(classes)])
    return x[np.sort(keep)], y[np.sort(keep)]


def run_tandem(*args: str, timeout: float = 300, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"tandem {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    """An image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data does not follow): a decompression bomb's opening."""
    data = png_bytes(np.zeros((8, 8), np.uint8))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def pngs(n: int) -> list[bytes]:
    """n real animal images as PNG bytes."""
    x, _ = animals(max(1, n // 10 + 1))
    return [png_bytes(image) for image in x[:n]]


def make_folder(root: Path, per_class: int = 4, classes: tuple = ("cat", "dog"), rgb: bool = False) -> Path:
    """A folder of class sub-folders holding real animal images, resized to 40x33 (PNG, or RGB JPEG)."""
    from PIL import Image

    x, y = animals(per_class, classes=len(classes))
    for image, label in zip(x, y):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image).resize((40, 33))  # any size: resized on load
        if rgb:
            picture = picture.convert("RGB")
        picture.save(folder / f"{len(list(folder.iterdir())):03d}.{'jpg' if rgb else 'png'}")
    return root

"""Phone photos for the benchmarks: seeded 12-megapixel JPEGs, made once and kept in benchmarks/.photos/.

    import sys; sys.path.insert(0, "benchmarks")       # the scripts in benchmarks/ have it already
    from phone_photos import photo_folder
    folder, info = photo_folder("predict", 200)         # benchmarks/.photos/v1-predict-200/<class>/<n>.jpg
    folder, info = photo_folder("train", 5000, workers=4)
    renders, info = photo_folder("renders", 3000)       # 252x189 PNGs of the same kind of scene

A folder is made where missing (atomically, file by file, so an interrupted run resumes) and found
again on later calls through its <folder>.json marker; `info` holds its figures (files, bytes,
generated, seconds, per_file_s, workers, grain, cpu, made) and whether it was cached.

The photos: 4032x3024 RGB JPEGs at quality 90 (4:2:0, as phones write them), about 3 MB each. Each
shows one of the embedded animals (never one the predicted photos share with the training ones),
bright, about 2/3 of the short side, on a smooth dark background with fine grain (the grain is what
makes a 12-megapixel JPEG weigh megabytes). One photo in four is stored turned, with EXIF Orientation
3, 6 or 8, so that only a reader that honours EXIF sees it upright; 6 and 8 are portrait photos,
stored landscape as phones do. Folders are <root>/<class>/<n>.jpg, so a folder is also a training set.
`grain` sets the file size (28, the default: 3.3 MB; 16: 2.1 MB; 8: 1.2 MB), and with it the time
that no decoder can skip: entropy decoding, about 25-35 ms for a 3.3 MB photo on one core here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from targets import AT_START

PHOTOS_DIR = Path(__file__).resolve().parent / ".photos"  # kept between runs (benchmarks/.gitignore)
GENERATOR_VERSION = 1  # part of every cached folder's name: bump it when the pictures change
SEED = 2026
WIDTH, HEIGHT = 4032, 3024  # as stored; portrait photos (Orientation 6, 8) are 3024x4032 upright
QUALITY = 90
GRAIN = 28  # peak-to-peak amplitude of the per-pixel grain, in pixel levels
RENDER_SCALE = 16  # the bundle's training renders: 252x189, the same scenes drawn 16x smaller
# How a stored photo is turned so that ImageOps.exif_transpose gives back the upright picture.
ORIENTATIONS = {1: None, 3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}
SETS = {"predict": 0, "train": 1, "renders": 2}  # each set draws its own scenes


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def scene(kind: str, i: int, labels: np.ndarray) -> dict:
    """Everything that photo i of a set shows, drawn from its own seed: the same photo on every run."""
    rng = np.random.default_rng([SEED, SETS[kind], i])
    label = i % 10
    # Animals with index % 5 == 0 appear only in the predict set, the others only in the training sets.
    pool = np.flatnonzero((labels == label) & ((np.arange(len(labels)) % 5 == 0) == (kind == "predict")))
    orientation = (3, 6, 8)[(i // 4) % 3] if i % 4 == 3 else 1  # one photo in four stored turned
    return {"label": label, "animal": int(rng.choice(pool)), "orientation": orientation,
            "background": rng.integers(0, 50, (6, 8, 3), dtype=np.uint8),  # smooth: 6x8 points, stretched
            "colour": tuple(int(c) for c in rng.integers(200, 256, 3)),
            "size": float(rng.uniform(0.75, 0.9)),  # the animal's 28x28 frame, as a share of the short side
            "shift": tuple(float(s) for s in rng.uniform(-0.04, 0.04, 2))}


def render(sc: dict, animals: np.ndarray, scale: int = 1):
    """The upright picture (PIL RGB), `scale` times smaller than the photo."""
    from PIL import Image

    portrait = sc["orientation"] in (6, 8)
    w, h = (HEIGHT, WIDTH) if portrait else (WIDTH, HEIGHT)
    w, h = w // scale, h // scale
    background = sc["background"].transpose(1, 0, 2) if portrait else sc["background"]
    picture = Image.fromarray(np.ascontiguousarray(background)).resize((w, h), Image.Resampling.BILINEAR)
    side = round(min(w, h) * sc["size"])
    mask = Image.fromarray(animals[sc["animal"]]).resize((side, side), Image.Resampling.BICUBIC)
    x = round((w - side) / 2 + sc["shift"][0] * w)
    y = round((h - side) / 2 + sc["shift"][1] * h)
    picture.paste(Image.new("RGB", (side, side), sc["colour"]), (x, y), mask)
    return picture


_WORKER: dict = {}


def _worker_init(grain: int) -> None:
    from PIL import Image

    from tandem.data.sources import ANIMALS_FILE

    with np.load(ANIMALS_FILE, allow_pickle=False) as arrays:
        _WORKER["x"], _WORKER["y"] = arrays["x"], arrays["y"]
    _WORKER["grain_amplitude"] = grain
    grain = np.random.default_rng([SEED, 99]).integers(0, grain + 1, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    _WORKER["grain"] = Image.fromarray(grain)  # the same grain on every photo: the pictures differ anyway


def _make_one(job: tuple[str, int, str]) -> int:
    """Write one file (atomically: a rerun after an interruption finds whole files or none); its size."""
    from PIL import Image, ImageChops

    kind, i, path = job
    sc = scene(kind, i, _WORKER["y"])
    tmp = path + ".tmp"
    if kind == "renders":
        render(sc, _WORKER["x"], RENDER_SCALE).save(tmp, "PNG")
    else:
        picture = render(sc, _WORKER["x"])
        turn = ORIENTATIONS[sc["orientation"]]
        if turn:
            picture = picture.transpose(getattr(Image.Transpose, turn))
        picture = ImageChops.add(picture, _WORKER["grain"], 1.0, -(_WORKER["grain_amplitude"] // 2))
        exif = Image.Exif()
        exif[0x0112] = sc["orientation"]
        # Make, Model. The model names the script these photos were first made by: every photo's bytes
        # depend on it, so it stays, like the seeds, for the cached folders to remain what they claim.
        exif[0x010F], exif[0x0110] = "tandem", "benchmarks/photos.py"
        picture.save(tmp, "JPEG", quality=QUALITY, exif=exif)
    os.replace(tmp, path)
    return os.path.getsize(path)


def photo_folder(kind: str, count: int, grain: int = GRAIN, workers: int = 2) -> tuple[Path, dict]:
    """The cached folder of `count` photos (or renders) of a set, made where missing; and its figures."""
    from tandem.data.sources import ANIMAL_CLASSES

    name = f"v{GENERATOR_VERSION}-{kind}-{count}" + (f"-grain{grain}" if grain != GRAIN and kind != "renders" else "")
    root = PHOTOS_DIR / name
    marker = root.with_name(root.name + ".json")
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("files") == count:
            return root, {**info, "cached": True}
    suffix = ".png" if kind == "renders" else ".jpg"
    jobs = []
    for i in range(count):
        folder = root / ANIMAL_CLASSES[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}{suffix}"
        if not path.is_file():
            jobs.append((kind, i, str(path)))
    log(f"generating {len(jobs)} of {count} {kind} files in {root} with {workers} processes ...")
    t0 = time.perf_counter()
    done, step = 0, max(1, len(jobs) // 10)
    if jobs:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(grain,)) as pool:
            for _ in pool.imap_unordered(_make_one, jobs, chunksize=4):
                done += 1
                if done % step == 0 or done == len(jobs):
                    elapsed = time.perf_counter() - t0
                    log(f"  {done}/{len(jobs)} in {elapsed:.0f} s ({done / elapsed:.1f} files/s)")
    seconds = time.perf_counter() - t0
    files = sorted(root.rglob(f"*{suffix}"))
    info = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "generated": len(jobs),
            "seconds": seconds, "per_file_s": seconds * workers / max(1, len(jobs)), "workers": workers, "grain": grain,
            "cpu": AT_START["cpu"], "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    if len(files) != count:
        raise SystemExit(f"{root} holds {len(files)} files, expected {count}: remove it and run again")
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return root, {**info, "cached": False}

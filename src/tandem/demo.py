"""`tandem demo`: the two systems end to end on the embedded animals.

    tandem demo [--out tandem-demo] [--epochs N] [--seed S] [--precision auto|fp32|bf16] [--json]

1. the training system trains the default cnn (CPU or GPU) and checkpoints it;
2. export turns the checkpoint into a verified bundle;
3. the inference system, in its own torch-free process (`tandem predict`), classifies 100 held-out
   images it never saw, written as PNG files like a user's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tandem.errors import UserError

SAMPLES = 100
# What a demo writes in --out; a second demo replaces exactly these, and nothing else.
DEMO_FILES = {"run", "bundle", "holdout", "report.json", "contact_sheet.png", "curves.png", "confusion.png"}


def check_out(out: Path) -> None:
    """Refuse an --out that holds anything a demo did not write: the demo replaces run/ and holdout/."""
    from tandem.train.runs import is_run_folder

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the demo")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in DEMO_FILES)
    run, holdout = out / "run", out / "holdout"
    if run.is_dir() and any(run.iterdir()) and not is_run_folder(run):
        foreign.append("run/ (not a tandem run)")
    if holdout.is_dir() and any(p.name != "truth.json" and not (p.suffix == ".png" and p.stem.isdigit())
                                for p in holdout.iterdir()):
        foreign.append("holdout/ (files the demo did not write)")
    if foreign:
        raise UserError(f"--out {out} holds files the demo did not write ({', '.join(foreign[:3])}); the demo "
                        "replaces its own files only: choose another --out")


def pick_holdout(cfg, count: int = SAMPLES) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`count` test-split images, spread evenly over the classes (seeded)."""
    from tandem.train.loop import load_splits

    test = load_splits(cfg).test
    rng = np.random.default_rng(cfg.seed)
    per_class = count // len(test.classes)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(test.labels == c))[:per_class]
                             for c in range(len(test.classes))])
    rest = np.setdiff1d(np.arange(len(test)), chosen)
    chosen = np.concatenate([chosen, rng.permutation(rest)[:count - len(chosen)]])
    chosen = rng.permutation(chosen)
    return test.pixels[chosen], test.labels[chosen], test.classes


def write_pngs(pixels: np.ndarray, folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{i:03d}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(path)
    return paths


def contact_sheet(pixels: np.ndarray, truth: list[str], guess: list[str], path: Path, columns: int = 10) -> None:
    """A grid of the images, each with its guess (and the truth, in red, when wrong)."""
    from PIL import Image, ImageDraw, ImageFont

    scale, label_h = 3, 26
    tile_w = pixels.shape[2] * scale
    tile_h = pixels.shape[1] * scale + label_h
    rows = (len(pixels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, image in enumerate(pixels):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        sheet.paste(tile.resize((tile_w, tile_h - label_h), Image.Resampling.NEAREST), (x, y))
        right = guess[i] == truth[i]
        if right:
            draw.text((x + 3, y + tile_h - label_h + 1), guess[i], fill="darkgreen", font=font)
        else:
            draw.rectangle([x, y, x + tile_w - 1, y + tile_h - 1], outline="red", width=3)
            draw.text((x + 3, y + tile_h - label_h + 1), f"{guess[i]}?", fill="red", font=font)
            draw.text((x + 3, y + tile_h - label_h + 13), f"is {truth[i]}", fill="black", font=font)
    sheet.save(path)


def print_table(truth: list[str], guess: list[str]) -> None:
    """Per true class: how many of the images were guessed right, and what the wrong guesses were."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(truth)} held-out images, guess vs truth")
    for name, justify in (("truth", "left"), ("images", "right"), ("right", "right"), ("wrong guesses (image #)", "left")):
        table.add_column(name, justify=justify)
    for label in sorted(set(truth)):
        mine = [i for i, t in enumerate(truth) if t == label]
        wrong = [f"{guess[i]} (#{i})" for i in mine if guess[i] != label]
        table.add_row(label, str(len(mine)), str(len(mine) - len(wrong)), f"[red]{', '.join(wrong)}[/]" if wrong else "")
    table.add_row("all", str(len(truth)), str(sum(g == t for g, t in zip(guess, truth))), "", style="bold")
    Console().print(table)


def training_log(log, run_dir: Path, verbose: bool):
    """train's log, less what the demo says better: the full config (in run/config.yaml; printed with --verbose)
    and "export it: ..." (the demo exports the run itself)."""
    def train_log(*args, **kwargs) -> None:
        text = " ".join(map(str, args))
        if text.startswith("export it:"):
            return
        if text.startswith("config:\n") and not verbose:
            log(f"config: {run_dir / 'config.yaml'} (`tandem demo --verbose` prints it)", **kwargs)
            return
        log(*args, **kwargs)
    return train_log


def run_demo(out: str | Path = "tandem-demo", epochs: int | None = None, quiet: bool = False, seed: int = 0,
             precision: str = "auto", verbose: bool = False) -> dict:
    from tandem.config import TrainConfig
    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.loop import train

    out = Path(out)
    check_out(out)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if quiet else print
    # Through the constructor, so the config validates every value, epochs included.
    cfg = TrainConfig(out_dir=str(out / "run"), progress=not quiet, seed=seed, precision=precision,
                      **({"epochs": epochs} if epochs is not None else {}))
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # a demo always starts fresh
    log("== 1. training system: train the default cnn on the embedded animals")
    t0 = time.perf_counter()
    result = train(cfg, log=training_log(log, Path(cfg.out_dir), verbose))
    train_wall_seconds = time.perf_counter() - t0

    log("\n== 2. export: checkpoint -> verified bundle")
    bundle = export_bundle(cfg.out_dir, out / "bundle", name="animals", force=True, log=log)
    for name in ("curves.png", "confusion.png"):
        shutil.copy(Path(cfg.out_dir) / name, out / name)

    log(f"\n== 3. inference system: a torch-free process classifies {SAMPLES} held-out images")
    pixels, labels, classes = pick_holdout(cfg)
    holdout = out / "holdout"
    if holdout.exists():
        shutil.rmtree(holdout)
    write_pngs(pixels, holdout)
    truth = [classes[i] for i in labels]
    (holdout / "truth.json").write_text(json.dumps(truth, indent=1))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tandem", "predict", str(bundle), str(holdout), "--json"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    predict_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"the inference process failed: {proc.stderr.strip()}")
    answers = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON Lines, one per image
    guess = [a["top_k"][0]["label"] for a in answers]
    correct = sum(g == t for g, t in zip(guess, truth))
    contact_sheet(pixels, truth, guess, out / "contact_sheet.png")
    if not quiet:
        print_table(truth, guess)

    report = {
        "test_accuracy": result.metrics["test_accuracy"],
        "test_images": result.metrics["test_images"],
        "train_seconds": result.metrics["train_seconds"],
        "train_wall_seconds": train_wall_seconds,
        "images_per_second": result.metrics["images_per_second"],
        "demo_accuracy_100": correct / len(truth),
        "demo_predict_seconds": predict_seconds,
        "bundle": str(bundle),
        "run_dir": str(result.run_dir),
        "contact_sheet": str(out / "contact_sheet.png"),
        "curves": str(out / "curves.png"),
        "confusion": str(out / "confusion.png"),
        "precision": result.metrics["precision"],
        "device": result.metrics["device"],
        "epochs": result.metrics["epochs"],
        "seed": seed,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"\n{correct}/{len(truth)} held-out images right ({report['demo_accuracy_100']:.0%}) by the torch-free "
        f"process in {predict_seconds:.2f} s (start-up included)")
    log(f"test accuracy {report['test_accuracy']:.2%} on {report['test_images']} held-out images; "
        f"training took {report['train_seconds']:.1f} s ({report['images_per_second']:,.0f} img/s, "
        f"{train_wall_seconds:.1f} s with data, evaluation, checkpoints and plots; "
        f"{report['precision']} on {report['device']})")
    log(f"everything is in {out}/: the run (run/, its config.yaml and checkpoints), the exported bundle "
        f"({bundle}/), report.json, contact_sheet.png, curves.png, confusion.png")
    log("next, on the bundle it made:\n"
        f"  tandem predict {bundle} {holdout}    # classify images or folders (torch-free)\n"
        f"  tandem explain {bundle} {holdout / '000.png'}    # which pixels the answer rests on\n"
        f"  tandem plan {bundle}    # which devices it fits, and how fast\n"
        f"  mkdir -p models/animals && cp -r {bundle} models/animals/1 && tandem serve models    # serve it over HTTP")
    return report

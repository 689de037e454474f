"""Phone photos as users bring them: `tandem predict` and `tandem train` on folders of 12-megapixel JPEGs.

    python benchmarks/photos.py                                  # 200 photos to predict, 5,000 to train on
    python benchmarks/photos.py --predict-photos 20 --train-photos 100   # a quick check of the script
    python benchmarks/photos.py --bundle BUNDLE --skip-train [--workdir DIR] [--json]

Photos. 4032x3024 RGB JPEGs at quality 90, about 3 MB each, one in four stored turned with EXIF
Orientation 3, 6 or 8; folders are <root>/<class>/<n>.jpg. They are generated (seeded) by
benchmarks/phone_photos.py and kept in benchmarks/.photos/, so that a rerun does not make them
again; its docstring describes them. --grain sets the file size (28, the default: 3.3 MB; 16:
2.1 MB; 8: 1.2 MB), and with it the entropy decoding that no decoder can skip.

Predict. Unless --bundle is given, a bundle that recognises such photos is trained first, on small
(252x189) renders of the same kind of scene, through the library's own folder loading and resizing
(`tandem train data.source=<renders> data.image_size=32 data.channels=3`, then `tandem export`).
Then, with the photos read once into the page cache, `tandem predict BUNDLE FOLDER --json` runs as
the user runs it (--predict-runs times; the median run counts); its wall time (start-up included)
gives images/s, and the time to its first JSON line shows whether it streams. The reference, in this
process: every photo decoded at full resolution with plain Pillow (open, load with no draft,
ImageOps.exif_transpose, convert to the bundle's channels), one at a time, then `Predictor.top_k` on
that array (the Predictor resizes it the bundle's way). That is also the naive serial path whose
speed the table shows beside the command's. The command's top-1 must equal the reference's on
>= 99% of the photos.

Train. `tandem train data.source=<photos> data.image_size=64 data.channels=3 model.name=resnet
model.width=8 epochs=1 batch_size=64 --json` with a private, empty TANDEM_CACHE_DIR, then
`tandem train --resume RUN --json` and `tandem export RUN --out BUNDLE --json` with the same cache.
Decode figures come from the commands' JSON: the "decode" object of train's metrics, "data_decode"
in export's (files, images, decoded, from_cache, seconds, workers). Independently, an audit hook
installed in every Python process of each command (sitecustomize on PYTHONPATH, so pool workers
have it too) records each photo file opened: a photo must be opened to be decoded. The first train
must open every photo (which shows that the hook sees them); the later commands must decode none
and open none.

Targets: tandem predict >= 100 images/s over the predict folder; its top-1 equal to the full-resolution
decode's on >= 99% of the photos; the first train reports its decode time and the hook sees it open
every photo; `train --resume` and `export` decode no photo and open no photo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phone_photos import GRAIN, HEIGHT, QUALITY, WIDTH, log, photo_folder  # also photos.photo_folder
from targets import Target, report

PREDICT_TARGET, AGREEMENT_TARGET = 100.0, 0.99

# Installed through PYTHONPATH in every Python process of a command, pool workers included: appends the
# path of each file opened under PHOTOS_BENCH_ROOT to PHOTOS_BENCH_OPENS, one line per open.
SITECUSTOMIZE = r'''
import os, sys
_root, _log = os.environ.get("PHOTOS_BENCH_ROOT"), os.environ.get("PHOTOS_BENCH_OPENS")
if _root and _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # opened once: the hook only writes

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_root):
                os.write(_fd, (path + "\n").encode())

    sys.addaudithook(_hook)
'''


def tandem(args: list[str], env: dict, watch: Path | None = None) -> dict:
    """Run `python -m tandem ARGS`: wall time, time to the first stdout line, stdout, and (with `watch`) how
    many files under `watch` its processes opened. A failure is returned, not raised, so the table shows it."""
    env = dict(env)
    log("$ tandem " + " ".join(args))
    with tempfile.TemporaryDirectory() as hook, tempfile.TemporaryFile("w+") as stderr:
        opens = Path(hook, "opens")
        if watch is not None:
            Path(hook, "sitecustomize.py").write_text(SITECUSTOMIZE)
            env.update(PYTHONPATH=os.pathsep.join(filter(None, [hook, env.get("PYTHONPATH")])),
                       PHOTOS_BENCH_ROOT=str(watch.resolve()) + os.sep, PHOTOS_BENCH_OPENS=str(opens))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tandem", *args], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, env=env)
        lines, first = [], None
        for line in proc.stdout:
            first = time.perf_counter() - t0 if first is None else first
            lines.append(line)
        code = proc.wait()
        wall = time.perf_counter() - t0
        stderr.seek(0)
        err = stderr.read()
        # None: the hook never ran (no process created the log), so it proves nothing.
        opened = len(set(opens.read_text().splitlines())) if watch is not None and opens.exists() else None
    if code != 0:
        log(f"  exit {code}: {err.strip().splitlines()[-1] if err.strip() else '(no message)'}")
    return {"command": "tandem " + " ".join(args), "exit": code, "wall_s": wall, "first_output_s": first,
            "stdout": "".join(lines), "stderr_tail": err[-3000:], "files_opened": opened}


def failed(run: dict) -> str | None:
    if run["exit"] == 0:
        return None
    last = run["stderr_tail"].strip().splitlines()
    return f"`{run['command']}` failed (exit {run['exit']}): {last[-1] if last else ''}"


def output(run: dict) -> dict:
    """The JSON document a command printed; a failed command ends the benchmark."""
    if failed(run):
        raise SystemExit(failed(run) + "\n" + run["stderr_tail"])
    return json.loads(run["stdout"])


def num(value) -> float:
    return float("nan") if value is None else float(value)  # a missing figure fails its target


# ---------------------------------------------------------------------------------------------------
# Predict

def train_bundle(work: Path, env: dict) -> Path:
    """A bundle that recognises the photos: trained on small renders of the same kind of scene."""
    renders, info = photo_folder("renders", 3000)
    log(f"renders: {info['files']} files, {info['bytes'] / 1e6:.0f} MB" + (" (cached)" if info["cached"] else ""))
    run = tandem(["train", f"data.source={renders}", "data.image_size=32", "data.channels=3", "epochs=8",
                  f"out_dir={work / 'renders-run'}", "--json"], env)
    metrics = output(run)
    log(f"  test accuracy {metrics['test_accuracy']:.3f} on the renders, {run['wall_s']:.0f} s")
    output(tandem(["export", metrics["run_dir"], "--out", str(work / "renders-bundle"), "--json"], env))
    return work / "renders-bundle"


def predictions(run: dict) -> dict[str, dict]:
    """resolved path -> {"index", "label"} or {"error"}, from the command's JSON Lines."""
    out = {}
    for row in map(json.loads, run["stdout"].splitlines()):
        top = row.get("top_k")
        out[str(Path(row["path"]).resolve())] = ({"index": top[0]["index"], "label": top[0]["label"]} if top
                                                 else {"error": row.get("error", "no prediction")})
    return out


def reference(bundle: Path, files: list[Path]) -> dict:
    """Full-resolution decodes with plain Pillow, one at a time, then the Predictor's top-1 of each."""
    from PIL import Image, ImageOps

    from tandem.runtime import Predictor

    predictor = Predictor.load(bundle)
    mode = "L" if predictor.channels == 1 else "RGB"
    predictor.top_k([np.zeros((8, 8, predictor.channels), np.uint8)], k=1)  # warm the session up
    out, decode_s, predict_s, upright_ok = {}, [], [], 0
    for n, path in enumerate(files):
        t0 = time.perf_counter()
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(image).convert(mode)
        array = np.asarray(upright)
        t1 = time.perf_counter()
        top = predictor.top_k([array], k=1)[0][0]
        t2 = time.perf_counter()
        decode_s.append(t1 - t0)
        predict_s.append(t2 - t1)
        upright_ok += (array.shape[0] > array.shape[1]) == (orientation in (6, 8))
        out[str(path.resolve())] = {"index": top.index, "label": top.label, "orientation": orientation}
        if (n + 1) % 50 == 0:
            log(f"  reference: {n + 1}/{len(files)}")
    return {"predictions": out, "decode_s": decode_s, "predict_s": predict_s, "upright_ok": upright_ok,
            "image_size": predictor.image_size, "channels": predictor.channels}


def predict_figures(bundle: Path, folder: Path, work: Path, env: dict, runs: int) -> dict:
    files = sorted(p for p in folder.rglob("*.jpg"))
    for path in files:  # into the page cache, so that neither side waits for the disk
        path.read_bytes()
    timed = []
    for i in range(runs):  # each with an empty cache of its own
        timed.append(tandem(["predict", str(bundle), str(folder), "--top-k", "1", "--json"],
                            {**env, "TANDEM_CACHE_DIR": str(work / f"predict-cache-{i}")}))
        log(f"  {timed[-1]['wall_s']:.1f} s, exit {timed[-1]['exit']}")
    run = sorted(timed, key=lambda r: (r["exit"] != 0, r["wall_s"]))[len(timed) // 2]  # the median run
    got = predictions(run)
    log(f"  {len(got)} results; reference: full-resolution decodes, serially ...")
    ref = reference(bundle, files)
    keys = list(ref["predictions"])
    same = [got.get(k, {}).get("index") == ref["predictions"][k]["index"] for k in keys]
    turned = [k for k in keys if ref["predictions"][k]["orientation"] != 1]
    right = lambda preds, k: preds.get(k, {}).get("label") == Path(k).parent.name  # noqa: E731
    serial_s = sum(ref["decode_s"]) + sum(ref["predict_s"])
    return {
        "photos": len(files), "command": {k: v for k, v in run.items() if k != "stdout"},
        "runs_wall_s": [r["wall_s"] for r in timed],
        "results": len(got), "errors": sum("error" in v for v in got.values()),
        "images_per_s": len(files) / run["wall_s"] if run["exit"] == 0 else 0.0,
        "agreement": sum(same) / len(keys),
        "agreement_turned": sum(same[keys.index(k)] for k in turned) / max(1, len(turned)), "turned": len(turned),
        "accuracy": sum(right(got, k) for k in keys) / len(keys),
        "reference_accuracy": sum(right(ref["predictions"], k) for k in keys) / len(keys),
        "reference_upright": ref["upright_ok"],
        "serial_s": serial_s, "serial_images_per_s": len(files) / serial_s,
        "serial_decode_ms": 1e3 * statistics.median(ref["decode_s"]),
        "serial_resize_predict_ms": 1e3 * statistics.median(ref["predict_s"]),
        "bundle": str(bundle), "bundle_input": f"{ref['image_size']}x{ref['image_size']}x{ref['channels']}",
    }


# ---------------------------------------------------------------------------------------------------
# Train, resume, export

def decode_figures(run: dict, key: str) -> dict:
    """One command's figures: the `key` object of its JSON (None if missing or failed), and the hook's count."""
    doc = json.loads(run["stdout"]) if run["exit"] == 0 else {}
    return {"decode": doc.get(key), "files_opened": run["files_opened"], "wall_s": run["wall_s"],
            "error": failed(run), "test_accuracy": doc.get("test_accuracy"), "train_seconds": doc.get("train_seconds"),
            "run_dir": doc.get("run_dir")}


def train_figures(folder: Path, work: Path, env: dict) -> dict:
    env = {**env, "TANDEM_CACHE_DIR": str(work / "decode-cache")}  # empty: the first run must decode
    first = decode_figures(tandem(
        ["train", f"data.source={folder}", "data.image_size=64", "data.channels=3", "model.name=resnet",
         "model.width=8", "epochs=1", "batch_size=64", f"out_dir={work / 'photos-run'}", "--json"], env, folder), "decode")
    if first["error"]:
        return {"first": first}
    resume = tandem(["train", "--resume", first["run_dir"], "--json"], env, folder)
    export = tandem(["export", first["run_dir"], "--out", str(work / "photos-bundle"), "--json"], env, folder)
    return {"first": first, "resume": decode_figures(resume, "decode"), "export": decode_figures(export, "data_decode")}


# ---------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predict-photos", type=int, default=200,
                        help="photos in the predict folder (default: %(default)s)")
    parser.add_argument("--train-photos", type=int, default=5000,
                        help="photos in the training folder (default: %(default)s; making them takes about 12 min "
                             "on 2 cores, once)")
    parser.add_argument("--predict-runs", type=int, default=1,
                        help="runs of tandem predict; the table shows the median one (default: %(default)s)")
    parser.add_argument("--skip-train", action="store_true", help="only the predict figures")
    parser.add_argument("--bundle", type=Path, help="bundle to predict with (default: train one on small renders)")
    parser.add_argument("--workdir", type=Path, help="keep runs, bundles and decode caches in a new folder under "
                                                      "this one (default: a temporary folder, removed at the end)")
    parser.add_argument("--grain", type=int, default=GRAIN,
                        help="peak-to-peak grain in pixel levels, which sets the file size: 28 (default) about 3.3 MB, "
                             "16 about 2.1 MB, 8 about 1.2 MB (other values get their own cached folders)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.predict_photos < 10 or args.train_photos < 20 or args.predict_runs < 1:
        parser.error("give at least 10 photos to predict, 20 to train on, and 1 predict run")
    if not 0 <= args.grain <= 255:
        parser.error("--grain goes from 0 to 255")

    predict_folder, predict_gen = photo_folder("predict", args.predict_photos, args.grain)
    train_folder, train_gen = (None, None) if args.skip_train else photo_folder("train", args.train_photos, args.grain)
    for name, gen in (("predict", predict_gen), ("train", train_gen)):
        if gen:
            log(f"{name} photos: {gen['files']} files, {gen['bytes'] / 1e9:.2f} GB, made in {gen['seconds']:.0f} s "
                f"({gen['per_file_s']:.2f} s a photo a process)" + (" (cached)" if gen["cached"] else ""))

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=time.strftime("photos-%Y%m%d-%H%M%S-"), dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="tandem-photos-"))
    env = {**os.environ, "TANDEM_CACHE_DIR": str(work / "cache")}  # never the user's cache
    try:
        bundle = args.bundle or train_bundle(work, env)
        log(f"predict: {args.predict_photos} photos with {bundle} ...")
        predict = predict_figures(bundle, predict_folder, work, env, args.predict_runs)
        train = None if args.skip_train else train_figures(train_folder, work, env)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    passed = show(args, predict, train, predict_gen, train_gen, work if args.workdir else None)
    if not passed:
        raise SystemExit(1)  # a missed target fails the run


def show(args, predict: dict, train: dict | None, predict_gen: dict, train_gen: dict | None, kept: Path | None) -> bool:
    rows, targets, notes = [], [], []

    def add(what, figure, reference="", ratio="", target: Target | None = None, limit=""):
        if target is not None:
            targets.append(target)
            limit = limit or f"{'>=' if target.higher_is_better else '<='} {target.limit:g}{target.unit}"
        verdict = "" if target is None else "PASS" if target.passed else "FAIL"
        rows.append([what, "missing" if figure is None else figure, reference, ratio, limit, verdict])

    p, n, command = predict, predict["photos"], predict["command"]
    add(f"tandem predict, {n} photos (images/s)", p["images_per_s"], p["serial_images_per_s"],
        p["images_per_s"] / p["serial_images_per_s"],
        Target(f"tandem predict, {n} 12-MP photos", p["images_per_s"], PREDICT_TARGET, True, " images/s"))
    add("  whole command (s)", command["wall_s"], p["serial_s"], command["wall_s"] / p["serial_s"])
    add("  start -> first result line (s)", command["first_output_s"])
    add("  top-1 = full-resolution decode's", p["agreement"],
        target=Target("predict top-1 = full-resolution decode's", p["agreement"], AGREEMENT_TARGET, True))
    add(f"    of the {p['turned']} EXIF-turned photos", p["agreement_turned"])
    add("  top-1 = the photo's class", p["accuracy"], p["reference_accuracy"])
    notes += [f"predict reference: plain Pillow, full decode + EXIF ({p['serial_decode_ms']:.0f} ms median), then "
              f"Predictor.top_k resizing it to {p['bundle_input']} ({p['serial_resize_predict_ms']:.0f} ms), one photo "
              f"at a time; {p['reference_upright']}/{n} upright after EXIF",
              f"bundle {p['bundle']}; predict exit {command['exit']}, {p['results']} results, {p['errors']} errors"]

    if train is not None:
        first, m = train["first"], train_gen["files"]
        decode = first["decode"] or {}
        est = m * (p["serial_s"] / n)  # the naive serial path's time for the training folder
        seconds, decoded = decode.get("seconds"), decode.get("decoded")
        add(f"tandem train, {m} photos: decode (s)", seconds, est, seconds / est if seconds else "",
            Target("first train reports its decode time", float(isinstance(seconds, (int, float))), 1, True), "reported")
        add("  images decoded", decoded, m)
        add("  images decoded/s", decoded / seconds if seconds and decoded else "", m / est,
            decoded / seconds / (m / est) if seconds and decoded else "")
        add("  decode processes", decode.get("workers"), 1)
        add("  photo files opened (audit hook)", first["files_opened"], m, "",
            Target("audit hook sees the first train open every photo", num(first["files_opened"]), m, True))
        add("  whole command (s)", first["wall_s"])
        if first["error"]:
            notes.append(first["error"])
            add("  train on the photos runs", "failed", target=Target("tandem train on the photos runs", 0.0, 1, True))
        for key, name in (("resume", "tandem train --resume"), ("export", "tandem export")):
            if key not in train:
                continue
            fig = train[key]
            decoded = (fig["decode"] or {}).get("decoded")
            add(f"{name}: images decoded", "failed" if fig["error"] else decoded, m, "",
                Target(f"{name}: images decoded", num(decoded), 0, False))
            add("  photo files opened (audit hook)", fig["files_opened"], m, "",
                Target(f"{name}: photo files opened", num(fig["files_opened"]), 0, False))
            add("  whole command (s)", fig["wall_s"])
            if fig["error"]:
                notes.append(fig["error"])
        notes.append(f"train decode figures: the commands' JSON (\"decode\"; export's \"data_decode\"); files opened: "
                     f"an audit hook in each of their processes. Reference: {m} x the serial per-photo time above")
        if first["test_accuracy"] is not None:
            notes.append(f"train on the photos: test accuracy {first['test_accuracy']:.3f}, "
                         f"{first['train_seconds'] or 0:.1f} s in the training loop")
    for name, gen in (("predict", predict_gen), ("train", train_gen)):
        if gen:
            notes.append(f"{name} photos: {gen['files']} files, {gen['bytes'] / 1e9:.2f} GB "
                         f"({gen['bytes'] / gen['files'] / 1e6:.1f} MB each), "
                         f"{'made earlier' if gen['cached'] else 'made'} in {gen['seconds']:.0f} s with {gen['workers']} "
                         f"processes ({gen['per_file_s']:.2f} s a photo a process)")
    if kept:
        notes.append(f"runs, bundles and caches kept in {kept}")
    details = {"predict": p, "train": train, "generation": {"predict": predict_gen, "train": train_gen},
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    passed = report(f"tandem on {WIDTH}x{HEIGHT} JPEG photos (quality {QUALITY}, 1 in 4 EXIF-turned)",
                    ["what", "figure", "reference", "ratio", "target", "verdict"], rows, targets, args.json, details)
    if not args.json:
        print("\nreference column: the naive path, serial full-resolution decodes with plain Pillow\n" + "\n".join(notes))
    return passed


if __name__ == "__main__":
    main()

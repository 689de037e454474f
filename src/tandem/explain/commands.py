"""`tandem explain`: which pixels a prediction rests on, per image, and how far each method can be trusted.

    tandem explain BUNDLE IMAGE... [--method ig|gradcam|occlusion] [--target LABEL] [--out DIR] [--json]
    tandem explain BUNDLE --evaluate [--methods ig,gradcam,occlusion] [--limit N] [--steps N] [--json]

Per image, into --out: NAME.METHOD.png (the image beside the image with the map over it, label and probability),
NAME.METHOD.npy (the raw (H, W) map) and NAME.METHOD.json (prediction, target, the map's values). --evaluate
scores each method by deletion and insertion curves against a random order on the bundle's test split
(tandem.explain.faithfulness). Integrated Gradients and Grad-CAM run on the training side (torch, Captum);
occlusion runs in the runtime and needs neither, so an inference-only install explains by occlusion.

cli.py calls register(sub) with its subparsers; each handler takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tandem.files import write_bytes_atomic
from tandem.cli import _counted, _print_json  # the command line's own argument types
from tandem.errors import UserError

SCHEMA = "tandem.explain/1"
METHODS = ("ig", "gradcam", "occlusion")
TORCH_METHODS = ("ig", "gradcam")
TITLES = {"ig": "Integrated Gradients", "gradcam": "Grad-CAM", "occlusion": "occlusion"}
SETUP = "pip install 'tandem[explain]'"

EXAMPLES = """examples:
  tandem explain bundles/animals/1 zebra.png                      Integrated Gradients (occlusion without torch)
  tandem explain bundles/animals/1 photos/ --method occlusion     every image in a folder, torch-free
  tandem explain bundles/animals/1 cat.png --target dog           why (not) a dog: explain another class
  tandem explain bundles/animals/1 cat.png --out why/ --json      a machine-readable report on stdout
  tandem explain bundles/animals/1 --evaluate                     faithfulness of every method on the test split
  tandem explain bundles/animals/1 --evaluate --methods ig,occlusion --limit 200 --json

Each image gets NAME.METHOD.png (the image and the map over it: red raises the class's probability, blue lowers
it), NAME.METHOD.npy (the raw map) and NAME.METHOD.json in --out. Every method explains the softmax probability
of the predicted class (or --target) against a black image. Existing files are never replaced without --force.

--evaluate removes pixels in the order of each method's map (deletion: set to black; insertion: put back into
a black image) and tracks the probability of the predicted class: a faithful map makes it fall fast (small
deletion AUC) and rise fast (large insertion AUC). Each method is compared with a random order on the same
images, and a method that does not beat it is reported as such. --json prints schema tandem.explain/1."""


def register(sub) -> None:
    """Add `explain` to the `tandem` command's subparsers."""
    p = sub.add_parser("explain", help="why the network answered as it did: attribution maps, and their faithfulness",
                       description="Explain a bundle's predictions with attribution maps (Integrated Gradients or "
                                   "Grad-CAM through Captum, or occlusion in the torch-free runtime), or measure "
                                   "how faithful each method is on the bundle's test split (--evaluate).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images (searched recursively)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="ig (Integrated Gradients), gradcam or occlusion (default: ig where torch and captum are "
                        "installed, else occlusion)")
    p.add_argument("--target", metavar="LABEL", help="explain this class instead of the predicted one (a label, or "
                   "its index)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the pictures, maps and JSON "
                   "files (default: explanations)")
    p.add_argument("--force", action="store_true", help="replace explanations already in --out")
    p.add_argument("--window", type=_counted(1, 4096), default=None, metavar="PIXELS",
                   help="occlusion: side of the black square (default: image size / 7, 4 for 28 pixels)")
    p.add_argument("--stride", type=_counted(1, 4096), default=None, metavar="PIXELS",
                   help="occlusion: step between squares (default: half the window)")
    p.add_argument("--evaluate", action="store_true",
                   help="measure faithfulness (deletion and insertion curves against random) on the test split")
    p.add_argument("--methods", default=None, metavar="M,M,...",
                   help="with --evaluate: the methods to score (default: every method this install and model run)")
    p.add_argument("--limit", type=_counted(1), default=None, metavar="N",
                   help="with --evaluate: a seeded sample of N test images (default: all of them)")
    p.add_argument("--steps", type=_counted(1, 1 << 20), default=None, metavar="N",
                   help="with --evaluate: steps of each curve (default: the image's side, 28 for the animals: one "
                        "row's worth of pixels a step)")
    p.add_argument("--seed", type=_counted(0, 2**32 - 1), default=0,
                   help="with --evaluate: seed of the random order and of --limit's sample (default: %(default)s)")
    p.add_argument("--json", action="store_true", help=f"print a report as JSON (schema {SCHEMA})")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    if args.evaluate:
        if args.images:
            raise UserError("--evaluate scores the methods on the bundle's test split; drop the images, or drop "
                            "--evaluate to explain them")
        if args.method or args.target:
            given = " and ".join(flag for flag, value in (("--method", args.method), ("--target", args.target)) if value)
            raise UserError(f"{given} do{'es' if ' and ' not in given else ''} not apply with --evaluate: choose "
                            "methods with --methods ig,gradcam,occlusion; each test image's predicted class is explained")
        if args.out is not None or args.force:
            raise UserError("--evaluate writes no files (it prints, or --json); drop --out and --force")
        return _evaluate(args)
    extra = [flag for flag, value in (("--methods", args.methods), ("--limit", args.limit), ("--steps", args.steps))
             if value is not None]
    if extra:
        raise UserError(f"{', '.join(extra)} {'apply' if len(extra) > 1 else 'applies'} only with --evaluate; add "
                        f"--evaluate, or drop {'them' if len(extra) > 1 else 'it'}")
    if not args.images:
        raise UserError(f"give images to explain (tandem explain {args.bundle} IMAGE_OR_FOLDER ...), or --evaluate "
                        "to measure faithfulness on the bundle's test split")
    return _explain_images(args)


# --- choosing methods ---------------------------------------------------------------------------------------


def torch_side_installed() -> bool:
    """Whether torch and captum can be imported (asked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "captum"))


def _require_torch_side(method: str) -> None:
    if method in TORCH_METHODS and not torch_side_installed():
        raise UserError(f"--method {method} needs torch and captum ({SETUP}); --method occlusion runs without them")


def default_method() -> tuple[str, str | None]:
    """ig where the training side is installed, else occlusion, with a note saying why."""
    if torch_side_installed():
        return "ig", None
    return "occlusion", (f"note: torch and captum are not installed, so explaining by occlusion (the runtime); "
                         f"{SETUP} adds Integrated Gradients and Grad-CAM")


def _occlusion_geometry(args, image_size: int, methods: list[str]) -> tuple[int, int]:
    from tandem.explain.occlusion import window_for

    if (args.window or args.stride) and "occlusion" not in methods:
        raise UserError("--window and --stride set occlusion's square; add --method occlusion (or occlusion to "
                        "--methods), or drop them")
    window = args.window or window_for(image_size)[0]
    stride = args.stride or max(1, window // 2)
    return window, stride


def parse_target(text: str | None, labels: list[str]) -> int | None:
    """--target: a label (exact, then ignoring case) or a class index; None: each image's predicted class."""
    from tandem.explain.occlusion import class_index

    try:
        return class_index(text, labels)
    except UserError as err:
        raise UserError(f"--{err}") from None


# --- attributions, shared by explaining images and by --evaluate ------------------------------------------------


def attribution_maps(method: str, predictor: Any, pixels: np.ndarray, targets: np.ndarray, window: int = 4,
                     stride: int = 2, explainer: Any = None,
                     progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(maps float32 (N, H, W), IG's convergence deltas (N,) or None) of uint8 images for the target classes.

    occlusion runs in the runtime (`predictor`); ig and gradcam on `explainer` (a TorchExplainer)."""
    if method == "occlusion":
        from tandem.explain.occlusion import occlusion

        maps = []
        for image, target in zip(pixels, targets):
            maps.append(occlusion(predictor, image, int(target), window, stride).heatmap)
            if progress:
                progress(1)
        return np.stack(maps), None
    result = explainer.attribute(method, pixels, targets, progress=progress)
    return result.maps, result.convergence_delta


def _torch_explainer(bundle: str, manifest: dict, methods: list[str]) -> Any:
    if not any(method in TORCH_METHODS for method in methods):
        return None
    from tandem.explain.attribute import TorchExplainer

    explainer = TorchExplainer(bundle, manifest)
    for method in methods:
        if method in TORCH_METHODS:
            explainer.check(method)  # Grad-CAM on a model without convolutions: refused before any work
    return explainer


# --- explaining images ----------------------------------------------------------------------------------------


def output_names(files: list[Path]) -> list[str]:
    """A distinct file-name stem per input: its own stem, or, where two inputs share one (two cat.png in different
    folders, cat.png beside cat.jpg), its path from the inputs' common folder."""
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if resolved else Path("/")
    stems = Counter(f.stem for f in files)
    names = []
    for f, r in zip(files, resolved):
        if stems[f.stem] == 1:
            names.append(f.stem)
            continue
        relative = r.relative_to(common)
        names.append("_".join(relative.with_suffix("").parts))
    counted = Counter(names)
    names = [f"{name}_{f.suffix.lstrip('.')}" if counted[name] > 1 and f.suffix else name
             for name, f in zip(names, files)]
    seen: Counter = Counter()
    unique = []
    for name in names:  # anything still equal (it should not be): numbered, never overwritten
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _check_out(out: Path, names: list[str], kind: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the explanations")
    if force or not out.is_dir():
        return
    taken = [f"{name}.{kind}.{ext}" for name in names for ext in ("png", "npy", "json")
             if (out / f"{name}.{kind}.{ext}").exists()]
    if taken:
        raise UserError(f"{out} already holds {len(taken)} of these files ({', '.join(taken[:2])}"
                        f"{' ...' if len(taken) > 2 else ''}); pass --force to replace them, or choose another --out")


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _caption(labels: list[str], probabilities: np.ndarray, target: int, method: str, window: int, stride: int) -> str:
    best = int(np.argmax(probabilities))
    line = f"{labels[best]} {probabilities[best]:.1%}"
    if target != best:
        line += f"; explaining {labels[target]} ({probabilities[target]:.1%})"
    how = TITLES[method] + (f" (window {window}, stride {stride})" if method == "occlusion" else "")
    signs = f"red: for {labels[target]}" + ("" if method == "gradcam" else ", blue: against")
    return f"{line}\n{how}; {signs}"


def _explain_images(args) -> int:
    from tandem.explain.render import overlay_png
    from tandem.images import decode_file_batches, expand_paths
    from tandem.runtime import Predictor

    note = None
    if args.method:
        method = args.method
        _require_torch_side(method)
    else:
        method, note = default_method()
    if note:
        print(note, file=sys.stderr)
    predictor = Predictor.load(args.bundle, precision="fp32")  # every hash checked; the model that was explained
    labels = predictor.labels
    target = parse_target(args.target, labels)
    window, stride = _occlusion_geometry(args, predictor.image_size, [method])
    if method == "occlusion":
        from tandem.explain.occlusion import check_window

        check_window(predictor.image_size, predictor.image_size, window, stride)
    out = Path(args.out or "explanations")
    files = _input_files(args.images, out, expand_paths)
    names = dict(zip(files, output_names(files)))
    # An explanation of another class than the predicted one (--target) gets its own files: NAME.METHOD.LABEL.*
    kind = method if target is None else f"{method}.{re.sub(r'[^A-Za-z0-9_-]', '_', labels[target])}"
    _check_out(out, list(names.values()), kind, args.force)
    explainer = _torch_explainer(args.bundle, predictor.manifest, [method])
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, round(224 / predictor.image_size))  # pictures about 224 pixels a side, whatever the model's size

    results: list[dict] = []
    failed = 0
    if not args.json:
        print(f"{'image':<32} {'prediction':<22} {'explained':<16} picture")
    for chunk in decode_file_batches(files, predictor.image_size, predictor.channels, predictor.resize):
        good = [(path, pixels) for path, pixels, _ in chunk if pixels is not None]
        for path, _, error in chunk:
            if error is not None:
                failed += 1
                results.append({"image": str(path), "error": error})
                print(f"error: {error}", file=sys.stderr, flush=True)
        if not good:
            continue
        pixels = np.stack([p for _, p in good])
        probabilities = predictor.probabilities(pixels)
        targets = probabilities.argmax(1) if target is None else np.full(len(good), target)
        maps, deltas = attribution_maps(method, predictor, pixels, targets, window, stride, explainer)
        for i, (path, _) in enumerate(good):
            record = _image_record(args, path, names[path], method, window, stride, labels, probabilities[i],
                                   int(targets[i]), maps[i], None if deltas is None else float(deltas[i]), kind)
            caption = _caption(labels, probabilities[i], int(targets[i]), method, window, stride)
            write_bytes_atomic(out / record["files"]["picture"], overlay_png(pixels[i], maps[i], caption, scale))
            write_bytes_atomic(out / record["files"]["map"], _npy_bytes(maps[i]))
            write_bytes_atomic(out / record["files"]["json"], (json.dumps(record, indent=1) + "\n").encode())
            results.append({k: v for k, v in record.items() if k != "map"}
                           | {"map": {k: v for k, v in record["map"].items() if k != "values"}})
            if not args.json:
                p = record["prediction"]
                print(f"{_short(path, 32):<32} {_short(p['label'], 14):<14} {p['probability']:>6.1%}  "
                      f"{_short(record['target']['label'], 16):<16} {out / record['files']['picture']}", flush=True)
    if args.json:
        _print_json({"schema": SCHEMA, "kind": "images", "bundle": str(args.bundle), "model_file": "model.onnx",
                     "method": method, "note": note,
                     "out": str(out), "explained": len(results) - failed, "failed": failed, "images": results})
    elif results:
        print(f"{len(results) - failed} image(s) explained by {TITLES[method]} into {out}/ (NAME.{kind}.png, .npy, "
            ".json)")
    if failed:
        print(f"error: {failed} file(s) could not be read; the others were explained", file=sys.stderr)
        return 1
    return 0


def _input_files(images: list[str], out: Path, expand_paths: Callable) -> list[Path]:
    """The image files to explain, each once, in order; a folder's pictures of an earlier run (NAME.METHOD.png in
    --out, when --out is the folder or inside it) are not inputs."""
    inside = out.resolve()
    earlier = re.compile(r".+\.(?:" + "|".join(map(re.escape, METHODS)) + r")(?:\.[A-Za-z0-9_-]+)?\.png")
    files: list[Path] = []
    for raw in images:
        found = expand_paths([raw])
        if Path(raw).is_dir():
            found = [f for f in found if not (f.resolve().is_relative_to(inside) and earlier.fullmatch(f.name))]
        files.extend(found)
    if not files:
        raise UserError(f"no images to explain: the folders given hold only earlier explanations (NAME.METHOD.png in "
                        f"{out})")
    return list(dict.fromkeys(files))  # the same file named twice is explained once


def _short(value: Any, width: int) -> str:
    text = str(value)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _image_record(args, path: Path, name: str, method: str, window: int, stride: int, labels: list[str],
                  probabilities: np.ndarray, target: int, heatmap: np.ndarray, delta: float | None,
                  kind: str | None = None) -> dict:
    kind = kind or method  # what the files are named by: the method, and the --target label where one was given
    order = np.argsort(-probabilities, kind="stable")[:5]
    settings = ({"window": window, "stride": stride, "baseline": "black (raw 0)"} if method == "occlusion" else
                {"n_steps": 50, "baseline": "black (raw 0)"} if method == "ig" else
                {"layer": "last convolutional block", "upsampled": "bilinear"})
    record = {
        "schema": SCHEMA, "kind": "image", "image": str(path), "bundle": str(args.bundle), "model_file": "model.onnx",
        "method": method,
        "settings": settings, "explains": "softmax probability of the target class",
        "prediction": {"label": labels[int(order[0])], "index": int(order[0]),
                       "probability": float(probabilities[order[0]])},
        "top_k": [{"label": labels[int(j)], "index": int(j), "probability": float(probabilities[j])} for j in order],
        "target": {"label": labels[target], "index": target, "probability": float(probabilities[target])},
        "map": {"shape": list(heatmap.shape), "sum": float(heatmap.sum(dtype=np.float64)),
                "min": float(heatmap.min()), "max": float(heatmap.max()),
                "values": [[float(f"{v:.7g}") for v in row] for row in heatmap.tolist()]},
        "files": {"picture": f"{name}.{kind}.png", "map": f"{name}.{kind}.npy", "json": f"{name}.{kind}.json"},
    }
    if delta is not None:
        record["convergence_delta"] = delta  # sum of the map - (f(image) - f(black)); near 0 when IG converged
    return record


# --- --evaluate ------------------------------------------------------------------------------------------------


def parse_methods(text: str | None, model_has_conv: bool | None = None) -> tuple[list[str], list[str]]:
    """--methods -> (methods, notes). Default: every method this install runs (and Grad-CAM only on a model with
    convolutions); named methods that cannot run are errors."""
    if text is None:
        if not torch_side_installed():
            return ["occlusion"], [f"note: torch and captum are not installed, so only occlusion is scored; {SETUP} "
                                   "adds Integrated Gradients and Grad-CAM"]
        if model_has_conv is False:
            return ["ig", "occlusion"], ["note: the model has no convolutional layer, so Grad-CAM is left out"]
        return list(METHODS), []
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {text!r}: give a comma-separated list of {', '.join(METHODS)}")
    for method in methods:
        _require_torch_side(method)
    return methods, []


def evaluate_bundle(bundle: str | Path, methods: list[str] | None = None, limit: int | None = None,
                    steps: int | None = None, seed: int = 0, window: int | None = None, stride: int | None = None,
                    progress: Any = None) -> dict:
    """Every method's faithfulness on the bundle's test split (all of it, or a seeded sample of `limit` images):
    the JSON report of `tandem explain BUNDLE --evaluate`. `progress`: a rich Progress, or None."""
    from tandem.explain import faithfulness
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.occlusion import check_window, window_for
    from tandem.runtime import Predictor

    predictor = Predictor.load(bundle, precision="fp32")
    manifest = predictor.manifest
    notes: list[str] = []
    if methods is None:
        has_conv = None
        if torch_side_installed():
            from tandem.explain.attribute import TorchExplainer

            try:
                TorchExplainer(bundle, manifest).check("gradcam")
                has_conv = True
            except UserError:
                has_conv = False
        methods, notes = parse_methods(None, has_conv)
    default_window = window_for(predictor.image_size)
    window = window or default_window[0]
    stride = stride or max(1, window // 2)
    if "occlusion" in methods:
        check_window(predictor.image_size, predictor.image_size, window, stride)
    explainer = _torch_explainer(str(bundle), manifest, methods)
    steps = steps or predictor.image_size  # one row's worth of pixels a step, as Petsiuk et al. did at 224 pixels
    if not 1 <= steps <= predictor.image_size ** 2:  # checked before the attributions, which take minutes
        raise UserError(f"--steps {steps}: give 1 to {predictor.image_size ** 2} (the pixels of one image)")
    test = bundle_splits(bundle, manifest).test
    total = len(test.labels)
    index = None
    if limit is not None and limit < total:
        index = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    pixels, labels = split_pixels(test, index)
    if len(pixels) == 0:
        raise UserError(f"bundle {bundle}: its test split is empty; nothing to evaluate on")
    probabilities = predictor.probabilities(pixels)
    targets = probabilities.argmax(1)

    maps: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    extra: dict[str, dict] = {}
    for method in methods:
        task = progress.add_task(f"{TITLES[method]}", total=len(pixels)) if progress else None
        advance = (lambda n, task=task: progress.advance(task, n)) if progress else None
        start = time.perf_counter()
        maps[method], deltas = attribution_maps(method, predictor, pixels, targets, window, stride, explainer, advance)
        timing[method] = (time.perf_counter() - start) / len(pixels)
        if deltas is not None:
            gap = probabilities[np.arange(len(targets)), targets] - _black_probability(predictor, pixels, targets)
            extra[method] = {"convergence_delta_median_abs": float(np.median(np.abs(deltas))),
                             "convergence_delta_max_abs": float(np.max(np.abs(deltas))),
                             "mean_abs_change_explained": float(np.mean(np.abs(gap)))}
    curve_task = progress.add_task("deletion and insertion curves", total=len(methods) + 1) if progress else None
    report = faithfulness.evaluate(predictor.probabilities, pixels, maps, steps, seed, targets,
                                   progress=(lambda _: progress.advance(curve_task)) if progress else None)
    result = {"schema": SCHEMA, "kind": "evaluation", "bundle": str(bundle), "split": "test",
              "images": len(pixels), "test_images": total, "sample": "seeded" if index is not None else "all",
              "accuracy": float((targets == labels).mean()), "steps": steps, "seed": seed,
              "removed_pixels_become": "black (raw 0)", "tracked": "softmax probability of the predicted class",
              "occlusion": {"window": window, "stride": stride} if "occlusion" in methods else None,
              "notes": notes, **report.to_dict()}
    for method in methods:
        result["methods"][method]["seconds_per_image"] = timing[method]
        result["methods"][method].update(extra.get(method, {}))
    return result


def _black_probability(predictor: Any, pixels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    black = predictor.probabilities(np.zeros((1, *pixels.shape[1:]), np.uint8))[0]
    return black[targets]


def format_evaluation(report: dict) -> str:
    random = report["random"]
    lines = [f"faithfulness of {report['bundle']} on {report['images']} of its {report['test_images']} test images "
             f"(accuracy {report['accuracy']:.1%}): pixels removed to black / put back into black in "
             f"{report['steps']} steps, tracking the probability of the predicted class; random order seed "
             f"{report['seed']}", "",
             f"{'method':<22} {'deletion AUC':>12} {'x random':>9} {'insertion AUC':>13} {'x random':>9} "
             f"{'s/image':>8}  verdict",
             f"{'random order':<22} {random['deletion_auc']:>12.3f} {1:>8.2f}x {random['insertion_auc']:>13.3f} "
             f"{1:>8.2f}x {'':>8}  (the baseline)"]
    for name, m in report["methods"].items():
        title = TITLES[name] + (f" ({report['occlusion']['window']}/{report['occlusion']['stride']})"
                                if name == "occlusion" else "")
        ratios = [f"{r:>8.2f}x" if r is not None else f"{'n/a':>9}" for r in (m["deletion_ratio"], m["insertion_ratio"])]
        lines.append(f"{title:<22} {m['deletion_auc']:>12.3f} {ratios[0]} {m['insertion_auc']:>13.3f} "
                     f"{ratios[1]} {m['seconds_per_image']:>8.3f}  "
                     f"{'beats random' if m['beats_random'] else m['verdict'].split(' (')[0]}")
    lines.append("")
    lines.append("deletion AUC: lower is more faithful; insertion AUC: higher. A method beats random when it is better "
                 "on both curves, image by image (paired, 95%), by at least 5%.")
    if report["best"]:
        best = report["methods"][report["best"]]
        lines.append(f"most faithful by deletion: {TITLES[report['best']]}, {best['deletion_ratio']:.2f}x random")
    elif report["methods"]:
        lines.append("no method beats random on deletion here")
    if report["methods"] and random["deletion_auc"] > 0:
        above = [f"{TITLES[name]} {m['deletion_above_floor_ratio']:.2f}x" for name, m in report["methods"].items()
                 if m["deletion_above_floor_ratio"] is not None]
        lines.append(f"every deletion curve ends at the all-black image's probability, {report['floor']:.3f} on "
                     f"average ({report['floor'] / random['deletion_auc']:.2f}x random's AUC, whatever the order); "
                     + (f"the area above it against random's: {', '.join(above)}" if above else
                        "random's curve hardly rises above it, so no ratio above it is given"))
    ig = report["methods"].get("ig")
    if ig and "convergence_delta_median_abs" in ig:
        lines.append(f"Integrated Gradients completeness: median |sum of map - (f(image) - f(black))| "
                     f"{ig['convergence_delta_median_abs']:.4f} (largest {ig['convergence_delta_max_abs']:.4f}) for a "
                     f"mean change of {ig['mean_abs_change_explained']:.3f}")
    lines.extend(report["notes"])
    return "\n".join(lines)


def _evaluate(args) -> int:
    if args.methods is not None:
        methods, _ = parse_methods(args.methods)
    else:
        methods = None
    bar = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=True)
    window_methods = methods if methods is not None else list(METHODS)
    if (args.window or args.stride) and "occlusion" not in window_methods:
        raise UserError("--window and --stride set occlusion's square; add occlusion to --methods, or drop them")
    if bar:
        with bar:
            report = evaluate_bundle(args.bundle, methods, args.limit, args.steps, args.seed, args.window, args.stride,
                                     bar)
    else:
        report = evaluate_bundle(args.bundle, methods, args.limit, args.steps, args.seed, args.window, args.stride)
    if args.json:
        _print_json(report)
    else:
        print(format_evaluation(report))
    return 0

"""Faithfulness of every attribution method on a bundle's test split: deletion and insertion curves against a
random order (tandem.explain.faithfulness). What `tandem explain BUNDLE --evaluate` runs and prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import UserError
from tandem.explain.methods import SCHEMA, TITLES, attribution_maps, parse_methods, torch_explainer, torch_side_installed


def evaluate_bundle(bundle: str | Path, methods: list[str] | None = None, limit: int | None = None,
                    steps: int | None = None, seed: int = 0, window: int | None = None, stride: int | None = None,
                    progress: Any = None) -> dict:
    """Every method's faithfulness on the bundle's test split (all of it, or a seeded sample of `limit` images):
    the JSON report of `tandem explain BUNDLE --evaluate`. `progress`: a rich Progress, or None."""
    from tandem.explain import faithfulness
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.occlusion import check_window, window_for
    from tandem.runtime import Predictor

    loading = progress.add_task("loading the bundle and data", total=None) if progress else None
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
    explainer = torch_explainer(str(bundle), manifest, methods)
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
    if progress:
        progress.remove_task(loading)

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
             f"{report['steps']} step{'' if report['steps'] == 1 else 's'}, tracking the probability of the predicted class; random order seed "
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

"""Faithfulness of every attribution method on a bundle's test split: deletion and insertion curves against a
random order (tandem.explain.faithfulness), against every model-free baseline under every fill
(tandem.explain.faithful), and the randomisation check (tandem.explain.sanity). What `tandem explain BUNDLE
--evaluate` runs; tandem.explain.evaluate_text prints it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import UserError
from tandem.explain.methods import SCHEMA, TITLES, attribution_maps, parse_methods, torch_explainer, torch_side_installed
from tandem.explain.options import AttributionOptions


def evaluate_bundle(bundle: str | Path, methods: list[str] | None = None, limit: int | None = None,
                    curve_steps: int | None = None, seed: int = 0, window: int | None = None,
                    stride: int | None = None, progress: Any = None, options: AttributionOptions | None = None,
                    randomisation_images: int | None = None) -> dict:
    """Every method's faithfulness on the bundle's test split (all of it, or a seeded sample of `limit` images):
    the JSON report of `tandem explain BUNDLE --evaluate`. `progress`: a rich Progress, or None. options: the
    methods' settings (--baseline, --steps, --smooth, --layer). randomisation_images: images the randomisation
    check explains at every layer (default tandem.explain.sanity.RANDOMISATION_IMAGES; 0 skips it)."""
    from tandem.explain import faithful, faithfulness
    from tandem.explain.baselines import FILL_TEXT, FILLS, data_mean_image, fill_images
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.occlusion import check_window, window_for
    from tandem.runtime import Predictor

    options = options or AttributionOptions()
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
    options.check(methods)
    default_window = window_for(predictor.image_size)
    window = window or default_window[0]
    stride = stride or max(1, window // 2)
    if "occlusion" in methods:
        check_window(predictor.image_size, predictor.image_size, window, stride)
    explainer = torch_explainer(str(bundle), manifest, methods, options)
    steps = curve_steps or predictor.image_size  # one row's worth of pixels a step, as Petsiuk et al. did at 224 pixels
    if not 1 <= steps <= predictor.image_size ** 2:  # checked before the attributions, which take minutes
        raise UserError(f"--curve-steps {steps}: give 1 to {predictor.image_size ** 2} (the pixels of one image)")
    test = bundle_splits(bundle, manifest).test
    total = len(test.labels)
    index = None
    if limit is not None and limit < total:
        index = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    pixels, labels = split_pixels(test, index)
    if len(pixels) == 0:
        raise UserError(f"bundle {bundle}: its test split is empty; nothing to evaluate on")
    data_mean = explainer.data_mean() if explainer is not None else data_mean_image(bundle, manifest)
    mean_source = ("the training split's mean image" if data_mean is not None else
                   "each image's own mean value (the training data is not reachable here)")
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
        maps[method], deltas = attribution_maps(method, predictor, pixels, targets, window, stride, explainer, advance,
                                                options, data_mean)
        timing[method] = (time.perf_counter() - start) / len(pixels)
        if deltas is not None:
            reference = _reference_probability(predictor, explainer, pixels, targets, options.baseline)
            gap = probabilities[np.arange(len(targets)), targets] - reference
            extra[method] = {"convergence_delta_median_abs": float(np.median(np.abs(deltas))),
                             "convergence_delta_max_abs": float(np.max(np.abs(deltas))),
                             "mean_abs_change_explained": float(np.mean(np.abs(gap)))}
    fills = {name: fill_images(name, pixels, data_mean) for name in FILLS}
    curve_task = (progress.add_task("deletion and insertion curves", total=len(FILLS) * (len(methods) + 3))
                  if progress else None)
    kept: dict[str, dict] = {}
    comparison = faithful.compare_with_baselines(
        predictor.probabilities, pixels, maps, fills, steps, seed, targets,
        progress=(lambda _: progress.advance(curve_task)) if progress else None, keep=kept)
    black = kept["black"]
    report = faithfulness.Report(len(pixels), steps, seed, black["random"], {m: black[m] for m in methods},
                                 {m: faithfulness.score(black[m], black["random"]) for m in methods})
    randomisation, why = _randomisation(bundle, manifest, explainer, methods, pixels, targets, options, window,
                                        stride, randomisation_images, progress)
    verdicts = faithful.final_verdicts(comparison, {m: (randomisation or {}).get(m) for m in methods}, why)
    result = {"schema": SCHEMA, "kind": "evaluation", "bundle": str(bundle), "split": "test",
              "images": len(pixels), "test_images": total, "sample": "seeded" if index is not None else "all",
              "accuracy": float((targets == labels).mean()), "steps": steps, "curve_steps": steps, "seed": seed,
              "removed_pixels_become": "black (raw 0)", "tracked": "softmax probability of the predicted class",
              "occlusion": {"window": window, "stride": stride} if "occlusion" in methods else None,
              "settings": {m: options.settings(m, mean_source) for m in methods},
              "notes": notes, **report.to_dict(),
              "fills": {name: {"text": FILL_TEXT[name] if name != "mean" else mean_source, **comparison["fills"][name]}
                        for name in FILLS},
              "baselines": comparison["baselines"],
              "randomisation": randomisation if randomisation is not None else {"skipped": why},
              "faithful": [m for m in methods if verdicts[m]["faithful"]]}
    for method in methods:
        result["methods"][method]["seconds_per_image"] = timing[method]
        result["methods"][method].update(extra.get(method, {}))
        result["methods"][method]["faithfulness"] = verdicts[method]
    return result


def _randomisation(bundle: str | Path, manifest: dict, explainer: Any, methods: list[str], pixels: np.ndarray,
                   targets: np.ndarray, options: AttributionOptions, window: int, stride: int, images: int | None,
                   progress: Any) -> tuple[dict | None, str | None]:
    """({name: check} for every method and the two model-free maps, None) or (None, why it did not run). Occlusion
    is checked through Captum's Occlusion on the torch network (the runtime's equals it to 1e-6)."""
    from tandem.explain import sanity
    from tandem.explain.baselines import brightness_maps, edge_maps

    images = sanity.RANDOMISATION_IMAGES if images is None else images
    if images == 0:
        return None, "--randomisation-images 0"
    if explainer is None:
        if not torch_side_installed():
            return None, "it needs torch and captum (pip install 'tandem[explain]')"
        from tandem.explain.attribute import TorchExplainer

        explainer = TorchExplainer(bundle, manifest)  # occlusion alone: the weights in torch, for the check
    if not sanity.quantus_installed():
        return None, "it needs quantus (pip install 'tandem[explain]')"
    part, t = pixels[:images], targets[:images]
    task = progress.add_task("randomisation check", total=len(methods) + 2) if progress else None
    found = {}
    checks = {**{m: m for m in methods},
              "brightness": lambda model, p, _t: brightness_maps(p), "edge": lambda model, p, _t: edge_maps(p)}
    for name, method in checks.items():
        found[name] = sanity.randomisation_check(explainer, method, part, t, options, window, stride)
        found[name]["method"] = name
        if progress:
            progress.advance(task)
    return found, None


def _reference_probability(predictor: Any, explainer: Any, pixels: np.ndarray, targets: np.ndarray,
                           baseline: str) -> np.ndarray:
    """Each image's target probability at IG's reference (black, its blur, the mean image)."""
    if baseline == "black":
        black = predictor.probabilities(np.zeros((1, *pixels.shape[1:]), np.uint8))[0]
        return black[targets]
    reference = explainer.reference_pixels(pixels, baseline)
    return predictor.probabilities(reference)[np.arange(len(targets)), targets]

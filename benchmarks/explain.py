"""Explanations of the default animal network, in one run: occlusion's speed in the runtime, every attribution
method's faithfulness on the test split, and the fidelity of the extracted rules (issue 10's targets).

    python benchmarks/explain.py                            # trains the default animal run and exports it first
    python benchmarks/explain.py --run runs/latest          # exports this run instead of training one
    python benchmarks/explain.py --bundle bundles/animals/1 [--limit N] [--oracle-images 40] [--json]

Occlusion: `tandem.explain.occlusion` on one test image at a time (window 4, stride 2: the 169 occluded copies
and the image in one ONNX Runtime run, 2 threads), the median over --latency-images images. Faithfulness:
`tandem explain BUNDLE --evaluate` (tandem.explain.evaluate.evaluate_bundle) over the whole test split: deletion
and insertion AUCs of Integrated Gradients, Grad-CAM and occlusion against a seeded random order, against the
model-free baselines (pixel brightness, a Sobel edge map) under three fills (black, blur, the mean image), and
Quantus's randomisation check (MPRT) on 32 of the images, with each method's verdict. For scale, a
greedy deletion order (each step removes the pixels whose single removal lowers the probability most, found by
trying every remaining pixel) on --oracle-images images: not an explanation method, an estimate of how low
any order's deletion AUC can go on this model. Rules: `tandem rules COPY --max-leaves 32 --json` and
`--max-leaves 16` in fresh processes, on a copy of the bundle (fitting stores the rules in the bundle), with
their measures of purpose (class-detector concepts, circular and contradictory explanations, levels).

Targets: occlusion of one 28 x 28 image <= 100 ms (median, runtime, 2 cores); deletion AUC of the best method
<= 0.5x random's (test split); at least one method called faithful (beats every model-free baseline on deletion
and insertion under every fill and passes the randomisation check; issue 19); rules with <= 32 leaves at
fidelity >= 0.90 (test split), at most a quarter of the concepts class detectors, <= 10% circular and 0
contradictory explanations, at least two levels (issue 19).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge import export_run, train_default_run
from targets import Target, report


def occlusion_latency(bundle: Path, images: int) -> dict:
    """Median and p90 ms of occlusion on one test image at a time, through the runtime with 2 threads."""
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.explain.occlusion import occlusion, window_masks
    from tandem.runtime import Predictor

    predictor = Predictor.load(bundle, precision="fp32", threads=2)
    test = bundle_splits(bundle, predictor.manifest).test
    pixels, _ = split_pixels(test, np.linspace(0, len(test.labels) - 1, min(images, len(test.labels))).astype(int))
    for image in pixels[:10]:  # warm-up: ONNX Runtime's first runs at a new batch size allocate
        occlusion(predictor, image)
    seconds = []
    for image in pixels:
        start = time.perf_counter()
        occlusion(predictor, image)
        seconds.append(time.perf_counter() - start)
    ms = np.array(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "images": len(ms),
            "copies": len(window_masks(predictor.image_size, predictor.image_size, 4, 2)), "threads": 2}


def greedy_deletion_auc(bundle: Path, images: int, steps: int, seed: int) -> dict | None:
    """Deletion AUC of a greedy order (every remaining pixel tried at each step) and of random, on the same images."""
    if images <= 0:
        return None
    from tandem.explain import faithfulness
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.runtime import Predictor

    predictor = Predictor.load(bundle, precision="fp32")
    test = bundle_splits(bundle, predictor.manifest).test
    pixels, _ = split_pixels(test, np.linspace(0, len(test.labels) - 1, min(images, len(test.labels))).astype(int))
    targets = predictor.probabilities(pixels).argmax(1)
    n, height, width, channels = pixels.shape
    area = height * width
    counts = np.rint(np.linspace(0, area, steps + 1)).astype(int)
    orders = []
    for image, target in zip(pixels, targets):
        current = image.reshape(area, channels).copy()
        order: list[int] = []
        for step in range(steps):
            left = np.setdiff1d(np.arange(area), order)
            lit = left[current[left].any(axis=1)]  # removing a black pixel changes nothing
            candidates = lit if len(lit) else left
            trial = np.repeat(current[None], len(candidates), axis=0)
            trial[np.arange(len(candidates)), candidates] = 0
            probability = predictor.probabilities(trial.reshape(-1, height, width, channels))[:, target]
            chosen = candidates[np.argsort(probability, kind="stable")[:counts[step + 1] - counts[step]]]
            if len(chosen) < counts[step + 1] - counts[step]:  # fewer lit pixels than a step: the rest in index order
                rest = np.setdiff1d(left, chosen)[:counts[step + 1] - counts[step] - len(chosen)]
                chosen = np.concatenate([chosen, rest])
            current[chosen] = 0
            order.extend(int(p) for p in chosen)
        orders.append(np.array(order))
    greedy = faithfulness.curves(predictor.probabilities, pixels, np.stack(orders), targets, steps)
    random = faithfulness.curves(predictor.probabilities, pixels, faithfulness.random_order(n, height, width, seed),
                                 targets, steps)
    return {"images": n, "deletion_auc": float(greedy.deletion_auc.mean()),
            "random_deletion_auc": float(random.deletion_auc.mean()),
            "ratio": float(greedy.deletion_auc.mean() / random.deletion_auc.mean())}


def rules_report(bundle: Path, max_leaves: int) -> dict:
    """`tandem rules COPY --max-leaves N --json` on a copy of the bundle; {"error": why} when it fails."""
    with tempfile.TemporaryDirectory(prefix="tandem-rules-") as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(bundle, copy)
        command = [sys.executable, "-m", "tandem", "rules", str(copy), "--max-leaves", str(max_leaves), "--json"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"`tandem rules --max-leaves {max_leaves}` failed: {why}"}
    try:
        found = json.loads(proc.stdout)
        return {**found, "seconds": seconds, "fidelity": float(found["fidelity"]), "accuracy": float(found["accuracy"])}
    except (ValueError, KeyError, TypeError) as err:
        return {"error": f"`tandem rules --max-leaves {max_leaves} --json` printed no tandem.rules/2 report ({err})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", type=Path, help="a trained run to export (default: train the default run)")
    source.add_argument("--bundle", type=Path, help="a bundle already exported")
    parser.add_argument("--out", type=Path, help="keep the trained run and the bundle here (default: a temporary folder)")
    parser.add_argument("--latency-images", type=int, default=300, help="test images occlusion is timed on (default: 300)")
    parser.add_argument("--limit", type=int, default=200, help="faithfulness on a seeded sample of N test images "
                        "(default: 200; each method is scored against 3 baselines under 3 fills)")
    parser.add_argument("--oracle-images", type=int, default=40,
                        help="test images for the greedy deletion order (default: 40, about 1 s each; 0 skips it)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.bundle:
        run(args, args.bundle)
        return
    with tempfile.TemporaryDirectory(prefix="tandem-explain-") as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        export_run(args.run or train_default_run(folder), folder / "bundle")
        run(args, folder / "bundle")


def run(args, bundle: Path) -> None:
    from tandem.explain.evaluate import evaluate_bundle
    from tandem.explain.evaluate_text import format_baselines
    from tandem.explain.methods import TITLES

    print("occlusion: one test image at a time, through the runtime ...", file=sys.stderr, flush=True)
    latency = occlusion_latency(bundle, args.latency_images)
    print("faithfulness: every method on the test split (tandem explain --evaluate) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    evaluation = evaluate_bundle(bundle, limit=args.limit)
    evaluation_seconds = time.perf_counter() - start
    print(f"greedy deletion order on {args.oracle_images} test images ...", file=sys.stderr, flush=True)
    greedy = greedy_deletion_auc(bundle, args.oracle_images, evaluation["steps"], evaluation["seed"])
    rules = {}
    for leaves in (32, 16):
        print(f"rules: tandem rules --max-leaves {leaves} --json (a fresh process) ...", file=sys.stderr, flush=True)
        rules[leaves] = rules_report(bundle, leaves)

    random = evaluation["random"]
    methods = evaluation["methods"]
    rows = [["occlusion, one 28x28 image, median (ms)", latency["median_ms"], ""],
            ["occlusion, one 28x28 image, p90 (ms)", latency["p90_ms"], ""],
            ["deletion AUC, random order", random["deletion_auc"], 1.0]]
    rows += [[f"deletion AUC, {TITLES[name]}", m["deletion_auc"], m["deletion_ratio"]] for name, m in methods.items()]
    if greedy:
        rows.append([f"deletion AUC, greedy order ({greedy['images']} images)", greedy["deletion_auc"], greedy["ratio"]])
    rows.append(["all-black image's probability (where every deletion curve ends)", evaluation["floor"],
                 evaluation["floor"] / random["deletion_auc"]])
    rows += [[f"deletion AUC above that floor, {TITLES[name]} / random's", "", m["deletion_above_floor_ratio"]]
             for name, m in methods.items()]
    rows.append(["insertion AUC, random order", random["insertion_auc"], 1.0])
    rows += [[f"insertion AUC, {TITLES[name]}", m["insertion_auc"], m["insertion_ratio"]] for name, m in methods.items()]
    checks = evaluation["randomisation"]
    rows += [[f"randomisation check, {TITLES.get(name, name)}: rank correlation after all layers", c["final_correlation"],
              ""] for name, c in checks.items() if "skipped" not in checks]
    rows += [[f"faithful (every baseline, every fill, randomisation), {TITLES[name]}",
              "yes" if m["faithfulness"]["faithful"] else "no", ""] for name, m in methods.items()]
    for leaves, found in rules.items():
        if "error" in found:
            rows.append([f"rules fidelity, <= {leaves} leaves", "not available", ""])
            continue
        rows += [[f"rules fidelity, <= {leaves} leaves", found["fidelity"], ""],
                 [f"rules accuracy, <= {leaves} leaves", found["accuracy"], ""],
                 [f"rules <= {leaves}: concepts that are class detectors (r > 0.8 with one logit)",
                  found["class_detector_share"], ""],
                 [f"rules <= {leaves}: circular explanations (test split)", found["circular_share"], ""],
                 [f"rules <= {leaves}: contradictory explanations", found["contradictory"], ""],
                 [f"rules <= {leaves}: levels, groups", f"{found['levels']}, {found['groups']}", ""]]
    notes = [f"occlusion: window 4, stride 2: {latency['copies']} occluded copies and the image in one ONNX Runtime run, "
             f"{latency['threads']} threads, {latency['images']} test images one at a time"]
    notes += [f"{TITLES[name]}: {m['verdict']}; {m['seconds_per_image'] * 1e3:.0f} ms per image" for name, m in methods.items()]
    if greedy:
        notes.append(f"greedy order: random's deletion AUC on the same {greedy['images']} images is "
                     f"{greedy['random_deletion_auc']:.3f}; a search that tries every pixel at every step (not an explanation: "
                     "it looks at the answer) gives a rough floor for any order on this model")
    for leaves, found in rules.items():
        notes.append(f"rules <= {leaves} leaves: not available: {found['error']}" if "error" in found else
                     f"rules <= {leaves} leaves: {found.get('leaves')} leaves, depth {found.get('depth')}, "
                     f"{found.get('concepts')} part concepts in {found.get('feature_tensor')}, groups: "
                     + "; ".join(g["name"] for g in found.get("groups_list", [])) + f"; fitted in {found['seconds']:.0f} s")
    best = evaluation["best"]
    targets = [Target("occlusion of one 28x28 image, runtime, median", latency["median_ms"], 100,
                      higher_is_better=False, unit=" ms"),
               Target(f"deletion AUC, best method ({TITLES.get(best, best)}) / random",
                      evaluation["methods"][best]["deletion_ratio"] if best else float("nan"), 0.5,
                      higher_is_better=False),
               Target("attribution methods called faithful (issue 19)", len(evaluation["faithful"]), 1,
                      higher_is_better=True)]
    got = rules[32]
    within = "error" not in got and (got.get("leaves") or 0) <= 32

    def measure(key: str) -> float:
        return float(got[key]) if within else float("nan")

    targets += [Target("rules fidelity, <= 32 leaves (test split)", measure("fidelity"), 0.90, higher_is_better=True),
                Target("rules: share of concepts that are class detectors", measure("class_detector_share"), 0.25,
                       higher_is_better=False),
                Target("rules: share of circular explanations", measure("circular_share"), 0.10,
                       higher_is_better=False),
                Target("rules: contradictory explanations", measure("contradictory"), 0, higher_is_better=False),
                Target("rules: levels of hierarchy", measure("levels"), 2, higher_is_better=True)]
    details = {"bundle": str(bundle), "occlusion_latency": latency, "evaluation": evaluation,
               "evaluation_seconds": evaluation_seconds, "greedy_deletion": greedy,
               "rules": {str(k): v for k, v in rules.items()}}
    passed = report(f"explanations of {bundle}: {evaluation['images']} test images, {evaluation['steps']} steps a "
                    f"curve, model accuracy {evaluation['accuracy']:.1%}",
                    ["measure", "value", "x random"], rows, targets, args.json, details)
    if not args.json:
        print("\n" + "\n".join(notes))
        print("\n" + "\n".join(format_baselines(evaluation)))
        print(f"faithfulness took {evaluation_seconds:.0f} s in all; deletion: pixels set to black in "
              f"{evaluation['steps']} steps, most important first, tracking the predicted class's probability "
              "(lower AUC is more faithful)")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run


if __name__ == "__main__":
    main()

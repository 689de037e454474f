"""When a method may be called faithful: it beats every model-free baseline on deletion and on insertion under
every fill, and it passes the randomisation check (NumPy only; the check itself is tandem.explain.sanity).

    found = compare_with_baselines(probabilities, pixels, {"ig": maps}, fills, steps=28, seed=0, targets=targets)
    found["methods"]["ig"]["beats_every_baseline"], found["methods"]["ig"]["failures"]
    verdicts = final_verdicts(found, {"ig": randomisation_report})   # {"ig": {"faithful": ..., "verdict": ...}}

Every map, the methods' and the baselines' (tandem.explain.baselines: random, brightness, edge), is scored by
deletion and insertion curves (tandem.explain.faithfulness.curves) under each fill (black, blur, mean): removed
pixels take the fill's value, and insertion starts from the fill image. A method beats a baseline on a curve
when the paired difference of AUCs, image by image, is significant and at least 5% of the baseline's AUC
(faithfulness.versus, as against random before). One failure anywhere, against any baseline under any fill, or
a failed randomisation check, and the method is not called faithful; every failure is listed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tandem.explain import faithfulness
from tandem.explain.baselines import BASELINES, model_free_maps

CURVES = ("deletion", "insertion")


def _ratio(value: float, reference: float) -> float | None:
    return float(value / reference) if reference > 0 else None


def compare_with_baselines(probabilities: faithfulness.ProbabilityFunction, pixels: np.ndarray,
                           maps: dict[str, np.ndarray], fills: dict[str, np.ndarray],
                           steps: int = faithfulness.DEFAULT_STEPS, seed: int = 0, targets: np.ndarray | None = None,
                           progress: Callable[[str], None] | None = None, keep: dict | None = None) -> dict:
    """Each method's and each baseline's AUCs under each fill (uint8 (N, H, W, C) images by name), and each method
    against each baseline: the JSON-ready report. keep: a dict that receives {fill: {name: Curves}}."""
    pixels = np.asarray(pixels)
    if targets is None:
        targets = probabilities(pixels).argmax(1)
    baselines = model_free_maps(pixels, seed)
    per_fill: dict[str, dict] = {}
    outcome: dict[str, list[str]] = {name: [] for name in maps}
    for fill_name, fill in fills.items():
        found: dict[str, faithfulness.Curves] = {}
        for name, method_maps in {**baselines, **maps}.items():
            if progress:
                progress(f"{name}, {fill_name} fill")
            order = faithfulness.pixel_order(method_maps, seed)  # the random baseline's noise: a random order
            found[name] = faithfulness.curves(probabilities, pixels, order, targets, steps, fill=fill)
        if keep is not None:
            keep[fill_name] = found
        entry: dict = {"baselines": {}, "methods": {}}
        for name in BASELINES:
            c = found[name]
            entry["baselines"][name] = {"deletion_auc": float(c.deletion_auc.mean()),
                                        "insertion_auc": float(c.insertion_auc.mean())}
        for name in maps:
            c = found[name]
            against: dict = {}
            for base in BASELINES:
                b = found[base]
                d = faithfulness.versus(c.deletion_auc, b.deletion_auc, lower_is_better=True)
                i = faithfulness.versus(c.insertion_auc, b.insertion_auc, lower_is_better=False)
                against[base] = {"deletion": d, "insertion": i,
                                 "deletion_ratio": _ratio(float(c.deletion_auc.mean()), float(b.deletion_auc.mean())),
                                 "insertion_ratio": _ratio(float(c.insertion_auc.mean()),
                                                           float(b.insertion_auc.mean()))}
                for curve, vs in (("deletion", d), ("insertion", i)):
                    if vs != "better":
                        outcome[name].append(f"{'worse than' if vs == 'worse' else 'no better than'} {base} on "
                                             f"{curve} ({fill_name} fill)")
            entry["methods"][name] = {"deletion_auc": float(c.deletion_auc.mean()),
                                      "insertion_auc": float(c.insertion_auc.mean()), "versus": against}
        per_fill[fill_name] = entry
    return {"baselines": list(BASELINES), "fills": per_fill,
            "methods": {name: {"beats_every_baseline": not failures, "failures": failures}
                        for name, failures in outcome.items()}}


def final_verdicts(comparison: dict, randomisation: dict[str, dict | None],
                   skipped_because: str | None = None) -> dict[str, dict]:
    """{method: {"faithful", "beats_every_baseline", "passes_randomisation", "verdict"}}: faithful only when it
    beats every baseline under every fill and passes the randomisation check (None: the check did not run, for
    the reason `skipped_because`)."""
    out: dict[str, dict] = {}
    for name, found in comparison["methods"].items():
        check = randomisation.get(name)
        passes = None if check is None else bool(check["passed"])
        failures = list(found["failures"])
        if passes is False:
            failures.append(f"fails the randomisation check (rank correlation {check['final_correlation']:.2f} with "
                            f"the map of the fully randomised network, threshold {check['threshold']:.2f})")
        if not failures and passes:
            verdict = "faithful: beats every model-free baseline on deletion and insertion under every fill, and " \
                      "passes the randomisation check"
        elif not failures:
            verdict = "not established: beats every baseline, but the randomisation check could not run " \
                      f"({skipped_because or 'not run'})"
        else:
            shown = "; ".join(failures[:4]) + (f"; and {len(failures) - 4} more" if len(failures) > 4 else "")
            verdict = f"not faithful: {shown}" + ("" if passes is not None else
                                                   f" (randomisation check not run: {skipped_because or 'not run'})")
        out[name] = {"faithful": bool(not failures and passes), "beats_every_baseline": found["beats_every_baseline"],
                     "passes_randomisation": passes, "failures": failures, "verdict": verdict}
    return out

"""How faithful an attribution map is: deletion and insertion curves (Petsiuk et al. 2018, "RISE"), NumPy only.

    probabilities = predictor.probabilities          # any batched function: uint8 (N, H, W, C) -> (N, classes)
    report = evaluate(probabilities, pixels, {"ig": ig_maps, "occlusion": occlusion_maps}, steps=28, seed=0)
    report.methods["ig"].deletion_auc, report.methods["ig"].deletion_ratio, report.methods["ig"].verdict

Deletion: pixels are set to black (raw 0), most important first, in `steps` equal steps, and the probability of
the class the model predicts for the untouched image is tracked; a faithful map makes it fall at once, so the
area under the curve (fraction removed 0..1, trapezoid rule) is small. Insertion: start from an all-black image
and put the pixels back in the same order; a faithful map makes the probability rise at once (large area).
Every method is compared image by image with the same curves under a seeded random order: a method beats
random on a curve when the mean paired difference is on the right side of zero by more than 1.96 standard errors
and by at least 5% of random's AUC; it beats random when it does so on both curves.

Every deletion curve ends on the same point, the all-black image's probability for the class (`floor`), whatever
the order; a model that calls a black image something keeps that much of every AUC. `deletion_above_floor_ratio`
compares what is left above it, (AUC - floor) / (random's AUC - floor), beside the plain ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tandem.errors import UserError

DEFAULT_STEPS = 28       # 28 pixels a step on the 28 x 28 animals
RANDOM = "random"        # the baseline's name in reports
_Z = 1.96                # two-sided 95% for the paired mean difference (Student's t below 31 images)
# Student's t, two-sided 95%, for 1 to 30 degrees of freedom: few images need a larger margin than 1.96.
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10,
        2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)
_MARGIN = 0.05           # and it must differ from random's mean AUC by at least 5% to count

ProbabilityFunction = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> float (N, classes)


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of N images: probability of each image's target class at each fraction."""
    fractions: np.ndarray  # (steps + 1,): fraction of the pixels removed (deletion) or put back (insertion)
    deletion: np.ndarray   # (N, steps + 1)
    insertion: np.ndarray  # (N, steps + 1)
    targets: np.ndarray    # (N,) the class tracked: the one predicted for the untouched image

    @property
    def deletion_auc(self) -> np.ndarray:
        return area_under(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> np.ndarray:
        return area_under(self.fractions, self.insertion)


@dataclass(frozen=True)
class MethodScore:
    """One method over the images, against the random order on the same images."""
    deletion_auc: float       # mean; lower is more faithful
    insertion_auc: float      # mean; higher is more faithful
    deletion_ratio: float | None     # deletion_auc / random's (below 1 beats random); None: random's is 0
    insertion_ratio: float | None    # insertion_auc / random's (above 1 beats random); None: random's is 0
    # (deletion_auc - floor) / (random's - floor): the part any order can change; None where random's curve hardly
    # rises above the floor (under 5% of its area), so that the ratio would say nothing
    deletion_above_floor_ratio: float | None
    deletion_vs_random: str   # "better", "no different" or "worse" (paired, 95%)
    insertion_vs_random: str
    verdict: str              # one plain sentence

    @property
    def beats_random(self) -> bool:
        return self.deletion_vs_random == "better" and self.insertion_vs_random == "better"


@dataclass(frozen=True)
class Report:
    images: int
    steps: int
    seed: int
    random: Curves
    curves: dict[str, Curves]
    methods: dict[str, MethodScore] = field(default_factory=dict)

    @property
    def floor(self) -> float:
        """Mean probability of the tracked class once every pixel is removed (the all-black image): where every
        deletion curve ends, whatever its order, so the part of each deletion AUC that no map can lower."""
        return float(self.random.deletion[:, -1].mean())

    @property
    def best(self) -> str | None:
        """Of the methods that beat random on deletion, the one with the lowest deletion AUC relative to random
        (None when none does)."""
        rated = [name for name, m in self.methods.items() if m.deletion_vs_random == "better"]
        return min(rated, key=lambda name: self.methods[name].deletion_ratio, default=None)

    def to_dict(self) -> dict:
        return {
            "images": self.images, "steps": self.steps, "seed": self.seed,
            "random": {"deletion_auc": float(self.random.deletion_auc.mean()),
                       "insertion_auc": float(self.random.insertion_auc.mean())},
            "floor": self.floor,
            "methods": {name: {"deletion_auc": s.deletion_auc, "insertion_auc": s.insertion_auc,
                               "deletion_ratio": s.deletion_ratio, "insertion_ratio": s.insertion_ratio,
                               "deletion_above_floor_ratio": s.deletion_above_floor_ratio,
                               "deletion_vs_random": s.deletion_vs_random, "insertion_vs_random": s.insertion_vs_random,
                               "beats_random": s.beats_random, "verdict": s.verdict}
                        for name, s in self.methods.items()},
            "best": self.best,
            "fractions": self.random.fractions.tolist(),
            "mean_curves": {name: {"deletion": c.deletion.mean(0).tolist(), "insertion": c.insertion.mean(0).tolist()}
                            for name, c in {**self.curves, RANDOM: self.random}.items()},
        }


def area_under(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoid rule over the last axis (np.trapz before NumPy 2)."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return trapezoid(values, fractions, axis=-1)


def pixel_order(maps: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, H, W) maps -> (N, H*W) pixel indices, highest attribution first; ties (the flat parts of a Grad-CAM
    map, an occlusion map's blank background) in a seeded random order rather than top-left first."""
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 3:
        raise ValueError(f"attribution maps are (N, H, W), got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise UserError("an attribution map holds NaN or infinite values; it cannot order pixels")
    flat = maps.reshape(len(maps), -1)
    tie_break = np.random.default_rng(seed).random(flat.shape)
    return np.lexsort((tie_break, -flat), axis=-1)  # the last key sorts first


def random_order(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(N, H*W): each image's pixels in a seeded random order (the baseline)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n, height * width)), axis=-1)


def curves(probabilities: ProbabilityFunction, pixels: np.ndarray, order: np.ndarray, targets: np.ndarray | None = None,
           steps: int = DEFAULT_STEPS, batch: int = 4096, fill: np.ndarray | None = None) -> Curves:
    """Deletion and insertion curves of uint8 images (N, H, W, C) for pixel orders (N, H*W).

    targets: the class to track per image (default: the class predicted for the untouched image). `batch` bounds
    the images handed to `probabilities` at once. fill: uint8 (N, H, W, C), what a removed pixel becomes and what
    insertion starts from (tandem.explain.baselines.fill_images); default black (raw 0)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels are uint8 (N, H, W, C), got {pixels.dtype} {pixels.shape}")
    n, height, width, channels = pixels.shape
    area = height * width
    if order.shape != (n, area):
        raise ValueError(f"orders are (N, H*W) = {(n, area)}, got {order.shape}")
    if not 1 <= steps <= area:
        raise UserError(f"--steps {steps}: give 1 to {area} (the pixels of one image)")
    if targets is None:
        targets = np.concatenate([probabilities(pixels[i:i + batch]).argmax(1) for i in range(0, n, batch)])
    targets = np.asarray(targets)
    if fill is not None and np.shape(fill) != pixels.shape:
        raise ValueError(f"the fill is {pixels.shape} like the images, got {np.shape(fill)}")
    counts = np.rint(np.linspace(0, area, steps + 1)).astype(np.int64)  # pixels removed (or put back) at each step
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(area)[None, :], axis=-1)  # rank[i, p]: when pixel p goes
    deletion = np.empty((n, steps + 1), np.float64)
    insertion = np.empty((n, steps + 1), np.float64)
    per_chunk = max(1, batch // (2 * (steps + 1)))
    for start in range(0, n, per_chunk):
        part = slice(start, min(n, start + per_chunk))
        m = part.stop - part.start
        gone = rank[part, None, :] < counts[None, :, None]                     # (m, steps + 1, H*W)
        flat = pixels[part].reshape(m, 1, area, channels)
        gone = gone[..., None]
        if fill is None:  # black: a product is the cheapest select
            variants = np.concatenate([flat * ~gone, flat * gone], axis=1)
        else:
            other = np.asarray(fill[part], np.uint8).reshape(m, 1, area, channels)
            variants = np.concatenate([np.where(gone, other, flat), np.where(gone, flat, other)], axis=1)
        probs = probabilities(variants.reshape(-1, height, width, channels)).reshape(m, 2, steps + 1, -1)
        tracked = np.take_along_axis(probs, targets[part, None, None, None], axis=-1)[..., 0]
        deletion[part], insertion[part] = tracked[:, 0], tracked[:, 1]
    return Curves(counts / area, deletion, insertion, targets)


def versus(method: np.ndarray, random: np.ndarray, lower_is_better: bool) -> str:
    """Paired per image, the method's AUCs against a reference's (random, or any baseline): "better" / "worse" when
    the mean difference is beyond 1.96 standard errors (Student's t below 31 images) and at least 5% of the
    reference's mean AUC (a model that hardly reacts to pixels makes tiny differences significant), else
    "no different"."""
    difference = method - random if lower_is_better else random - method  # below zero: the method is better
    if len(difference) < 2:
        return "no different"  # one image says nothing about a method
    mean = float(difference.mean())
    error = float(difference.std(ddof=1) / math.sqrt(len(difference)))
    z = _T95[len(difference) - 2] if len(difference) - 1 <= len(_T95) else _Z
    margin = _MARGIN * float(random.mean())
    if mean + z * error < 0 and mean <= -margin:
        return "better"
    if mean - z * error > 0 and mean >= margin:
        return "worse"
    return "no different"


def _times(ratio: float | None) -> str:
    return "n/a x" if ratio is None else f"{ratio:.2f}x"


def _verdict(score: dict) -> str:
    deletion, insertion = score["deletion_vs_random"], score["insertion_vs_random"]
    figures = f"deletion {_times(score['deletion_ratio'])} random, insertion {_times(score['insertion_ratio'])} random"
    if deletion == insertion == "better":
        return f"beats random ({figures})"
    failed = [f"{'worse than' if vs == 'worse' else 'no better than'} random on {curve}"
              for curve, vs in (("deletion", deletion), ("insertion", insertion)) if vs != "better"]
    return f"does not beat random: {' and '.join(failed)} ({figures})"


def score(method: Curves, random: Curves) -> MethodScore:
    d, i = method.deletion_auc, method.insertion_auc
    rd, ri = random.deletion_auc, random.insertion_auc
    floor = float(random.deletion[:, -1].mean())  # the all-black image's probability: every deletion curve's end
    above = float(rd.mean()) - floor
    values = {"deletion_auc": float(d.mean()), "insertion_auc": float(i.mean()),
              "deletion_ratio": float(d.mean() / rd.mean()) if rd.mean() > 0 else None,
              "insertion_ratio": float(i.mean() / ri.mean()) if ri.mean() > 0 else None,
              "deletion_above_floor_ratio": (float(d.mean()) - floor) / above if above > _MARGIN * rd.mean() else None,
              "deletion_vs_random": versus(d, rd, lower_is_better=True),
              "insertion_vs_random": versus(i, ri, lower_is_better=False)}
    return MethodScore(**values, verdict=_verdict(values))


def evaluate(probabilities: ProbabilityFunction, pixels: np.ndarray, maps: dict[str, np.ndarray],
             steps: int = DEFAULT_STEPS, seed: int = 0, targets: np.ndarray | None = None,
             progress: Callable[[str], None] | None = None) -> Report:
    """Deletion and insertion curves of each method's maps (N, H, W) and of a random order, on the same images;
    each method scored against random. targets: default, the class predicted for each untouched image."""
    pixels = np.asarray(pixels)
    n, height, width = pixels.shape[:3]
    if n == 0:
        raise UserError("no images to evaluate on")
    if targets is None:
        targets = probabilities(pixels).argmax(1)
    if progress:
        progress(RANDOM)
    random = curves(probabilities, pixels, random_order(n, height, width, seed), targets, steps)
    found: dict[str, Curves] = {}
    for name, method_maps in maps.items():
        if progress:
            progress(name)
        found[name] = curves(probabilities, pixels, pixel_order(method_maps, seed), targets, steps)
    return Report(n, steps, seed, random, found, {name: score(c, random) for name, c in found.items()})

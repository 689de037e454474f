"""The model-parameter randomisation check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"), through
Quantus's MPRT: a map that explains the network must change when the network's weights are randomised.

    check = randomisation_check(explainer, "ig", pixels, targets)         # a TorchExplainer, uint8 images
    check["passed"], check["final_correlation"], check["layers"]          # per layer, top first, cascading

Quantus (quantus.MPRT, layer_order="top_down") randomises the layers one at a time from the output down, each
step keeping the ones randomised before (cascading), and after each step explains the same images again with
the same method on the randomised copy. The similarity is Quantus's default: Spearman's rank correlation of the
absolute maps, each scaled by its maximum (abs and normalise on), per image; where one of the two maps is
constant (a Grad-CAM of a randomised network is often all zero) it has no rank correlation, and counts as 1.0
when the maps are equal and 0.0 when they differ. The check passes when the mean rank
correlation with the map of the fully randomised network is below RANDOMISATION_THRESHOLD (0.5): the method's
map then depends on what the network learnt. A map that ignores the network (pixel brightness) keeps a
correlation of 1.0 and fails. Needs torch and quantus (the explain extra).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable

import numpy as np

RANDOMISATION_THRESHOLD = 0.5
RANDOMISATION_IMAGES = 32   # images the check explains at every layer (the evaluation's first 32)

Explain = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]   # (torch model, uint8 pixels, targets) -> (N, H, W)


def quantus_installed() -> bool:
    return importlib.util.find_spec("quantus") is not None


def method_explain(explainer: Any, method: str, options: Any = None, window: int = 4, stride: int = 2) -> Explain:
    """The function the check calls: `method`'s maps of the images on a given (randomised) copy of the network."""
    def explain(model, pixels, targets):
        return explainer.attribute(method, pixels, targets, window, stride, options=options, model=model).maps
    return explain


def randomisation_check(explainer: Any, method: str | Explain, pixels: np.ndarray, targets: np.ndarray,
                        options: Any = None, window: int = 4, stride: int = 2,
                        threshold: float = RANDOMISATION_THRESHOLD, seed: int = 0) -> dict:
    """Quantus's MPRT of one method (a name, or an Explain function) on uint8 images (N, H, W, C): the mean rank
    correlation after each layer is randomised (top down, cascading), the last one's, and whether it passed."""
    import quantus
    import torch

    explain = method_explain(explainer, method, options, window, stride) if isinstance(method, str) else method
    pixels = np.asarray(pixels)
    targets = np.asarray(targets, np.int64)
    x = explainer.inputs(pixels).numpy()
    scale = 255 * np.atleast_1d(np.asarray(explainer.std, np.float64))[None, :, None, None]
    offset = 255 * np.atleast_1d(np.asarray(explainer.mean, np.float64))[None, :, None, None]

    def explain_func(model, inputs, targets, **_):
        # Quantus hands over the network's inputs; the methods take pixels: preprocessing undone exactly (uint8).
        back = np.clip(np.rint(np.asarray(inputs, np.float64) * scale + offset), 0, 255).astype(np.uint8)
        maps = explain(model, back.transpose(0, 2, 3, 1), np.asarray(targets, np.int64))
        return np.asarray(maps, np.float32)[:, None]

    metric = quantus.MPRT(similarity_func=rank_correlation, layer_order="top_down", seed=seed, abs=True,
                          normalise=True, disable_warnings=True, display_progressbar=False)
    state = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = metric(model=explainer.model, x_batch=x, y_batch=targets, a_batch=explain_func(explainer.model, x,
                            targets), explain_func=explain_func, device="cpu", batch_size=len(x))
    finally:
        torch.random.set_rng_state(state)  # Quantus seeds torch's global generator for each layer
    layers = [{"layer": name, "correlation": _mean(values)} for name, values in scores.items() if name != "original"]
    final = layers[-1]["correlation"] if layers else 1.0
    return {"method": method if isinstance(method, str) else getattr(method, "__name__", "map"),
            "images": len(x), "order": "top down, cascading", "threshold": threshold,
            "similarity": "Spearman rank correlation of |map| / max (Quantus MPRT)",
            "layers": layers, "final_correlation": final, "passed": bool(final < threshold)}


def rank_correlation(a: np.ndarray, b: np.ndarray, batched: bool = False, **kwargs) -> np.ndarray | float:
    """Quantus's correlation_spearman, row by row where batched, with constant maps scored as said above."""
    from quantus.functions.similarity_func import correlation_spearman

    if not batched:
        return _pair(np.ravel(a), np.ravel(b), correlation_spearman)
    return np.array([_pair(x, y, correlation_spearman) for x, y in zip(a, b)])


def _pair(a: np.ndarray, b: np.ndarray, spearman) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(spearman(a, b))


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, np.float64))) if len(values) else 1.0

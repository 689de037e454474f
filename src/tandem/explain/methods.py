"""The attribution methods: which ones this install runs, choosing them, and computing their maps.

Integrated Gradients and Grad-CAM run on the training side (torch, Captum); occlusion runs in the runtime and
needs neither, so an inference-only install explains by occlusion. Light to import (the command line's parser
reads METHODS): numpy and the methods themselves are imported when used.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Callable

from tandem.errors import UserError

if TYPE_CHECKING:
    import numpy as np

SCHEMA = "tandem.explain/1"
METHODS = ("ig", "gradcam", "occlusion")
TORCH_METHODS = ("ig", "gradcam")
TITLES = {"ig": "Integrated Gradients", "gradcam": "Grad-CAM", "occlusion": "occlusion"}
SETUP = "pip install 'tandem[explain]'"


def torch_side_installed() -> bool:
    """Whether torch and captum can be imported (asked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "captum"))


def require_torch_side(method: str) -> None:
    if method in TORCH_METHODS and not torch_side_installed():
        raise UserError(f"--method {method} needs torch and captum ({SETUP}); --method occlusion runs without them")


def default_method() -> tuple[str, str | None]:
    """ig where the training side is installed, else occlusion, with a note saying why."""
    if torch_side_installed():
        return "ig", None
    return "occlusion", (f"note: torch and captum are not installed, so explaining by occlusion (the runtime); "
                         f"{SETUP} adds Integrated Gradients and Grad-CAM")


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
        require_torch_side(method)
    return methods, []


def occlusion_geometry(window: int | None, stride: int | None, image_size: int, methods: list[str]) -> tuple[int, int]:
    """--window and --stride, or their defaults for the image size; refused where occlusion is not among methods."""
    from tandem.explain.occlusion import window_for

    if (window or stride) and "occlusion" not in methods:
        raise UserError("--window and --stride set occlusion's square; add --method occlusion (or occlusion to "
                        "--methods), or drop them")
    window = window or window_for(image_size)[0]
    stride = stride or max(1, window // 2)
    return window, stride


def parse_target(text: str | None, labels: list[str]) -> int | None:
    """--target: a label (exact, then ignoring case) or a class index; None: each image's predicted class."""
    from tandem.explain.occlusion import class_index

    try:
        return class_index(text, labels)
    except UserError as err:
        raise UserError(f"--{err}") from None


def attribution_maps(method: str, predictor: Any, pixels: np.ndarray, targets: np.ndarray, window: int = 4,
                     stride: int = 2, explainer: Any = None, progress: Callable[[int], None] | None = None,
                     options: Any = None, data_mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(maps float32 (N, H, W), IG's convergence deltas (N,) or None) of uint8 images for the target classes.

    occlusion runs in the runtime (`predictor`); ig and gradcam on `explainer` (a TorchExplainer). options: a
    tandem.explain.options.AttributionOptions (default: black, 50 steps, no smoothing, the last conv block);
    data_mean: the training split's mean image, occlusion's --baseline mean where the data is reachable."""
    if method == "occlusion":
        import numpy as np

        from tandem.explain.baselines import fill_images
        from tandem.explain.occlusion import occlusion

        baseline = getattr(options, "baseline", "black")
        fills = None if baseline == "black" else fill_images(baseline, pixels, data_mean)
        maps = []
        for i, (image, target) in enumerate(zip(pixels, targets)):
            maps.append(occlusion(predictor, image, int(target), window, stride,
                                  None if fills is None else fills[i]).heatmap)
            if progress:
                progress(1)
        return np.stack(maps), None
    result = explainer.attribute(method, pixels, targets, progress=progress, options=options)
    return result.maps, result.convergence_delta


def torch_explainer(bundle: str, manifest: dict, methods: list[str], options: Any = None) -> Any:
    """A TorchExplainer where a method needs one (each method checked before any work, --layer included), else
    None."""
    if not any(method in TORCH_METHODS for method in methods):
        return None
    from tandem.explain.attribute import TorchExplainer

    explainer = TorchExplainer(bundle, manifest)
    for method in methods:
        if method in TORCH_METHODS:
            explainer.check(method, options)  # Grad-CAM without convolutions, an unknown --layer: refused now
    return explainer

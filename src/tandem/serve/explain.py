"""What the server's explain endpoints compute, off the event loop: an image's occlusion heatmap on the version's
fp32 model and its rule path (tandem.explain, torch-free), the query's window and target checked into 4xx answers,
and the answer's JSON schema. app.py lists the endpoints; this is their work.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any, Callable

import numpy as np

from tandem.errors import UserError
from tandem.serve.protocol import NotFound, ProtocolError
from tandem.serve.repository import ModelVersion

EXPLAIN_OFF = "explanations are off on this server (explain.enabled is false in its serve config)"


def occlusion_window(size: int, window: int | None, stride: int | None, max_windows: int) -> tuple[int, int, int]:
    """(window, stride, occluded copies) for the query's window and stride; the defaults scale with the image."""
    from tandem.explain.occlusion import check_window, window_for

    if window is None:
        window = min(size, max(window_for(size)[0], stride or 1))
    if stride is None:
        stride = max(1, window // 2)
    try:
        windows = check_window(size, size, window, stride)
    except UserError as err:
        raise ProtocolError(f"{err} (query parameters window and stride)") from None
    if windows > max_windows:
        suggested = window_for(size)
        raise ProtocolError(f"window {window} and stride {stride} make {windows:,} occluded copies of the image, more "
                            f"than this server computes ({max_windows:,}: explain.max_windows); use a larger window or "
                            f"stride, e.g. window={suggested[0]}&stride={suggested[1]}")
    return window, stride, windows


def target_index(labels: list[str], target: str | None) -> int | None:
    from tandem.explain.occlusion import class_index

    try:
        return class_index(target, labels)
    except UserError as err:
        raise ProtocolError(str(err)) from None


def explain_image(model: ModelVersion, pixels: np.ndarray, target: int | None, window: int, stride: int,
                  windows: int, arrived: float, observe: Callable[[str, float], None], top_k: int = 5) -> bytes:
    """In a worker thread: one image's occlusion map (the version's fp32 model) and its rule path, as JSON."""
    from tandem.explain.occlusion import occlusion
    from tandem.explain.render import heatmap_png
    from tandem.explain.rules_pictures import fired_png

    predictor = model.fp32_predictor()
    started = time.perf_counter()
    found = occlusion(predictor, pixels, target, window, stride)
    if not (np.isfinite(found.heatmap).all() and np.isfinite(found.probabilities).all()):
        raise ProtocolError(f"model {model.name} version {model.version} gives NaN or infinity for this image; "
                            "it cannot be explained")
    scale = max(1, -(-224 // max(found.heatmap.shape)))  # a PNG of about 224 pixels or more: smooth in the page
    heatmap = base64.b64encode(heatmap_png(found.heatmap, scale)).decode()
    occluded = time.perf_counter()
    observe("occlusion", occluded - started)
    rules, reason = model.rules()
    path = None
    if rules is not None:
        path = rules.explain(pixels[None])[0]
        # The rules' hash in the URL: rules fit again under the same version get new URLs, so no cache shows old strips.
        fit = model.manifest["files"]["rules.json"]["sha256"][:12]
        for condition in path["conditions"]:
            condition["prototype_url"] = (f"/v2/models/{model.name}/versions/{model.version}/concepts/"
                                          f"{int(condition['concept'])}?rules={fit}")
            # Where the concept fired in this image (orange over the dimmed image), for the page.
            condition["where_png_base64"] = base64.b64encode(fired_png(pixels, np.asarray(condition["where"]))).decode()
        observe("rules", time.perf_counter() - occluded)
    ended = time.perf_counter()
    probs, labels = found.probabilities, predictor.labels
    answer = {"model": model.name, "version": model.version, "precision": predictor.precision,
              "image": {"shape": list(pixels.shape), "png_base64": base64.b64encode(_png(pixels)).decode()},
              "top_k": [{"label": c.label, "index": c.index, "probability": c.probability}
                        for c in predictor.rank(probs[None], top_k, probabilities=True)[0]],
              "heatmap": {"method": "occlusion", "target": found.target, "label": labels[found.target],
                          "probability": float(probs[found.target]), "window": found.window, "stride": found.stride,
                          "windows": windows, "shape": list(found.heatmap.shape), "values": found.heatmap.tolist(),
                          "png_base64": heatmap},
              "rules": path, "rules_reason": reason,
              "latency_ms": {"occlusion": round((occluded - started) * 1e3, 3),
                             "rules": round((ended - occluded) * 1e3, 3),
                             "total": round((time.perf_counter() - arrived) * 1e3, 3)}}
    return json.dumps(answer, separators=(",", ":"), default=_plain).encode()


def prototype_png(rules: Any, concept: int, model: ModelVersion) -> bytes:
    """A concept's prototype strip; a 404 naming the version when the concept or its file is not there."""
    try:
        return rules.prototype_png(concept)
    except UserError as err:
        raise NotFound(f"model {model.name} version {model.version}: {str(err).splitlines()[0]}") from None


def _png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, C) as a PNG: the image as the model saw it, under the heatmap."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """json.dumps' fallback for NumPy scalars and arrays in a rule path."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


EXPLAIN_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "version": {"type": "integer"},
    "precision": {"type": "string", "description": "the model that explained: always fp32 (model.onnx)"},
    "image": {"type": "object", "description": "the image as the model saw it (its input size), as a PNG",
              "properties": {"shape": {"type": "array", "items": {"type": "integer"}},
                             "png_base64": {"type": "string"}}},
    "top_k": {"type": "array", "items": {"type": "object", "properties": {
        "label": {"type": "string"}, "index": {"type": "integer"}, "probability": {"type": "number"}}}},
    "heatmap": {"type": "object", "description": "occlusion: each pixel's mean drop of the target's probability "
                                                 "when a window over it is black", "properties": {
        "method": {"type": "string"}, "target": {"type": "integer"}, "label": {"type": "string"},
        "probability": {"type": "number"}, "window": {"type": "integer"}, "stride": {"type": "integer"},
        "windows": {"type": "integer"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "values": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "png_base64": {"type": "string", "description": "RGBA PNG to lay over the image"}}},
    "rules": {"type": ["object", "null"], "description": "the rule path (label, conditions with prototype_url, "
                                                         "text, agrees, fidelity); null when the bundle has no rules"},
    "rules_reason": {"type": ["string", "null"], "description": "why rules is null"},
    "latency_ms": {"type": "object"}}}

"""Part concepts: what fires where in a spatial layer of the network, NumPy only (both `tandem rules`, which fits
them, and the runtime side, which applies them, compute scores with these functions).

A concept is a non-negative direction in the channels of a spatial activation (N, C, H, W) of a convolutional
block, found by non-negative matrix factorisation of the activations at every position of every training image
(as ACE and CRAFT factorise activations of image regions rather than whole images). At each position, an image's
activation is written as a non-negative mix of the concepts (non-negative least squares against the fixed
components, `codes`): its code map (H, W) per concept says where the concept fired. The rules read, per concept,
its strongest response anywhere, its mean over the image (how much of it there is), and its strongest response in
each of nine regions (top-left ... bottom-right), each scaled so that 1 is the 99th percentile on training images.

    layer = find_concept_layer(onnx_model)            # the last spatial, non-negative activation (or a named one)
    codes = concept_codes(activations, components)    # (N, K, H, W)
    x = region_features(codes) / scale                # (N, K * FEATURES_PER_CONCEPT)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tandem.errors import UserError

NNLS_ITERATIONS = 50       # sweeps of coordinate descent from a fixed start: the same codes on every machine
REGIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
WHERE = ("anywhere", "overall") + REGIONS  # one score per concept and place: max, mean, then max per region
FEATURES_PER_CONCEPT = len(WHERE)
_NON_NEGATIVE = ("Relu",)                  # activations NMF can factorise as they are
_POOLS = ("MaxPool", "AveragePool")        # a pool of a non-negative activation is non-negative too


def concept_layers(model: Any) -> list[tuple[str, tuple[int, int, int]]]:
    """(tensor, (channels, height, width)) of every spatial, non-negative activation in an ONNX graph, in order:
    ReLU outputs and pools of them, at least 3 x 3 positions (nine regions need three rows and columns)."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    non_negative, found = set(), []
    for node in inferred.graph.node:
        if node.op_type in _NON_NEGATIVE or (node.op_type in _POOLS and node.input[0] in non_negative):
            name = node.output[0]
            non_negative.add(name)
            dims = shapes.get(name, [])
            if len(dims) == 4 and dims[1] > 0 and dims[2] >= 3 and dims[3] >= 3:
                found.append((name, (dims[1], dims[2], dims[3])))
    return found


def find_concept_layer(model: Any, layer: str | None = None) -> tuple[str, tuple[int, int, int]]:
    """The layer concepts are found in: the named one, or by default the last spatial block's output (its parts
    are the largest the network composes before the head reads them)."""
    layers = concept_layers(model)
    if not layers:
        raise UserError("part concepts need a spatial activation of at least 3 x 3 positions after a ReLU (a "
                        "convolutional model such as cnn or resnet); this model has none: train a cnn")
    if layer is None:
        return layers[-1]
    for name, shape in layers:
        if name == layer:
            return name, shape
    listed = ", ".join(f"{name} ({c}x{h}x{w})" for name, (c, h, w) in layers)
    raise UserError(f"--layer {layer!r} is not a spatial activation of this model; choose one of: {listed}")


def concept_codes(activations: np.ndarray, components: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(N, C, H, W) activations, (K, C) non-negative components -> (N, K, H, W) non-negative codes: at each
    position the least-squares non-negative mix of the components (coordinate descent, HALS, a fixed count of
    sweeps: each code in turn set to its best non-negative value given the others)."""
    a = np.maximum(np.asarray(activations, np.float64), 0.0)
    n, c, h, w = a.shape
    comp = np.asarray(components, np.float64)
    if comp.ndim != 2 or comp.shape[1] != c:
        raise UserError(f"the concept layer has {c} channels, the rules expect {comp.shape[-1]}; "
                        "run `tandem rules BUNDLE` again")
    rows = a.transpose(0, 2, 3, 1).reshape(-1, c)
    gram = comp @ comp.T
    diag = np.maximum(np.diag(gram), 1e-12)
    out = np.empty((len(rows), len(comp)))
    for start in range(0, len(rows), chunk):
        ah = rows[start:start + chunk] @ comp.T
        code = np.zeros_like(ah)
        for _ in range(NNLS_ITERATIONS):
            for k in range(len(comp)):
                code[:, k] = np.maximum(code[:, k] + (ah[:, k] - code @ gram[:, k]) / diag[k], 0.0)
        out[start:start + chunk] = code
    return out.reshape(n, h, w, len(comp)).transpose(0, 3, 1, 2)


def region_edges(size: int) -> np.ndarray:
    """Where the three bands of rows (or columns) of a grid of `size` begin and end."""
    return np.linspace(0, size, 4).round().astype(int)


def region_features(codes: np.ndarray) -> np.ndarray:
    """(N, K, H, W) codes -> (N, K * FEATURES_PER_CONCEPT): per concept, WHERE's order (max, mean, 9 regions)."""
    n, k, h, w = codes.shape
    rows, cols = region_edges(h), region_edges(w)
    parts = [codes.max(axis=(2, 3)), codes.mean(axis=(2, 3))]
    for i in range(3):
        for j in range(3):
            parts.append(codes[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]].max(axis=(2, 3)))
    return np.stack(parts, axis=2).reshape(n, k * FEATURES_PER_CONCEPT)


def feature_of(index: int) -> tuple[int, str]:
    """A region feature's (concept, place)."""
    return index // FEATURES_PER_CONCEPT, WHERE[index % FEATURES_PER_CONCEPT]


def place_words(place: str) -> str:
    """'anywhere', 'over the image' (its mean), 'at the top-left' ..."""
    return {"anywhere": "anywhere", "overall": "over the whole image"}.get(place, f"at the {place}")


def load_concepts(stored: dict) -> dict:
    """rules.json's "concepts_fit" as arrays: components (K, C) and scale (K * FEATURES_PER_CONCEPT,)."""
    components = np.asarray(stored["components"], np.float32).astype(np.float64)
    scale = np.asarray(stored["scale"], np.float32).astype(np.float64)
    if components.ndim != 2 or scale.shape != (components.shape[0] * FEATURES_PER_CONCEPT,):
        raise ValueError("concepts_fit needs components (concepts, channels) and a scale per concept and place")
    if (components < 0).any() or not np.isfinite(components).all() or not (np.isfinite(scale).all() and
                                                                          (scale > 0).all()):
        raise ValueError("concepts_fit holds negative components or scales that are not positive numbers")
    return {"components": components, "scale": scale}


def scores(activations: np.ndarray, fit: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) -> the scaled region features (N, K * FEATURES_PER_CONCEPT) and the codes (N, K, H, W)."""
    codes = concept_codes(activations, fit["components"])
    return region_features(codes) / fit["scale"], codes

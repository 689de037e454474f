"""What a network costs, read from its ONNX graph: parameters, MACs, FLOPs, weight bytes, activation memory.
Torch-free; needs the `onnx` package (for shape inference), imported only when a graph is analysed.

    tandem inspect bundles/animals/1 [--precision int8] [--json]

    analysis = analyze_bundle("bundles/animals/1")          # model.onnx, hashes verified
    analysis = analyze_model(onnx_bytes)                     # any ONNX graph (batch dimension set to 1)
    analysis.macs, analysis.flops, analysis.parameters       # per image
    analysis.weight_bytes("int8"), analysis.peak_activation_bytes("fp32", batch=8)

Conventions (per image, batch 1):
- MACs: multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul. A MAC is 2 FLOPs; a bias add is 1 FLOP
  per output; elementwise ops, pooling and normalisation add their own FLOPs (onnx_walk._ELEMENTWISE_FLOPS).
- Parameters: every constant input of a node (initializers, folded constants); of those, the second input of
  a MAC op is its `weights`, the rest `biases` (kept at 4 bytes, int32, in an int8 model, as QDQ stores them).
- Activations: the non-constant inputs and outputs of each layer. Quantize/DequantizeLinear on activations,
  and reshapes (Flatten, Reshape, Squeeze, ...) are views: they take no memory of their own and no time.
- Peak activation memory: a liveness walk over the graph in its topological order: a tensor lives from the node
  that makes it to its last reader; the peak is the largest sum of live tensors while a node runs.
- Arithmetic intensity: FLOPs / bytes moved (weights + activations read and written), at a precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.errors import UserError
# The cost model, importable from here as before.
from tandem.hardware.costs import PRECISION_BYTES, PRECISIONS, Analysis, Layer
from tandem.hardware.onnx_walk import walk_graph, with_batch_one

__all__ = ["MODEL_FILES", "PRECISIONS", "PRECISION_BYTES", "Analysis", "Layer", "analyze_bundle", "analyze_model",
           "bundle_model_bytes", "format_bytes", "format_count", "has_int8"]

MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def _onnx():
    try:
        import onnx
        import onnx.shape_inference
    except ImportError:
        raise UserError("model analysis reads ONNX graphs with the onnx package, which is not installed; "
                        "install it with: pip install onnx") from None
    return onnx


def bundle_model_bytes(bundle: str | Path, precision: str = "fp32") -> bytes:
    """The verified bytes of a bundle's model file for `precision` (fp32: model.onnx, int8: model.int8.onnx)."""
    from tandem.bundle import read_bundle_file, read_manifest

    if precision not in MODEL_FILES:
        raise UserError(f"a bundle holds fp32 (model.onnx) and int8 (model.int8.onnx) graphs, not {precision!r}")
    manifest = read_manifest(bundle, verify=False)
    name = MODEL_FILES[precision]
    if name not in manifest.get("files", {}):
        raise UserError(f"bundle {bundle} has no {name} (export it with `tandem export RUN --out B --int8`)"
                        if precision == "int8" else f"bundle {bundle} lists no {name}; re-export the bundle")
    return read_bundle_file(bundle, manifest, name)


def has_int8(bundle: str | Path) -> bool:
    from tandem.bundle import read_manifest

    return MODEL_FILES["int8"] in read_manifest(bundle, verify=False).get("files", {})


def analyze_bundle(bundle: str | Path, precision: str = "fp32") -> Analysis:
    analysis = analyze_model(bundle_model_bytes(bundle, precision))
    analysis.source = f"{bundle}/{MODEL_FILES[precision]}"
    return analysis


def analyze_model(model: bytes | Any, source: str = "model") -> Analysis:
    """Analyse an ONNX model (serialized bytes or a ModelProto) at batch 1."""
    onnx = _onnx()
    try:
        proto = onnx.load_model_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    except Exception as err:  # protobuf's DecodeError and friends
        raise UserError(f"{source} is not an ONNX model ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    proto = with_batch_one(onnx, proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as err:
        raise UserError(f"{source}: ONNX shape inference failed ({str(err).splitlines()[0]})") from None
    return walk_graph(onnx, inferred, source)


def format_count(n: float) -> str:
    """12,345 -> '12.3 K'; for tables."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"

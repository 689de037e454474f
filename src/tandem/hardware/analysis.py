"""What a network costs, read from its ONNX graph: parameters, MACs, FLOPs, weight bytes, activation memory.
Torch-free; needs the `onnx` package (for shape inference), imported only when a graph is analysed.

    tandem inspect bundles/animals/1 [--precision int8] [--json]

    analysis = analyze_bundle("bundles/animals/1")          # model.onnx, hashes verified
    analysis = analyze_model(onnx_bytes)                     # any ONNX graph (batch dimension set to 1)
    analysis.macs, analysis.flops, analysis.parameters       # per image
    analysis.weight_bytes("int8"), analysis.peak_activation_bytes("fp32", batch=8)

Conventions (per image, batch 1):
- MACs: multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul. A MAC is 2 FLOPs; a bias add is 1 FLOP
  per output; elementwise ops, pooling and normalisation add their own FLOPs (see _ELEMENTWISE_FLOPS).
- Parameters: every constant input of a node (initializers, folded constants); of those, the second input of
  a MAC op is its `weights`, the rest `biases` (kept at 4 bytes, int32, in an int8 model, as QDQ stores them).
- Activations: the non-constant inputs and outputs of each layer. Quantize/DequantizeLinear on activations,
  and reshapes (Flatten, Reshape, Squeeze, ...) are views: they take no memory of their own and no time.
- Peak activation memory: a liveness walk over the graph in its topological order: a tensor lives from the node
  that makes it to its last reader; the peak is the largest sum of live tensors while a node runs.
- Arithmetic intensity: FLOPs / bytes moved (weights + activations read and written), at a precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import UserError

# Bytes per value of each precision the planner knows.
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
PRECISIONS = tuple(PRECISION_BYTES)
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
# Ops that only relabel their input's memory (no copy in ONNX Runtime, nor on an accelerator).
_VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "QuantizeLinear",
             "DequantizeLinear", "Cast")
# Ops that move data without arithmetic.
_DATA_OPS = ("Concat", "Transpose", "Slice", "Gather", "Pad", "Split", "Shape", "Expand", "Tile", "Resize",
             "ConstantOfShape", "Range", "Where")
# FLOPs per output element of elementwise and normalisation ops (rough, conventional counts).
_ELEMENTWISE_FLOPS = {
    "Relu": 1, "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Max": 1, "Min": 1, "Neg": 1, "Abs": 1, "Sqrt": 1,
    "Exp": 1, "Log": 1, "Pow": 1, "Reciprocal": 1, "Clip": 1, "Erf": 1, "Sum": 1, "PRelu": 2, "LeakyRelu": 2,
    "Sigmoid": 4, "Tanh": 4, "HardSigmoid": 3, "HardSwish": 4, "Softplus": 3, "Gelu": 8, "Softmax": 3,
    "LogSoftmax": 4, "BatchNormalization": 2, "InstanceNormalization": 5, "LayerNormalization": 5,
}

# Ops whose constant inputs are learned parameters (weights, biases, scales), not shapes or bounds.
_LEARNED_INPUTS = set(_MAC_OPS) | (set(_ELEMENTWISE_FLOPS) - {"Clip", "Pow"})


@dataclass
class Layer:
    """One node of the graph, per image."""

    name: str
    op: str
    output_shape: list[int]
    weights: int = 0         # the multiplicands of a MAC op
    biases: int = 0          # every other constant input
    macs: int = 0
    flops: int = 0
    input_elements: int = 0  # activations read
    output_elements: int = 0  # activations written (0 for views)
    view: bool = False

    @property
    def parameters(self) -> int:
        return self.weights + self.biases

    def weight_bytes(self, precision: str) -> int:
        size = PRECISION_BYTES[precision]
        return self.weights * size + self.biases * (4 if precision == "int8" else size)

    def activation_bytes(self, precision: str) -> int:
        return (self.input_elements + self.output_elements) * PRECISION_BYTES[precision]

    def intensity(self, precision: str) -> float:
        moved = self.weight_bytes(precision) + self.activation_bytes(precision)
        return self.flops / moved if moved else 0.0


@dataclass
class Analysis:
    """A graph's costs per image (batch 1); bytes at any precision."""

    source: str
    input_shape: list[int]
    output_shape: list[int]
    layers: list[Layer]
    peak_activation_elements: int
    stored_bytes: int          # bytes of every constant in the file as stored (int8 weights, fp32 scales, ...)
    quantized: bool            # the graph holds QuantizeLinear / DequantizeLinear nodes (an int8 QDQ model)
    uncounted: list[str] = field(default_factory=list)  # "op (node)" whose cost is unknown: counted as 0

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def input_elements(self) -> int:
        return _product(self.input_shape)

    def weight_bytes(self, precision: str) -> int:
        return sum(layer.weight_bytes(precision) for layer in self.layers)

    def activation_traffic_bytes(self, precision: str) -> int:
        """Activation bytes read and written by all layers, per image (each tensor to and from memory)."""
        return sum(layer.activation_bytes(precision) for layer in self.layers)

    def peak_activation_bytes(self, precision: str, batch: int = 1) -> int:
        return self.peak_activation_elements * batch * PRECISION_BYTES[precision]

    def intensity(self, precision: str) -> float:
        moved = self.weight_bytes(precision) + self.activation_traffic_bytes(precision)
        return self.flops / moved if moved else 0.0

    @property
    def kernels(self) -> int:
        """Layers a runtime launches one by one: not views, and not an activation fused into the MAC op before it."""
        count, previous = 0, ""
        for layer in self.layers:
            fused = layer.op in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish") and previous in _MAC_OPS
            if not layer.view and not fused:
                count += 1
            previous = layer.op
        return count

    def totals(self) -> dict:
        return {
            "parameters": self.parameters, "macs": self.macs, "flops": self.flops,
            "weight_bytes": {p: self.weight_bytes(p) for p in PRECISIONS},
            "stored_bytes": self.stored_bytes,
            "peak_activation_bytes": {p: self.peak_activation_bytes(p) for p in PRECISIONS},
            "activation_traffic_bytes": {p: self.activation_traffic_bytes(p) for p in PRECISIONS},
            "arithmetic_intensity": {p: round(self.intensity(p), 3) for p in PRECISIONS},
        }

    def to_dict(self) -> dict:
        return {
            "source": self.source, "input_shape": self.input_shape, "output_shape": self.output_shape,
            "quantized": self.quantized, "per_image": True, "totals": self.totals(),
            "layers": [{"name": layer.name, "op": layer.op, "output_shape": layer.output_shape,
                        "parameters": layer.parameters, "macs": layer.macs, "flops": layer.flops,
                        "weight_bytes": {p: layer.weight_bytes(p) for p in PRECISIONS},
                        "activation_bytes": {p: layer.activation_bytes(p) for p in PRECISIONS},
                        "arithmetic_intensity": round(layer.intensity("fp32"), 3)}
                       for layer in self.layers],
            "uncounted": self.uncounted,
        }


def _product(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


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
    proto = _with_batch_one(onnx, proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as err:
        raise UserError(f"{source}: ONNX shape inference failed ({str(err).splitlines()[0]})") from None
    return _walk(onnx, inferred, source)


def _with_batch_one(onnx, proto):
    """A copy with every symbolic or unknown dimension of the graph inputs and outputs set to 1 (the batch)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    initializers = {init.name for init in proto.graph.initializer}
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1
    return proto


def _shapes(onnx, graph) -> dict[str, list[int] | None]:
    """Tensor name -> static shape (None where shape inference left a dimension unknown)."""
    shapes: dict[str, list[int] | None] = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            shapes.setdefault(value.name, None)
            continue
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
        else:  # a partial shape never replaces a full one (an output may be listed twice)
            shapes.setdefault(value.name, None)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _is_float(onnx, graph) -> dict[str, bool]:
    """Tensor name -> whether it holds floating-point values (where the file or shape inference says)."""
    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    out = {v.name: v.type.tensor_type.elem_type in kinds
           for v in list(graph.input) + list(graph.output) + list(graph.value_info) if v.type.HasField("tensor_type")}
    out.update({init.name: init.data_type in kinds for init in graph.initializer})
    return out


def _stored_bytes(onnx, graph) -> int:
    total = 0
    for init in graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        total += _product(init.dims) * dtype.itemsize
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += _product(attr.t.dims) * onnx.helper.tensor_dtype_to_np_dtype(attr.t.data_type).itemsize
    return total


def _topological(graph) -> list:
    """The nodes in an order where every input is made before it is read (ONNX files normally are)."""
    made = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in made for i in n.input)]
        if not ready:  # a cycle or a dangling input: keep the file's order for the rest
            return ordered + pending
        for node in ready:
            made.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if n not in ready]
    return ordered


def _attr(onnx, node, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _walk(onnx, model, source: str) -> Analysis:
    graph = model.graph
    shapes = _shapes(onnx, graph)
    floats = _is_float(onnx, graph)
    nodes = _topological(graph)
    constant = {init.name for init in graph.initializer}
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)
    # Constant folding by name: a node whose every input is constant makes constants (DequantizeLinear of an
    # int8 weight, a Constant, a Reshape of a constant shape): part of a parameter, not a layer.
    compute = []
    for node in nodes:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)
        else:
            compute.append(node)
    graph_inputs = [i.name for i in graph.input if i.name not in constant]
    if not graph_inputs:
        raise UserError(f"{source}: the graph has no input")

    def elements(name: str) -> int | None:
        shape = shapes.get(name)
        return None if shape is None else _product(shape)

    layers, uncounted = [], []
    # Views share their input's memory: alias -> the tensor that owns the memory.
    owner: dict[str, str] = {}
    for node in compute:
        activations = [i for i in node.input if i and i not in constant]
        constants = [i for i in node.input if i and i in constant]
        out = node.output[0] if node.output else ""
        out_shape = shapes.get(out)
        view = node.op_type in _VIEW_OPS
        if view and activations:
            owner[out] = owner.get(activations[0], activations[0])
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue  # fused into the integer kernels around it: no layer of its own
        layer = Layer(name=node.name or out, op=node.op_type, output_shape=out_shape or [], view=view)
        known = out_shape is not None and all(elements(i) is not None for i in activations + constants)
        if not known:
            uncounted.append(f"{node.op_type} ({layer.name}): shapes unknown")
            layers.append(layer)
            continue
        # Learned constants only: not the shapes, axes and clip bounds some ops take as inputs.
        learned = [c for c in constants if floats.get(c, True)] if node.op_type in _LEARNED_INPUTS else []
        index = _weight_index(node, constant) if node.op_type in _MAC_OPS else None
        if index is not None:
            layer.weights = elements(node.input[index])
            learned = [c for c in learned if c != node.input[index]]
        layer.biases = sum(elements(c) for c in learned)
        if not view:
            layer.input_elements = sum(elements(i) for i in activations)
            layer.output_elements = sum(elements(o) for o in node.output if o and elements(o) is not None)
        layer.macs, layer.flops, counted = _cost(onnx, node, shapes, constant)
        if not counted:
            uncounted.append(f"{node.op_type} ({layer.name})")
        layers.append(layer)
    peak = _peak_elements(compute, graph_inputs, [o.name for o in graph.output], owner, elements, constant)
    input_shape = shapes.get(graph_inputs[0]) or []
    output_shape = shapes.get(graph.output[0].name) or [] if graph.output else []
    return Analysis(source, input_shape, output_shape, layers, peak, _stored_bytes(onnx, graph), quantized, uncounted)


def _weight_index(node, constant: set[str]) -> int | None:
    """Which input of a MAC op is its weight: the constant among its two operands (QLinear ops: input 3)."""
    operands = (0, 3) if node.op_type in ("QLinearConv", "QLinearMatMul") else (0, 1)
    for index in reversed(operands):
        if index < len(node.input) and node.input[index] in constant:
            return index
    return None


def _cost(onnx, node, shapes, constant) -> tuple[int, int, bool]:
    """(MACs, FLOPs, counted) of one node, per the conventions in the module docstring."""
    op = node.op_type
    out = _product(shapes[node.output[0]])
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes[node.input[3 if op == "QLinearConv" else 1]]  # (C_out, C_in / group, k...)
        macs = out * _product(w[1:])
        bias_index = 8 if op == "QLinearConv" else 2
        has_bias = len(node.input) > bias_index and bool(node.input[bias_index])
        return macs, 2 * macs + (out if has_bias else 0), True
    if op == "ConvTranspose":
        x, w = shapes[node.input[0]], shapes[node.input[1]]  # w: (C_in, C_out / group, k...)
        macs = _product(x) * _product(w[1:])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        return macs, 2 * macs + (out if has_bias else 0), True
    if op == "Gemm":
        a = shapes[node.input[0]]
        k = a[0] if _attr(onnx, node, "transA", 0) else a[-1]
        macs = out * k
        has_c = len(node.input) > 2 and bool(node.input[2])
        return macs, 2 * macs + (out if has_c else 0), True
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes[node.input[0]]
        macs = out * a[-1]
        return macs, 2 * macs, True
    if op in _ELEMENTWISE_FLOPS:
        return 0, _ELEMENTWISE_FLOPS[op] * out, True
    if op == "MaxPool":
        return 0, out * max(0, _product(_attr(onnx, node, "kernel_shape", [1])) - 1), True
    if op in ("AveragePool", "LpPool"):
        return 0, out * _product(_attr(onnx, node, "kernel_shape", [1])), True
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        return 0, _product(shapes[node.input[0]]), True
    if op in _VIEW_OPS or op in _DATA_OPS:
        return 0, 0, True
    return 0, 0, False


def _peak_elements(nodes, graph_inputs, graph_outputs, owner, elements, constant) -> int:
    """The most activation elements alive at once while the nodes run in order (views share their owner's memory)."""
    def root(name: str) -> str:
        while name in owner:
            name = owner[name]
        return name

    last_use: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constant:
                last_use[root(name)] = step
    keep = {root(o) for o in graph_outputs}
    live = {root(i): elements(i) or 0 for i in graph_inputs}
    peak = sum(live.values())
    for step, node in enumerate(nodes):
        for out in node.output:
            if out and root(out) == out and out not in constant:
                live[out] = elements(out) or 0
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= step and name not in keep:
                del live[name]
    return peak


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

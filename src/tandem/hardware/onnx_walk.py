"""Reading a network's costs from its ONNX graph, per the conventions in tandem.hardware.analysis: constants
folded, views aliased to their owner, MACs and FLOPs per node, peak activation memory by a liveness walk.
Torch-free; takes the `onnx` module it is given (imported by the caller only when a graph is analysed).
"""

from __future__ import annotations

from typing import Any

from tandem.errors import UserError
from tandem.hardware.costs import MAC_OPS, Analysis, Layer, product

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
_LEARNED_INPUTS = set(MAC_OPS) | (set(_ELEMENTWISE_FLOPS) - {"Clip", "Pow"})


def with_batch_one(onnx, proto):
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
        total += product(init.dims) * dtype.itemsize
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += product(attr.t.dims) * onnx.helper.tensor_dtype_to_np_dtype(attr.t.data_type).itemsize
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


def walk_graph(onnx, model, source: str) -> Analysis:
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
        return None if shape is None else product(shape)

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
        index = _weight_index(node, constant) if node.op_type in MAC_OPS else None
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
    out = product(shapes[node.output[0]])
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes[node.input[3 if op == "QLinearConv" else 1]]  # (C_out, C_in / group, k...)
        macs = out * product(w[1:])
        bias_index = 8 if op == "QLinearConv" else 2
        has_bias = len(node.input) > bias_index and bool(node.input[bias_index])
        return macs, 2 * macs + (out if has_bias else 0), True
    if op == "ConvTranspose":
        x, w = shapes[node.input[0]], shapes[node.input[1]]  # w: (C_in, C_out / group, k...)
        macs = product(x) * product(w[1:])
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
        return 0, out * max(0, product(_attr(onnx, node, "kernel_shape", [1])) - 1), True
    if op in ("AveragePool", "LpPool"):
        return 0, out * product(_attr(onnx, node, "kernel_shape", [1])), True
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        return 0, product(shapes[node.input[0]]), True
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

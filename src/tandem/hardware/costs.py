"""A network's costs per image, layer by layer (Layer) and in total (Analysis), at any precision; filled in by
tandem.hardware.onnx_walk, read by the planner. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Bytes per value of each precision the planner knows.
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
PRECISIONS = tuple(PRECISION_BYTES)

# Multiply-accumulate ops: a MAC is 2 FLOPs; their constant operand is the weight.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


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
        return product(self.input_shape)

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
            fused = layer.op in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish") and previous in MAC_OPS
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


def product(shape) -> int:
    """The number of elements of a shape."""
    out = 1
    for d in shape:
        out *= int(d)
    return out

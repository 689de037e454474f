"""The roofline estimate of one device: time per batch (compute, memory, fixed costs), whether the model fits its
memory, and the estimate a plan reports. Torch-free; tandem.hardware.plan and plan_train build on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tandem.errors import UserError
from tandem.hardware.analysis import format_bytes
from tandem.hardware.costs import PRECISION_BYTES, PRECISIONS, Analysis
from tandem.hardware.devices import Device


@dataclass
class Roofline:
    seconds: float           # one batch
    compute_seconds: float   # the sum over layers of FLOPs / peak
    memory_seconds: float    # the sum over layers of bytes / bandwidth
    overhead_seconds: float = 0.0

    @property
    def bound(self) -> str:
        """What limits it: compute, memory, or the fixed cost per run and kernel ("launch")."""
        if self.overhead_seconds > max(self.compute_seconds, self.memory_seconds):
            return "launch"
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def roofline(analysis: Analysis, device: Device, precision: str, batch: int = 1,
             weights_resident: bool = False) -> Roofline:
    """Time for one batch: per layer the longer of compute and memory time, plus the device's fixed cost per run
    and per kernel where it has one (measured on the host; a GPU's launch latency). weights_resident: weights and
    activations stay on chip, so only the inputs and outputs cross memory_bandwidth (device.on_chip)."""
    peak, bandwidth, size = device.peak(precision), device.memory_bandwidth.value, PRECISION_BYTES[precision]
    depth = device.min_depth[precision].value if precision in device.min_depth else 0.0
    total = compute = memory = 0.0
    if device.on_chip:
        io = (analysis.input_elements + math.prod(analysis.output_shape or [1])) * size * batch
        weights = 0 if weights_resident else analysis.weight_bytes(precision)
        compute = analysis.flops * batch / peak
        memory = (io + weights) / bandwidth
        total = max(compute, memory)
    else:
        for layer in analysis.layers:
            # A shallow Conv / Gemm (a grey image's first layer) costs at least min_depth MACs per output.
            shallow = max(0.0, layer.output_elements * depth - layer.macs) if layer.macs else 0.0
            c = (layer.flops + 2 * shallow) * batch / peak
            m = (layer.weight_bytes(precision) + layer.activation_bytes(precision) * batch) / bandwidth
            compute, memory, total = compute + c, memory + m, total + max(c, m)
    extra = (device.run_overhead.value if device.run_overhead else 0.0) + \
        (device.kernel_overhead.value if device.kernel_overhead else 0.0) * analysis.kernels
    return Roofline(total + extra, compute, memory, extra)


@dataclass
class Fit:
    fits: bool
    reason: str
    needed: dict   # bytes by part, "total", and "available" (and "weight_memory" where the device has one)
    weights_resident: bool = False


def describe_parts(parts: dict) -> str:
    """'weights 1.2 MB + activations 3 KB' (parts of zero bytes left out)."""
    return " + ".join(f"{name} {format_bytes(value)}" for name, value in parts.items() if value)


def inference_fit(analysis: Analysis, device: Device, precision: str, batch: int = 1) -> Fit:
    weights = analysis.weight_bytes(precision)
    activations = analysis.peak_activation_bytes(precision, batch)
    runtime = int(device.runtime_overhead.value)
    memory = device.memory.value
    where = "on-chip memory" if device.on_chip else "memory"
    if device.weight_memory is not None:
        ram = {"activations": activations, "runtime": runtime}
        needed = {"weights": weights, **ram, "total": sum(ram.values()), "available": int(memory),
                  "weight_memory": int(device.weight_memory.value)}
        if weights > device.weight_memory.value:
            return Fit(False, f"weights {format_bytes(weights)} exceed the {format_bytes(device.weight_memory.value)} "
                              "weight memory", needed)
        if needed["total"] > memory:
            return Fit(False, f"needs {format_bytes(needed['total'])} ({describe_parts(ram)}) of {format_bytes(memory)} "
                              f"{where}; weights {format_bytes(weights)} fit the weight memory", needed)
        return Fit(True, f"{format_bytes(needed['total'])} ({describe_parts(ram)}) of {format_bytes(memory)} {where}; "
                         f"weights {format_bytes(weights)} of {format_bytes(device.weight_memory.value)} weight memory",
                   needed)
    parts = {"weights": weights, "activations": activations, "runtime": runtime}
    needed = {**parts, "total": sum(parts.values()), "available": int(memory)}
    if needed["total"] <= memory:
        return Fit(True, f"{format_bytes(needed['total'])} ({describe_parts(parts)}) of {format_bytes(memory)} {where}",
                   needed, weights_resident=device.on_chip)
    if device.on_chip and activations + runtime <= memory:
        # An on-chip accelerator (the Edge TPU) streams parameters that do not fit from the host, every inference.
        return Fit(True, f"weights {format_bytes(weights)} exceed the {format_bytes(memory)} on-chip memory: they "
                         "stream from the host on every inference (slower)", needed)
    return Fit(False, f"needs {format_bytes(needed['total'])} ({describe_parts(parts)}) of {format_bytes(memory)} {where}",
               needed)


@dataclass
class Estimate:
    device: str
    title: str
    kind: str
    precision: str
    batch: int
    latency_s: float           # one batch
    throughput_per_s: float    # images per second
    energy_j: float | None     # per image; None where the device publishes no power figure
    bound: str
    compute_s: float
    memory_s: float
    overhead_s: float
    fits: bool
    reason: str
    memory: dict
    measured_figures: bool     # the device's figures were measured here (host), not read from a datasheet
    derived_figures: bool      # some of the device's figures are derived estimates, not datasheet values

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_inference(analysis: Analysis, device: Device, precision: str, batch: int = 1) -> Estimate:
    fit = inference_fit(analysis, device, precision, batch)
    line = roofline(analysis, device, precision, batch, fit.weights_resident)
    power = device.power.value if device.power else None
    return Estimate(device.name, device.title, device.kind, precision, batch, line.seconds, batch / line.seconds,
                    power * line.seconds / batch if power else None, line.bound, line.compute_seconds,
                    line.memory_seconds, line.overhead_seconds, fit.fits, fit.reason, fit.needed, device.measured,
                    derived(device))


def derived(device: Device) -> bool:
    """Whether any of the device's figures is a derived estimate (marked ~ in tables)."""
    return any(figure.estimate for figure in device.figures().values())


def wanted_precisions(device: Device, precisions: list[str] | None, supported: list[str]) -> tuple[list[str], list[str]]:
    """(precisions to estimate, those asked for that the device does not run)."""
    if not precisions:
        return list(supported), []
    return [p for p in precisions if p in supported], [p for p in precisions if p not in supported]


def check_precisions(precisions: list[str] | None) -> list[str] | None:
    if not precisions:
        return None
    out = [p.strip() for item in precisions for p in item.split(",") if p.strip()]
    unknown = [p for p in out if p not in PRECISIONS]
    if unknown:
        raise UserError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))

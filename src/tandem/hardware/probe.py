"""Measure this machine's roofline in a second or two: a NumPy GEMM (fp32 compute), a large array copy
(memory bandwidth), two ONNX Runtime int8 convolutions (int8 compute, and the least work one output costs),
and ONNX Runtime's fixed cost per run and per kernel. Torch-free.

    probe = probe_host()          # measured once per process
    device = host_device(probe)   # a Device profile named "host", its figures measured here

Each probe keeps its best repetition: a peak is what the machine can do, and the best run is the one least
disturbed by other work on the same cores.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.hardware.timing import cpu_name
from tandem.hardware.devices import Device


@dataclass(frozen=True)
class HostProbe:
    cpu: str
    cores: int
    fp32_flops: float          # NumPy float32 GEMM, n=512 and 1024
    int8_ops: float | None     # ONNX Runtime QLinearConv 3x3, 32 -> 32 channels (ops/s); None without onnx
    int8_min_depth: float | None  # multiply-accumulates an int8 output costs at least (from a 1-channel conv)
    copy_bandwidth: float      # bytes read + written per second, NumPy copy of 128 MiB
    run_overhead_s: float      # ONNX Runtime's fixed cost of one session.run
    kernel_overhead_s: float   # and of each kernel it launches
    memory_available: int      # bytes
    native_bf16: bool          # AVX512-BF16 or AMX: what `precision=auto` trains in
    seconds: float             # how long the probe took

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _memory_available() -> int:
    """Bytes of RAM available to new work (0 when unknown): what data.stream decides streaming by."""
    from tandem.data.stream import available_memory

    return available_memory() or 0


def _best(fn, seconds: float, min_runs: int = 3, max_runs: int = 10_000) -> float:
    """The fastest of repeated calls of fn within about `seconds` (after one warm-up call)."""
    fn()
    best, runs, stop = float("inf"), 0, time.perf_counter() + seconds
    while runs < min_runs or (time.perf_counter() < stop and runs < max_runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return best


def gemm_flops(sizes: tuple[int, ...] = (512, 1024), seconds: float = 0.2) -> float:
    """FLOP/s of NumPy's float32 matrix product: the best over a few sizes (on cores shared with other work,
    the smaller size catches more undisturbed runs; the larger one amortises the threads' start-up)."""
    best = 0.0
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        out = np.empty_like(a)
        best = max(best, 2 * n**3 / _best(lambda: np.matmul(a, a, out=out), seconds))
    return best


def copy_bandwidth(mib: int = 128, seconds: float = 0.3) -> float:
    """Bytes read and written per second by a copy far larger than the caches."""
    available = _memory_available()
    if available:
        mib = max(16, min(mib, available // (8 << 20)))
    src = np.ones((mib << 20) // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best(lambda: np.copyto(dst, src), seconds)


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as tandem.runtime.Predictor
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _qlinear_conv(c_in: int, c_out: int, size: int, batch: int):
    """A session running one QLinearConv (3x3, padding 1; uint8 activations, int8 weights, as the int8 bundles'
    convolutions run once ONNX Runtime fuses their QDQ pairs) and its input; None without onnx."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    constants = {"x_scale": np.float32(0.02), "x_zero": np.uint8(128),
                 "w": rng.integers(-127, 128, (c_out, c_in, 3, 3), dtype=np.int8),
                 "w_scale": np.full(c_out, 0.01, np.float32), "w_zero": np.zeros(c_out, np.int8),
                 "y_scale": np.float32(0.05), "y_zero": np.uint8(0), "bias": np.zeros(c_out, np.int32)}
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero",
                                            "bias"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "int8_probe",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [batch, c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [batch, c_out, size, size])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    x = rng.integers(0, 256, (batch, c_in, size, size), dtype=np.uint8)
    return _session(model.SerializeToString()), x


def int8_conv(batch: int = 16, seconds: float = 0.15) -> tuple[float | None, float | None]:
    """(int8 ops per second, the least multiply-accumulates one output costs) of ONNX Runtime's int8 convolution.

    The rate comes from a 3x3 convolution of 32 channels to 32 on a 14x14 grid, a reduction depth (C_in x 3 x 3 =
    288) at which the int8 kernels run at full speed. A convolution of 1 channel (depth 9, as a grey image's first
    layer) runs far below that rate: each output costs about as much as a deeper one (packing, requantizing), so the
    probe reports that cost in multiply-accumulates, and the planner charges every int8 Conv / Gemm output at least
    that much."""
    deep, shallow = _qlinear_conv(32, 32, 14, batch), _qlinear_conv(1, 16, 28, batch)
    if deep is None or shallow is None:
        return None, None
    outputs_per_s = []
    for session, x in (deep, shallow):
        outputs = session.run(None, {"x": x})[0].size
        outputs_per_s.append(outputs / _best(lambda session=session, x=x: session.run(None, {"x": x}), seconds))
    ops = 2 * 288 * outputs_per_s[0]  # 288 MACs per output of the 32-channel convolution
    return ops, max(9.0, ops / 2 / outputs_per_s[1])


def dispatch_overhead(seconds: float = 0.1) -> tuple[float, float]:
    """(seconds per session.run, seconds per kernel) of ONNX Runtime, from chains of 1 and 33 tiny Relus."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return 0.0, 0.0

    def chain(k: int) -> float:
        nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(k)]
        graph = helper.make_graph(nodes, "dispatch_probe", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 16])],
                                  [helper.make_tensor_value_info(f"t{k}", TensorProto.FLOAT, [1, 16])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = min(model.ir_version, 8)
        session = _session(model.SerializeToString())
        x = np.zeros((1, 16), np.float32)
        return _best(lambda: session.run(None, {"t0": x}), seconds, min_runs=20)

    one, many = chain(1), chain(33)
    per_kernel = max(0.0, (many - one) / 32)
    return max(0.0, one - per_kernel), per_kernel


@functools.lru_cache(maxsize=1)
def probe_host() -> HostProbe:
    started = time.perf_counter()
    flags = _cpu_flags()
    run, kernel = dispatch_overhead()
    int8_ops, int8_min_depth = int8_conv()
    return HostProbe(cpu=cpu_name(), cores=os.cpu_count() or 1, fp32_flops=gemm_flops(), int8_ops=int8_ops,
                     int8_min_depth=int8_min_depth,
                     copy_bandwidth=copy_bandwidth(), run_overhead_s=run, kernel_overhead_s=kernel,
                     memory_available=_memory_available(),
                     native_bf16="amx_bf16" in flags or "avx512_bf16" in flags,
                     seconds=time.perf_counter() - started)


def host_device(probe: HostProbe, train_peaks: dict[str, float] | None = None) -> Device:
    """This machine as a Device profile: measured figures, no power figure (none is measured).

    train_peaks: GEMM peaks per training precision measured with the training framework (tandem.hardware.train_memory)."""
    how = "measured by tandem.hardware.probe on this machine"
    peaks = {"fp32": {"value": probe.fp32_flops, "source": f"{how}: NumPy float32 GEMM (n=512, 1024), best run"}}
    min_depth = {}
    if probe.int8_ops:
        peaks["int8"] = {"value": probe.int8_ops,
                         "source": f"{how}: ONNX Runtime QLinearConv 3x3, 32 to 32 channels on 14x14, best run"}
        if probe.int8_min_depth:
            min_depth["int8"] = {"value": probe.int8_min_depth,
                                 "source": f"{how}: ONNX Runtime QLinearConv 3x3 of 1 channel (depth 9) against "
                                           "the 32-channel rate, best runs"}
    for precision, value in (train_peaks or {}).items():
        peaks[precision] = {"value": value, "source": f"{how}: PyTorch {precision} GEMM (n=512, 1024), best run"}
    train = [p for p in ("fp32", "bf16") if p in peaks] if train_peaks else ["fp32"]
    return Device.model_validate({
        "name": "host",
        "title": f"this machine: {probe.cpu}, {probe.cores} cores",
        "kind": "cpu",
        "precisions": [p for p in ("fp32", "int8") if p in peaks],
        "train_precisions": train,
        "peak_ops": peaks,
        "min_depth": min_depth,
        "memory_bandwidth": {"value": probe.copy_bandwidth, "source": f"{how}: NumPy copy of 128 MiB, best run"},
        "memory": {"value": max(1, probe.memory_available), "source": f"{how}: MemAvailable in /proc/meminfo"},
        "runtime_overhead": {"value": 60e6, "source": "measured RSS of Python + NumPy + ONNX Runtime with a bundle"},
        "train_overhead": {"value": 250e6, "source": "measured RSS of Python + PyTorch after a training step"},
        "run_overhead": {"value": probe.run_overhead_s, "source": f"{how}: ONNX Runtime, 1 and 33 Relu kernels"},
        "kernel_overhead": {"value": probe.kernel_overhead_s, "source": f"{how}: ONNX Runtime, 1 and 33 Relu kernels"},
        "measured": True,
    })

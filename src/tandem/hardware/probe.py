"""Measure this machine's roofline in a second or two: a NumPy GEMM (fp32 compute), a large array copy
(memory bandwidth), an ONNX Runtime int8 matrix product (int8 compute), and ONNX Runtime's fixed cost per
run and per kernel. Torch-free.

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

from tandem.hardware.bench import cpu_name
from tandem.hardware.devices import Device


@dataclass(frozen=True)
class HostProbe:
    cpu: str
    cores: int
    fp32_flops: float          # NumPy float32 GEMM, n=512 and 1024
    int8_ops: float | None     # ONNX Runtime MatMulInteger (uint8 x int8), n=512; None without onnx
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


def int8_ops(n: int = 512, seconds: float = 0.2) -> float | None:
    """uint8 x int8 -> int32 matrix products per second in ONNX Runtime (its int8 kernels: VNNI, AMX, SDOT)."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    session = _session(model.SerializeToString())
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return 2 * n**3 / _best(lambda: session.run(None, {"a": a}), seconds)


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
    return HostProbe(cpu=cpu_name(), cores=os.cpu_count() or 1, fp32_flops=gemm_flops(), int8_ops=int8_ops(),
                     copy_bandwidth=copy_bandwidth(), run_overhead_s=run, kernel_overhead_s=kernel,
                     memory_available=_memory_available(),
                     native_bf16="amx_bf16" in flags or "avx512_bf16" in flags,
                     seconds=time.perf_counter() - started)


def host_device(probe: HostProbe, train_peaks: dict[str, float] | None = None) -> Device:
    """This machine as a Device profile: measured figures, no power figure (none is measured).

    train_peaks: GEMM peaks per training precision measured with the training framework (tandem.train.memory)."""
    how = "measured by tandem.hardware.probe on this machine"
    peaks = {"fp32": {"value": probe.fp32_flops, "source": f"{how}: NumPy float32 GEMM (n=512, 1024), best run"}}
    if probe.int8_ops:
        peaks["int8"] = {"value": probe.int8_ops, "source": f"{how}: ONNX Runtime MatMulInteger (n=512), best run"}
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
        "memory_bandwidth": {"value": probe.copy_bandwidth, "source": f"{how}: NumPy copy of 128 MiB, best run"},
        "memory": {"value": max(1, probe.memory_available), "source": f"{how}: MemAvailable in /proc/meminfo"},
        "runtime_overhead": {"value": 60e6, "source": "measured RSS of Python + NumPy + ONNX Runtime with a bundle"},
        "train_overhead": {"value": 250e6, "source": "measured RSS of Python + PyTorch after a training step"},
        "run_overhead": {"value": probe.run_overhead_s, "source": f"{how}: ONNX Runtime, 1 and 33 Relu kernels"},
        "kernel_overhead": {"value": probe.kernel_overhead_s, "source": f"{how}: ONNX Runtime, 1 and 33 Relu kernels"},
        "measured": True,
    })

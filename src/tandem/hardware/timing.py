"""Timing and naming this machine, torch-free and import-light: what the benchmarks, the int8 speed gate
(tandem.export.quantize) and the host probe (tandem.hardware.probe) share.

    fp32_s, int8_s = alternated_seconds_per_call([run_fp32, run_int8], rounds=5)   # medians, drift hits both
    cpu_name()                                                                     # "AMD EPYC 9R14"
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def alternated_seconds_per_call(fns: list[Callable[[], object]], rounds: int = 3, min_seconds: float = 0.1,
                                warmup: int = 1) -> list[float]:
    """Median seconds per call of each function, timed in alternated blocks of at least min_seconds each:
    fn0 block, fn1 block, ..., `rounds` times, so that drift in the machine's load hits all alike."""
    per_call: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, per_call):
            for _ in range(warmup):
                fn()
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            out.append(elapsed / calls)
    return [statistics.median(times) for times in per_call]

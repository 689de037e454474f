"""Which device and which precision a run uses: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tandem.errors import UserError
from tandem.threads import BusyWatch, applied, apply_to_torch


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix products run several times faster than fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it and on CPUs with native bf16, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        # No fp16 (it needs loss scaling): GPUs without bf16 train in fp32. Pre-Ampere GPUs (V100, T4)
        # only emulate bf16, slowly; is_bf16_supported() counts emulation unless told not to.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


class ThreadWatch:
    """The intra-op threads of this run: what tandem.threads chose at start (threads.count=auto) revised every
    second while it trains, so that work starting beside it (a server, a game, another trial) does
    not stall it. A fixed count (the config, OMP_NUM_THREADS, the calling program) stays as it is."""

    def __init__(self, device: torch.device, count: int | str = "auto") -> None:
        policy = applied()
        # train() called from Python with threads.count set: the count applies now (the wait as torch was loaded).
        self.from_config = policy is None and count != "auto"
        if self.from_config:
            torch.set_num_threads(int(count))
        auto = device.type == "cpu" and policy is not None and policy.source == "auto" and policy.kind == "torch"
        self.watch = BusyWatch(policy) if auto else None
        self.changes: list[dict] = []

    def check(self, step: int, log) -> None:
        revised = self.watch.look() if self.watch is not None else None
        if revised is None:
            return
        before = torch.get_num_threads()
        apply_to_torch(revised)
        self.changes.append({"step": step, "threads": revised.threads, "busy": revised.busy})
        log(f"threads: {before} -> {revised.threads} at step {step} ({revised.reason})")

    def report(self) -> tuple[str, dict]:
        """The threads this process computes with and what chose them: for the log line and --json."""
        policy, actual = applied(), torch.get_num_threads()
        if policy is None:  # the library called from the user's own program
            wait = "passive" if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive" else "spin"
            why = "threads.count in the config" if self.from_config else "as the calling program set torch"
            text = f"{actual} thread{'s' if actual != 1 else ''} ({why}), {wait} wait"
            report = {"threads": actual, "wait": wait, "source": "config" if self.from_config else "caller"}
        else:
            text = policy.describe() if actual == policy.threads else f"{actual} threads (torch kept its own)"
            report = {**policy.as_dict(), "threads": actual}
        return text, {**report, "changes": self.changes} if self.watch is not None else report

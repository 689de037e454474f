"""Which device and which precision a run uses: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

from pathlib import Path

import torch

from tandem.errors import UserError


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

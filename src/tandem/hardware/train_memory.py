"""The training side of `tandem plan --train`: a config's model as the ONNX graph a bundle would carry (analysed
torch-free by tandem.hardware.analysis, so its counts are `tandem inspect`'s), GEMM peaks measured with PyTorch,
and a real training step timed on this machine with the memory autograd keeps for the backward pass.

    onnx_bytes, trainable = inference_graph(cfg, classes=10)
    gemm_peaks(["fp32", "bf16"])                     # {"fp32": 1.7e11, "bf16": 2.3e11} FLOP/s
    measure_training_step(cfg, 10, batch=128, precision="bf16", seconds=2.0)

Imported only by the --train path of `tandem plan`; torch and the training side are imported inside each
function, so importing this module (and tandem.hardware) loads no torch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _model(cfg, classes: int) -> torch.nn.Module:
    from tandem.train.models import create_model

    return create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, classes, cfg.model.width,
                        cfg.model.dropout)


def inference_graph(cfg, classes: int) -> tuple[bytes, int]:
    """(model.onnx as `tandem export` writes it for this config, with fresh weights; trainable parameters)."""
    import torch

    from tandem.train.onnx_graph import export_onnx

    torch.manual_seed(cfg.seed)
    model = _model(cfg, classes).eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    example = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, example, path)  # the writer of a bundle's model.onnx
        return path.read_bytes(), trainable


def gemm_peaks(precisions: list[str], sizes: tuple[int, ...] = (512, 1024), seconds: float = 0.15) -> dict[str, float]:
    """FLOP/s of PyTorch's matrix product per precision on this CPU (best run over a few sizes, as
    tandem.hardware.probe.gemm_flops): what a training step can reach."""
    import torch

    peaks = {}
    for precision in precisions:
        for n in sizes:
            a = torch.randn(n, n).to(_dtype(precision))
            out = torch.empty_like(a)
            torch.mm(a, a, out=out)
            best, runs, stop = float("inf"), 0, time.perf_counter() + seconds
            while runs < 3 or time.perf_counter() < stop:
                start = time.perf_counter()
                torch.mm(a, a, out=out)
                best = min(best, time.perf_counter() - start)
                runs += 1
            peaks[precision] = max(peaks.get(precision, 0.0), 2 * n**3 / best)
    return peaks


def saved_activation_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `forward()` runs (each storage once;
    the parameters themselves not counted): the activation memory of a training step."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(storages.values())


def measure_training_step(cfg, classes: int, batch: int, precision: str, seconds: float = 2.0) -> dict:
    """Time the training loop's step (forward, backward, optimizer) on random images of the config's shape, in the
    loop's settings (channels_last, its optimizer, autocast, deterministic CPU kernels); no data loading or
    augmentation. Returns the median and best step time and the activation bytes autograd saved."""
    import torch
    import torch.nn.functional as F

    from tandem.train.optim import make_optimizer
    from tandem.train.models import count_parameters

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the loop runs on CPU
    try:
        torch.manual_seed(cfg.seed)
        memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
        model = _model(cfg, classes).to(memory_format=memory_format).train()
        optimizer = make_optimizer(cfg, model.named_parameters())
        x = torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, classes, (batch,))
        amp = _dtype(precision) if precision != "fp32" else None

        def forward() -> torch.Tensor:
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x).float()
            return F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)

        def step() -> None:
            forward().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        activation_bytes = saved_activation_bytes(model, forward)
        optimizer.zero_grad(set_to_none=True)
        step()  # warm-up: kernels chosen, optimizer state made
        times, stop = [], time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < stop and len(times) < 500):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        times.sort()
        return {"precision": precision, "batch": batch, "steps": len(times), "median_s": times[len(times) // 2],
                "best_s": times[0], "activation_bytes": activation_bytes,
                "trainable_parameters": count_parameters(model)}
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

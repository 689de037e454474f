"""What the loop carries: the run's fixed parts (set up once, before the first step) and its state from step to
step (LoopState, saved as JSON in each checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tandem.config import TrainConfig
from tandem.train.parallel.engine import Engine
from tandem.train.parallel.group import Dist


def no_examples() -> dict:
    return {"loss": 0.0, "correct": 0.0, "count": 0}


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides tensors; saved as JSON in each checkpoint."""

    step: int = 0
    best_val: float = -1.0
    best_step: int | None = None  # the checkpoint export ships; None without a validation split
    bad_epochs: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    running: dict = field(default_factory=no_examples)
    stopped_early: bool = False
    init_from: dict | None = None  # the bundle a fine-tuning run started from (its provenance)
    comm_bytes: int = 0  # bytes all processes had communicated at the last checkpoint (see Engine.report)


@dataclass
class Run:
    """One run's fixed parts, filled in by the loop's set-up steps in order: where and how it runs, its data,
    its model and engine, its optimizer and schedule."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    log: Callable
    run_dir: Path
    precision: str
    amp_dtype: torch.dtype | None
    # data
    splits: Any = None  # Splits or FileSplits
    fingerprint: str = ""  # of the training images: a resumed run must see the same
    train_data: Any = None
    val_data: Any = None
    background: torch.Tensor | None = None  # a black pixel after preprocessing: what a shifted image's border shows
    # model, engine, optimizer
    memory_format: torch.memory_format = torch.contiguous_format
    compiled: str = "off"  # graphs.resolve: off, inductor or graphs
    capture: bool = False  # compile=graphs on CUDA: the step is captured in a CUDA graph
    engine: Engine | None = None
    optimizer: torch.optim.Optimizer | None = None
    augment_rng: torch.Generator | None = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    val_batches: list = field(default_factory=list)
    metrics_path: Path | None = None
    threads: Any = None  # train.device.ThreadWatch: the CPU threads, revised while an automatic choice trains

    @property
    def classes(self) -> list[str]:
        return self.splits.train.classes

    @property
    def streamed(self) -> bool:
        return bool(self.splits.train.decode.get("streamed"))

    @property
    def layout(self) -> dict:
        """How the run is parallel, as its checkpoints record it (resume must match it)."""
        return {"strategy": self.engine.strategy, "processes": self.dist.world}

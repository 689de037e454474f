"""Parallelism, applied to a built single-device model from outside: the loop talks to an Engine, the same calls
under every strategy, so the loop is one.

    group.py        the process group (Dist, init_distributed): torchrun's environment, collectives
    engine.py       the Engine base: one process, and what every strategy shares
    data.py         ddp and local-sgd
    tensor.py       tensor parallel (DTensor)
    pipeline.py     pipeline parallel (torch.distributed.pipelining)
    optim_state.py  optimizer state in the one-process (checkpoint) layout

`tandem train` without torchrun is the one-process case of the same code: no process group, every
collective a no-op, the model unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tandem.train.parallel.data import DataParallel, LocalSGD
from tandem.train.parallel.engine import Engine
from tandem.train.parallel.group import Dist


def make_engine(cfg, dist_: Dist, model: nn.Module, loss_fn: Callable, autocast: Callable,
                device: torch.device) -> Engine:
    """The engine for cfg.parallel.strategy; one process gets the plain engine whatever the strategy."""
    par = cfg.parallel
    if dist_.world == 1:
        return Engine(dist_, model, loss_fn, autocast)
    if par.strategy == "ddp":
        return DataParallel(dist_, model, loss_fn, autocast, device)
    if par.strategy == "local-sgd":
        return LocalSGD(dist_, model, loss_fn, autocast, par.average_every)
    if par.strategy == "tensor":
        from tandem.train.parallel.tensor import TensorParallel

        return TensorParallel(cfg, dist_, model, loss_fn, autocast, device)
    from tandem.train.parallel.pipeline import PipelineParallel

    return PipelineParallel(cfg, dist_, model, loss_fn, autocast, device)

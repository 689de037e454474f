"""The Engine: how this process runs its part of a step, the same calls under every strategy. This base class is
the one-process engine; data.py, tensor.py and pipeline.py subclass it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tandem.train.parallel.group import Dist


def decay_split(named) -> tuple[list, list]:
    """(name, parameter) pairs -> (weights that get weight decay, biases and norms that do not): make_optimizer's
    two param groups, in this order."""
    named = list(named)
    return [(n, p) for n, p in named if p.ndim > 1], [(n, p) for n, p in named if p.ndim <= 1]


def optimizer_order(model: nn.Module) -> list[str]:
    """Parameter names in the order make_optimizer lists them: the indices a one-process checkpoint uses for
    optimizer state, which every strategy writes too."""
    decay, no_decay = decay_split(model.named_parameters())
    return [n for n, _ in decay + no_decay]


class Engine:
    """How this process runs its part of a step. The loop calls, under every strategy:

        engine.named_parameters()           what this process's optimizer updates (full-model names)
        engine.wrap_optimizer(opt)          the optimizer the loop steps (local-sgd wraps it)
        engine.forward_backward(x, y, w)    one chunk of this process's share -> (loss sum, correct, count)
        engine.compile()                    compile=inductor: torch.compile what forward_backward runs
        engine.sync(opt)                    before evaluation and checkpoints: every process holds the full state
        engine.model                        the whole single-device module, current after sync()
        engine.full_optimizer_state(opt)    optimizer.state_dict() as one process would write it
        engine.load_state(model_sd, opt, optim_sd)   resume: each process takes its part

    `data_rank` / `data_world` say which strided share of each global batch this process trains on.
    forward_backward returns (0, 0, 0) where another process reports the same examples (tensor ranks > 0,
    pipeline stages before the last), so metrics summed over every process count each example once.
    `comm_bytes` counts the bytes this process handed to gradient / parameter collectives.
    """

    strategy = "single"
    data_rank = 0
    data_world = 1
    splits_batch = False  # True: forward_backward takes the whole share at once (pipeline micro-batches)

    def __init__(self, dist_: Dist, model: nn.Module, loss_fn: Callable, autocast: Callable) -> None:
        self.dist, self.model, self.loss_fn, self.autocast = dist_, model, loss_fn, autocast
        self.forward_module: Callable = model  # what forward_backward runs: the model, or DDP around it
        self.comm_bytes = 0

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def _forward(self, module: nn.Module, x, y, weight: float):
        with self.autocast():
            logits = module(x)
            loss = self.loss_fn(logits.float(), y)
        (loss * (weight * self.data_world)).backward()
        return loss.detach() * len(y), (logits.detach().argmax(1) == y).sum(), len(y)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, weight: float, last: bool = True):
        """Forward and backward of one chunk; `weight` = the chunk's share of the global batch, so the summed
        (all-reduced) gradient is the mean over the global batch. Returns (sum of losses, correct) as 0-d tensors
        on the device (read once per logging interval, not per step) and the number of examples."""
        return self._forward(self.forward_module, x, y, weight)

    def compile(self) -> None:
        """compile=inductor: torch.compile what forward_backward runs (evaluation stays eager: no recompiles for
        its batch sizes and eval mode)."""
        self.forward_module = torch.compile(self.forward_module)

    def after_step(self) -> None:
        """After optimizer.step()."""

    def sync(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every process hold the same, whole model (and optimizer state) before evaluation / checkpoints."""

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return inner_optimizer(optimizer).state_dict()

    def load_state(self, model_state: dict, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        self.model.load_state_dict(model_state)
        inner_optimizer(optimizer).load_state_dict(optimizer_state)

    def resume_at(self, step: int) -> None:
        """Resume: counters the engine keeps (local-sgd's averaging clock) continue from `step`."""

    def report(self) -> dict:
        """Figures for metrics.jsonl and results.json: comm_bytes, the bytes every process together has handed
        to gradient / parameter / activation transfers so far (and the pipeline bubble). A collective: every
        process calls it."""
        if self.dist.world == 1:
            return {}
        total = self.dist.all_reduce_sum(torch.tensor([self.comm_bytes], dtype=torch.float64))
        return {"comm_bytes": int(total.item())}

    def describe(self) -> str:
        return "one process"


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The plain optimizer inside local-sgd's PostLocalSGDOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optim", optimizer)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def no_metrics(device: torch.device):
    """forward_backward's (loss sum, correct, count) on a process that reports no examples (see Engine)."""
    return torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), 0

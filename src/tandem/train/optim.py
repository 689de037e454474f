"""The optimizer and its learning rate: make_optimizer's two param groups, the lr as a pure function of the step."""

from __future__ import annotations

import math

import torch

from tandem.config import TrainConfig
from tandem.train.parallel.engine import decay_split, inner_optimizer


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * min(1.0, max(0.0, fraction)))) / 2


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    """The lr at an optimizer step: a pure function of the step, so resume needs no scheduler state.

    onecycle = torch's OneCycleLR (cosine from peak/25 up to peak, then down to peak/25/1e4), except
    when the warm-up is shorter than one step (warmup_fraction * total < 1, e.g. warmup_fraction=0):
    step 0 is then the peak, where torch starts a little below it (and divides by zero at total = 4);
    cosine = torch's CosineAnnealingLR to 0; constant = the peak."""
    peak, sched = cfg.optim.lr, cfg.schedule
    if sched.name == "constant":
        return peak
    if sched.name == "cosine":
        return _cosine(peak, 0.0, step / total)
    start, floor = peak / 25, peak / 25 / 1e4
    # On runs of a few steps the warm-up ends at step 0: it then starts at the peak.
    warm_end = max(0.0, sched.warmup_fraction * total - 1)
    if step <= warm_end:
        return _cosine(start, peak, step / warm_end) if warm_end > 0 else peak
    return _cosine(peak, floor, (step - warm_end) / max(1e-9, total - 1 - warm_end))


def make_optimizer(cfg: TrainConfig, named_parameters, capturable: bool = False) -> torch.optim.Optimizer:
    """Over (name, parameter) pairs, grouped by parallel.engine.decay_split (checkpoints rely on its order).
    capturable (compile=graphs): an optimizer whose step can be recorded in a CUDA graph and reads its learning rate
    from a device tensor: SGD's fused CUDA kernel, AdamW's capturable path."""
    decay, no_decay = decay_split(named_parameters)  # no weight decay on biases and batch-norm parameters
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.momentum > 0,
                               **({"fused": True} if capturable else {}))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, capturable=capturable)
    # Its warm-up steps and each epoch's short last batch run uncaptured on purpose: no warning about it.
    optimizer._warned_capturable_if_run_uncaptured = capturable
    return optimizer


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """make_optimizer's capturable choice again, after load_state_dict brought back the checkpoint's (a run
    resumed with another `compile`): SGD fused or not, AdamW capturable or not, with its step counters on the
    device (capturable) or the CPU, as torch keeps them."""
    inner = inner_optimizer(optimizer)  # local-sgd's PostLocalSGDOptimizer wraps the real one
    for group in inner.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable
        elif "fused" in group:
            group["fused"] = True if capturable else None
        for param in group["params"]:
            step = inner.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                inner.state[param]["step"] = step.to(param.device if capturable else "cpu", torch.float32)
    inner._warned_capturable_if_run_uncaptured = capturable


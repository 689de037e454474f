"""Data parallelism: every process holds the whole model and trains on its share of each batch.

    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=ddp          # all-reduce gradients
    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=local-sgd    # average weights every H steps
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from tandem.train.parallel.engine import Engine, inner_optimizer, tensor_bytes
from tandem.train.parallel.group import Dist


class DataParallel(Engine):
    """parallel.strategy=ddp: DistributedDataParallel all-reduces the gradients of every step."""

    strategy = "ddp"

    def __init__(self, dist_: Dist, model: nn.Module, loss_fn, autocast, device: torch.device) -> None:
        super().__init__(dist_, model, loss_fn, autocast)
        self.data_rank, self.data_world = dist_.rank, dist_.world
        # broadcast_buffers=False: no collective before each forward to copy rank 0's batch-norm statistics (the
        # forward of a training step normalises with the batch's own statistics; rank 0's running ones, which
        # only its own shares ever update, are copied to every process in sync()). gradient_as_bucket_view:
        # the gradients live in DDP's all-reduce buckets, one copy fewer per step.
        self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                       broadcast_buffers=False, gradient_as_bucket_view=True)
        self.ddp.register_comm_hook(self, _counting_allreduce)
        self.forward_module = self.ddp

    def forward_backward(self, x, y, weight, last=True):
        # Micro-batches of one step (optim.grad_accum) all-reduce once, with the last one.
        with self.ddp.no_sync() if not last else nullcontext():
            return self._forward(self.forward_module, x, y, weight)

    def sync(self, optimizer) -> None:
        # Weights agree after every step; batch-norm running statistics do not (each process updates them from
        # its own share): evaluate and save rank 0's everywhere.
        for buffer in self.model.buffers():
            self.dist.broadcast(buffer, 0)

    def describe(self) -> str:
        return f"ddp over {self.dist.world} processes ({self.dist.backend})"


def _counting_allreduce(engine, bucket):  # no annotations: DDP checks them against its own, unresolved
    """DDP's default all-reduce (sum, then divide by the world size), counting the bytes it sends."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    engine.comm_bytes += tensor_bytes([bucket.buffer()])
    return allreduce_hook(None, bucket)


class LocalSGD(Engine):
    """parallel.strategy=local-sgd: each process takes `average_every` steps on its own shard, then the
    parameters are averaged (torch.distributed.algorithms' PeriodicModelAverager in a PostLocalSGDOptimizer).
    sync() also averages buffers and optimizer state, so a checkpoint holds one state for every process."""

    strategy = "local-sgd"

    def __init__(self, dist_: Dist, model: nn.Module, loss_fn, autocast, average_every: int) -> None:
        super().__init__(dist_, model, loss_fn, autocast)
        self.data_rank, self.data_world = dist_.rank, dist_.world
        self.period = average_every
        self.averager = None
        self._strides = [p.stride() for p in model.parameters()]
        # Every process starts from rank 0's weights (they match already: same seed; this makes sure).
        for tensor in self.model.state_dict().values():
            dist_.broadcast(tensor, 0)

    def wrap_optimizer(self, optimizer):
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )
        from torch.distributed.optim import PostLocalSGDOptimizer

        # The averager averages after its step counter reaches warmup_steps, then every `period` steps:
        # warmup_steps = period - 1 averages after steps H, 2H, 3H, ... (counting from 1).
        self.averager = PeriodicModelAverager(period=self.period, warmup_steps=self.period - 1)
        return PostLocalSGDOptimizer(optimizer, self.averager)

    def after_step(self) -> None:
        done = self.averager.step  # PostLocalSGDOptimizer.step has already advanced it
        if done >= self.period and done % self.period == 0:
            self.comm_bytes += tensor_bytes(self.model.parameters())
            # The averager writes the averages back as contiguous views of one flat buffer, dropping the
            # channels_last layout: convs would slow down, and a resumed run (whose weights keep their layout)
            # would pick other kernels and round differently. Give each weight its own layout back.
            with torch.no_grad():
                for param, stride in zip(self.model.parameters(), self._strides):
                    if param.stride() != stride:
                        param.data = torch.empty_strided(param.shape, stride, dtype=param.dtype,
                                                         device=param.device).copy_(param.data)

    def resume_at(self, step: int) -> None:
        self.averager.step = step

    def load_state(self, model_state, optimizer, optimizer_state) -> None:
        super().load_state(model_state, optimizer, optimizer_state)
        # PostLocalSGDOptimizer keeps the inner optimizer's param_groups list as it was when it was made (its own
        # load_state_dict too); the inner load_state_dict replaces it, so without this the loop would set the lr
        # on groups nobody reads.
        optimizer.param_groups = optimizer.optim.param_groups

    def sync(self, optimizer) -> None:
        world = float(self.dist.world)
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        for state in inner_optimizer(optimizer).state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim]
        for tensor in tensors:
            self.dist.all_reduce_sum(tensor).div_(world)
        self.comm_bytes += tensor_bytes(tensors)

    def describe(self) -> str:
        return (f"local-sgd over {self.dist.world} processes ({self.dist.backend}), parameters averaged every "
                f"{self.period} steps")

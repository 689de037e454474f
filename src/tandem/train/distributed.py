"""Processes and data parallelism: the process group from torchrun's environment, DDP, parameter averaging.

    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=ddp          # all-reduce gradients
    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=local-sgd    # average weights every H steps

`tandem train` without torchrun is the one-process case of the same code: no process group, every
collective a no-op, the model unwrapped. The loop talks to an Engine (this module: one process, ddp,
local-sgd; train/parallel.py: tensor and pipeline); every engine takes the same calls, so the loop is one.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tandem.errors import UserError
from tandem.train.device import pick_device


@dataclass
class Dist:
    """This process's place in the job. world == 1: no process group, collectives do nothing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
        if self.world > 1:
            dist.broadcast(tensor, src=src, group=group)
        return tensor

    def from_main(self, fn: Callable, share: bool = True):
        """fn() on rank 0; its result (share=True) or its error on every process. Decisions that must agree
        (the run folder, which checkpoint) are made once, by rank 0."""
        if self.world == 1:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                result = fn()
            except UserError as err:
                dist.broadcast_object_list([("error", str(err))], src=0)
                raise
            except BaseException as err:
                dist.broadcast_object_list([("error", f"rank 0 failed: {type(err).__name__}: {err}")], src=0)
                raise
            box = [("ok", result if share else None)]
            dist.broadcast_object_list(box, src=0)
            return result
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's `tensor` (same shape everywhere), in rank order, on every process."""
        if self.world == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor)
        return out

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None) -> dict:
        """Rank 0's tensors (name -> tensor) on every process."""
        if self.world == 1:
            return tensors
        meta = [[(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
                if self.is_main else None]
        dist.broadcast_object_list(meta, src=0)
        device = "cuda" if self.backend == "nccl" else "cpu"
        out = {}
        for name, shape, dtype in meta[0]:
            t = (tensors[name].to(device) if self.is_main
                 else torch.empty(shape, dtype=getattr(torch, dtype), device=device))
            dist.broadcast(t, src=0)
            out[name] = t.cpu()
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def peer_lost(err: BaseException) -> str | None:
    """The first line of a collective's error when it says another process of the job has gone, else None."""
    text = str(err)
    return text.strip().splitlines()[0][:300] if isinstance(err, RuntimeError) and any(
        marker in text for marker in _PEER_GONE) else None


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; start tandem with torchrun or unset them") from None


def init_distributed(device_name: str, timeout: int) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (gloo on CPU, nccl on GPU; collectives give up after `timeout` s)."""
    rank, world, local_rank = launched()
    if world <= 1:
        return Dist(), pick_device(device_name)
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) on this machine; "
                            "give torchrun --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout), device_id=device if device.type == "cuda" else None)
    except KeyError as err:
        raise UserError(f"{err.args[0]} is not set; start tandem with torchrun (it sets MASTER_ADDR, MASTER_PORT, "
                        "RANK, WORLD_SIZE)") from None
    except (RuntimeError, ValueError) as err:  # DistStoreError and friends derive from RuntimeError
        raise UserError(f"could not join the process group ({backend}) within {timeout} s: {err}; check that every "
                        "node runs the same torchrun command and can reach --rdzv-endpoint") from None
    return Dist(rank, world, local_rank, backend), device


def _attempt_store(rank: int, world: int, timeout: int) -> dist.Store:
    """The job's key-value store, under a prefix of its own for each torchrun restart: after a rank fails and
    torchrun --max-restarts starts every process again, the store still holds the first attempt's keys, and a
    process reading the dead processes' addresses from them fails to connect ("Connection refused")."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it (plain env://)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timedelta(seconds=timeout),
                          multi_tenant=True)
    return dist.PrefixStore(f"tandem/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
        return _inner(optimizer).state_dict()

    def load_state(self, model_state: dict, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        self.model.load_state_dict(model_state)
        _inner(optimizer).load_state_dict(optimizer_state)

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


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The plain optimizer inside local-sgd's PostLocalSGDOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optim", optimizer)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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

    engine.comm_bytes += _tensor_bytes([bucket.buffer()])
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
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        # The averager averages after its step counter reaches warmup_steps, then every `period` steps:
        # warmup_steps = period - 1 averages after steps H, 2H, 3H, ... (counting from 1).
        self.averager = PeriodicModelAverager(period=self.period, warmup_steps=self.period - 1)
        return PostLocalSGDOptimizer(optimizer, self.averager)

    def after_step(self) -> None:
        done = self.averager.step  # PostLocalSGDOptimizer.step has already advanced it
        if done >= self.period and done % self.period == 0:
            self.comm_bytes += _tensor_bytes(self.model.parameters())
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
        for state in _inner(optimizer).state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim]
        for tensor in tensors:
            self.dist.all_reduce_sum(tensor).div_(world)
        self.comm_bytes += _tensor_bytes(tensors)

    def describe(self) -> str:
        return (f"local-sgd over {self.dist.world} processes ({self.dist.backend}), parameters averaged every "
                f"{self.period} steps")


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
    from tandem.train import parallel

    if par.strategy == "tensor":
        return parallel.TensorParallel(cfg, dist_, model, loss_fn, autocast, device)
    return parallel.PipelineParallel(cfg, dist_, model, loss_fn, autocast, device)

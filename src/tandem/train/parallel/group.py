"""The process group: this process's place in the job (from torchrun's environment) and the collectives the
loop and the engines use. Without torchrun, world == 1: no process group, every collective a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

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


def broadcast_into(tensor: torch.Tensor, group, group_src: int) -> None:
    """Broadcast in place (through a contiguous copy when the tensor is not, e.g. channels_last weights)."""
    buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
    dist.broadcast(buffer, group=group, group_src=group_src)
    if buffer is not tensor:
        tensor.copy_(buffer)

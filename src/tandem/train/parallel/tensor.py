"""Tensor parallelism, applied to a built single-device model from outside.

    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=tensor model.name=mlp

TensorParallel shards layers with DTensor (torch.distributed.tensor.parallel.parallelize_module and the plan
beside each model in models.TENSOR_PLANS). It takes a data dimension (parallel.data): a DeviceMesh (data,
tensor), gradients averaged over the data replicas. It keeps `engine.model`, a plain full single-device copy,
current after sync(): what the loop evaluates and checkpoints, in the same format as one process.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from tandem.errors import UserError
from tandem.train.parallel.engine import (
    Engine,
    inner_optimizer,
    no_metrics,
    optimizer_order,
    tensor_bytes,
)
from tandem.train.parallel.group import Dist, broadcast_into
from tandem.train.parallel.optim_state import full_format, local_format, state_by_name

_COLLECTIVES = {"all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
                "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast"}


class _CollectiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes handed to torch's functional collectives (what DTensor redistributions run), like
    torch.distributed.tensor.debug.CommDebugMode counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into plain ops and collectives first
        if func.namespace in ("_c10d_functional", "c10d_functional") and func._opname.rstrip("_") in _COLLECTIVES:
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            self.bytes += tensor_bytes([a for a in flat if isinstance(a, torch.Tensor)])
        return func(*args, **kwargs)


def _replicated_input(module, inputs, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                 if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)


def _local_output(module, output, mesh):
    from torch.distributed.tensor import DTensor

    return output.full_tensor() if isinstance(output, DTensor) else output


class TensorParallel(Engine):
    """parallel.strategy=tensor: the children named by the model's plan (models.TENSOR_PLANS) are sharded over
    the processes of a tensor group with torch's ColwiseParallel / RowwiseParallel; every other parameter and
    buffer is a replicated DTensor (distribute_module). Every tensor rank runs the same batch; with
    parallel.data=D the processes form a (data, tensor) mesh and gradients are averaged over the data group.

    mlp: Linear 1 column-wise, Linear 2 row-wise, head column-wise with replicated (all-gathered) logits.
    cnn: only the head Linear is sharded (column-wise, logits all-gathered); convs and batch norms replicated.
    """

    strategy = "tensor"

    def __init__(self, cfg, dist_: Dist, model: nn.Module, loss_fn, autocast, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_module
        from torch.distributed.tensor.parallel import parallelize_module

        from tandem.train.models import TENSOR_PLANS

        super().__init__(dist_, model, loss_fn, autocast)
        name, data, world = cfg.model.name, cfg.parallel.data, dist_.world
        if name not in TENSOR_PLANS:
            raise UserError(f"model {name} has no tensor-parallel plan; use parallel.strategy=ddp or pipeline, "
                            "or model.name=mlp/cnn")
        if world % data:
            raise UserError(f"parallel.data={data} does not divide the {world} processes; start a multiple of "
                            f"{data} processes or set parallel.data to a divisor of {world}")
        self.device, self.tensor_world = device, world // data
        self.mesh = init_device_mesh(device.type, (data, self.tensor_world), mesh_dim_names=("data", "tensor"))
        self.data_rank, self.data_world = self.mesh.get_local_rank("data"), data
        self.tensor_rank = self.mesh.get_local_rank("tensor")
        self.data_group = self.mesh.get_group("data") if data > 1 else None
        tp_mesh = self.mesh["tensor"]
        # self.model stays the plain single-device model; the sharded one is a copy.
        self.module = copy.deepcopy(model)
        plan = TENSOR_PLANS[name](self.module)
        parallelize_module(self.module, tp_mesh, plan)
        distribute_module(self.module, tp_mesh, input_fn=_replicated_input, output_fn=_local_output)
        self.plan = {child: type(style).__name__ for child, style in plan.items() if "Parallel" in type(style).__name__}
        self._names = {id(p): n for n, p in self.module.named_parameters()}
        self._bytes_per_row: float | None = None

    def named_parameters(self):
        return list(self.module.named_parameters())

    def forward_backward(self, x, y, weight, last=True):
        if self._bytes_per_row is None:  # measure the collectives of one chunk, then scale with its rows
            with _CollectiveBytes() as counter:
                result = self._forward(self.module, x, y, weight)
            self._bytes_per_row = counter.bytes / max(1, len(y))
        else:
            result = self._forward(self.module, x, y, weight)
        self.comm_bytes += int(self._bytes_per_row * len(y))
        if last and self.data_group is not None:
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                     for p in self.module.parameters() if p.grad is not None]
            for g in grads:
                dist.all_reduce(g, group=self.data_group)
                g.div_(self.data_world)
            self.comm_bytes += tensor_bytes(grads)
        return result if self.tensor_rank == 0 else no_metrics(self.device)

    def _full_state(self) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.module.state_dict().items()}

    def sync(self, optimizer) -> None:
        """Copy the gathered (full) weights and buffers into self.model; buffers from data replica 0."""
        params = set(self._names.values())
        with torch.no_grad():
            plain = self.model.state_dict()
            for key, value in self._full_state().items():
                if self.data_group is not None and value.is_floating_point() and key not in params:
                    broadcast_into(value, self.data_group, 0)
                plain[key].copy_(value)

    def full_optimizer_state(self, optimizer) -> dict:
        """Collective: every process of the job calls it; returns the one-process format on every process."""
        groups, hyper, state = state_by_name(inner_optimizer(optimizer), self._names)
        state = {n: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in st.items()}
                 for n, st in state.items()}
        return full_format(groups, hyper, state, optimizer_order(self.model))

    def _localize(self, name: str, full: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        like = dict(self.module.named_parameters()).get(name)
        if like is None:
            like = dict(self.module.named_buffers())[name]
        if isinstance(like, DTensor):  # every process holds the full tensor: each takes its shard, no comm
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                     src_data_rank=None)
        return full.to(like.device, like.dtype)

    def load_state(self, model_state, optimizer, optimizer_state) -> None:
        self.model.load_state_dict(model_state)
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                local = self._localize(key, model_state[key])
                (value.to_local() if hasattr(value, "to_local") else value).copy_(
                    local.to_local() if hasattr(local, "to_local") else local)
        inner = inner_optimizer(optimizer)
        inner.load_state_dict(local_format(inner, self._names, optimizer_state, optimizer_order(self.model),
                                            self._localize))

    def describe(self) -> str:
        plan = ", ".join(f"{child} {style}" for child, style in self.plan.items())
        data = f" x {self.data_world} data replicas" if self.data_world > 1 else ""
        return (f"tensor parallel over {self.tensor_world} processes{data} ({self.dist.backend}): {plan}; "
                "every other layer replicated")

"""Pipeline parallelism, applied to a built single-device model from outside.

    torchrun --nproc-per-node 2 -m tandem train parallel.strategy=pipeline parallel.microbatches=8
    torchrun --nproc-per-node 4 -m tandem train parallel.strategy=pipeline parallel.data=2   # 2 replicas x 2 stages

PipelineParallel cuts the model's top-level nn.Sequential into stages and runs them with
torch.distributed.pipelining (GPipe or 1F1B). It takes a data dimension (parallel.data): a DeviceMesh (data,
pipe), gradients averaged over the data replicas. It keeps `engine.model`, a plain full single-device copy,
current after sync(): what the loop evaluates and checkpoints, in the same format as one process.
"""

from __future__ import annotations

import time
from collections import OrderedDict

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


def _trace(model: nn.Sequential, example: torch.Tensor, autocast) -> list[tuple[float, torch.Size, torch.dtype]]:
    """(estimated cost, output shape per example, output dtype) of each child: FLOPs counted by torch's
    FlopCounterMode on one example (eval mode: no batch-norm statistics move), plus one per output element for
    the layers FLOPs miss (batch norm, activations, pooling)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad(), autocast():
            h = example
            for child in model.children():
                with FlopCounterMode(display=False) as counter:
                    h = child(h)
                rows.append((float(counter.get_total_flops() + h[0].numel()), h.shape[1:], h.dtype))
    finally:
        model.train(was_training)
    return rows


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Start index of each of `parts` contiguous, non-empty runs of `costs` that minimise the largest run's sum."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-run over costs[:i] cut into k runs; cut[k][i]: where the last run starts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


class _ContiguousGrad(torch.autograd.Function):
    """A copy whose backward makes the gradient contiguous: what a stage sends back must have the layout of
    the previous stage's receive buffer (a conv in channels_last would hand back a channels_last gradient).
    A copy, not a view: a stage may start with an in-place layer (the mlp's second stage starts at a ReLU)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_input(module, inputs):
    return tuple(_ContiguousGrad.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs)


def _contiguous_output(module, inputs, output):
    return output.contiguous()


class PipelineParallel(Engine):
    """parallel.strategy=pipeline: the model's top-level nn.Sequential cut into `stages` contiguous runs of
    children balanced by estimated FLOPs, one stage per process of a pipe group, run by torch.distributed.pipelining
    (PipelineStage + ScheduleGPipe / Schedule1F1B). With parallel.data=D the processes form a (data, pipe) mesh:
    each data replica is a pipeline, and each stage's gradients are averaged over its replicas by one all-reduce
    on the data group after the schedule. (Not a DDP-wrapped stage, which pipelining supports and which works on
    gloo: DDP all-reduces once per schedule step, and a share that does not split evenly takes two schedule
    steps on some replicas and one on others, which would leave the replicas' collectives out of step.)

    forward_backward takes this replica's whole share of the batch (splits_batch): its rows are reordered so
    that the schedule's contiguous micro-batch m holds rows m::microbatches, the strided chunks one process
    with optim.grad_accum = microbatches would take; each micro-batch's mean loss is weighted by its share of the
    global batch, so the step equals that one-process step. Batch norm sees the same micro-batches in the same
    order (GPipe and 1F1B run forwards in order). The stages exchange fixed shapes, so a share that does not
    split evenly (the last batch of an epoch) runs as two schedule steps, the larger micro-batches first, as
    strided chunks are (k::m is one row longer for the first share % m chunks): the same step again.
    """

    strategy = "pipeline"
    splits_batch = True

    def __init__(self, cfg, dist_: Dist, model: nn.Module, loss_fn, autocast, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(dist_, model, loss_fn, autocast)
        par, world = cfg.parallel, dist_.world
        data = par.data
        stages = par.stages or world // data
        micro = par.microbatches
        children = list(model.named_children()) if isinstance(model, nn.Sequential) else []
        if not children:
            raise UserError(f"model {cfg.model.name} is not a top-level nn.Sequential; pipeline needs one")
        if stages < 1 or data * stages != world:
            raise UserError(f"parallel.data={data} x parallel.stages={stages} = {data * stages} processes, but "
                            f"{world} were started; start {data * max(stages, 1)} processes or set parallel.stages=0 "
                            f"(= processes / parallel.data)")
        if stages > len(children):
            raise UserError(f"parallel.stages={stages} but model {cfg.model.name} has only {len(children)} layers "
                            f"to split; use at most {len(children)} stages")
        if par.schedule == "1f1b" and micro < stages:
            raise UserError(f"parallel.schedule=1f1b needs parallel.microbatches >= stages ({micro} < {stages}); "
                            f"set parallel.microbatches={stages} or more, or parallel.schedule=gpipe")
        if cfg.batch_size % (data * micro):
            raise UserError(f"batch_size={cfg.batch_size} is not a multiple of parallel.data x parallel.microbatches"
                            f" = {data} x {micro}; choose a batch size divisible by {data * micro}")
        self.device, self.stages, self.microbatches, self.schedule_name = device, stages, micro, par.schedule
        self.mesh = init_device_mesh(device.type, (data, stages), mesh_dim_names=("data", "pipe"))
        self.data_rank, self.data_world = self.mesh.get_local_rank("data"), data
        self.stage_index = self.mesh.get_local_rank("pipe")
        self.pipe_group = self.mesh.get_group("pipe")
        self.data_group = self.mesh.get_group("data") if data > 1 else None

        # Where to cut: a trace of one example at the configured image size.
        param = next(model.parameters())
        example = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=param.device)
        trace = _trace(model, example, autocast)
        starts = balanced_split([cost for cost, _, _ in trace], stages) + [len(children)]
        self.split = [[name for name, _ in children[starts[s]:starts[s + 1]]] for s in range(stages)]
        self.stage_costs = [sum(cost for cost, _, _ in trace[starts[s]:starts[s + 1]]) for s in range(stages)]
        first, end = starts[self.stage_index], starts[self.stage_index + 1]
        # Per-example (shape, dtype) of what enters and leaves this stage.
        self._in = (example.shape[1:], example.dtype) if first == 0 else trace[first - 1][1:]
        self._out = trace[end - 1][1:]

        # The stage shares its children with self.model: this process's layers of self.model are always current.
        self.stage_module = nn.Sequential(OrderedDict((name, model.get_submodule(name)) for name in self.split[
            self.stage_index]))
        if self.stage_index > 0:
            self.stage_module.register_forward_pre_hook(_contiguous_input)
        if self.stage_index < stages - 1:
            self.stage_module.register_forward_hook(_contiguous_output)
        self._names = {id(p): n for n, p in self.stage_module.named_parameters()}
        self._schedules: dict[tuple[int, int], object] = {}
        self._stepped: set[tuple[int, int]] = set()
        self._idle: list[float] = []
        self._scale = 1.0
        self._metrics: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.stages - 1

    def named_parameters(self):
        return list(self.stage_module.named_parameters())

    def _schedule(self, rows: int, count: int):
        """The schedule for `count` micro-batches of `rows` images (one per shape: the stages exchange fixed
        shapes). 1F1B needs count >= stages: fewer (an uneven last batch) run as GPipe, the same arithmetic."""
        key = (rows, count)
        if key not in self._schedules:
            from torch.distributed.pipelining import (
                PipelineStage,
                Schedule1F1B,
                ScheduleGPipe,
            )

            engine = self

            class TimedStage(PipelineStage):
                """Times this stage's own compute (forward and backward of each micro-batch, not the waits)."""

                def forward_one_chunk(self, *args, **kwargs):
                    start = time.perf_counter()
                    try:
                        return super().forward_one_chunk(*args, **kwargs)
                    finally:
                        engine._busy += time.perf_counter() - start

                def backward_one_chunk(self, *args, **kwargs):
                    start = time.perf_counter()
                    try:
                        return super().backward_one_chunk(*args, **kwargs)
                    finally:
                        engine._busy += time.perf_counter() - start

            def meta(shape_dtype, grad: bool):
                shape, dtype = shape_dtype
                return torch.empty((rows, *shape), dtype=dtype, device="meta", requires_grad=grad)

            stage = TimedStage(self.stage_module, self.stage_index, self.stages, self.device,
                               input_args=meta(self._in, not self.is_first), output_args=meta(self._out, True),
                               group=self.pipe_group)
            kind = Schedule1F1B if self.schedule_name == "1f1b" and count >= self.stages else ScheduleGPipe
            self._schedules[key] = kind(stage, count, loss_fn=self._loss, scale_grads=False)
        return self._schedules[key]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        loss = self.loss_fn(logits.float(), y)
        self._metrics.append((loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()))
        self._busy += time.perf_counter() - start
        return loss * self._scale

    def forward_backward(self, x, y, weight, last=True):
        """This replica's whole share of the step (call once per step). Collective over the pipeline (and, with
        last=True, over the data group)."""
        n, micro = len(y), self.microbatches
        # Reordered so that contiguous micro-batch k is rows k::micro of the share (strided chunks); the chunks'
        # sizes fall from ceil(n / micro) to floor(n / micro): one schedule step per size.
        order = torch.cat([torch.arange(k, n, micro, device=y.device) for k in range(min(n, micro))])
        sizes = [len(range(k, n, micro)) for k in range(min(n, micro))]
        runs = [(rows, sizes.count(rows)) for rows in sorted(set(sizes), reverse=True)]
        self._metrics, self._busy = [], 0.0
        measured = len(runs) == 1 and runs[0] in self._stepped  # a schedule's first step exchanges metadata
        start, offset = time.perf_counter(), 0
        with self.autocast():
            for rows, count in runs:
                schedule = self._schedule(rows, count)
                part = order[offset:offset + rows * count]
                offset += rows * count
                # Each micro-batch's mean loss times its share of the global batch (times data_world: the
                # all-reduce below averages over the replicas).
                self._scale = weight * self.data_world * rows / n
                if self.is_first and self.is_last:
                    schedule.step(x[part], target=y[part])
                elif self.is_first:
                    schedule.step(x[part])
                elif self.is_last:
                    schedule.step(target=y[part])
                else:
                    schedule.step()
                self._stepped.add((rows, count))
        if measured:
            self._idle.append(max(0.0, 1.0 - self._busy / (time.perf_counter() - start)))
        self.comm_bytes += self._p2p_bytes(n)
        if last and self.data_group is not None:
            self._average_gradients()
        if not self.is_last:
            return no_metrics(self.device)
        loss = torch.stack([m[0] for m in self._metrics]).sum()
        correct = torch.stack([m[1] for m in self._metrics]).sum()
        return loss, correct, n

    def _average_gradients(self) -> None:
        """Mean of this stage's gradients over its data replicas: one all-reduce of them all, flattened."""
        grads = [p.grad for p in self.stage_module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat.div_(self.data_world)
        self.comm_bytes += tensor_bytes([flat])
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()

    def _p2p_bytes(self, rows: int) -> int:
        """Activations sent forward and their gradients sent back by this stage in one step."""
        total = 0
        for (shape, dtype), sends in ((self._out, not self.is_last), (self._in, not self.is_first)):
            if sends:
                total += rows * shape.numel() * torch.empty((), dtype=dtype).element_size()
        return total

    @property
    def bubble_formula(self) -> float:
        """GPipe's idle fraction (p-1)/(m+p-1) for p stages and m micro-batches (1F1B has the same bubble)."""
        return (self.stages - 1) / (self.microbatches + self.stages - 1)

    def report(self) -> dict:
        """Collective (the loop calls it on every process): bytes sent by all processes, and the bubble
        measured (mean over the stages) beside the formula's."""
        return {**super().report(), "bubble_measured": round(self.bubble_measured(all_stages=True), 4),
                "bubble_formula": round(self.bubble_formula, 4)}

    def bubble_measured(self, all_stages: bool = False) -> float:
        """This stage's idle fraction of the steps so far: 1 - (its forward/backward/loss compute) / (the step's
        wall time), averaged over steps (a schedule's first step, which also exchanges metadata, left out).
        all_stages=True: the mean over the stages (a collective over the pipe group: every stage must call it)."""
        mean = sum(self._idle) / len(self._idle) if self._idle else 0.0
        if all_stages:
            value = torch.tensor([mean], dtype=torch.float64)
            dist.all_reduce(value, group=self.pipe_group)
            mean = value.item() / self.stages
        return mean

    def sync(self, optimizer) -> None:
        """Every process's self.model gets every stage's weights and buffers (data replica 0's buffers)."""
        with torch.no_grad():
            if self.data_group is not None:
                for tensor in self.stage_module.buffers():
                    broadcast_into(tensor, self.data_group, 0)
            for s in range(self.stages):
                for name in self.split[s]:
                    for tensor in self.model.get_submodule(name).state_dict().values():
                        broadcast_into(tensor, self.pipe_group, s)

    def full_optimizer_state(self, optimizer) -> dict:
        """Collective over the pipe group: every stage's state, in the one-process format, on every process."""
        groups, hyper, state = state_by_name(inner_optimizer(optimizer), self._names)
        mine = {n: {k: (("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v))
                    for k, v in st.items()} for n, st in state.items()}
        gathered: list = [None] * self.stages
        dist.all_gather_object(gathered, (groups, hyper, mine), group=self.pipe_group)
        all_groups = [[name for g in gathered for name in g[0][i]] for i in range(len(groups))]
        full_state: dict[str, dict] = {}
        for s, (_, _, metas) in enumerate(gathered):
            for name, keys in metas.items():
                full_state[name] = {}
                for key, (kind, *rest) in keys.items():
                    if kind == "value":
                        full_state[name][key] = rest[0]
                        continue
                    shape, dtype = rest
                    tensor = (state[name][key].detach().clone() if s == self.stage_index
                              else torch.empty(shape, dtype=dtype, device=self.device))
                    broadcast_into(tensor, self.pipe_group, s)
                    full_state[name][key] = tensor
        return full_format(all_groups, hyper, full_state, optimizer_order(self.model))

    def load_state(self, model_state, optimizer, optimizer_state) -> None:
        self.model.load_state_dict(model_state)  # the stage's layers are self.model's
        params = dict(self.stage_module.named_parameters())
        inner = inner_optimizer(optimizer)
        inner.load_state_dict(local_format(inner, self._names, optimizer_state, optimizer_order(self.model),
                                            lambda name, v: v.to(params[name].device)))

    def describe(self) -> str:
        total = sum(self.stage_costs) or 1.0
        split = "; ".join(f"stage {s}: layers {names[0]}-{names[-1]} ({self.stage_costs[s] / total:.0%} of the FLOPs)"
                          for s, names in enumerate(self.split))
        data = f" x {self.data_world} data replicas" if self.data_world > 1 else ""
        return (f"pipeline of {self.stages} stages{data} ({self.dist.backend}), {self.schedule_name} schedule, "
                f"{self.microbatches} micro-batches per step (bubble (p-1)/(m+p-1) = {self.bubble_formula:.0%}); "
                f"{split}")

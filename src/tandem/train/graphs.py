"""How each training step runs on the device: the config key `compile`.

    compile=off        eager PyTorch, kernel by kernel (the default)
    compile=inductor   torch.compile on the model's forward (and so its backward)
    compile=graphs     the whole step captured once in a CUDA graph and replayed (CapturedStep below)
    compile=auto       graphs where it applies (a CUDA GPU, one process, the training images in GPU memory,
                       one forward and backward per step), else off

Why graphs: at the demo's batch of 128 a GPU step is a few hundred small kernels; eager PyTorch spends longer
launching them than the GPU spends running them (FIELD-NOTES.md: the demo at 31,600 images/s eager on an H100;
a prototype that captured a plain step whole ran at 164,000+ on an H200). A replay launches the recorded kernels
in one call, with no Python and no host sync in between. This capture has not yet run on a GPU (no session has
had one): benchmarks/gpu.py checks it there, after which `auto` can become the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tandem.config import TrainConfig
from tandem.errors import UserError

WARMUP_STEPS = 3  # eager steps (on a side stream) before the capture, as CUDA graph capture asks


def resolve(cfg: TrainConfig, device: torch.device, world: int, streamed: bool) -> str:
    """'off', 'inductor' or 'graphs' for this run; a one-line UserError for a choice that cannot work here."""
    mode = cfg.compile
    if mode == "inductor" and world > 1 and cfg.parallel.strategy in ("tensor", "pipeline"):
        raise UserError(f"compile=inductor works in one process and under parallel.strategy=ddp or local-sgd, "
                        f"not with parallel.strategy={cfg.parallel.strategy}; use compile=off")
    if mode == "inductor" and device.type == "cpu" and not _cxx_compiler():
        raise UserError("compile=inductor on the CPU builds C++ kernels and no C++ compiler is installed: install g++ "
                        "(apt-get install g++) or set CXX, or use compile=off")
    if mode not in ("auto", "graphs"):
        return mode
    why = None
    if device.type != "cuda":
        why = f"a CUDA graph needs a CUDA GPU and this run is on the {device.type}"
    elif world > 1:
        why = "the captured step runs in one process; under torchrun use compile=inductor or compile=off"
    elif streamed:
        why = ("the captured step reads the training images from GPU memory and this folder is streamed from disk; "
               "give data.stream=off if it fits in memory")
    elif cfg.optim.grad_accum > 1:
        why = "the captured step is one forward and backward; give optim.grad_accum=1 (or a smaller batch_size)"
    if why is None:
        return "graphs"
    if mode == "graphs":
        raise UserError(f"compile=graphs: {why}; or use compile=off")
    return "off"


def _cxx_compiler() -> str | None:
    """The compiler torch.compile's C++ backend would find: $CXX, else g++ or clang++."""
    import os
    import shutil

    return shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("clang++")


class CapturedStep:
    """compile=graphs: one whole optimizer step on a full batch, recorded once in a CUDA graph and replayed.

    What the graph holds, start to end: the batch gathered from the training split (already in GPU memory) by a
    static index tensor, the augmentation drawn on a CUDA generator (registered with the graph, so each replay
    draws new numbers) and applied, forward and backward through the engine, the optimizer's step with its
    learning rate read from a device tensor, and the loss and correct count added to the loop's running sums.
    Before a replay the loop's only work is two tiny device writes: this step's index and learning rate.

    The first WARMUP_STEPS full batches run the same body eagerly (on a side stream, as capture asks: it lets
    cuDNN and the allocator settle); a batch of another size (an epoch's last) always runs eagerly through
    the loop's own path. With `capture=False` (a CPU run in the tests) every step runs the body eagerly: the
    same arithmetic the graph records, checked against compile=off.
    """

    def __init__(self, *, x: torch.Tensor, y: torch.Tensor, batch: int, body: Callable[[torch.Tensor, torch.Tensor], None],
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, capture: bool, fallback: bool,
                 log: Callable) -> None:
        self.x, self.y, self.batch, self.body = x, y, batch, body
        self.optimizer, self.generator, self.capture, self.log = optimizer, generator, capture, log
        self.fallback = fallback  # compile=auto: a capture that fails leaves the run eager instead of ending it
        self.index = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.lr = torch.zeros((), dtype=torch.float32, device=x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream() if capture else None  # one warm-up stream: the allocator caches per stream
        self.eager_steps = 0

    def takes(self, batch_len: int) -> bool:
        return batch_len == self.batch

    def _run(self) -> None:
        self.body(self.x[self.index], self.y[self.index])

    def step(self, index: torch.Tensor, lr: float) -> None:
        """One optimizer step on the images at `index` (positions in the split, on the device) with learning rate
        `lr`; the param groups' "lr" already holds it (the loop set it) for the eager steps."""
        self.index.copy_(index, non_blocking=True)
        if self.graph is None and self.capture and self.eager_steps >= WARMUP_STEPS:
            try:
                self._record()
            except Exception as err:  # noqa: BLE001 - whatever the capture tripped on, the step itself is sound
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                if not self.fallback:
                    raise UserError(f"compile=graphs: capturing the training step in a CUDA graph failed ({first}); "
                                    "train with compile=off") from err
                self.log(f"compile=auto: capturing the training step in a CUDA graph failed ({first}); "
                         "the run goes on eagerly")
                self.capture = False
                # The capture's backward may have set gradients it never computed: an eager step starts from none.
                self.optimizer.zero_grad(set_to_none=True)
        if self.graph is not None:
            self.lr.fill_(lr)
            self.graph.replay()
            return
        if self.capture:  # warm-up on a side stream
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self._run()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.side)
        else:
            self._run()
            self.optimizer.zero_grad(set_to_none=True)
        self.eager_steps += 1

    def _record(self) -> None:
        """Capture the body once. The optimizer reads its learning rate from self.lr while it is recorded, so a
        replay takes the rate the loop wrote there; afterwards the groups hold plain numbers again for the eager
        steps. The gradients the capture made live in the graph's memory pool: the references are dropped so that
        an eager step starts from no gradient, as it always does, while the graph keeps writing its own."""
        groups = self.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph):
                self._run()
        finally:
            for group, rate in zip(groups, rates):
                group["lr"] = rate
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = graph
        self.log(f"compile=graphs: the training step is captured in one CUDA graph after {self.eager_steps} eager steps")

"""Run by tests/train/test_distributed.py under torchrun: local-sgd's averaging, seen from inside the processes.

    torchrun --standalone --nproc-per-node 2 tests/helpers/distributed_worker.py H STEPS OUT.json

Trains an mlp with the LocalSGD engine on random data (each rank its own) and records, after every
optimizer step, whether all ranks hold bitwise identical parameters.
"""

import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.config import TrainConfig
from tandem.train.models import create_model
from tandem.train.optim import make_optimizer
from tandem.train.parallel import make_engine
from tandem.train.parallel.group import init_distributed


def main() -> None:
    period, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = TrainConfig.model_validate({"parallel": {"strategy": "local-sgd", "average_every": period, "timeout": 60}})
    dist_, device = init_distributed("cpu", 60)
    torch.manual_seed(0)
    model = create_model("mlp", 1, 8, 4, width=2)
    engine = make_engine(cfg, dist_, model, F.cross_entropy, nullcontext, device)
    optimizer = engine.wrap_optimizer(make_optimizer(cfg, engine.named_parameters()))
    data = torch.Generator().manual_seed(100 + dist_.rank)
    identical = []
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=data), torch.randint(0, 4, (16,), generator=data)
        engine.forward_backward(x, y, 0.5)
        optimizer.step()
        optimizer.zero_grad()
        engine.after_step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist_.world)]
        dist.all_gather(gathered, flat)
        identical.append(all(torch.equal(gathered[0], g) for g in gathered))
    if dist_.is_main:
        with open(out, "w") as handle:
            json.dump({"identical": identical, "comm_bytes": engine.comm_bytes}, handle)
    # Leave together, then skip gloo's teardown: with the work done and its result written, a process that
    # destroys the group (or runs its C++ destructors at exit) while its peer is still closing the connections
    # can abort ("terminate called without an active exception") even after a barrier: a flaky non-zero exit.
    dist_.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

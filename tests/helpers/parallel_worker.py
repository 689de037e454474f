"""Run by tests/train/test_parallel.py under torchrun: trains tiny models with the tensor and pipeline engines and
saves what they end with (rank 0) for the test to compare with one process. Also the helpers both sides use.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/helpers/parallel_worker.py 2 OUT_DIR
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.config import TrainConfig

STEPS = 3
BATCH = 16
LAST = 13  # the last step's batch, like an epoch's last: shares that do not split into equal micro-batches
CLASSES = 5  # odd: the column-wise heads shard unevenly over 2 ranks


def make_cfg(model: str, strategy: str, data: int = 1, microbatches: int = 4, schedule: str = "gpipe",
             stages: int = 0) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"image_size": 8 if model == "mlp" else 16, "channels": 1},
        "model": {"name": model, "width": 4},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.1},
        "parallel": {"strategy": strategy, "data": data, "microbatches": microbatches, "schedule": schedule,
                     "stages": stages, "timeout": 60},
        "batch_size": BATCH, "precision": "fp32", "device": "cpu"})


def build(cfg: TrainConfig, seed: int = 0) -> torch.nn.Module:
    from tandem.train.models import create_model

    torch.manual_seed(seed)
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, CLASSES, cfg.model.width)
    memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    return model.to(memory_format=memory_format)


def batches(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    n = BATCH * STEPS
    x = torch.randn(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    steps = [order[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)]
    return x, y, steps[:-1] + [steps[-1][:LAST]]


def loss_fn(cfg: TrainConfig):
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)


def optimizer_for(cfg: TrainConfig, named_parameters) -> torch.optim.Optimizer:
    """loop.make_optimizer over the parameters an engine says its process updates."""
    from tandem.train.optim import make_optimizer

    return make_optimizer(cfg, list(named_parameters))


def reference(cfg: TrainConfig, chunks: int, steps: int = STEPS):
    """One process, optim.grad_accum = chunks, strided chunks (chunk k = rows k::chunks of each batch)."""
    model = build(cfg)
    opt = optimizer_for(cfg, model.named_parameters())
    x, y, order = batches(cfg)
    fn, losses, first_grads = loss_fn(cfg), [], None
    for step in range(steps):
        index = order[step]
        total = 0.0
        for k in range(chunks):
            chunk = index[k::chunks]
            loss = fn(model(x[chunk]).float(), y[chunk])
            (loss * (len(chunk) / len(index))).backward()
            total += loss.item() * len(chunk)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(total / len(index))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, losses, first_grads


def train(cfg: TrainConfig, dist_, device, resume_after: int | None = None) -> dict:
    """STEPS steps with the engine cfg names; with resume_after, a checkpoint round trip before that step
    (full state saved, a fresh engine built from other weights loads it and goes on)."""
    import torch.distributed as dist

    from tandem.train.parallel import make_engine

    def start(seed):
        model = build(cfg, seed)
        engine = make_engine(cfg, dist_, model, loss_fn(cfg), nullcontext, device)
        return engine, optimizer_for(cfg, engine.named_parameters())

    engine, opt = start(0)
    x, y, order = batches(cfg)
    out: dict = {"losses": [], "describe": engine.describe()}
    if engine.strategy == "tensor":  # the forward of the sharded model (eval: no batch-norm statistics move)
        engine.module.eval()
        with torch.no_grad():
            out["logits"] = engine.module(x[order[0]]).clone()
        engine.module.train()
    for step in range(STEPS):
        if step == resume_after:
            engine.sync(opt)
            model_state = {k: v.clone() for k, v in engine.model.state_dict().items()}
            optim_state = engine.full_optimizer_state(opt)
            engine, opt = start(123)
            engine.load_state(model_state, opt, optim_state)
        index = order[step]
        share = index[engine.data_rank::engine.data_world]
        loss, _, count = engine.forward_backward(x[share], y[share], len(share) / len(index))
        if step == 0 and engine.strategy == "tensor":
            out["grads"] = {n: p.grad.full_tensor() for n, p in engine.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        summed = torch.stack([loss.detach().double(), torch.tensor(float(count), dtype=torch.float64)])
        dist.all_reduce(summed)
        out["losses"].append((summed[0] / summed[1]).item())
    engine.sync(opt)
    out["model"] = {k: v.clone() for k, v in engine.model.state_dict().items()}
    out["optimizer"] = engine.full_optimizer_state(opt)
    out["comm_bytes_per_step"] = engine.comm_bytes / STEPS
    out["report"] = engine.report()
    if engine.strategy == "pipeline":
        out["bubble"] = (engine.bubble_measured(all_stages=True), engine.bubble_formula)
        out["split"] = engine.split
    return out


def scenarios(world: int) -> dict[str, tuple[TrainConfig, int | None]]:
    """name -> (config, resume_after) for a job of `world` processes."""
    if world == 2:
        return {
            "tensor-mlp": (make_cfg("mlp", "tensor"), None),
            "tensor-cnn": (make_cfg("cnn", "tensor"), None),
            "tensor-cnn-resume": (make_cfg("cnn", "tensor"), 2),
            "pipeline-gpipe-cnn": (make_cfg("cnn", "pipeline", schedule="gpipe"), None),
            "pipeline-1f1b-cnn": (make_cfg("cnn", "pipeline", schedule="1f1b"), None),
            "pipeline-gpipe-mlp": (make_cfg("mlp", "pipeline", schedule="gpipe"), None),
            "pipeline-1f1b-mlp": (make_cfg("mlp", "pipeline", schedule="1f1b"), None),
            "pipeline-1f1b-cnn-resume": (make_cfg("cnn", "pipeline", schedule="1f1b"), 2),
        }
    return {
        "pipeline-data-cnn": (make_cfg("cnn", "pipeline", data=2, microbatches=2, schedule="1f1b"), None),
        "pipeline-data-mlp-resume": (make_cfg("mlp", "pipeline", data=2, microbatches=2, schedule="gpipe"), 2),
        "tensor-data-mlp": (make_cfg("mlp", "tensor", data=2), None),
    }


def main() -> None:
    from tandem.train.parallel.group import init_distributed

    world, out_dir = int(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist_, device = init_distributed("cpu", 60)
    try:
        for name, (cfg, resume_after) in scenarios(world).items():
            result = train(cfg, dist_, device, resume_after)
            if dist_.rank == 0:
                torch.save(result, out_dir / f"{name}.pt")
    finally:
        dist_.close()


if __name__ == "__main__":
    main()

"""tandem's training loop against a plain hand-written PyTorch loop on the same work, in one run.

    python benchmarks/train_overhead.py [--steps 120] [--rounds 5] [--json]

Both sides train the default cnn (channels_last) on the embedded animals' train split, batch 128,
with the same optimizer (the default: SGD with Nesterov momentum, same momentum, peak lr and weight
decay), the same precision (tandem's `auto` choice), the same torch threads, and the same
augmentation: the plain loop calls tandem.train.augment.augment too, so the ratio measures the
framework's tax (schedule, metrics, bookkeeping), not augmentation. The plain loop does what a
hand-written one does: a constant lr, weight decay on every parameter, full batches only (60 steps
an epoch against tandem's 61); the arithmetic per step is the same. Images/s counts the training
steps only: data loading and preprocessing are outside both clocks. tandem's figure is the
`images_per_second` it reports; with checkpoint_every=0 it checkpoints at each epoch end and restarts
its clock after that, so neither checkpoint I/O nor the end-of-epoch evaluation is counted. The two
run alternately (plain, tandem, plain, tandem, ...) to cancel drift; the table shows medians.

Target: throughput tandem/plain >= 0.98.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from targets import Target, report


def plain_loop(x, y, steps: int, cfg, device, amp_dtype, background) -> float:
    """What a person writes by hand; returns images/s over `steps` optimizer steps."""
    import torch
    import torch.nn.functional as F

    from tandem.train.augment import augment
    from tandem.train.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model("cnn", cfg.data.channels, cfg.data.image_size, int(y.max()) + 1,
                         cfg.model.width, cfg.model.dropout).to(device).to(memory_format=torch.channels_last)
    if cfg.optim.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True,
                                    weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    batch, per_epoch = cfg.batch_size, len(x) // cfg.batch_size
    model.train()
    images, t0 = 0, time.perf_counter()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x)).to(device)
        index = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        xb = augment(x[index], cfg.augment.shift, cfg.augment.hflip, generator, background)
        xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(xb).float(), y[index], label_smoothing=cfg.optim.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += len(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def tandem_loop(cfg, steps: int) -> tuple[float, float]:
    """tandem.train.loop.train for `steps` steps; returns (images/s, seconds outside its training clock)."""
    from tandem.train.loop import train

    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as out:
        run = cfg.model_copy(update={"out_dir": out, "max_steps": steps, "epochs": 10_000,
                                     "checkpoint_every": 0, "progress": False})
        t0 = time.perf_counter()
        metrics = train(run, log=lambda *a, **k: None).metrics
        return metrics["images_per_second"], time.perf_counter() - t0 - metrics["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (61 make an epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per side, alternated")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's own)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    import torch

    from tandem.config import TrainConfig
    from tandem.train.device import autocast_dtype, pick_device, pick_precision
    from tandem.runtime.preprocess import preprocess
    from tandem.train.loader import InMemoryBatches
    from tandem.train.loop import load_splits

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = TrainConfig(device=args.device, precision=pick_precision("auto", device))
    amp_dtype = autocast_dtype(cfg.precision)
    # tandem turns this on during CPU runs; the plain loop runs under the same setting.
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    train = InMemoryBatches(load_splits(cfg).train, cfg.data.mean, cfg.data.std, device)
    x, y = train.x, train.y  # the loop's own data and preprocessing
    black = np.zeros((1, 1, 1, cfg.data.channels), np.uint8)  # as tandem pads: a black pixel after preprocessing
    background = torch.from_numpy(preprocess(black, cfg.data.mean, cfg.data.std)[0, :, 0, 0])

    plain_loop(x, y, 3, cfg, device, amp_dtype, background)  # warm-up: oneDNN builds its kernels on first use
    plain, tandem, untimed = [], [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(x, y, args.steps, cfg, device, amp_dtype, background))
        speed, outside = tandem_loop(cfg, args.steps)
        tandem.append(speed)
        untimed.append(outside)
    p, t = statistics.median(plain), statistics.median(tandem)
    rows = [["training throughput, median (images/s)", t, p, t / p]]
    rows += [[f"  round {i + 1}", a, b, a / b] for i, (a, b) in enumerate(zip(tandem, plain))]
    details = {"steps": args.steps, "rounds": args.rounds, "batch_size": cfg.batch_size, "precision": cfg.precision,
               "device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "tandem_seconds_outside_clock": untimed}
    passed = report(f"tandem training loop vs a plain PyTorch loop, {args.steps} steps of {cfg.batch_size} images",
           ["measure", "tandem", "plain", "tandem/plain"], rows,
           [Target("throughput tandem/plain", t / p, 0.98, higher_is_better=True)], args.json, details)
    if not args.json:
        print(f"\n{cfg.precision} on {device}, {torch.get_num_threads()} torch threads, {args.rounds} runs per side "
              f"alternated; tandem also spent a median {statistics.median(untimed):.1f} s per run outside its "
              "clock (data, checkpoints, evaluation, plots)")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run (and `make bench`)


if __name__ == "__main__":
    main()

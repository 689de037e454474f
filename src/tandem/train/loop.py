"""The one training loop. Read it top to bottom.

    tandem train                                  # default cnn on the embedded animals
    tandem train run.yaml optim.lr=0.01 epochs=5  # a YAML config plus overrides
    tandem train --resume runs/latest             # continue a killed run exactly

    from tandem.config import TrainConfig
    from tandem.train.loop import train
    result = train(TrainConfig(epochs=2))
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.config import TrainConfig, dump_config
from tandem.data import Dataset, load_dataset, split_dataset
from tandem.runtime.preprocess import preprocess
from tandem.train import checkpoint as ckpt
from tandem.train.augment import augment
from tandem.train.device import autocast_dtype, pick_device, pick_precision
from tandem.train.models import count_parameters, create_model


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict


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


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and batch-norm parameters.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def to_tensors(data: Dataset, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same NumPy preprocessing the runtime uses, once for the whole split."""
    x = torch.from_numpy(preprocess(data.pixels, cfg.data.mean, cfg.data.std))
    return x.to(device), torch.from_numpy(data.labels).to(device)


@torch.no_grad()
def evaluate(model, x, y, batch_size, memory_format, amp_dtype, num_classes) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, confusion matrix) over a whole split."""
    model.eval()
    loss_sum, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].contiguous(memory_format=memory_format)
        with torch.autocast(xb.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        pairs = y[i:i + batch_size].cpu() * num_classes + logits.argmax(1).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    model.train()
    matrix = confusion.numpy()
    return loss_sum / max(1, len(x)), float(np.trace(matrix) / max(1, matrix.sum())), matrix


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The sampler: a permutation that depends only on (seed, epoch), so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _progress(cfg: TrainConfig, total: int, start: int):
    if not (cfg.progress and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), transient=True)
    bar.start()
    bar.add_task("train", total=total, completed=start, info="")
    return bar


def train(cfg: TrainConfig, resume: bool = False, log=print) -> TrainResult:
    # Deterministic kernels on CPU for this run only; the caller's setting comes back afterwards.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(cfg, resume, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def _train(cfg: TrainConfig, resume: bool, log) -> TrainResult:
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    amp_dtype = autocast_dtype(precision)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    # Data: load, dedupe, split, preprocess once with the runtime's own function.
    splits = split_dataset(load_dataset(cfg.data.source, cfg.data.image_size, cfg.data.channels, cfg.data.skip_bad_files),
                           cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    classes = splits.train.classes
    x_train, y_train = to_tensors(splits.train, cfg, device)
    x_val, y_val = to_tensors(splits.val, cfg, device)
    background = float(preprocess(np.zeros((1, 1, 1, 1), np.uint8), cfg.data.mean, cfg.data.std)[0, 0, 0, 0])

    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, len(classes),
                         cfg.model.width, cfg.model.dropout).to(device)
    # channels_last runs the convs of oneDNN / cuDNN about 1.4x faster; it changes layout, not maths.
    memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(cfg, model)
    augment_rng = torch.Generator().manual_seed(cfg.seed + 1)

    batch, micro = cfg.batch_size, cfg.batch_size // cfg.optim.grad_accum
    n = len(x_train)
    # A last batch of a single image would break batch norm: drop it.
    steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    step, best_val, bad_epochs, train_seconds, images_seen = 0, -1.0, 0, 0.0, 0
    running = {"loss": 0.0, "correct": 0.0, "count": 0}
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            log(f"no checkpoint in {run_dir} yet: starting from step 0")
        else:
            model.load_state_dict(found.model)
            optimizer.load_state_dict(ckpt.unflatten_optimizer(found.trainer, found.state["optimizer"]))
            torch.set_rng_state(found.trainer["rng.torch"])
            augment_rng.set_state(found.trainer["rng.augment"])
            if device.type == "cuda" and "rng.cuda" in found.trainer:
                torch.cuda.set_rng_state(found.trainer["rng.cuda"])
            loop_state = found.state["loop"]
            step, best_val, bad_epochs = found.state["step"], loop_state["best_val"], loop_state["bad_epochs"]
            train_seconds, images_seen, running = loop_state["train_seconds"], loop_state["images_seen"], loop_state["running"]
            log(f"resumed from {found.path} at step {step} of {total_steps}")
    if not resume or step == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    # Keep only the metrics the resumed state has seen, so the log reads as one run.
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() and step else []
    records = [r for r in records if r["step"] <= step]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    log(f"config:\n{dump_config(cfg)}")
    log(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{len(classes)} classes, {splits.duplicates_removed} exact duplicates removed")
    log(f"model: {cfg.model.name}, {count_parameters(model):,} parameters; device {device}, precision {precision}; "
        f"{total_steps} steps of {batch} images")

    def save(stopped: bool = False) -> Path:
        tensors, optim_meta = ckpt.flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.augment"] = augment_rng.get_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        loop_state = {"best_val": best_val, "bad_epochs": bad_epochs, "train_seconds": train_seconds,
                      "images_seen": images_seen, "running": running, "stopped_early": stopped}
        state = {"epoch": step / steps_per_epoch, "total_steps": total_steps, "classes": classes,
                 "config": cfg.model_dump(), "precision": precision, "optimizer": optim_meta, "loop": loop_state,
                 "data_fingerprint": splits.train.fingerprint()}
        return ckpt.save_checkpoint(run_dir, step, model.state_dict(), tensors, state, cfg.keep_checkpoints)

    bar = _progress(cfg, total_steps, step)
    model.train()
    order = epoch_order(n, step // steps_per_epoch, cfg.seed)
    stopped_early = False
    t_last = time.perf_counter()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0:
            order = epoch_order(n, epoch, cfg.seed)
        lr = learning_rate(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # One optimizer step over `batch` images, in grad_accum micro-batches.
        index = order[position * batch:(position + 1) * batch].to(device)
        for chunk in index.split(micro):
            xb = augment(x_train[chunk], cfg.augment.shift, cfg.augment.hflip, augment_rng, background)
            xb = xb.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), y_train[chunk], label_smoothing=cfg.optim.label_smoothing)
            (loss * (len(chunk) / len(index))).backward()
            running["loss"] += loss.item() * len(chunk)
            running["correct"] += (logits.argmax(1) == y_train[chunk]).sum().item()
            running["count"] += len(chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        images_seen += len(index)
        now = time.perf_counter()
        train_seconds += now - t_last
        t_last = now
        if bar is not None and (step % 10 == 0 or step == total_steps):
            bar.update(bar.task_ids[0], completed=step, info=(
                f"epoch {epoch + 1}  loss {running['loss'] / running['count']:.3f}  "
                f"acc {running['correct'] / running['count']:.3f}  {images_seen / train_seconds:,.0f} img/s"))

        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if end_of_epoch:
            record = {"step": step, "epoch": math.ceil(step / steps_per_epoch), "lr": lr,
                      "train_loss": running["loss"] / running["count"],
                      "train_accuracy": running["correct"] / running["count"],
                      "images_per_second": images_seen / train_seconds, "train_seconds": train_seconds}
            if len(x_val):
                record["val_loss"], record["val_accuracy"], _ = evaluate(
                    model, x_val, y_val, 512, memory_format, amp_dtype, len(classes))
                if record["val_accuracy"] > best_val:
                    best_val, bad_epochs = record["val_accuracy"], 0
                else:
                    bad_epochs += 1
                stopped_early = bool(cfg.early_stopping) and bad_epochs >= cfg.early_stopping
            running = {"loss": 0.0, "correct": 0.0, "count": 0}
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            summary = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")))
            (bar.console.print if bar else log)(f"epoch {record['epoch']:>3}  {summary}  {record['images_per_second']:,.0f} img/s")
            t_last = time.perf_counter()  # validation is not training time
        if step == total_steps or stopped_early or (
                cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (not cfg.checkpoint_every and end_of_epoch):
            save(stopped_early)
            t_last = time.perf_counter()  # checkpoint I/O is not training time
        if stopped_early:
            log(f"early stopping: validation accuracy has not improved for {bad_epochs} epochs")
            break
    if bar is not None:
        bar.stop()

    # The verdict on data the model never saw.
    x_test, y_test = to_tensors(splits.test, cfg, device)
    test_loss, test_acc, confusion = evaluate(model, x_test, y_test, 512, memory_format, amp_dtype, len(classes))
    last = ckpt.list_checkpoints(run_dir)[-1]
    metrics = {"test_accuracy": test_acc, "test_loss": test_loss, "val_accuracy": best_val if len(x_val) else None,
               "train_seconds": train_seconds, "images_per_second": images_seen / max(train_seconds, 1e-9),
               "steps": step, "epochs": step / steps_per_epoch, "parameters": count_parameters(model),
               "precision": precision, "device": str(device), "test_images": len(splits.test),
               "duplicates_removed": splits.duplicates_removed, "checkpoint": str(last)}
    ckpt.write_json_atomic(run_dir / "results.json", {**metrics, "classes": classes, "confusion": confusion.tolist()})
    from tandem.train.plots import plot_confusion, plot_curves

    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if history:
        plot_curves(history, run_dir / "curves.png")
    plot_confusion(confusion, classes, run_dir / "confusion.png")
    log(f"test accuracy {test_acc:.4f} on {len(splits.test)} held-out images; "
        f"{train_seconds:.1f} s training at {metrics['images_per_second']:,.0f} img/s")
    log(f"checkpoint: {last}")
    log(f"export it:  tandem export {run_dir} --out {run_dir / 'bundle'}")
    return TrainResult(run_dir, last, metrics)

"""The one training loop. Read it top to bottom.

    tandem train                                  # default cnn on the embedded animals
    tandem train run.yaml optim.lr=0.01 epochs=5  # a YAML config plus overrides
    tandem train --resume runs/latest             # continue a killed run exactly
    tandem train init_from=bundles/animals/1 data.source=photos/   # fine-tune a bundle

    from tandem.config import TrainConfig
    from tandem.train.loop import train
    result = train(TrainConfig(epochs=2))
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.config import TrainConfig, dump_config
from tandem.data import Dataset, Splits, load_dataset, split_dataset
from tandem.errors import UserError
from tandem.runtime.preprocess import preprocess
from tandem.train import checkpoint as ckpt
from tandem.train.augment import augment
from tandem.train.device import autocast_dtype, pick_device, pick_precision
from tandem.train.finetune import inherit_from_bundle, load_bundle_weights
from tandem.train.models import count_parameters, create_model
from tandem.train.runs import link_latest, new_run_dir, remove_if_empty


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the best by validation accuracy: what `tandem export RUN` ships
    last_checkpoint: Path
    metrics: dict


def _no_examples() -> dict:
    return {"loss": 0.0, "correct": 0.0, "count": 0}


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides tensors; saved as JSON in each checkpoint."""

    step: int = 0
    best_val: float = -1.0
    best_step: int | None = None  # the checkpoint export ships; None without a validation split
    bad_epochs: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    running: dict = field(default_factory=_no_examples)
    stopped_early: bool = False
    init_from: dict | None = None  # the bundle a fine-tuning run started from (its provenance)


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


def load_splits(cfg: TrainConfig) -> Splits:
    """The run's data, deduplicated and split by its seed: the same images for train, resume and export."""
    data = load_dataset(cfg.data.source, cfg.data.image_size, cfg.data.channels, cfg.data.skip_bad_files,
                        resize=cfg.data.resize)
    return split_dataset(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)


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
    made = False
    try:
        if not resume:  # a folder of its own (see train/runs.py)
            cfg, made = new_run_dir(inherit_from_bundle(cfg) if cfg.init_from else cfg)
        return _train(cfg, resume, log)
    except BaseException:
        if made:
            remove_if_empty(Path(cfg.out_dir))  # a run that could not start leaves no empty folder
        raise
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def _train(cfg: TrainConfig, resume: bool, log) -> TrainResult:
    # 1. Where the run writes, on what device, in what precision.
    run_dir = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    amp_dtype = autocast_dtype(precision)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    # 2. Data: decoded once (then cached), deduplicated, split, preprocessed with the runtime's own function.
    splits = load_splits(cfg)
    classes, fingerprint = splits.train.classes, splits.train.fingerprint()
    x_train, y_train = to_tensors(splits.train, cfg, device)
    x_val, y_val = to_tensors(splits.val, cfg, device)
    # The value of a black pixel after preprocessing, per channel: what a shifted image's border shows.
    black = np.zeros((1, 1, 1, cfg.data.channels), np.uint8)
    background = torch.from_numpy(preprocess(black, cfg.data.mean, cfg.data.std)[0, :, 0, 0]).to(device)

    # 3. The model and its optimizer.
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, len(classes),
                         cfg.model.width, cfg.model.dropout)
    # channels_last runs the convs of oneDNN / cuDNN about 1.4x faster; it changes layout, not maths.
    memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    optimizer = make_optimizer(cfg, model)
    augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
    batch, micro = cfg.batch_size, cfg.batch_size // cfg.optim.grad_accum
    n = len(x_train)
    steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)  # a last batch of one image would break batch norm
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)

    # 4. Resume: every tensor, RNG and counter as it was at the newest good checkpoint. Or, at step 0 of a
    # fine-tuning run, the bundle's weights.
    state = _restore(run_dir, model, optimizer, augment_rng, device, fingerprint, log) if resume else LoopState()
    if cfg.init_from and state.step == 0:
        state.init_from = load_bundle_weights(model, cfg.init_from, classes)
    metrics_path = _start_log(run_dir, cfg, state.step)
    log(f"config:\n{dump_config(cfg)}")
    log(f"data: {splits.train.describe_decode()}; {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(classes)} classes, {splits.duplicates_removed} exact duplicates removed")
    if state.init_from:
        init = state.init_from
        log(f"fine-tuning from {init['bundle']}: {len(init['classes_kept'])} classes kept, "
            f"{len(init['classes_new'])} new ({', '.join(init['classes_new']) or 'none'})")
    log(f"model: {cfg.model.name}, {count_parameters(model):,} parameters; device {device}, precision {precision}; "
        f"{total_steps} steps of {batch} images")

    def save() -> Path:
        extra = {"epoch": state.step / steps_per_epoch, "total_steps": total_steps, "classes": classes,
                 "precision": precision, "data_fingerprint": fingerprint, "data_decode": splits.train.decode}
        return _save(run_dir, cfg, model, optimizer, augment_rng, device, state, extra)

    # 5. The loop: one optimizer step per iteration, validation and checkpoints at the end of each epoch.
    bar = _progress(cfg, total_steps, state.step)
    model.train()
    order = epoch_order(n, state.step // steps_per_epoch, cfg.seed)
    t_last = time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        epoch, position = divmod(state.step, steps_per_epoch)
        if position == 0:
            order = epoch_order(n, epoch, cfg.seed)
        lr = learning_rate(state.step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = order[position * batch:(position + 1) * batch].to(device)
        for chunk in index.split(micro):  # grad_accum micro-batches make one step of `batch` images
            xb = augment(x_train[chunk], cfg.augment.shift, cfg.augment.hflip, augment_rng, background)
            xb = xb.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), y_train[chunk], label_smoothing=cfg.optim.label_smoothing)
            (loss * (len(chunk) / len(index))).backward()
            state.running["loss"] += loss.item() * len(chunk)
            state.running["correct"] += (logits.argmax(1) == y_train[chunk]).sum().item()
            state.running["count"] += len(chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.images_seen += len(index)
        now = time.perf_counter()
        state.train_seconds, t_last = state.train_seconds + now - t_last, now
        _show(bar, state, epoch, total_steps)

        end_of_epoch = state.step % steps_per_epoch == 0 or state.step == total_steps
        improved = False
        if end_of_epoch:
            improved = _end_of_epoch(cfg, state, model, x_val, y_val, memory_format, amp_dtype, len(classes), lr,
                                     steps_per_epoch, metrics_path, bar.console.print if bar else log)
        if improved or state.step == total_steps or state.stopped_early or (
                cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or (
                not cfg.checkpoint_every and end_of_epoch):
            save()
        if state.stopped_early:
            log(f"early stopping: validation accuracy has not improved for {state.bad_epochs} epochs")
        t_last = time.perf_counter()  # validation and checkpoint I/O are not training time
    if bar is not None:
        bar.stop()

    # 6. The verdict: the best checkpoint, in fp32 as the bundle ships it, on images the model never saw.
    return _verdict(cfg, run_dir, model, splits, state, steps_per_epoch, device, memory_format, precision,
                    metrics_path, log)


def _start_log(run_dir: Path, cfg: TrainConfig, step: int) -> Path:
    """config.yaml as this run resolved it; metrics.jsonl cut back to what the resumed state has seen;
    runs/latest moved here once the run has really started."""
    ckpt.write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    link_latest(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() and step else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return metrics_path


def _restore(run_dir, model, optimizer, augment_rng, device, fingerprint: str, log) -> LoopState:
    found = ckpt.latest_checkpoint(run_dir)
    if found is None:
        log(f"no checkpoint in {run_dir} yet: starting from step 0")
        return LoopState()
    if found.state.get("data_fingerprint") not in (None, fingerprint):
        raise UserError(f"--resume {run_dir}: the training images differ from the ones this run was trained on "
                        "(files added, removed or changed); resuming would mix two data sets: start a new run")
    model.load_state_dict(found.model)
    optimizer.load_state_dict(ckpt.unflatten_optimizer(found.trainer, found.state["optimizer"]))
    torch.set_rng_state(found.trainer["rng.torch"])
    augment_rng.set_state(found.trainer["rng.augment"])
    if device.type == "cuda" and "rng.cuda" in found.trainer:
        torch.cuda.set_rng_state(found.trainer["rng.cuda"])
    state = LoopState(step=found.state["step"], **found.state["loop"])
    log(f"resumed from {found.path} at step {state.step}" + (" (the run had stopped early: nothing left to train)"
                                                            if state.stopped_early else ""))
    return state


def _save(run_dir, cfg, model, optimizer, augment_rng, device, state: LoopState, extra: dict) -> Path:
    tensors, optim_meta = ckpt.flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = augment_rng.get_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    loop = {k: v for k, v in asdict(state).items() if k != "step"}
    meta = {**extra, "config": cfg.model_dump(), "optimizer": optim_meta, "loop": loop}
    return ckpt.save_checkpoint(run_dir, state.step, model.state_dict(), tensors, meta, cfg.keep_checkpoints,
                                protect=state.best_step)


def _show(bar, state: LoopState, epoch: int, total_steps: int) -> None:
    if bar is not None and (state.step % 10 == 0 or state.step == total_steps):
        r = state.running
        bar.update(bar.task_ids[0], completed=state.step, info=(
            f"epoch {epoch + 1}  loss {r['loss'] / r['count']:.3f}  acc {r['correct'] / r['count']:.3f}  "
            f"{state.images_seen / state.train_seconds:,.0f} img/s"))


def _end_of_epoch(cfg, state: LoopState, model, x_val, y_val, memory_format, amp_dtype, num_classes, lr,
                  steps_per_epoch, metrics_path: Path, show) -> bool:
    """Validate, log one line to metrics.jsonl, track the best epoch; True when this one is the new best."""
    r = state.running
    record = {"step": state.step, "epoch": math.ceil(state.step / steps_per_epoch), "lr": lr,
              "train_loss": r["loss"] / r["count"], "train_accuracy": r["correct"] / r["count"],
              "images_per_second": state.images_seen / state.train_seconds, "train_seconds": state.train_seconds}
    improved = False
    if len(x_val):
        record["val_loss"], record["val_accuracy"], _ = evaluate(model, x_val, y_val, 512, memory_format, amp_dtype,
                                                                 num_classes)
        improved = record["val_accuracy"] > state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_epochs = record["val_accuracy"], state.step, 0
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(cfg.early_stopping) and state.bad_epochs >= cfg.early_stopping
    state.running = _no_examples()
    with open(metrics_path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    summary = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")))
    show(f"epoch {record['epoch']:>3}  {summary}  {record['images_per_second']:,.0f} img/s")
    return improved


def _verdict(cfg, run_dir: Path, model, splits: Splits, state: LoopState, steps_per_epoch: int, device,
             memory_format, precision, metrics_path: Path, log) -> TrainResult:
    """Test accuracy of the checkpoint export ships (the best on validation), evaluated in fp32 like the bundle."""
    last = ckpt.list_checkpoints(run_dir)[-1]
    best = ckpt.checkpoint_path(run_dir, state.best_step) if state.best_step is not None else last
    if best != last:
        model.load_state_dict(ckpt.read_checkpoint(best).model)
    x_test, y_test = to_tensors(splits.test, cfg, device)
    classes = splits.train.classes
    test_loss, test_acc, confusion = evaluate(model, x_test, y_test, 512, memory_format, None, len(classes))
    metrics = {"test_accuracy": test_acc, "test_loss": test_loss,
               "val_accuracy": state.best_val if len(splits.val) else None, "train_seconds": state.train_seconds,
               "images_per_second": state.images_seen / max(state.train_seconds, 1e-9), "steps": state.step,
               "epochs": state.step / steps_per_epoch, "parameters": count_parameters(model), "precision": precision,
               "device": str(device), "test_images": len(splits.test), "duplicates_removed": splits.duplicates_removed,
               "stopped_early": state.stopped_early, "decode": splits.train.decode,
               "checkpoint": str(best), "last_checkpoint": str(last)}
    ckpt.write_json_atomic(run_dir / "results.json", {**metrics, "classes": classes, "confusion": confusion.tolist()})
    from tandem.train.plots import plot_confusion, plot_curves

    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if history:
        plot_curves(history, run_dir / "curves.png")
    plot_confusion(confusion, classes, run_dir / "confusion.png")
    log(f"test accuracy {test_acc:.4f} on {len(splits.test)} held-out images (checkpoint {best.name}, fp32); "
        f"{state.train_seconds:.1f} s training at {metrics['images_per_second']:,.0f} img/s")
    log(f"export it:  tandem export {run_dir} --out {run_dir / 'bundle'}")
    return TrainResult(run_dir, best, last, metrics)

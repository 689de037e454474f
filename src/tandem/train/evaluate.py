"""Evaluation: the validation at the end of each epoch (one line of metrics.jsonl) and the verdict, the test
accuracy of the checkpoint export ships."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.files import write_json_atomic
from tandem.train import checkpoint as ckpt
from tandem.train.loader import make_batches
from tandem.train.models import count_parameters
from tandem.train.parallel.group import Dist
from tandem.train.state import LoopState, Run, no_examples


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the best by validation accuracy: what `tandem export RUN` ships
    last_checkpoint: Path
    metrics: dict


def index_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Positions 0..n-1 in batches, this process's strided share of each (rows rank::world)."""
    return [torch.arange(i, min(n, i + batch_size))[rank::world] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate(model, source, batches, memory_format, amp_dtype, num_classes, dist_: Dist) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, confusion matrix) over a whole split; each process evaluates its share of the
    batches and the sums are added over processes."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for x, y in source.batches(batches):
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    model.train()
    dist_.all_reduce_sum(loss_sum)
    matrix = dist_.all_reduce_sum(confusion).view(num_classes, num_classes).cpu().numpy()
    count = max(1, int(matrix.sum()))
    return loss_sum.item() / count, float(np.trace(matrix) / count), matrix


def end_of_epoch(run: Run, state: LoopState, lr: float, show) -> bool:
    """Validate, log one line to metrics.jsonl (rank 0), track the best epoch; True when this one is the new best.
    Training figures are summed over every process here, in one place."""
    cfg, dist_ = run.cfg, run.dist
    totals = dist_.all_reduce_sum(torch.tensor([state.running[k] for k in ("loss", "correct", "count")],
                                               dtype=torch.float64)).tolist()
    r = dict(zip(("loss", "correct", "count"), totals))
    record = {"step": state.step, "epoch": math.ceil(state.step / run.steps_per_epoch), "lr": lr,
              "train_loss": r["loss"] / r["count"], "train_accuracy": r["correct"] / r["count"],
              "images_per_second": state.images_seen / state.train_seconds, "train_seconds": state.train_seconds}
    for key, value in run.engine.report().items():
        record[key] = value
    improved = False
    if len(run.val_data):
        record["val_loss"], record["val_accuracy"], _ = evaluate(run.engine.model, run.val_data, run.val_batches,
                                                                 run.memory_format, run.amp_dtype, len(run.classes),
                                                                 dist_)
        improved = record["val_accuracy"] > state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_epochs = record["val_accuracy"], state.step, 0
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(cfg.early_stopping) and state.bad_epochs >= cfg.early_stopping
    state.running = no_examples()
    if dist_.is_main:
        with open(run.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    summary = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")))
    show(f"epoch {record['epoch']:>3}  {summary}  {record['images_per_second']:,.0f} img/s")
    return improved


def verdict(run: Run, state: LoopState) -> TrainResult:
    """Test accuracy of the checkpoint export ships (the best on validation), evaluated in fp32 like the bundle.
    Every process evaluates its share; rank 0 reads the checkpoint, writes results.json and the plots."""
    cfg, run_dir, engine, splits, dist_, device, log = (run.cfg, run.run_dir, run.engine, run.splits, run.dist,
                                                         run.device, run.log)
    steps_per_epoch, memory_format, precision, metrics_path = (run.steps_per_epoch, run.memory_format, run.precision,
                                                               run.metrics_path)
    model = engine.model
    paths = dist_.from_main(lambda: _best_and_last(run_dir, state))
    best, last = Path(paths[0]), Path(paths[1])
    if best != last:
        weights = ckpt.read_checkpoint(best).model if dist_.is_main else None
        model.load_state_dict(dist_.broadcast_tensors(weights))
    test_data = make_batches(splits.test, cfg, device)
    classes = splits.train.classes
    test_loss, test_acc, confusion = evaluate(model, test_data, index_batches(len(test_data), 512, dist_.rank, dist_.world),
                                              memory_format, None, len(classes), dist_)
    test_data.close()
    metrics = {"test_accuracy": test_acc, "test_loss": test_loss,
               "val_accuracy": state.best_val if len(splits.val) else None, "train_seconds": state.train_seconds,
               "images_per_second": state.images_seen / max(state.train_seconds, 1e-9), "steps": state.step,
               "epochs": state.step / steps_per_epoch, "parameters": count_parameters(model), "precision": precision,
               "device": str(device), "test_images": len(splits.test), "duplicates_removed": splits.duplicates_removed,
               "stopped_early": state.stopped_early, "decode": splits.train.decode,
               "parallel": {"strategy": engine.strategy, "processes": dist_.world, **engine.report()},
               "threads": run.threads.report()[1], "checkpoint": str(best), "last_checkpoint": str(last)}
    if dist_.is_main:
        write_json_atomic(run_dir / "results.json", {**metrics, "classes": classes,
                                                          "confusion": confusion.tolist()})
        from tandem.train.plots import plot_confusion, plot_curves

        history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        if history:
            plot_curves(history, run_dir / "curves.png")
        plot_confusion(confusion, classes, run_dir / "confusion.png")
    log(f"test accuracy {test_acc:.4f} on {len(splits.test)} held-out images (checkpoint {best.name}, fp32); "
        f"{state.train_seconds:.1f} s training at {metrics['images_per_second']:,.0f} img/s")
    log(f"export it:  tandem export {run_dir} --out {run_dir / 'bundle'}")
    return TrainResult(run_dir, best, last, metrics)


def _best_and_last(run_dir: Path, state: LoopState) -> tuple[str, str]:
    last = ckpt.list_checkpoints(run_dir)[-1]
    best = ckpt.checkpoint_path(run_dir, state.best_step) if state.best_step is not None else last
    return str(best), str(last)

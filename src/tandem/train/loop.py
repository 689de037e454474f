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
from tandem.data import Splits, stream
from tandem.data.stream import FileSplits
from tandem.errors import UserError
from tandem.files import write_json_atomic, write_text_atomic
from tandem.runtime.preprocess import preprocess
from tandem.train import checkpoint as ckpt
from tandem.train import graphs
from tandem.train.augment import apply, draw
from tandem.train.device import autocast_dtype, pick_precision
from tandem.train.distributed import Dist, Engine, decay_split, init_distributed, make_engine, peer_lost
from tandem.train.finetune import inherit_from_bundle, load_bundle_weights
from tandem.train.loader import make_batches
from tandem.train.models import count_parameters, create_model
from tandem.train.runs import link_latest, mark_job, new_run_dir, remove_if_empty


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
    comm_bytes: int = 0  # bytes all processes had communicated at the last checkpoint (see Engine.report)


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


def make_optimizer(cfg: TrainConfig, named_parameters, capturable: bool = False) -> torch.optim.Optimizer:
    """Over (name, parameter) pairs, grouped by distributed.decay_split (checkpoints rely on its order).
    capturable (compile=graphs): an optimizer whose step can be recorded in a CUDA graph and reads its learning rate
    from a device tensor: SGD's fused CUDA kernel, AdamW's capturable path."""
    decay, no_decay = decay_split(named_parameters)  # no weight decay on biases and batch-norm parameters
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.momentum > 0,
                               **({"fused": True} if capturable else {}))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, capturable=capturable)
    # Its warm-up steps and each epoch's short last batch run uncaptured on purpose: no warning about it.
    optimizer._warned_capturable_if_run_uncaptured = capturable
    return optimizer


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """make_optimizer's capturable choice again, after load_state_dict brought back the checkpoint's (a run
    resumed with another `compile`): SGD fused or not, AdamW capturable or not, with its step counters on the
    device (capturable) or the CPU, as torch keeps them."""
    inner = getattr(optimizer, "optim", optimizer)  # local-sgd's PostLocalSGDOptimizer wraps the real one
    for group in inner.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable
        elif "fused" in group:
            group["fused"] = True if capturable else None
        for param in group["params"]:
            step = inner.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                inner.state[param]["step"] = step.to(param.device if capturable else "cpu", torch.float32)
    inner._warned_capturable_if_run_uncaptured = capturable


def load_splits(cfg: TrainConfig) -> Splits | FileSplits:
    """The run's data, deduplicated and split by its seed: the same images for train, resume and export.
    In memory (Splits), or, for folders too large for memory (data.stream), files decoded batch by batch
    in DataLoader workers (FileSplits): the same images either way."""
    return stream.load_splits(cfg.data, cfg.seed)


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


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The sampler: a permutation that depends only on (seed, epoch), so a resumed run sees the same order.
    Under torchrun every process computes the same one and takes its strided share of each batch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_chunks(batch_len: int, engine: Engine, accum: int) -> list[torch.Tensor]:
    """Positions (within the global batch) of this process's chunks: its share is rows data_rank::data_world,
    split into `accum` strided micro-batches (k::accum), so 2 processes x 1 micro-batch and 1 process x 2
    micro-batches see the same micro-batches (and batch-norm statistics). A pipeline takes its share whole."""
    share = torch.arange(batch_len)[engine.data_rank::engine.data_world]
    if engine.splits_batch:
        return [share]
    return [share[k::accum] for k in range(accum) if len(share[k::accum])]


def _progress(cfg: TrainConfig, total: int, start: int, show: bool):
    if not (show and cfg.progress and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), transient=True)
    bar.start()
    bar.add_task("train", total=total, completed=start, info="")
    return bar


def train(cfg: TrainConfig, resume: bool = False, log=print) -> TrainResult:
    """One run. Under torchrun every process calls this with the same config: rank 0 picks and writes the
    run folder, the others train beside it and write nothing."""
    # Deterministic kernels on CPU for this run only; the caller's setting comes back afterwards.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    made = False
    dist_, device = init_distributed(cfg.device, cfg.parallel.timeout)
    try:
        if not resume:  # a folder of its own (see train/runs.py), chosen by rank 0
            cfg, made = dist_.from_main(lambda: new_run_dir(inherit_from_bundle(cfg) if cfg.init_from else cfg))
            made = made and dist_.is_main
        try:
            result = _train(cfg, resume, log if dist_.is_main else (lambda *a, **k: None), dist_, device)
        except RuntimeError as err:  # a collective failed because another process is gone: say so, in one line
            lost = peer_lost(err) if dist_.world > 1 else None
            if lost is None:
                raise
            raise UserError(f"another process of this job stopped ({lost}); its own error is above, and torchrun "
                            "ends the job (with --max-restarts it starts again from the newest checkpoint)") from None
        dist_.barrier()  # every process leaves together, once rank 0 has written the results
        return result
    except BaseException:
        if made:
            remove_if_empty(Path(cfg.out_dir))  # a run that could not start leaves no empty folder
        raise
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        dist_.close()


def _train(cfg: TrainConfig, resume: bool, log, dist_: Dist, device: torch.device) -> TrainResult:
    # 1. Where the run writes, on what device, in what precision.
    run_dir = Path(cfg.out_dir)
    precision = pick_precision(cfg.precision, device)
    amp_dtype = autocast_dtype(precision)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    # 2. Data: decoded once (then cached), deduplicated, split, preprocessed with the runtime's own function.
    splits = load_splits(cfg)
    classes, fingerprint = splits.train.classes, splits.train.fingerprint()
    train_data, val_data = make_batches(splits.train, cfg, device), make_batches(splits.val, cfg, device)
    # The value of a black pixel after preprocessing, per channel: what a shifted image's border shows.
    black = np.zeros((1, 1, 1, cfg.data.channels), np.uint8)
    background = torch.from_numpy(preprocess(black, cfg.data.mean, cfg.data.std)[0, :, 0, 0]).to(device)

    # 3. The model, written for one device; the engine applies the strategy from outside (train/distributed.py).
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, len(classes),
                         cfg.model.width, cfg.model.dropout)
    # channels_last runs the convs of oneDNN / cuDNN about 1.4x faster; it changes layout, not maths.
    memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)

    # How each step runs (train/graphs.py): eager, torch.compile, or captured whole in a CUDA graph.
    streamed = bool(splits.train.decode.get("streamed"))
    compiled = graphs.resolve(cfg, device, dist_.world, streamed)

    def autocast():  # a captured graph records the casts themselves: autocast's cache of cast weights stays off
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                              cache_enabled=compiled != "graphs")

    engine = make_engine(cfg, dist_, model, loss_fn, autocast, device)
    if compiled == "inductor":
        engine.compile()
    capture = compiled == "graphs" and device.type == "cuda"
    optimizer = engine.wrap_optimizer(make_optimizer(cfg, engine.named_parameters(), capturable=capture))
    # On the CPU, as always; a captured step draws its augmentation inside the graph, on a CUDA generator.
    augment_rng = torch.Generator(device=device if capture else "cpu").manual_seed(cfg.seed + 1)
    batch = cfg.batch_size
    if engine.splits_batch and cfg.optim.grad_accum > 1:
        raise UserError("parallel.strategy=pipeline splits each batch into parallel.microbatches itself; "
                        "leave optim.grad_accum at 1")
    if batch // engine.data_world < 1:
        raise UserError(f"batch_size={batch} is smaller than the {engine.data_world} data-parallel processes; "
                        f"give batch_size >= {engine.data_world}")
    n = len(train_data)
    steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)  # a last batch of one image would break batch norm
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
    val_batches = index_batches(len(val_data), 512, dist_.rank, dist_.world)

    # 4. Resume: every tensor, RNG and counter as it was at the newest good checkpoint. Or, at step 0 of a
    # fine-tuning run, the bundle's weights.
    layout = {"strategy": engine.strategy, "processes": dist_.world}
    state, saved_augment = _restore(run_dir, engine, optimizer, device, fingerprint, streamed, layout, dist_, log) \
        if resume else (LoopState(), None)
    if saved_augment is not None:  # the augmentation's random stream goes on where it stopped, on its own device
        if saved_augment.numel() != augment_rng.get_state().numel():  # a CPU and a CUDA generator's states
            if device.type != "cuda":
                raise UserError(f"--resume {run_dir}: the run drew its augmentation on a GPU (compile=graphs); "
                                "resume it on a GPU (device=cuda)")
            augment_rng = torch.Generator(device=device if not capture else "cpu")
            if capture:  # the run drew on the CPU (compile=off or inductor): a captured step cannot go on with that
                if cfg.compile == "graphs":
                    raise UserError(f"--resume {run_dir}: the run drew its augmentation on the CPU (it ran with "
                                    "compile=off or inductor), which a captured step cannot continue; resume it "
                                    "with compile=off")
                log("compile=auto: the run drew its augmentation on the CPU; it goes on eagerly (compile=off)")
                compiled, capture = "off", False
        augment_rng.set_state(saved_augment)
    if resume:
        set_capturable(optimizer, capture)
    if cfg.init_from and state.step == 0:
        state.init_from = load_bundle_weights(engine.model, cfg.init_from, classes)
        engine.load_state(engine.model.state_dict(), optimizer, engine.full_optimizer_state(optimizer))
    metrics_path = _start_log(run_dir, cfg, state.step) if dist_.is_main else run_dir / "metrics.jsonl"
    log(f"config:\n{dump_config(cfg)}")
    log(f"data: {splits.train.describe_decode()}; {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(classes)} classes, {splits.duplicates_removed} exact duplicates removed")
    if state.init_from:
        init = state.init_from
        log(f"fine-tuning from {init['bundle']}: {len(init['classes_kept'])} classes kept, "
            f"{len(init['classes_new'])} new ({', '.join(init['classes_new']) or 'none'})")
    log(f"model: {cfg.model.name}, {count_parameters(model):,} parameters; device {device}, precision {precision}; "
        f"{total_steps} steps of {batch} images; {engine.describe()}; compile={compiled}")

    def save(synced: bool) -> Path | None:
        if not synced:
            engine.sync(optimizer)  # every process holds the whole state: rank 0 writes it
        extra = {"epoch": state.step / steps_per_epoch, "total_steps": total_steps, "classes": classes,
                 "precision": precision, "data_fingerprint": fingerprint, "data_decode": splits.train.decode,
                 "parallel": layout}
        optim_state = engine.full_optimizer_state(optimizer)
        # Each process's own RNG streams: pipeline stages draw dropout masks on some processes and not others.
        rngs = {"rng.torch": dist_.all_gather(torch.get_rng_state())}
        if device.type == "cuda":
            rngs["rng.cuda"] = dist_.all_gather(torch.cuda.get_rng_state())
        running = {k: dist_.all_reduce_sum(torch.tensor(float(v), dtype=torch.float64)).item()
                   for k, v in state.running.items()}
        # The partial sums of the epoch so far, over every process: rank 0 carries them on, the others start
        # again from zero (a resumed run does the same), so the epoch's figures are the same either way.
        state.running = running if dist_.is_main else _no_examples()
        state.comm_bytes = engine.report().get("comm_bytes", 0)
        if not dist_.is_main:
            return None
        return _save(run_dir, cfg, engine.model, optim_state, augment_rng, device, state, extra, rngs)

    # 5. The loop: one optimizer step per iteration, validation and checkpoints at the end of each epoch.
    bar = _progress(cfg, total_steps, state.step, dist_.is_main)
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once per logging interval
    shift, hflip = cfg.augment.shift, cfg.augment.hflip
    captured = None
    if compiled == "graphs":
        def whole_step(x, y):  # what the loop below does for a full batch in one process, as one graph
            x = apply(x, draw(batch, shift, hflip, augment_rng), shift, background, hflip)
            loss_sum, correct, _ = engine.forward_backward(x.contiguous(memory_format=memory_format), y, 1.0)
            sums[0] += loss_sum
            sums[1] += correct
            optimizer.step()

        captured = graphs.CapturedStep(x=train_data.x, y=train_data.y, batch=batch, body=whole_step,
                                       optimizer=optimizer, generator=augment_rng, capture=capture,
                                       fallback=cfg.compile == "auto", log=log)
    t_last = time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        epoch, position = divmod(state.step, steps_per_epoch)
        order = epoch_order(n, epoch, cfg.seed)
        on_device = order.to(device) if captured is not None else None  # the captured step's indices, copied once
        batches = []  # the rest of this epoch, chunk by chunk, so that a streamed split can read ahead
        for pos in range(position, min(steps_per_epoch, position + total_steps - state.step)):
            index = order[pos * batch:(pos + 1) * batch]
            whole = on_device[pos * batch:(pos + 1) * batch] if captured is not None and captured.takes(len(index)) else None
            batches.append((len(index), step_chunks(len(index), engine, cfg.optim.grad_accum), index, whole))
        flat = [index[chunk] for _, chunks, index, whole in batches if whole is None for chunk in chunks]
        stream = train_data.batches(flat)
        for batch_len, chunks, _, whole in batches:
            lr = learning_rate(state.step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if whole is not None:  # compile=graphs: the whole step below, replayed from one CUDA graph
                captured.step(whole, lr)
                state.running["count"] += batch_len
            else:
                # Augmentation is drawn for the global batch; each process applies the rows of its share.
                params = draw(batch_len, shift, hflip, augment_rng)
                for k, chunk in enumerate(chunks):
                    xb, yb = next(stream)
                    xb = apply(xb, params[chunk], shift, background, hflip).contiguous(memory_format=memory_format)
                    loss_sum, correct, count = engine.forward_backward(xb, yb, len(chunk) / batch_len,
                                                                       last=k == len(chunks) - 1)
                    sums[0] += loss_sum
                    sums[1] += correct
                    state.running["count"] += count
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            engine.after_step()
            state.step += 1
            state.images_seen += batch_len
            end_of_epoch = state.step % steps_per_epoch == 0 or state.step == total_steps
            saving = state.step == total_steps or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) \
                or (not cfg.checkpoint_every and end_of_epoch)
            if end_of_epoch or saving or (bar is not None and state.step % 10 == 0):
                # Reading the sums waits for the device: the steps a GPU still had queued count as training time.
                state.running["loss"] += sums[0].item()
                state.running["correct"] += sums[1].item()
                sums.zero_()
            now = time.perf_counter()
            state.train_seconds, t_last = state.train_seconds + now - t_last, now
            _show(bar, state, epoch, total_steps)
            improved = False
            if end_of_epoch:
                engine.sync(optimizer)
                improved = _end_of_epoch(cfg, state, engine.model, val_data, val_batches, memory_format, amp_dtype,
                                         len(classes), lr, steps_per_epoch, metrics_path, dist_, engine,
                                         bar.console.print if bar else log)
            if improved or saving or state.stopped_early:
                save(synced=end_of_epoch)
            if state.stopped_early:
                log(f"early stopping: validation accuracy has not improved for {state.bad_epochs} epochs")
            t_last = time.perf_counter()  # validation and checkpoint I/O are not training time
            if end_of_epoch or state.stopped_early:
                break
    if bar is not None:
        bar.stop()
    train_data.close()  # a streamed split's worker processes end here
    val_data.close()

    # 6. The verdict: the best checkpoint, in fp32 as the bundle ships it, on images the model never saw.
    return _verdict(cfg, run_dir, engine, splits, state, steps_per_epoch, device, memory_format, precision,
                    metrics_path, dist_, log)


def _start_log(run_dir: Path, cfg: TrainConfig, step: int) -> Path:
    """config.yaml as this run resolved it; metrics.jsonl cut back to what the resumed state has seen;
    runs/latest moved here once the run has really started."""
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    mark_job(run_dir)
    link_latest(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() and step else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return metrics_path


def _restore(run_dir, engine: Engine, optimizer, device, fingerprint: str, streamed: bool, layout: dict,
             dist_: Dist, log) -> tuple[LoopState, torch.Tensor | None]:
    """Rank 0 finds the newest good checkpoint and reads it; every process takes its part of the state. Returns the
    loop's state and the augmentation generator's saved state (the caller picks the generator it fits)."""

    def newest() -> ckpt.Checkpoint | None:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            return None
        was_streamed = bool(found.state.get("data_decode", {}).get("streamed"))
        if was_streamed != streamed:  # the two modes fingerprint the same images differently
            before = "streamed its folder" if was_streamed else "held its images in memory"
            now = "stream it" if streamed else "hold them in memory"
            raise UserError(f"--resume {run_dir}: the run {before}, this one would {now} (data.stream=auto decides by "
                            f"the memory available); resume with data.stream={'on' if was_streamed else 'off'}")
        if found.state.get("data_fingerprint") not in (None, fingerprint):
            raise UserError(f"--resume {run_dir}: the training images differ from the ones this run was trained on "
                            "(files added, removed or changed); resuming would mix two data sets: start a new run")
        saved = found.state.get("parallel", {"strategy": "single", "processes": 1})
        if saved["processes"] != layout["processes"] or (layout["processes"] > 1 and saved != layout):
            def how(lay: dict) -> str:
                return ("in one process (without torchrun)" if lay["processes"] == 1 else
                        f"with parallel.strategy={lay['strategy']} on {lay['processes']} processes")
            raise UserError(f"--resume {run_dir}: the run was trained {how(saved)}, this one runs {how(layout)}; "
                            f"resume it the way it ran: "
                            + ("tandem train --resume without torchrun" if saved["processes"] == 1 else
                               f"torchrun with {saved['processes']} processes in all and "
                               f"parallel.strategy={saved['strategy']}"))
        return found

    found = dist_.from_main(newest, share=False)
    there = dist_.from_main(lambda: found is not None)
    if not there:
        log(f"no checkpoint in {run_dir} yet: starting from step 0")
        return LoopState(), None
    model_state = dist_.broadcast_tensors(found.model if dist_.is_main else None)
    trainer = dist_.broadcast_tensors(found.trainer if dist_.is_main else None)
    meta = dist_.from_main(lambda: {k: found.state[k] for k in ("step", "loop", "optimizer")} | {"path": str(found.path)})
    engine.load_state(model_state, optimizer, ckpt.unflatten_optimizer(trainer, meta["optimizer"]))
    own = "" if dist_.is_main else f".{dist_.rank}"  # rank r > 0 saved its streams as rng.torch.<r>
    torch.set_rng_state(trainer[f"rng.torch{own}"])
    if device.type == "cuda" and f"rng.cuda{own}" in trainer:
        torch.cuda.set_rng_state(trainer[f"rng.cuda{own}"])
    state = LoopState(step=meta["step"], **meta["loop"])
    engine.resume_at(state.step)
    if dist_.is_main:
        engine.comm_bytes = state.comm_bytes  # the job's count goes on from the checkpoint's
    else:
        state.running = _no_examples()  # rank 0 carries the epoch's partial sums
    log(f"resumed from {meta['path']} at step {state.step}" + (" (the run had stopped early: nothing left to train)"
                                                               if state.stopped_early else ""))
    return state, trainer["rng.augment"]


def _save(run_dir, cfg, model, optim_state: dict, augment_rng, device, state: LoopState, extra: dict,
          rngs: dict[str, list[torch.Tensor]]) -> Path:
    tensors, optim_meta = ckpt.flatten_optimizer(optim_state)
    for name, per_rank in rngs.items():  # rank 0's under the one-process name, rank r's as <name>.<r>
        for rank, rng in enumerate(per_rank):
            tensors[name if rank == 0 else f"{name}.{rank}"] = rng
    tensors["rng.augment"] = augment_rng.get_state()
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


def _end_of_epoch(cfg, state: LoopState, model, val_data, val_batches, memory_format, amp_dtype, num_classes, lr,
                  steps_per_epoch, metrics_path: Path, dist_: Dist, engine: Engine, show) -> bool:
    """Validate, log one line to metrics.jsonl (rank 0), track the best epoch; True when this one is the new best.
    Training figures are summed over every process here, in one place."""
    totals = dist_.all_reduce_sum(torch.tensor([state.running[k] for k in ("loss", "correct", "count")],
                                               dtype=torch.float64)).tolist()
    r = dict(zip(("loss", "correct", "count"), totals))
    record = {"step": state.step, "epoch": math.ceil(state.step / steps_per_epoch), "lr": lr,
              "train_loss": r["loss"] / r["count"], "train_accuracy": r["correct"] / r["count"],
              "images_per_second": state.images_seen / state.train_seconds, "train_seconds": state.train_seconds}
    for key, value in engine.report().items():
        record[key] = value
    improved = False
    if len(val_data):
        record["val_loss"], record["val_accuracy"], _ = evaluate(model, val_data, val_batches, memory_format,
                                                                 amp_dtype, num_classes, dist_)
        improved = record["val_accuracy"] > state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_epochs = record["val_accuracy"], state.step, 0
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(cfg.early_stopping) and state.bad_epochs >= cfg.early_stopping
    state.running = _no_examples()
    if dist_.is_main:
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    summary = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("loss", "accuracy")))
    show(f"epoch {record['epoch']:>3}  {summary}  {record['images_per_second']:,.0f} img/s")
    return improved


def _verdict(cfg, run_dir: Path, engine: Engine, splits: Splits, state: LoopState, steps_per_epoch: int, device,
             memory_format, precision, metrics_path: Path, dist_: Dist, log) -> TrainResult:
    """Test accuracy of the checkpoint export ships (the best on validation), evaluated in fp32 like the bundle.
    Every process evaluates its share; rank 0 reads the checkpoint, writes results.json and the plots."""
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
               "checkpoint": str(best), "last_checkpoint": str(last)}
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

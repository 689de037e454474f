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

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.config import TrainConfig, dump_config
from tandem.data import Splits, stream
from tandem.data.stream import FileSplits
from tandem.errors import UserError
from tandem.runtime.preprocess import preprocess
from tandem.train import checkpoint as ckpt  # noqa: F401  (tests reach the checkpoint writer as loop.ckpt)
from tandem.train import graphs
from tandem.train.augment import apply, draw
from tandem.train.device import ThreadWatch, autocast_dtype, pick_precision
from tandem.train.evaluate import TrainResult, end_of_epoch, index_batches, verdict
from tandem.train.finetune import inherit_from_bundle, load_bundle_weights
from tandem.train.loader import make_batches
from tandem.train.models import count_parameters, create_model
from tandem.train.optim import learning_rate, make_optimizer
from tandem.train.parallel import make_engine
from tandem.train.parallel.engine import Engine
from tandem.train.parallel.group import Dist, init_distributed, peer_lost
from tandem.train.resume import restore, save, start_log
from tandem.train.runs import new_run_dir, remove_if_empty
from tandem.train.state import LoopState, Run

NOTE_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal (logs, CI)


def load_splits(cfg: TrainConfig) -> Splits | FileSplits:
    """The run's data, deduplicated and split by its seed: the same images for train, resume and export.
    In memory (Splits), or, for folders too large for memory (data.stream), files decoded batch by batch
    in DataLoader workers (FileSplits): the same images either way."""
    return stream.load_splits(cfg.data, cfg.seed)


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
    run = _place(cfg, log, dist_, device)  # 1. where the run writes, on what device, in what precision
    _load_data(run)                        # 2. the data, preprocessed with the runtime's own function
    _build(run)                            # 3. the model, its engine, optimizer and schedule
    state = restore(run) if resume else LoopState()  # 4. resume: every tensor, RNG and counter as it was
    if cfg.init_from and state.step == 0:  # or, at step 0 of a fine-tuning run, the bundle's weights
        state.init_from = load_bundle_weights(run.engine.model, cfg.init_from, run.classes)
        run.engine.load_state(run.engine.model.state_dict(), run.optimizer,
                              run.engine.full_optimizer_state(run.optimizer))
    run.metrics_path = start_log(run.run_dir, cfg, state.step) if dist_.is_main else run.run_dir / "metrics.jsonl"
    _announce(run, state)
    _fit(run, state)                       # 5. one optimizer step per iteration, validation at each epoch's end
    return verdict(run, state)             # 6. the best checkpoint, in fp32, on images the model never saw


def _place(cfg: TrainConfig, log, dist_: Dist, device: torch.device) -> Run:
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    return Run(cfg=cfg, dist=dist_, device=device, log=log, run_dir=Path(cfg.out_dir), precision=precision,
               amp_dtype=autocast_dtype(precision), threads=ThreadWatch(device, cfg.threads.count))


def _load_data(run: Run) -> None:
    """Decoded once (then cached), deduplicated, split, preprocessed with the runtime's own function."""
    cfg, device = run.cfg, run.device
    run.splits = load_splits(cfg)
    run.fingerprint = run.splits.train.fingerprint()
    run.train_data, run.val_data = make_batches(run.splits.train, cfg, device), make_batches(run.splits.val, cfg, device)
    # The value of a black pixel after preprocessing, per channel: what a shifted image's border shows.
    black = np.zeros((1, 1, 1, cfg.data.channels), np.uint8)
    run.background = torch.from_numpy(preprocess(black, cfg.data.mean, cfg.data.std)[0, :, 0, 0]).to(device)


def _build(run: Run) -> None:
    """The model, written for one device; the engine applies the strategy from outside (train/parallel/)."""
    cfg, device, dist_ = run.cfg, run.device, run.dist
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, len(run.classes),
                         cfg.model.width, cfg.model.dropout)
    # channels_last runs the convs of oneDNN / cuDNN about 1.4x faster; it changes layout, not maths.
    run.memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    model = model.to(device).to(memory_format=run.memory_format)

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)

    # How each step runs (train/graphs.py): eager, torch.compile, or captured whole in a CUDA graph.
    run.compiled = graphs.resolve(cfg, device, dist_.world, run.streamed)

    def autocast():  # a captured graph records the casts themselves: autocast's cache of cast weights stays off
        return torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None,
                              cache_enabled=run.compiled != "graphs")

    engine = run.engine = make_engine(cfg, dist_, model, loss_fn, autocast, device)
    if run.compiled == "inductor":
        engine.compile()
    run.capture = run.compiled == "graphs" and device.type == "cuda"
    run.optimizer = engine.wrap_optimizer(make_optimizer(cfg, engine.named_parameters(), capturable=run.capture))
    # On the CPU, as always; a captured step draws its augmentation inside the graph, on a CUDA generator.
    run.augment_rng = torch.Generator(device=device if run.capture else "cpu").manual_seed(cfg.seed + 1)
    batch = cfg.batch_size
    if engine.splits_batch and cfg.optim.grad_accum > 1:
        raise UserError("parallel.strategy=pipeline splits each batch into parallel.microbatches itself; "
                        "leave optim.grad_accum at 1")
    if batch // engine.data_world < 1:
        raise UserError(f"batch_size={batch} is smaller than the {engine.data_world} data-parallel processes; "
                        f"give batch_size >= {engine.data_world}")
    n = len(run.train_data)
    run.steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)  # a last batch of one image would break batch norm
    run.total_steps = min(cfg.epochs * run.steps_per_epoch, cfg.max_steps or cfg.epochs * run.steps_per_epoch)
    run.val_batches = index_batches(len(run.val_data), 512, dist_.rank, dist_.world)


def _plural(count: int, word: str, spec: str = "") -> str:
    return f"{count:{spec}} {word}{'' if count == 1 else 's'}"


def _folded_parameters(model: torch.nn.Module) -> int:
    """The parameters left once export folds each batch norm into the bias-free conv before it: its scale and
    shift (2 per channel) become that conv's bias (1 per channel)."""
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    norms = [m for m in model.modules() if isinstance(m, kinds) and m.affine]
    return count_parameters(model) - sum(m.num_features for m in norms)


def _announce(run: Run, state: LoopState) -> None:
    cfg, splits, log, model = run.cfg, run.splits, run.log, run.engine.model
    log(f"config:\n{dump_config(cfg)}")
    log(f"data: {splits.train.describe_decode()}; {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(run.classes)} classes, {splits.duplicates_removed} exact duplicates removed")
    if state.init_from:
        init = state.init_from
        log(f"fine-tuning from {init['bundle']}: {len(init['classes_kept'])} classes kept, "
            f"{len(init['classes_new'])} new ({', '.join(init['classes_new']) or 'none'})")
    count, folded = count_parameters(model), _folded_parameters(model)
    params = _plural(count, "parameter", ",") + (f" ({folded:,} after batch norm is folded at export)" if folded != count else "")
    log(f"model: {cfg.model.name}, {params}; device {run.device}, precision {run.precision}; "
        f"{_plural(run.total_steps, 'step')} of {cfg.batch_size} images; {run.engine.describe()}; "
        f"compile={run.compiled}; {run.threads.report()[0]}")


class _Progress:
    """What the loop shows while it trains (rank 0, cfg.progress): a bar on a terminal; off a terminal (logs, CI)
    a line on stderr every NOTE_EVERY seconds, between the epoch lines."""

    def __init__(self, run: Run, state: LoopState) -> None:
        self.total = run.total_steps
        show = run.dist.is_main and run.cfg.progress
        self.bar = _bar(self.total, state.step) if show and sys.stderr.isatty() else None
        self.notes = show and self.bar is None
        self.last_note = time.perf_counter()

    @property
    def wants_sums(self) -> bool:
        return self.bar is not None

    def print(self, line: str) -> None:
        return self.bar.console.print(line) if self.bar is not None else None

    def show(self, state: LoopState, epoch: int) -> None:
        if self.bar is not None and (state.step % 10 == 0 or state.step == self.total):
            r = state.running
            self.bar.update(self.bar.task_ids[0], completed=state.step, info=(
                f"epoch {epoch + 1}  loss {r['loss'] / r['count']:.3f}  acc {r['correct'] / r['count']:.3f}  "
                f"{state.images_seen / state.train_seconds:,.0f} img/s"))
        elif self.notes and time.perf_counter() - self.last_note >= NOTE_EVERY and state.step < self.total:
            self.last_note = time.perf_counter()
            print(f"train: step {state.step}/{self.total} (epoch {epoch + 1}), "
                  f"{state.images_seen / max(state.train_seconds, 1e-9):,.0f} img/s", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _bar(total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), transient=True)
    bar.start()
    bar.add_task("train", total=total, completed=start, info="")
    return bar


def _fit(run: Run, state: LoopState) -> None:
    """Epoch after epoch until the last step or early stopping: the steps, then validation and checkpoints."""
    progress = _Progress(run, state)
    run.engine.model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss, correct: read once per logging interval
    captured = _captured_step(run, sums) if run.compiled == "graphs" else None
    t_last = time.perf_counter()
    while state.step < run.total_steps and not state.stopped_early:
        t_last = _epoch(run, state, sums, captured, progress, t_last)
    progress.stop()
    run.train_data.close()  # a streamed split's worker processes end here
    run.val_data.close()


def _captured_step(run: Run, sums: torch.Tensor) -> graphs.CapturedStep:
    """compile=graphs: what _eager_step does for a full batch in one process, recorded as one CUDA graph."""
    cfg, engine, optimizer = run.cfg, run.engine, run.optimizer
    shift, hflip, batch = cfg.augment.shift, cfg.augment.hflip, cfg.batch_size

    def whole_step(x, y):
        x = apply(x, draw(batch, shift, hflip, run.augment_rng), shift, run.background, hflip)
        loss_sum, correct, _ = engine.forward_backward(x.contiguous(memory_format=run.memory_format), y, 1.0)
        sums[0] += loss_sum
        sums[1] += correct
        optimizer.step()

    return graphs.CapturedStep(x=run.train_data.x, y=run.train_data.y, batch=batch, body=whole_step,
                               optimizer=optimizer, generator=run.augment_rng, capture=run.capture,
                               fallback=cfg.compile == "auto", log=run.log)


def _eager_step(run: Run, state: LoopState, sums: torch.Tensor, batch_len: int, chunks, stream) -> None:
    """One optimizer step through the engine, chunk by chunk (this process's share, in micro-batches).
    Augmentation is drawn for the global batch; each process applies the rows of its share."""
    shift, hflip = run.cfg.augment.shift, run.cfg.augment.hflip
    params = draw(batch_len, shift, hflip, run.augment_rng)
    for k, chunk in enumerate(chunks):
        xb, yb = next(stream)
        xb = apply(xb, params[chunk], shift, run.background, hflip).contiguous(memory_format=run.memory_format)
        loss_sum, correct, count = run.engine.forward_backward(xb, yb, len(chunk) / batch_len,
                                                               last=k == len(chunks) - 1)
        sums[0] += loss_sum
        sums[1] += correct
        state.running["count"] += count
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _epoch(run: Run, state: LoopState, sums, captured, progress: _Progress, t_last: float) -> float:
    """The rest of the epoch state.step is in, to its end (validation, checkpoint) or to the run's last step.
    Returns the training clock's mark."""
    cfg, engine, batch, steps_per_epoch = run.cfg, run.engine, run.cfg.batch_size, run.steps_per_epoch
    epoch, position = divmod(state.step, steps_per_epoch)
    order = epoch_order(len(run.train_data), epoch, cfg.seed)
    on_device = order.to(run.device) if captured is not None else None  # the captured step's indices, copied once
    batches = []  # the rest of this epoch, chunk by chunk, so that a streamed split can read ahead
    for pos in range(position, min(steps_per_epoch, position + run.total_steps - state.step)):
        index = order[pos * batch:(pos + 1) * batch]
        whole = on_device[pos * batch:(pos + 1) * batch] if captured is not None and captured.takes(len(index)) else None
        batches.append((len(index), step_chunks(len(index), engine, cfg.optim.grad_accum), index, whole))
    flat = [index[chunk] for _, chunks, index, whole in batches if whole is None for chunk in chunks]
    stream = run.train_data.batches(flat)
    for batch_len, chunks, _, whole in batches:
        lr = learning_rate(state.step, run.total_steps, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if whole is not None:  # compile=graphs: the whole step, replayed from one CUDA graph
            captured.step(whole, lr)
            state.running["count"] += batch_len
        else:
            _eager_step(run, state, sums, batch_len, chunks, stream)
        engine.after_step()
        state.step += 1
        state.images_seen += batch_len
        end = state.step % steps_per_epoch == 0 or state.step == run.total_steps
        saving = state.step == run.total_steps or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) \
            or (not cfg.checkpoint_every and end)
        if end or saving or (progress.wants_sums and state.step % 10 == 0):
            # Reading the sums waits for the device: the steps a GPU still had queued count as training time.
            state.running["loss"] += sums[0].item()
            state.running["correct"] += sums[1].item()
            sums.zero_()
        now = time.perf_counter()
        state.train_seconds, t_last = state.train_seconds + now - t_last, now
        progress.show(state, epoch)
        run.threads.check(state.step, progress.print if progress.bar is not None else run.log)
        improved = False
        if end:
            engine.sync(run.optimizer)
            improved = end_of_epoch(run, state, lr, progress.print if progress.bar is not None else run.log)
        if improved or saving or state.stopped_early:
            save(run, state, synced=end)
        if state.stopped_early:
            run.log(f"early stopping: validation accuracy has not improved for {_plural(state.bad_epochs, 'epoch')}")
        t_last = time.perf_counter()  # validation and checkpoint I/O are not training time
        if end or state.stopped_early:
            break
    return t_last

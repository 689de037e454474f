"""Checkpoints from the loop's side: what a save writes (every tensor, RNG and counter) and how a resumed run
takes it all back, exactly, on every process."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from tandem.config import TrainConfig, dump_config
from tandem.errors import UserError
from tandem.files import write_text_atomic
from tandem.train import checkpoint as ckpt
from tandem.train.models import floor_pooled
from tandem.train.optim import set_capturable
from tandem.train.runs import link_latest, mark_job
from tandem.train.state import LoopState, Run, no_examples


def start_log(run_dir: Path, cfg: TrainConfig, step: int) -> Path:
    """config.yaml as this run resolved it; metrics.jsonl cut back to what the resumed state has seen;
    runs/latest moved here once the run has really started."""
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    mark_job(run_dir)
    link_latest(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() and step else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return metrics_path


def restore(run: Run) -> LoopState:
    """The loop's state at the newest good checkpoint, with every process's part of the model and optimizer,
    its RNG streams and the augmentation's generator as they were; a fresh state when there is none yet."""
    state, saved_augment = _read_newest(run)
    if saved_augment is not None:
        _restore_augment(run, saved_augment)
    set_capturable(run.optimizer, run.capture)
    return state


def _restore_augment(run: Run, saved: torch.Tensor) -> None:
    """The augmentation's random stream goes on where it stopped, on its own device: a CPU and a CUDA generator's
    states differ in size, and a captured step draws on the GPU."""
    cfg, device = run.cfg, run.device
    if saved.numel() != run.augment_rng.get_state().numel():
        if device.type != "cuda":
            raise UserError(f"--resume {run.run_dir}: the run drew its augmentation on a GPU (compile=graphs); "
                            "resume it on a GPU (device=cuda)")
        run.augment_rng = torch.Generator(device=device if not run.capture else "cpu")
        if run.capture:  # the run drew on the CPU (compile=off or inductor): a captured step cannot go on with that
            if cfg.compile == "graphs":
                raise UserError(f"--resume {run.run_dir}: the run drew its augmentation on the CPU (it ran with "
                                "compile=off or inductor), which a captured step cannot continue; resume it "
                                "with compile=off")
            run.log("compile=auto: the run drew its augmentation on the CPU; it goes on eagerly (compile=off)")
            run.compiled, run.capture = "off", False
    run.augment_rng.set_state(saved)


def _read_newest(run: Run) -> tuple[LoopState, torch.Tensor | None]:
    """Rank 0 finds the newest good checkpoint and reads it; every process takes its part of the state. Returns the
    loop's state and the augmentation generator's saved state (the caller picks the generator it fits)."""
    run_dir, dist_, engine, layout, log = run.run_dir, run.dist, run.engine, run.layout, run.log

    def newest() -> ckpt.Checkpoint | None:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            return None
        was_streamed = bool(found.state.get("data_decode", {}).get("streamed"))
        if was_streamed != run.streamed:  # the two modes fingerprint the same images differently
            before = "streamed its folder" if was_streamed else "held its images in memory"
            now = "stream it" if run.streamed else "hold them in memory"
            raise UserError(f"--resume {run_dir}: the run {before}, this one would {now} (data.stream=auto decides by "
                            f"the memory available); resume with data.stream={'on' if was_streamed else 'off'}")
        if found.state.get("data_fingerprint") not in (None, run.fingerprint):
            raise UserError(f"--resume {run_dir}: the training images differ from the ones this run was trained on "
                            "(files added, removed or changed); resuming would mix two data sets: start a new run")
        cfg = run.cfg
        if cfg.model.name == "cnn" and floor_pooled(found.model, cfg.data.image_size, cfg.model.width):
            raise UserError(f"--resume {run_dir}: the run was trained with the earlier cnn, whose pools dropped the "
                            "last row and column of the feature map; it can still be exported and explained, but "
                            "not trained further by this version: start a new run")
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
    engine.load_state(model_state, run.optimizer, ckpt.unflatten_optimizer(trainer, meta["optimizer"]))
    own = "" if dist_.is_main else f".{dist_.rank}"  # rank r > 0 saved its streams as rng.torch.<r>
    torch.set_rng_state(trainer[f"rng.torch{own}"])
    if run.device.type == "cuda" and f"rng.cuda{own}" in trainer:
        torch.cuda.set_rng_state(trainer[f"rng.cuda{own}"])
    state = LoopState(step=meta["step"], **meta["loop"])
    engine.resume_at(state.step)
    if dist_.is_main:
        engine.comm_bytes = state.comm_bytes  # the job's count goes on from the checkpoint's
    else:
        state.running = no_examples()  # rank 0 carries the epoch's partial sums
    if state.stopped_early:
        note = " (the run had stopped early: nothing left to train)"
    elif state.step >= run.total_steps:
        note = f" (the run was already complete at step {state.step}: nothing left to train; evaluating it again)"
    else:
        note = ""
    log(f"resumed from {meta['path']} at step {state.step}{note}")
    return state, trainer["rng.augment"]


def save(run: Run, state: LoopState, synced: bool) -> Path | None:
    """A checkpoint of the whole state (a collective: every process calls it; rank 0 writes). synced: the engine's
    sync() has run since the last step."""
    engine, optimizer, dist_, device = run.engine, run.optimizer, run.dist, run.device
    if not synced:
        engine.sync(optimizer)  # every process holds the whole state: rank 0 writes it
    extra = {"epoch": state.step / run.steps_per_epoch, "total_steps": run.total_steps, "classes": run.classes,
             "precision": run.precision, "data_fingerprint": run.fingerprint, "data_decode": run.splits.train.decode,
             "parallel": run.layout}
    optim_state = engine.full_optimizer_state(optimizer)
    # Each process's own RNG streams: pipeline stages draw dropout masks on some processes and not others.
    rngs = {"rng.torch": dist_.all_gather(torch.get_rng_state())}
    if device.type == "cuda":
        rngs["rng.cuda"] = dist_.all_gather(torch.cuda.get_rng_state())
    running = {k: dist_.all_reduce_sum(torch.tensor(float(v), dtype=torch.float64)).item()
               for k, v in state.running.items()}
    # The partial sums of the epoch so far, over every process: rank 0 carries them on, the others start
    # again from zero (a resumed run does the same), so the epoch's figures are the same either way.
    state.running = running if dist_.is_main else no_examples()
    state.comm_bytes = engine.report().get("comm_bytes", 0)
    if not dist_.is_main:
        return None
    return _write(run, engine.model, optim_state, state, extra, rngs)


def _write(run: Run, model, optim_state: dict, state: LoopState, extra: dict,
           rngs: dict[str, list[torch.Tensor]]) -> Path:
    tensors, optim_meta = ckpt.flatten_optimizer(optim_state)
    for name, per_rank in rngs.items():  # rank 0's under the one-process name, rank r's as <name>.<r>
        for rank, rng in enumerate(per_rank):
            tensors[name if rank == 0 else f"{name}.{rank}"] = rng
    tensors["rng.augment"] = run.augment_rng.get_state()
    loop = {k: v for k, v in asdict(state).items() if k != "step"}
    meta = {**extra, "config": run.cfg.model_dump(), "optimizer": optim_meta, "loop": loop}
    return ckpt.save_checkpoint(run.run_dir, state.step, model.state_dict(), tensors, meta, run.cfg.keep_checkpoints,
                                protect=state.best_step)

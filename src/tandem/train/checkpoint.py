"""Checkpoints: tensors in safetensors, everything else in JSON; atomic writes; exact resume.

A checkpoint is a folder `<run>/checkpoints/step-00000123/` holding

    model.safetensors     model parameters and buffers
    trainer.safetensors   optimizer tensors and RNG states
    state.json            step, loop state, optimizer hyperparameters, config, sha256 of the two files

written under a temporary name, fsynced, then renamed: a crash leaves either the old set or the new
one, never half a checkpoint. Loading checks the hashes; a corrupt checkpoint is skipped for the one
before it, with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tandem.bundle import sha256_file
from tandem.errors import UserError
from tandem.files import fsync_dir, fsync_file

FORMAT_VERSION = 1
PREFIX = "step-"


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors for safetensors, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: dict[str, torch.Tensor]
    trainer: dict[str, torch.Tensor]


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    trainer_tensors: dict[str, torch.Tensor], state: dict, keep: int = 3,
                    protect: int | None = None) -> Path:
    """Write one checkpoint atomically and prune all but the newest `keep` and the step `protect` (the best)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {"model.safetensors": model_state, "trainer.safetensors": trainer_tensors}
    hashes = {}
    for name, tensors in files.items():
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / name))
        fsync_file(tmp / name)
        hashes[name] = sha256_file(tmp / name)
    state = {"format_version": FORMAT_VERSION, "step": step, **state, "files": hashes}
    with open(tmp / "state.json", "w") as handle:
        json.dump(state, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. end of an epoch that was also a save step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    # The best checkpoint is what export ships: pruning by age must not take it.
    kept = {checkpoint_path(run_dir, protect)} if protect is not None else set()
    for old in list_checkpoints(run_dir)[:-keep]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of a killed write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint folder; raises UserError saying what is wrong with it."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no state.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {path}: state.json is corrupt") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state.get('format_version')}, this tandem reads {FORMAT_VERSION}")
    loaded = {}
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path}: {name} is missing")
        if sha256_file(file) != expected:
            raise UserError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
        loaded[name] = load_file(str(file))
    if set(loaded) != {"model.safetensors", "trainer.safetensors"}:
        raise UserError(f"checkpoint {path}: state.json does not list its tensor files")
    return Checkpoint(path, state, loaded["model.safetensors"], loaded["trainer.safetensors"])


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path)
        except UserError as err:
            print(f"warning: {err}; falling back to the checkpoint before it", file=sys.stderr)
    return None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def best_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint with the best validation accuracy (the newest one when the run has no validation)."""
    newest = latest_checkpoint(run_dir)
    best_step = newest.state["loop"].get("best_step") if newest else None
    if newest is None or best_step is None or best_step == newest.state["step"]:
        return newest
    try:
        return read_checkpoint(checkpoint_path(run_dir, best_step))
    except UserError as err:
        print(f"warning: best checkpoint unusable ({err}); using the newest one", file=sys.stderr)
        return newest


def resolve_checkpoint(path: Path) -> Checkpoint:
    """A run folder (its best good checkpoint) or one checkpoint folder -> a verified Checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder (the train out_dir) or one of its checkpoints")
    if (path / "state.json").is_file():
        return read_checkpoint(path)
    found = best_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no usable checkpoint; give the folder of a `tandem train` run "
                        "(its out_dir) or one of its checkpoints/step-* folders")
    return found

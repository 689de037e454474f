"""Exact resume: a run killed with SIGKILL and resumed ends with bitwise the same weights as one never killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_tandem
from tandem.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _settings(npz: Path, out: Path) -> list[str]:
    # Dropout and augmentation on, so every RNG stream has to be restored exactly.
    return [f"data.source={npz}", "model.width=8", "model.dropout=0.2", "epochs=3", "batch_size=32",
            "checkpoint_every=4", "keep_checkpoints=2", f"out_dir={out}"]


def _final_weights(run: Path) -> dict:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def _curve(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_second", "train_seconds")} for line in lines]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(small_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_tandem("train", *_settings(small_npz, out), check=True)
    return out


def _start_and_kill(settings: list[str], out: Path, when) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tandem", "train", *settings],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not when(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the kill point; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _steps_saved(out: Path) -> int:
    return len(list((out / "checkpoints").glob("*"))) if (out / "checkpoints").exists() else 0


@pytest.mark.parametrize("when", [
    pytest.param(lambda out: (out / "config.yaml").exists(), id="before-any-checkpoint"),
    pytest.param(lambda out: _steps_saved(out) >= 1, id="right-after-first-checkpoint"),
    pytest.param(lambda out: (out / "checkpoints").exists() and any(
        p.name.startswith(".") for p in (out / "checkpoints").iterdir()), id="while-writing-a-checkpoint"),
    pytest.param(lambda out: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0,
                 id="after-first-epoch"),
])
def test_kill_and_resume_is_bitwise_identical(reference, small_npz, tmp_path, when):
    out = tmp_path / "run"
    settings = _settings(small_npz, out)
    _start_and_kill(settings, out, when)
    resumed = run_tandem("train", "--resume", str(out), check=True)
    assert "resumed from" in resumed.stdout or "starting from step 0" in resumed.stdout
    _assert_same(_final_weights(out), _final_weights(reference))
    assert _curve(out) == _curve(reference)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(reference, small_npz, tmp_path):
    out = tmp_path / "run"
    _start_and_kill(_settings(small_npz, out), out, lambda o: _steps_saved(o) >= 2)
    newest = list_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a failing disk
    resumed = run_tandem("train", "--resume", str(out), check=True)
    assert f"checkpoint {newest}: model.safetensors is corrupt" in resumed.stderr
    assert "falling back" in resumed.stderr
    _assert_same(_final_weights(out), _final_weights(reference))

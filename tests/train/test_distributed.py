"""Data parallelism under torchrun (gloo, 2 processes) against one process: same weights, same resume.

One process with optim.grad_accum=2 splits each batch into the strided micro-batches (rows k::2) that two
ddp processes take as their shares, so even the cnn's batch norm sees the same micro-batches either way.
Every process of a torchrun job gets OMP_NUM_THREADS=1; the one-process references get it too, because
oneDNN's conv backward rounds differently with 2 threads than with 1.
"""

from __future__ import annotations

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

from helpers import REPO, run_tandem
from tandem.train.checkpoint import list_checkpoints
from tandem.train.models import count_parameters, create_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread_everywhere(monkeypatch):
    """What torchrun itself sets when OMP_NUM_THREADS is unset (conftest.py pins the other tests to every CPU)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _settings(npz: Path, out: Path, *extra: str, model: str = "cnn") -> list[str]:
    return [f"data.source={npz}", f"model.name={model}", "model.width=8", "batch_size=64", "epochs=2",
            "precision=fp32", "progress=false", "parallel.timeout=60", f"out_dir={out}", *extra]


def torchrun(n: int, *args: str, timeout: float = 240, restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           f"--max-restarts={restarts}", "-m", "tandem", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(run: Path) -> dict:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _assert_close(a: dict, b: dict, atol: float = 1e-5, buffers: bool = False) -> None:
    """Weights equal within atol. Batch-norm running statistics differ by design under ddp (each process
    keeps those of its own micro-batches; rank 0's are saved), so they are compared only when asked."""
    assert a.keys() == b.keys()
    for name in a:
        if buffers or not name.endswith(BUFFERS):
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_ddp_on_two_processes_equals_one_process(small_npz, tmp_path):
    """cnn (batch norm, augmentation on): 2 ddp processes == 1 process with the same two micro-batches; mlp:
    2 processes with batch B/2 each == 1 process with batch B."""
    one = tmp_path / "one"
    run_tandem("train", *_settings(small_npz, one, "optim.grad_accum=2"), check=True, env=ONE_THREAD)
    two = tmp_path / "two"
    _ok(torchrun(2, "train", *_settings(small_npz, two)))
    _assert_close(_weights(one), _weights(two))
    results = json.loads((two / "results.json").read_text())
    assert results["parallel"]["strategy"] == "ddp" and results["parallel"]["processes"] == 2
    assert results["parallel"]["comm_bytes"] > 0
    one_curve = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    two_curve = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one_curve, two_curve, strict=True):  # metrics summed over processes in one place
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"])

    mlp_one, mlp_two = tmp_path / "mlp-one", tmp_path / "mlp-two"
    run_tandem("train", *_settings(small_npz, mlp_one, model="mlp"), check=True, env=ONE_THREAD)
    _ok(torchrun(2, "train", *_settings(small_npz, mlp_two, model="mlp")))
    _assert_close(_weights(mlp_one), _weights(mlp_two))
    # Only rank 0 writes: one metrics line per epoch, one set of checkpoints.
    assert len((mlp_two / "metrics.jsonl").read_text().splitlines()) == 2


def test_local_sgd_averaging_every_step_equals_ddp(small_npz, tmp_path):
    ddp, local = tmp_path / "ddp", tmp_path / "local"
    _ok(torchrun(2, "train", *_settings(small_npz, ddp, model="mlp")))
    _ok(torchrun(2, "train", *_settings(small_npz, local, "parallel.strategy=local-sgd", "parallel.average_every=1",
                                       model="mlp")))
    _assert_close(_weights(ddp), _weights(local))


def test_local_sgd_ranks_agree_right_after_each_average(tmp_path):
    out = tmp_path / "local.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "helpers" / "distributed_worker.py"), "3", "7", str(out)],
                          capture_output=True, text=True, timeout=120)
    _ok(proc)
    seen = json.loads(out.read_text())
    assert seen["identical"] == [False, False, True, False, False, True, False]
    params = 4 * count_parameters(create_model("mlp", 1, 8, 4, width=2))  # the worker's model, fp32
    assert seen["comm_bytes"] == 2 * params  # two averages of every parameter, nothing else


def _rank_pids(parent: int, rank: str) -> list[int]:
    """Processes below `parent` whose environment says RANK=rank (torchrun's workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return found


STRATEGIES = {
    "ddp": [],
    "local-sgd": ["parallel.strategy=local-sgd", "parallel.average_every=3"],
    "tensor": ["parallel.strategy=tensor"],
    "pipeline": ["parallel.strategy=pipeline", "parallel.microbatches=2"],
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_killed_rank_restarts_from_the_last_checkpoint(small_npz, tmp_path, strategy):
    """torchrun --max-restarts 1: SIGKILL rank 1 after the first checkpoint; the job restarts, resumes from
    the newest checkpoint and ends with the weights of a run never killed, under every strategy."""
    settings = ["epochs=3", "checkpoint_every=4", "model.dropout=0.2", *STRATEGIES[strategy]]
    reference = tmp_path / "reference"
    _ok(torchrun(2, "train", *_settings(small_npz, reference, *settings)))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "tandem", "train", *_settings(small_npz, out, *settings)]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        victims = _rank_pids(agent.pid, "1")
        assert agent.poll() is None and victims, "the run ended (or never started) before the kill point"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, stderr[-4000:]
    assert "resumed from" in stdout, stdout[-2000:]
    _assert_close(_weights(out), _weights(reference), atol=0, buffers=True)
    assert _curve(out) == _curve(reference)


def _curve(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items()
             if k not in ("images_per_second", "train_seconds", "bubble_measured")} for line in lines]


@pytest.mark.parametrize("strategy,model", [("tensor", "cnn"), ("pipeline", "cnn"), ("pipeline", "mlp")])
def test_model_parallel_runs_equal_one_process_and_export(small_npz, tmp_path, strategy, model):
    """tandem train under tensor / pipeline parallelism == one process (pipeline: with the same micro-batches as
    optim.grad_accum), and its run exports to the usual bundle. (The mlp's second stage starts with an in-place
    ReLU on what it receives.)"""
    extra = STRATEGIES[strategy]
    one = tmp_path / "one"
    accum = ["optim.grad_accum=2"] if strategy == "pipeline" else []
    # Two steps (the second with momentum): the strategies' kernels round differently from one process's (1e-7
    # after a step), and on these binary silhouettes rounding is chaotic: a last-bit change flips a max-pool or
    # ReLU near-tie and moves a whole gradient. Measured on an AVX2-only Zen 3: pipeline-cnn 1.7e-7 after two
    # steps, 2.4e-4 after three; one process on 1 thread against 2 threads already 3.7e-4 after one step.
    steps = ["max_steps=2"]
    run_tandem("train", *_settings(small_npz, one, *accum, *steps, model=model), check=True, env=ONE_THREAD)
    run = tmp_path / "run"
    _ok(torchrun(2, "train", *_settings(small_npz, run, *extra, *steps, model=model)))
    _assert_close(_weights(one), _weights(run))
    results = json.loads((run / "results.json").read_text())
    assert results["parallel"]["strategy"] == strategy
    if strategy == "pipeline":
        assert 0 < results["parallel"]["bubble_measured"] < 1
        assert results["parallel"]["bubble_formula"] == pytest.approx(1 / 3, abs=1e-4)  # p=2, m=2: (p-1)/(m+p-1)
    bundle = tmp_path / "bundle"
    run_tandem("export", str(run), "--out", str(bundle), check=True)
    assert (bundle / "manifest.json").is_file()


def test_a_restarted_job_never_continues_another_run(small_npz, tmp_path):
    """--max-restarts: the first attempt is refused a folder holding an earlier run; the restart must be refused
    too, not continue that run with its old config."""
    out = tmp_path / "earlier"
    run_tandem("train", *_settings(small_npz, out, "max_steps=2", model="mlp"), check=True)
    before = sorted(p.name for p in list_checkpoints(out))
    proc = torchrun(2, "train", *_settings(small_npz, out, "parallel.strategy=pipeline"), restarts=1)
    assert proc.returncode != 0
    assert "holds another run" in proc.stderr and "resumed from" not in proc.stdout
    assert sorted(p.name for p in list_checkpoints(out)) == before


def test_resume_needs_the_same_process_count(small_npz, tmp_path):
    out = tmp_path / "run"
    _ok(torchrun(2, "train", *_settings(small_npz, out, "max_steps=3", model="mlp")))
    proc = run_tandem("train", "--resume", str(out))
    assert proc.returncode == 2
    assert "trained with parallel.strategy=ddp on 2 processes" in proc.stderr and "Traceback" not in proc.stderr
    assert "this one runs in one process (without torchrun)" in proc.stderr


def test_an_error_on_one_rank_names_it_and_ends_the_job(small_npz, tmp_path):
    """Rank 0 decides the run folder; its refusal reaches every rank, and nobody waits for the timeout."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    started = time.monotonic()
    proc = torchrun(2, "train", *_settings(small_npz, blocked, model="mlp"), timeout=120)
    assert proc.returncode != 0
    assert "rank 0: out_dir" in proc.stderr and "rank 1: out_dir" in proc.stderr
    # torchrun itself ends with a traceback of its ChildFailedError; none comes from tandem's processes.
    assert "tandem/train" not in proc.stderr and "tandem/cli.py" not in proc.stderr
    assert time.monotonic() - started < 50  # far below parallel.timeout (60 s)


def test_export_turns_a_ddp_run_into_the_usual_bundle(small_npz, tmp_path):
    run = tmp_path / "run"
    _ok(torchrun(2, "train", *_settings(small_npz, run, "max_steps=4")))
    bundle = tmp_path / "bundle"
    run_tandem("export", str(run), "--out", str(bundle), check=True)
    assert (bundle / "manifest.json").is_file()

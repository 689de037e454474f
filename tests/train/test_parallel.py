"""Tensor and pipeline parallelism (train/parallel/) against one process with the same seed.

Two torchrun jobs (2 and 4 processes, gloo) run tests/helpers/parallel_worker.py once each; the tests compare what they
saved with one process built here: tensor parallel = the same batch in one piece; pipeline = one process with
optim.grad_accum = data x microbatches, strided chunks (chunk k = rows k::chunks of each batch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

from helpers import parallel_worker as pw
import pytest
import torch

from tandem.errors import UserError
from tandem.train.parallel.group import Dist
from tandem.train.parallel.pipeline import PipelineParallel, balanced_split
from tandem.train.parallel.tensor import TensorParallel

WORKER = Path(pw.__file__)
TOL = 1e-5


def _launch(world: int, out: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(world), str(WORKER), str(world), str(out)],
                          check=False, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return _launch(2, tmp_path_factory.mktemp("parallel-2"))


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Path:
    return _launch(4, tmp_path_factory.mktemp("parallel-4"))


def _result(folder: Path, name: str) -> dict:
    return torch.load(folder / f"{name}.pt", weights_only=True)


def _close(got: dict, want: dict, keys=None) -> None:
    for key in keys if keys is not None else want:
        assert got[key].shape == want[key].shape, key
        diff = (got[key].double() - want[key].double()).abs().max().item()
        assert diff <= TOL, f"{key}: differs by {diff:.3g}"


def _check(world: int, folder: Path, name: str, buffers: bool = True) -> dict:
    """Loss of every step, final weights (and buffers) and the full optimizer state equal one process."""
    cfg, _ = pw.scenarios(world)[name]
    chunks = cfg.parallel.data * (cfg.parallel.microbatches if cfg.parallel.strategy == "pipeline" else 1)
    model, optimizer, losses, grads = pw.reference(cfg, chunks)
    got = _result(folder, name)
    assert got["losses"] == pytest.approx(losses, abs=TOL)
    state = model.state_dict()
    _close(got["model"], state, None if buffers else [n for n, _ in model.named_parameters()])
    want_opt = optimizer.state_dict()
    assert got["optimizer"]["param_groups"] == want_opt["param_groups"]
    assert sorted(got["optimizer"]["state"]) == sorted(want_opt["state"])
    for index, per_param in want_opt["state"].items():
        _close(got["optimizer"]["state"][index], per_param)
    if "grads" in got:  # first step's gradients, gathered from the shards
        _close(got["grads"], grads)
    return got


def multiprocess(test):
    return pytest.mark.multiprocess(pytest.mark.slow(test))


@multiprocess
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_tensor_parallel_matches_one_process(two, model):
    got = _check(2, two, f"tensor-{model}")
    cfg, _ = pw.scenarios(2)[f"tensor-{model}"]
    reference = pw.build(cfg).eval()
    x, _, order = pw.batches(cfg)
    with torch.no_grad():
        want = reference(x[order[0]])
    assert (got["logits"] - want).abs().max().item() <= TOL
    assert got["comm_bytes_per_step"] > 0


@multiprocess
def test_tensor_parallel_resume_round_trip(two):
    _check(2, two, "tensor-cnn-resume")


@multiprocess
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_pipeline_matches_strided_grad_accumulation(two, schedule, model):
    got = _check(2, two, f"pipeline-{schedule}-{model}")
    measured, formula = got["bubble"]
    assert formula == pytest.approx(1 / 5)  # 2 stages, 4 micro-batches
    assert 0.0 <= measured < 1.0
    # report() sums over the processes: stage 0 sends the activations, stage 1 their gradients (as many bytes).
    assert got["report"] == {"comm_bytes": pytest.approx(2 * 3 * got["comm_bytes_per_step"]),
                             "bubble_measured": pytest.approx(measured, abs=1e-4), "bubble_formula": 0.2}
    layers = [name for stage in got["split"] for name in stage]
    assert len(got["split"]) == 2 and layers == [str(i) for i in range(len(layers))]
    # Activations forward and gradients back, one of each per example across the cut: shapes known.
    assert got["comm_bytes_per_step"] > 0


@multiprocess
def test_pipeline_resume_round_trip(two):
    _check(2, two, "pipeline-1f1b-cnn-resume")


@multiprocess
def test_data_times_pipeline_matches_one_process(four):
    # Parameters and losses equal one process with grad_accum = 2 x 2; batch-norm running statistics are data
    # replica 0's (as with ddp), which saw half the micro-batches.
    _check(4, four, "pipeline-data-cnn", buffers=False)
    _check(4, four, "pipeline-data-mlp-resume")


@multiprocess
def test_data_times_tensor_matches_one_process(four):
    _check(4, four, "tensor-data-mlp")


# Configuration errors, found before any process group is touched.


def _engine(kind, model: str = "cnn", world: int = 2, **parallel):
    cfg = pw.make_cfg(model, "tensor" if kind is TensorParallel else "pipeline")
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update=parallel)})
    return kind(cfg, Dist(rank=0, world=world), pw.build(cfg), pw.loss_fn(cfg), nullcontext, torch.device("cpu"))


def test_resnet_has_no_tensor_plan():
    from tandem.train.models import create_model

    cfg = pw.make_cfg("cnn", "tensor")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "resnet"})})
    model = create_model("resnet", 1, 16, 5, 4)
    with pytest.raises(UserError, match="model resnet has no tensor-parallel plan; use parallel.strategy=ddp or "
                                        "pipeline, or model.name=mlp/cnn"):
        TensorParallel(cfg, Dist(rank=0, world=2), model, pw.loss_fn(cfg), nullcontext, torch.device("cpu"))


@pytest.mark.parametrize(("world", "parallel", "message"), [
    (2, {"data": 2, "stages": 2}, r"parallel.data=2 x parallel.stages=2 = 4 processes, but 2 were started"),
    (3, {"data": 2}, r"parallel.data=2 x parallel.stages=1 = 2 processes, but 3 were started"),
    (2, {"schedule": "1f1b", "microbatches": 1}, r"1f1b needs parallel.microbatches >= stages \(1 < 2\)"),
    (2, {"microbatches": 3}, r"batch_size=16 is not a multiple of parallel.data x parallel.microbatches = 1 x 3"),
    (30, {"stages": 30, "microbatches": 1, "schedule": "gpipe"}, r"parallel.stages=30 but model cnn has only 21"),
])
def test_pipeline_config_errors(world, parallel, message):
    with pytest.raises(UserError, match=message):
        _engine(PipelineParallel, world=world, **parallel)


def test_balanced_split():
    assert balanced_split([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_split([10, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_split([1, 2, 3], 3) == [0, 1, 2]

"""Run folders never mix two runs; a resume changes only what it can honour; the bundle describes the
model it holds (the best checkpoint, its own test accuracy); a finished early-stopped run stays finished."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import run_tandem
from tandem.bundle import read_manifest
from tandem.config import TrainConfig, load_config
from tandem.errors import UserError
from tandem.train import checkpoint as ckpt
from tandem.train.loop import load_splits, train
from tandem.train.runs import resume_config

QUIET = {"log": lambda *a, **k: None}


def _cfg(npz, out, **extra) -> TrainConfig:
    tree = {"data": {"source": str(npz)}, "model": {"name": "mlp", "width": 4}, "batch_size": 64, "epochs": 1,
            "out_dir": str(out), "progress": False, "precision": "fp32"}
    tree.update(extra)
    return TrainConfig.model_validate(tree)


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(small_npz, tmp_path):
    first = train(_cfg(small_npz, tmp_path / "run", epochs=2), **QUIET)
    before = ckpt.list_checkpoints(tmp_path / "run")
    with pytest.raises(UserError, match="holds another run; resume it with"):
        train(_cfg(small_npz, tmp_path / "run", model={"name": "mlp", "width": 8}), **QUIET)
    assert ckpt.list_checkpoints(tmp_path / "run") == before and first.last_checkpoint in before  # untouched
    second = train(_cfg(small_npz, tmp_path / "run", model={"name": "mlp", "width": 8}, overwrite=True), **QUIET)
    # Only the second run's checkpoints, results and log are left, and they describe its model.
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == [second.last_checkpoint.name]
    weights = load_file(str(second.last_checkpoint / "model.safetensors"))
    assert weights["1.weight"].shape[0] == 16 * 8  # width 8
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["checkpoint"] == str(second.checkpoint)


@pytest.mark.parametrize("files", [["thesis.tex"], ["config.yaml", "data/notes.txt"],
                                   ["checkpoints/x", "results.json", "src/model.py"]])
def test_a_folder_that_is_not_a_run_is_never_cleared(small_npz, tmp_path, files):
    """Even with overwrite=true, and even when it has a config.yaml or a checkpoints/ of its own."""
    for name in files:
        (tmp_path / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mine" / name).write_text("years of work")
    with pytest.raises(UserError, match="is not empty and is not a tandem run"):
        train(_cfg(small_npz, tmp_path / "mine", overwrite=True), **QUIET)
    assert all((tmp_path / "mine" / name).read_text() == "years of work" for name in files)


def test_a_run_that_cannot_start_leaves_latest_alone(small_npz, tmp_path, monkeypatch):
    """No empty folder, runs/latest still on the last run that started; paths saved absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.npz").write_bytes(small_npz.read_bytes())
    good = train(_cfg("data.npz", "", max_steps=1), **QUIET)
    with pytest.raises(UserError, match="does not exist"):
        train(_cfg("missing.npz", "", max_steps=1), **QUIET)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([good.run_dir.name, "latest"])
    assert (tmp_path / "runs" / "latest").resolve() == good.run_dir.resolve()
    saved = load_config(good.run_dir / "config.yaml")
    assert saved.data.source == str(tmp_path / "data.npz")  # resume and export work from any folder
    named = train(_cfg("data.npz", "runs/exp1", max_steps=1), **QUIET)  # a named run in runs/ is the newest too
    assert (tmp_path / "runs" / "latest").resolve() == named.run_dir.resolve()


def test_runs_without_out_dir_get_their_own_folders_and_latest_follows(small_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(_cfg(small_npz, "", max_steps=1), **QUIET)
    second = train(_cfg(small_npz, "", max_steps=1), **QUIET)
    assert first.run_dir != second.run_dir
    assert first.run_dir.resolve().parent == second.run_dir.resolve().parent == tmp_path / "runs"
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == second.run_dir.resolve()
    assert ckpt.list_checkpoints(first.run_dir) and ckpt.list_checkpoints(second.run_dir)
    # --resume through the link resumes the run it points at, under its real name.
    assert resume_config(latest, []).out_dir == str(second.run_dir.resolve())


@pytest.fixture(scope="module")
def stopped_run(small_npz, tmp_path_factory):
    """A cnn whose validation accuracy cannot move (lr 1e-9): best after epoch 1, stopped after epoch 3.
    Batch norm's running statistics still change, so the three checkpoints hold different weights."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    cfg = _cfg(small_npz, out, model={"name": "cnn", "width": 4}, epochs=10, early_stopping=2, keep_checkpoints=1,
               optim={"lr": 1e-9, "momentum": 0.0})
    return cfg, train(cfg, **QUIET)


def test_resume_refuses_what_it_cannot_honour(stopped_run):
    cfg, result = stopped_run
    for override, named in [("seed=7", "seed (0 -> 7)"), ("data.val_fraction=0.3", "data.val_fraction"),
                            ("epochs=3", "epochs (10 -> 3)"), ("model.width=8", "model.width (4 -> 8)")]:
        with pytest.raises(UserError, match=r"--resume cannot change .*" + named.replace("(", r"\(").replace(")", r"\)")):
            resume_config(result.run_dir, [override])
    allowed = resume_config(result.run_dir, ["keep_checkpoints=5", "progress=false"])
    assert allowed.keep_checkpoints == 5 and allowed.seed == cfg.seed
    # Through the command: one line, no traceback.
    proc = run_tandem("train", "--resume", str(result.run_dir), "model.width=8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model.width (4 -> 8)" in proc.stderr


def test_resume_refuses_changed_training_data(small_npz, tmp_path):
    data = tmp_path / "data.npz"
    with np.load(small_npz) as arrays:
        x, y, classes = arrays["x"].copy(), arrays["y"], arrays["classes"]
    np.savez(data, x=x, y=y, classes=classes)
    run = tmp_path / "run"
    train(_cfg(data, run, max_steps=2, checkpoint_every=1, epochs=3), **QUIET)
    x[:20] = 255 - x[:20]  # the user re-made the data set since
    np.savez(data, x=x, y=y, classes=classes)
    with pytest.raises(UserError, match="the training images differ from the ones this run was trained on"):
        train(resume_config(run, []), resume=True, **QUIET)


def test_a_finished_early_stopped_run_does_not_train_on_when_resumed(stopped_run):
    cfg, result = stopped_run
    assert result.metrics["stopped_early"] and result.metrics["steps"] == 3 * 8  # 480 train images, 8 steps/epoch
    before = (result.run_dir / "metrics.jsonl").read_text()
    again = train(resume_config(result.run_dir, []), resume=True, **QUIET)
    assert again.metrics["steps"] == result.metrics["steps"]
    assert (result.run_dir / "metrics.jsonl").read_text() == before


def test_export_ships_the_best_checkpoint_with_its_own_metrics(stopped_run, tmp_path):
    from tandem.export.onnx_bundle import export_bundle
    from tandem.runtime import Predictor

    cfg, result = stopped_run
    best, last = result.checkpoint, result.last_checkpoint
    assert best != last and best.is_dir(), "the best checkpoint must survive keep_checkpoints=1"
    assert ckpt.list_checkpoints(result.run_dir) == [best, last]
    bundle = export_bundle(result.run_dir, tmp_path / "bundle", **QUIET)
    shipped = load_file(str(bundle / "weights.safetensors"))
    best_weights, last_weights = (load_file(str(p / "model.safetensors")) for p in (best, last))
    assert all(torch.equal(shipped[k], best_weights[k]) for k in shipped)
    assert not all(torch.equal(shipped[k], last_weights[k]) for k in shipped)
    metrics = read_manifest(bundle)["metrics"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["val_accuracy"] == records[0]["val_accuracy"] and metrics["checkpoint_step"] == records[0]["step"]
    # The test accuracy is the exported graph's, as the runtime computes it.
    test = load_splits(cfg).test
    guesses = Predictor.load(bundle).probabilities(test.pixels).argmax(1)
    assert metrics["test_accuracy"] == float((guesses == test.labels).mean())
    assert metrics["test_images"] == len(test) and metrics["stopped_early"] is True


def test_export_of_a_run_whose_data_changed_carries_no_test_accuracy(small_npz, tmp_path):
    """Its 'test' split would now hold other images, some perhaps trained on: no number is better than that one."""
    from tandem.export.onnx_bundle import export_bundle

    data = tmp_path / "data.npz"
    with np.load(small_npz) as arrays:
        x, y, classes = arrays["x"], arrays["y"], arrays["classes"]
    np.savez(data, x=x, y=y, classes=classes)
    run = train(_cfg(data, tmp_path / "run", max_steps=2), **QUIET)
    np.savez(data, x=x[100:], y=y[100:], classes=classes)
    said = []
    bundle = export_bundle(run.run_dir, tmp_path / "b", log=said.append)
    metrics = read_manifest(bundle)["metrics"]
    assert "test_accuracy" not in metrics and any("changed since this checkpoint" in line for line in said)


def test_export_force_replaces_a_bundle_but_never_another_folder(tiny_run, tmp_path):
    from tandem.export.onnx_bundle import export_bundle

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"irreplaceable")
    with pytest.raises(UserError, match="is not empty and is not a bundle"):
        export_bundle(tiny_run.run_dir, mine, force=True, **QUIET)
    assert (mine / "holiday.jpg").read_bytes() == b"irreplaceable"
    bundle = export_bundle(tiny_run.run_dir, tmp_path / "b", **QUIET)
    with pytest.raises(UserError, match="pass --force"):
        export_bundle(tiny_run.run_dir, bundle, **QUIET)
    assert export_bundle(tiny_run.run_dir, bundle, force=True, **QUIET) == bundle
    (bundle / "NOTES.md").write_text("my notes")  # not part of the bundle: --force must not take it
    with pytest.raises(UserError, match=r"holds files that are not part of its bundle \(NOTES.md\)"):
        export_bundle(tiny_run.run_dir, bundle, force=True, **QUIET)
    (tmp_path / "link").symlink_to(bundle)
    with pytest.raises(UserError, match="is a link; give the folder itself"):
        export_bundle(tiny_run.run_dir, tmp_path / "link", force=True, **QUIET)
    assert (bundle / "NOTES.md").read_text() == "my notes"


def test_precision_auto_does_not_pick_emulated_bf16_on_old_gpus(monkeypatch):
    """A V100 or T4 reports bf16 'supported' only by counting emulation; it must train in fp32."""
    from tandem.train import device

    def v100(including_emulation=True):
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", v100)
    assert device.pick_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert device.pick_precision("auto", torch.device("cuda")) == "bf16"

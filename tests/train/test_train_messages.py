"""What training says: progress lines off a terminal, a resumed run that was already complete, the parameters
after export folds batch norm, the resume refusal in one accurate line, plurals."""

import pytest
import torch

import tandem.train.loop as loop
from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.train.loop import train
from tandem.train.models import create_model
from tandem.train.runs import SAFE_ON_RESUME, resume_config


def _cfg(npz, out, **extra):
    tree = {"data": {"source": str(npz)}, "model": {"name": "cnn", "width": 4}, "augment": {"shift": 0, "hflip": False},
            "batch_size": 64, "epochs": 1, "out_dir": str(out), "progress": False, "precision": "fp32",
            "device": "cpu", **extra}
    return TrainConfig.model_validate(tree)


@pytest.fixture(scope="module")
def finished(small_npz, tmp_path_factory):
    lines = []
    cfg = _cfg(small_npz, tmp_path_factory.mktemp("done") / "run")
    result = train(cfg, log=lines.append)
    return cfg, result, lines


def test_the_model_line_says_what_export_folds(finished):
    cfg, result, lines = finished
    (line,) = [x for x in lines if x.startswith("model: ")]
    model = create_model("cnn", cfg.data.channels, cfg.data.image_size, 10, width=4)
    norms = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    count = result.metrics["parameters"]
    assert f"{count:,} parameters ({count - norms:,} after batch norm is folded at export)" in line
    assert f"{result.metrics['steps']} steps of 64 images" in line


def test_resuming_a_finished_run_says_it_was_complete(finished):
    cfg, result, _ = finished
    lines = []
    again = train(cfg, resume=True, log=lines.append)
    (said,) = [x for x in lines if x.startswith("resumed from")]
    assert f"at step {result.metrics['steps']}" in said and "already complete" in said
    assert again.metrics["steps"] == result.metrics["steps"]


def test_progress_lines_off_a_terminal(small_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "NOTE_EVERY", 0.0)  # pytest's stderr is not a terminal
    train(_cfg(small_npz, tmp_path / "run", progress=True), log=lambda *a, **k: None)
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train: step ")]
    assert notes and all("img/s" in x for x in notes)


def test_no_progress_lines_when_progress_is_off(small_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "NOTE_EVERY", 0.0)
    lines = []
    train(_cfg(small_npz, tmp_path / "run", max_steps=1, model={"name": "mlp", "width": 4}), log=lines.append)
    assert "train: step" not in capsys.readouterr().err
    (line,) = [x for x in lines if x.startswith("model: ")]
    assert "1 step of 64 images" in line and "folded" not in line  # an mlp has no batch norm to fold


def test_the_resume_refusal_is_one_line_and_lists_what_may_change(finished):
    _, result, _ = finished
    with pytest.raises(UserError) as err:
        resume_config(result.run_dir, ["optim.lr=0.5"])
    message = str(err.value)
    assert "\n" not in message and "optim.lr" in message and "optimizer" in message
    assert message.endswith("A resume may change only " + ", ".join(SAFE_ON_RESUME))

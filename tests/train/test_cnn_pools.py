"""The default cnn's pools round up (issue 19): every pixel reaches the answer; bundles of the earlier cnn, whose
last pool dropped a row and a column of its 7 x 7 map, keep working as trained, and their runs refuse to resume."""

from __future__ import annotations

import json

from helpers import run_tandem


def test_every_pixel_of_an_image_reaches_the_default_cnns_answer():
    """Today's pools round up: the last row and column (a strip the floor pool never saw) move the logits."""
    import torch

    from tandem.train.models import create_model

    model = create_model("cnn", 1, 28, 10, width=8).eval()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    reach = x.grad.abs().sum(dim=(0, 1))
    assert (reach[-4:, :] > 0).all() and (reach[:, -4:] > 0).all()


def test_a_bundle_of_the_earlier_floor_pooled_cnn_still_builds_as_trained():
    import torch

    from tandem.config import TrainConfig
    from tandem.train.models import build_model, cnn, floor_pooled

    old = cnn(1, 28, 10, width=8, ceil=False).eval()
    weights = old.state_dict()
    assert floor_pooled(weights, 28, 8) and not floor_pooled(cnn(1, 28, 10, width=8).state_dict(), 28, 8)
    cfg = TrainConfig.model_validate({"model": {"width": 8}})
    rebuilt = build_model(cfg, 10, weights)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), old(x))


def test_a_run_of_the_earlier_cnn_is_refused_on_resume_in_one_line(small_npz, tmp_path):
    from tandem.config import TrainConfig
    from tandem.train import checkpoint as ckpt
    from tandem.train.loop import train
    from tandem.train.models import cnn

    out = tmp_path / "run"
    cfg = TrainConfig.model_validate({"data": {"source": str(small_npz)}, "model": {"width": 8}, "epochs": 2,
                                      "batch_size": 64, "out_dir": str(out), "progress": False})
    train(cfg, log=lambda *a, **k: None)
    found = ckpt.latest_checkpoint(out)
    old = cnn(1, 28, 10, width=8, ceil=False).state_dict()  # what such a run's checkpoint holds
    state = {k: v for k, v in found.state.items() if k not in ("format_version", "step", "files")}
    ckpt.save_checkpoint(out, found.state["step"] + 1, old, found.trainer, state)
    proc = run_tandem("train", "--resume", str(out))
    assert proc.returncode == 2 and "earlier cnn" in proc.stderr and "start a new run" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert json.loads((out / "results.json").read_text())  # the run's own files are untouched

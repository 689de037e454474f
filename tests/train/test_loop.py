"""The loop's parts against references: the lr schedule against torch's schedulers, gradient
accumulation against one big batch, early stopping, augmentation."""

import json

import pytest
import torch

from tandem.config import TrainConfig
from tandem.train.augment import augment
from tandem.train.loop import learning_rate, train


@pytest.mark.parametrize("name", ["onecycle", "cosine"])
def test_schedule_matches_torch(name):
    cfg = TrainConfig.model_validate({"schedule": {"name": name, "warmup_fraction": 0.3}, "optim": {"lr": 0.02}})
    total = 97
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    if name == "onecycle":
        reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=total, pct_start=0.3,
                                                        cycle_momentum=False)
    else:
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    for step in range(total):
        assert learning_rate(step, total, cfg) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        optimizer.step()
        if step < total - 1:
            reference.step()


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 8])
def test_schedule_on_runs_of_a_few_steps(total):
    """A 25% warm-up of at most 4 steps ends on step 0: the run starts at the peak and decays (no division by zero)."""
    cfg = TrainConfig()
    rates = [learning_rate(step, total, cfg) for step in range(total)]
    if total <= 4:
        assert rates[0] == cfg.optim.lr and rates == sorted(rates, reverse=True)
    else:
        assert rates[0] == pytest.approx(cfg.optim.lr / 25) and rates[0] < rates[1]  # a real warm-up
    assert all(0 < lr <= cfg.optim.lr for lr in rates)


def _run(npz, out, **extra):
    tree = {"data": {"source": str(npz)}, "model": {"name": "mlp", "width": 4}, "augment": {"shift": 0, "hflip": False},
            "optim": {"label_smoothing": 0.0}, "batch_size": 64, "epochs": 2, "out_dir": str(out), "progress": False,
            "precision": "fp32"}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            tree.setdefault(section, {})[field] = value
        else:
            tree[key] = value
    return train(TrainConfig.model_validate(tree), log=lambda *a, **k: None)


def test_grad_accumulation_equals_one_big_batch(small_npz, tmp_path):
    """An mlp has no batch norm, so 4 micro-batches of 16 must give the step of one batch of 64."""
    from safetensors.torch import load_file

    whole = _run(small_npz, tmp_path / "whole")
    split = _run(small_npz, tmp_path / "split", optim__grad_accum=4)
    a = load_file(str(whole.last_checkpoint / "model.safetensors"))
    b = load_file(str(split.last_checkpoint / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert split.metrics["test_accuracy"] == whole.metrics["test_accuracy"]


def test_early_stopping_stops_when_validation_stalls(small_npz, tmp_path):
    # A learning rate this small cannot move validation accuracy: stop after 2 flat epochs.
    result = _run(small_npz, tmp_path / "run", optim__lr=1e-9, epochs=10, early_stopping=2, optim__name="sgd",
                  optim__momentum=0.0)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and result.metrics["epochs"] == 3


def test_augment_shifts_and_flips_each_image_on_its_own():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 2] = 1.0  # one bright pixel, left of centre
    out = augment(x, shift=2, hflip=True, generator=torch.Generator().manual_seed(0), fill=torch.tensor([-1.0]))
    assert out.shape == x.shape
    positions = {tuple((img[0] == 1).nonzero()[0].tolist()) for img in out if (img[0] == 1).any()}
    assert len(positions) > 10  # different images moved differently
    assert all(abs(r - 3) <= 2 and (abs(c - 2) <= 2 or abs(c - 5) <= 2) for r, c in positions)
    assert (out == -1.0).any()  # the uncovered border takes the fill value
    unchanged = augment(x, shift=0, hflip=False, generator=torch.Generator().manual_seed(0), fill=torch.tensor([-1.0]))
    assert torch.equal(unchanged, x)


def test_precision_auto_follows_the_hardware(monkeypatch):
    from tandem.train import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.pick_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.pick_precision("auto", torch.device("cpu")) == "bf16"
    assert device.pick_precision("fp32", torch.device("cpu")) == "fp32"


def test_bf16_autocast_trains_a_cnn_as_well_as_fp32(small_npz, tmp_path):
    bf16 = _run(small_npz, tmp_path / "bf16", precision="bf16", model__name="cnn", epochs=6)
    fp32 = _run(small_npz, tmp_path / "fp32", precision="fp32", model__name="cnn", epochs=6)
    assert (bf16.metrics["precision"], fp32.metrics["precision"]) == ("bf16", "fp32")
    # Six short epochs on 480 images: about 0.7 either way, far above chance (0.1). 60 test images,
    # so 0.1 is six images.
    assert fp32.metrics["test_accuracy"] > 0.4
    assert bf16.metrics["test_accuracy"] > fp32.metrics["test_accuracy"] - 0.1


@pytest.mark.parametrize("before", [(False, False), (True, False), (True, True)])
def test_train_restores_the_callers_determinism_setting(small_npz, tmp_path, monkeypatch, before):
    """Deterministic kernels (warn only) are on during a CPU run; the caller's setting comes back afterwards."""
    import tandem.train.loop as loop

    during = []
    real_save = loop.ckpt.save_checkpoint

    def save_and_look(*args, **kwargs):
        during.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", save_and_look)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    try:
        _run(small_npz, tmp_path / "run", epochs=1, device="cpu")  # deterministic kernels are a CPU-run setting
        after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    finally:
        torch.use_deterministic_algorithms(False)
    assert during and set(during) == {(True, True)}
    assert after == before

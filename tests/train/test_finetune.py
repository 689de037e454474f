"""Fine-tuning from a bundle (init_from), per-channel normalisation end to end, a self-describing ONNX file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import animals, run_tandem
from tandem.bundle import read_manifest
from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.train.finetune import classifier_head, inherit_from_bundle, load_bundle_weights
from tandem.train.models import create_model


def test_known_classes_keep_their_rows_and_new_ones_start_fresh(tiny_bundle):
    torch.manual_seed(0)
    model = create_model("cnn", 1, 28, 3, width=8)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    info = load_bundle_weights(model, tiny_bundle, ["bird", "unicorn", "cat"])
    saved = load_file(str(tiny_bundle / "weights.safetensors"))
    labels = read_manifest(tiny_bundle)["labels"]
    head = classifier_head(model)
    state = model.state_dict()
    for part in ("weight", "bias"):
        key = f"{head}.{part}"
        assert torch.equal(state[key][0], saved[key][labels.index("bird")])
        assert torch.equal(state[key][2], saved[key][labels.index("cat")])
        assert torch.equal(state[key][1], fresh[key][1])  # the new class: its fresh initialisation
    for key in saved:
        if not key.startswith(f"{head}."):
            assert torch.equal(state[key], saved[key]), key
    assert info["classes_kept"] == ["bird", "cat"] and info["classes_new"] == ["unicorn"]


def test_the_run_inherits_the_bundles_architecture_and_refuses_a_conflict(tiny_bundle):
    cfg = inherit_from_bundle(TrainConfig.model_validate({"init_from": str(tiny_bundle)}))
    assert cfg.model.width == 8  # the bundle's, not the default 16
    with pytest.raises(UserError, match=r"model.width=16 \(the bundle has 8\)"):
        inherit_from_bundle(TrainConfig.model_validate({"init_from": str(tiny_bundle), "model": {"width": 16}}))


@pytest.mark.slow
def test_fine_tune_through_the_command_on_new_classes(tiny_bundle, tmp_path):
    x, y = animals(40, classes=3)  # bear, bird, cat ...
    names = np.array(["bird", "cat", "unicorn"])  # ... relabelled: two known classes and a new one
    np.savez(tmp_path / "new.npz", x=x, y=y, classes=names)
    run = tmp_path / "run"
    proc = run_tandem("train", f"init_from={tiny_bundle}", f"data.source={tmp_path / 'new.npz'}", "epochs=2",
                      "batch_size=32", f"out_dir={run}", "--json", check=True)
    assert "fine-tuning from" in proc.stdout + proc.stderr and "1 new (unicorn)" in proc.stderr
    assert json.loads(proc.stdout)["test_images"] > 0
    run_tandem("export", str(run), "--out", str(tmp_path / "b"), check=True)
    manifest = read_manifest(tmp_path / "b")
    assert manifest["labels"] == ["bird", "cat", "unicorn"] and manifest["config"]["model"]["width"] == 8
    assert manifest["provenance"]["init_from"]["bundle"] == str(tiny_bundle)
    refused = run_tandem("train", f"init_from={tiny_bundle}", f"data.source={tmp_path / 'new.npz'}", "model.width=16",
                         f"out_dir={tmp_path / 'other'}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "the bundle has 8" in refused.stderr


def test_per_channel_normalisation_and_onnx_metadata(small_npz, tmp_path):
    import onnx

    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.models import build_model
    from tandem.runtime import Predictor
    from tandem.runtime.preprocess import preprocess
    from tandem.train.loop import train

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = TrainConfig.model_validate({
        "data": {"source": str(small_npz), "channels": 3, "mean": mean, "std": std}, "model": {"width": 4},
        "max_steps": 2, "batch_size": 64, "out_dir": str(tmp_path / "run"), "progress": False})
    result = train(cfg, log=lambda *a, **k: None)
    bundle = export_bundle(result.run_dir, tmp_path / "b", log=lambda *a, **k: None)
    manifest = read_manifest(bundle)
    assert manifest["preprocessing"]["mean"] == mean and manifest["preprocessing"]["std"] == std
    x, _ = animals(1)
    rgb = np.repeat(x[..., None], 3, axis=-1)
    rgb[..., 0] //= 2  # channels that differ, so a mix-up of mean or std per channel shows
    reference = (rgb.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(preprocess(rgb, mean, std), reference.transpose(0, 3, 1, 2), atol=1e-6)
    model = build_model(cfg, 10, load_file(str(bundle / "weights.safetensors")))
    with torch.no_grad():
        expected = model(torch.from_numpy(reference.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    np.testing.assert_allclose(Predictor.load(bundle).logits(rgb), expected, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(bundle / "model.onnx")).metadata_props}
    assert json.loads(props["tandem.labels"]) == manifest["labels"]
    assert json.loads(props["tandem.preprocessing"]) == manifest["preprocessing"]


@pytest.mark.parametrize("setting, message", [
    ({"mean": [0.1, 0.2]}, "data.mean has 2 values; give one, or one per channel (3)"),
    ({"std": [0.2, 0.0, 0.2]}, "data.std must be greater than 0"),
])
def test_bad_normalisation_is_one_line(setting, message):
    from tandem.config import config_from_dict

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"data": {"channels": 3, **setting}})

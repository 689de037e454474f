"""The runtime: hashes verified before use; arrays, PIL images, files and folders give the same answers,
which are the answers of the torch model the bundle came from."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import animals
from tandem.bundle import read_manifest
from tandem.errors import UserError
from tandem.export.onnx_bundle import build_model
from tandem.runtime import Predictor
from tandem.runtime.preprocess import preprocess
from tandem.config import TrainConfig
from safetensors.torch import load_file


def test_manifest_describes_the_model(tiny_bundle, tiny_run):
    manifest = read_manifest(tiny_bundle)
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert manifest["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert manifest["labels"][:2] == ["bear", "bird"]
    assert manifest["metrics"]["test_accuracy"] == tiny_run.metrics["test_accuracy"]
    assert manifest["config"]["model"]["width"] == 8
    assert manifest["export"]["parity_max_abs_diff"] <= 1e-4
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors"}
    assert len(manifest["provenance"]["data_fingerprint"]) == 64


def test_every_input_form_matches_torch(tiny_bundle, tmp_path):
    predictor = Predictor.load(tiny_bundle)
    x, _ = animals(2)
    paths = []
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    from_arrays = predictor.probabilities(x)
    np.testing.assert_allclose(predictor.probabilities([Image.fromarray(i) for i in x]), from_arrays, atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(paths), from_arrays, atol=1e-6)
    folder = predictor.predict_paths([tmp_path], k=3)
    assert [p for p, _ in folder] == paths
    assert [preds[0].index for _, preds in folder] == list(from_arrays.argmax(1))
    # The torch model from the same weights, fed by the same preprocessing function.
    manifest = read_manifest(tiny_bundle)
    model = build_model(TrainConfig.model_validate(manifest["config"]), 10,
                        load_file(str(tiny_bundle / "weights.safetensors")))
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(x[..., None], 0.5, 0.5))).numpy()
    np.testing.assert_allclose(predictor.logits(x), logits, atol=1e-4)
    top = predictor.top_k(x[:1], k=3)[0]
    assert [p.probability for p in top] == sorted((p.probability for p in top), reverse=True)
    assert abs(sum(predictor.probabilities(x[:1])[0]) - 1) < 1e-5


def test_rgb_and_odd_sizes_are_converted(tiny_bundle):
    predictor = Predictor.load(tiny_bundle)
    x, _ = animals(1, classes=1)
    big_rgb = np.asarray(Image.fromarray(x[0]).convert("RGB").resize((56, 56)))
    assert predictor.pixels(big_rgb).shape == (1, 28, 28, 1)
    with pytest.raises(UserError, match="0..255"):
        predictor.logits(np.full((28, 28), 300.0))


@pytest.mark.parametrize("damage", ["flip-a-byte", "delete", "manifest"])
def test_tampered_bundle_is_rejected_naming_the_file(tiny_bundle, tmp_path, damage):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    if damage == "flip-a-byte":
        data = bytearray((bundle / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (bundle / "model.onnx").write_bytes(bytes(data))
        expected = "model.onnx does not match its sha256"
    elif damage == "delete":
        (bundle / "weights.safetensors").unlink()
        expected = "weights.safetensors is missing"
    else:
        (bundle / "manifest.json").write_text(json.dumps({"format": "tandem-bundle"})[:-3])
        expected = "manifest.json is corrupt"
    with pytest.raises(UserError, match=expected):
        Predictor.load(bundle)

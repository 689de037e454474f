"""The runtime: hashes verified before use; arrays, PIL images, files and folders give the same answers,
which are the answers of the torch model the bundle came from."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import animals
from tandem.bundle import read_manifest
from tandem.errors import UserError
from tandem.train.models import build_model
from tandem.runtime import Predictor
from tandem.images import to_pixels
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
    with pytest.raises(UserError, match="float pixel values must lie in 0..1"):
        predictor.logits(np.full((28, 28), 300.0))


def test_preprocess_per_channel_against_a_hand_computed_reference():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    expected = np.empty((2, 3, 3, 4))
    for n, h, w, c in np.ndindex(*pixels.shape):
        expected[n, c, h, w] = (pixels[n, h, w, c] / 255 - mean[c]) / std[c]
    np.testing.assert_allclose(preprocess(pixels, mean, std), expected, atol=1e-6)
    assert preprocess(pixels, mean, std).dtype == np.float32 and preprocess(pixels, mean, std).flags.c_contiguous
    np.testing.assert_allclose(preprocess(pixels, 0.5, std), preprocess(pixels, [0.5] * 3, std), atol=0)
    np.testing.assert_allclose(preprocess(pixels, [0.4], [0.3]), preprocess(pixels, 0.4, 0.3), atol=0)
    for mean, std, message in [(0.5, 0.0, "std must be finite and > 0"), ([0.1, 0.2], 0.5, "has 2 values"),
                               (0.5, [1, 2, 3, 4], "one per channel \\(3\\)")]:
        with pytest.raises(UserError, match=message):
            preprocess(pixels, mean, std)


def test_manifest_preprocessing_per_channel_lists_and_resize(tiny_bundle):
    predictor = Predictor.load(tiny_bundle)
    manifest = read_manifest(tiny_bundle)
    x, _ = animals(1)
    wide = np.zeros((28, 56), np.uint8)
    wide[:, :8] = 255
    as_lists = {**manifest["preprocessing"], "mean": [0.5], "std": [0.5], "resize": "pad"}
    other = Predictor(predictor.session, {**manifest, "preprocessing": as_lists})
    np.testing.assert_allclose(other.logits(x), predictor.logits(x), atol=0)
    assert np.array_equal(other.pixels(wide), to_pixels(wide, 28, 1, "pad"))
    for legacy in ("bilinear", None):  # bundles from before resize modes squashed every image
        pre = {key: value for key, value in manifest["preprocessing"].items() if key != "resize"}
        pre = {**pre, "resize": legacy} if legacy else pre
        old = Predictor(predictor.session, {**manifest, "preprocessing": pre})
        assert old.resize == "squash" and np.array_equal(old.pixels(wide), to_pixels(wide, 28, 1, "squash"))
    for bad, message in [({"resize": "zoom"}, "upgrade tandem"), ({"std": 0}, "std must be finite and > 0"),
                         ({"mean": [0.1, 0.2]}, "has 2 values")]:
        with pytest.raises(UserError, match=message):
            Predictor(predictor.session, {**manifest, "preprocessing": {**manifest["preprocessing"], **bad}})


def _write_pngs(folder, images):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_predict_files_reports_a_bad_file_and_classifies_the_rest_in_order(tiny_bundle, tmp_path):
    predictor = Predictor.load(tiny_bundle)
    x, _ = animals(2)  # 20 images: decoded by a pool of 2 processes
    paths = _write_pngs(tmp_path / "photos", x)
    paths[7].write_bytes(b"not a png")
    expected = predictor.top_k(np.delete(x, 7, axis=0), k=3)
    results = list(predictor.predict_files([tmp_path / "photos"], k=3, workers=2))
    assert [path for path, _, _ in results] == paths
    path, preds, error = results[7]
    assert preds is None and str(paths[7]) in error and "fix or remove the file" in error
    got = [preds for _, preds, _ in results if preds is not None]
    assert [[p.index for p in preds] for preds in got] == [[p.index for p in preds] for preds in expected]
    np.testing.assert_allclose([[p.probability for p in preds] for preds in got],
                               [[p.probability for p in preds] for preds in expected], atol=1e-6)
    with pytest.raises(UserError, match="07.png"):  # predict_paths: the first bad file stops it, as before
        predictor.predict_paths([tmp_path / "photos"], k=3)


def test_predict_files_streams_results_before_later_files_are_read(tiny_bundle, tmp_path):
    predictor = Predictor.load(tiny_bundle)
    x, _ = animals(4)
    paths = _write_pngs(tmp_path / "photos", x)  # 40 files, decoded in this process: 8 at a time
    stream = predictor.predict_files([tmp_path / "photos"], k=1, workers=1)
    first = next(stream)
    assert first[0] == paths[0] and first[1][0].index == predictor.top_k(x[:1], k=1)[0][0].index
    paths[-1].write_bytes(b"damaged after the first answer")  # not read yet, so the stream sees the damage
    rest = list(stream)
    assert len(rest) == 39 and rest[-1][1] is None and str(paths[-1]) in rest[-1][2]
    assert all(error is None for _, _, error in rest[:-1])


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


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(labels=[m["labels"][1], m["labels"][0], *m["labels"][2:]]), "disagrees with its model.onnx on labels"),
    (lambda m: m["preprocessing"].update(mean=0.9), "disagrees with its model.onnx on preprocessing"),
    (lambda m: m.update(labels=m["labels"][:2]), "disagrees with its model.onnx on labels"),
    (lambda m: m.pop("preprocessing"), "lacks or garbles 'preprocessing'"),
    (lambda m: m.pop("labels"), "lacks or garbles 'labels'"),
    (lambda m: m["preprocessing"].update(image_size="big"), "lacks or garbles"),
])
def test_a_hand_edited_manifest_is_refused_not_believed(tiny_bundle, tmp_path, edit, expected):
    """The manifest holds the hashes, so it is not hashed itself; model.onnx records its labels and
    preprocessing, and the runtime checks the manifest against them."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=expected):
        Predictor.load(bundle)


def test_streams_give_the_same_answers_as_one_stream(tiny_bundle, tmp_path):
    """streams=2 cuts batches into pieces run at once: the same logits, in the same order, for arrays and files."""
    images, _ = animals(5)
    pixels = images[..., None]  # (N, 28, 28, 1), as the runtime holds them
    one = Predictor.load(tiny_bundle, threads=1)
    two = Predictor.load(tiny_bundle, threads=2, streams=2)
    assert two.streams == 2 and two.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(two.logits(pixels), one.logits(pixels), rtol=0, atol=1e-5)
    x = preprocess(pixels, one.mean, one.std)
    np.testing.assert_allclose(two.run_inputs(x), one.run_inputs(x), rtol=0, atol=1e-5)
    for i, image in enumerate(images[:20]):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    pieces: list[int] = []
    run = two._run
    two._run = lambda x: pieces.append(len(x)) or run(x)  # the pieces the streams get
    assert [(p.name, r[0].index) for p, r, _ in two.predict_files([tmp_path], workers=1)] == \
        [(p.name, r[0].index) for p, r, _ in one.predict_files([tmp_path], workers=1)]
    assert sorted(pieces) == [4, 8, 8], pieces  # decoded files are gathered until each stream has 8
    with pytest.raises(UserError, match="4 streams need at least 4 threads"):
        Predictor.load(tiny_bundle, threads=1, streams=4)
    import os

    with pytest.MonkeyPatch.context() as mp:  # the cores, as tandem.threads counts them (not the tests' pin)
        mp.delenv("OMP_NUM_THREADS", raising=False)
        with pytest.raises(UserError, match="cores"):
            Predictor.load(tiny_bundle, streams=len(os.sched_getaffinity(0)) + 1)
    for bad in (0, 257, 1.5):
        with pytest.raises(UserError, match="streams must be a whole number"):
            Predictor.load(tiny_bundle, streams=bad)

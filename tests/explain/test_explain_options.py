"""The options Captum and Quantus users expect, from the command line (issue 19): --baseline, --steps, --smooth,
--layer, --curve-steps, each recorded in the JSON, and each bad value one line on stderr, no traceback."""

import json

import numpy as np
import pytest

from helpers import animals, run_tandem
from helpers.explainable import explainable_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return explainable_bundle(tmp_path_factory.mktemp("options"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray(animals(1)[0][2]).save(path)
    return path


def _one_line(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_ig_options_change_the_map_and_are_recorded(bundle, image, tmp_path):
    plain = run_tandem("explain", str(bundle), str(image), "--out", str(tmp_path / "a"), "--json", check=True)
    tuned = run_tandem("explain", str(bundle), str(image), "--out", str(tmp_path / "b"), "--baseline", "blur",
                       "--steps", "8", "--smooth", "2", "--json", check=True)
    settings = json.loads(tuned.stdout)["images"][0]["settings"]
    assert settings["n_steps"] == 8 and settings["baseline"].startswith("the image blurred")
    assert settings["smoothgrad"]["samples"] == 2
    assert json.loads(plain.stdout)["images"][0]["settings"] == {"baseline": "black (raw 0)", "n_steps": 50}
    a, b = np.load(tmp_path / "a" / "cat.ig.npy"), np.load(tmp_path / "b" / "cat.ig.npy")
    assert a.shape == b.shape == (28, 28) and not np.allclose(a, b)
    record = json.loads((tmp_path / "b" / "cat.ig.json").read_text())
    assert record["legend"].startswith("red to orange to yellow")
    mean = run_tandem("explain", str(bundle), str(image), "--out", str(tmp_path / "c"), "--method", "occlusion",
                      "--baseline", "mean", "--json", check=True)
    assert json.loads(mean.stdout)["images"][0]["settings"]["baseline"] == "the training split's mean image"


@pytest.mark.slow
def test_grad_cam_on_a_named_layer(bundle, image, tmp_path):
    proc = run_tandem("explain", str(bundle), str(image), "--method", "gradcam", "--layer", "9", "--out",
                      str(tmp_path), "--json", check=True)
    assert json.loads(proc.stdout)["images"][0]["settings"]["layer"] == "9"
    default = run_tandem("explain", str(bundle), str(image), "--method", "gradcam", "--out", str(tmp_path / "d"),
                         check=True)
    assert not np.allclose(np.load(tmp_path / "cat.gradcam.npy"), np.load(tmp_path / "d" / "cat.gradcam.npy"))
    assert default.returncode == 0


@pytest.mark.parametrize("args, expected", [
    (["IMG", "--baseline", "pink"], "--baseline 'pink': choose one of black, blur, mean"),
    (["IMG", "--steps", "0"], "--steps 0: give 1 to 10000"),
    (["IMG", "--steps", "many"], "--steps 'many': give a whole number"),
    (["IMG", "--smooth", "-1"], "--smooth -1: give 0 (off) to 1000"),
    (["IMG", "--method", "gradcam", "--layer", "nope"], "--layer 'nope' is not a layer of"),
    (["IMG", "--method", "gradcam", "--layer", "18"], "--layer '18' gives no feature map"),
    (["IMG", "--method", "occlusion", "--steps", "10"], "--steps applies to ig, not to occlusion"),
    (["IMG", "--method", "ig", "--layer", "3"], "--layer applies to gradcam, not to ig"),
    (["IMG", "--method", "gradcam", "--baseline", "blur"], "--baseline applies to ig and occlusion"),
    (["IMG", "--curve-steps", "10"], "--curve-steps applies only with --evaluate"),
    (["--evaluate", "--methods", "occlusion", "--steps", "10"], "--steps applies to ig, not to occlusion"),
])
def test_bad_options_get_one_line(bundle, image, args, expected, tmp_path):
    args = [str(image) if a == "IMG" else a for a in args]
    out = ["--out", str(tmp_path)] if "--evaluate" not in args else []
    _one_line(run_tandem("explain", str(bundle), *args, *out), expected)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_an_unknown_layer_lists_the_valid_ones(bundle, image):
    proc = run_tandem("explain", str(bundle), str(image), "--method", "gradcam", "--layer", "nope", "--out", "/nonexistent")
    _one_line(proc, "Grad-CAM can weigh: 0 (Conv2d 8x28x28)")
    assert "16 (ReLU 32x7x7)" in proc.stderr and "18 " not in proc.stderr  # 18: the Flatten


def test_help_names_both_steps():
    text = run_tandem("explain", "--help", check=True).stdout
    assert "--curve-steps" in text and "Integrated Gradients' steps" in text and "--smooth" in text

"""Explanations checked against references: a model with a known dependency, Integrated Gradients' completeness,
Captum's Occlusion for the runtime's, random orders for faithfulness, and the `tandem explain` command as run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from helpers import animals, run_tandem
from tandem.data.sources import ANIMAL_CLASSES
from tandem.errors import UserError
from tandem.explain import faithfulness
from tandem.explain.attribute import TorchExplainer, captum_occlusion, integrated_gradients, last_conv_block
from tandem.explain.occlusion import MAX_OCCLUDED, occlusion, window_starts
from tandem.runtime import Predictor

REGION = (slice(4, 12), slice(16, 24))  # rows 4-11, columns 16-23 of a 28 x 28 image


class RegionNet(nn.Module):
    """Three classes from one 8 x 8 region of the image: nothing outside it can change the output."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 28, 28)
        mask[(0, 0, *REGION)] = 1
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 28 * 28, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x * self.mask)).flatten(1))


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """RegionNet in torch and in the runtime (its ONNX export behind a Predictor), and an image it is sure of."""
    import onnxruntime as ort

    from tandem.train.onnx_graph import export_onnx

    torch.manual_seed(0)
    model = RegionNet().eval()
    path = tmp_path_factory.mktemp("region") / "model.onnx"
    export_onnx(model, torch.zeros(2, 1, 28, 28), path)
    manifest = {"labels": ["a", "b", "c"], "inputs": [{"name": "input"}],
                "preprocessing": {"image_size": 28, "channels": 1, "mean": 0.5, "std": 0.5, "resize": "crop"}}
    predictor = Predictor(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), manifest)
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    return model, predictor, pixels


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """A cnn trained well enough to explain (about 85% test accuracy on 1,000 animals, ~10 s on 2 cores);
    tiny_bundle is at chance, and a map of a model that knows nothing says nothing."""
    from tandem.config import TrainConfig
    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.loop import train

    folder = tmp_path_factory.mktemp("explain")
    x, y = animals(100)
    np.savez(folder / "animals.npz", x=x, y=y, classes=np.array(ANIMAL_CLASSES))
    cfg = TrainConfig.model_validate({"data": {"source": str(folder / "animals.npz")}, "model": {"width": 8},
                                      "epochs": 6, "batch_size": 64, "out_dir": str(folder / "run"), "progress": False})
    run = train(cfg, log=lambda *a, **k: None)
    assert run.metrics["test_accuracy"] > 0.6, run.metrics  # else the faithfulness test below means nothing
    return export_bundle(run.run_dir, folder / "bundle", log=lambda *a, **k: None)


def _test_images(bundle, n: int):
    from tandem.bundle import read_manifest
    from tandem.explain.data import bundle_splits, split_pixels

    test = bundle_splits(bundle, read_manifest(bundle)).test
    return split_pixels(test, np.linspace(0, len(test.labels) - 1, n).astype(int))


# --- (1) attribution sanity: a model that only looks at one region --------------------------------------------


def test_integrated_gradients_puts_all_its_mass_in_the_region_the_model_reads(region):
    model, predictor, pixels = region
    x = torch.from_numpy(predictor_input(predictor, pixels))
    baseline = torch.from_numpy(predictor_input(predictor, np.zeros_like(pixels)))
    target = int(model(x).argmax())
    attributions, _ = integrated_gradients(model, x, [target], baseline)
    heatmap = attributions.sum(1)[0].detach().numpy()
    inside = np.zeros((28, 28), bool)
    inside[REGION] = True
    assert np.abs(heatmap[~inside]).max() == 0  # not a small number: exactly nothing outside
    assert np.abs(heatmap[inside]).sum() > 1e-3


def test_occlusion_finds_the_region_and_nothing_else(region):
    model, predictor, pixels = region
    result = occlusion(predictor, pixels, window=4, stride=2)
    inside = np.zeros((28, 28), bool)
    inside[REGION] = True
    # A window can reach the region from up to 3 pixels away (window - 1); beyond that it changes nothing.
    near = np.zeros((28, 28), bool)
    near[1:15, 13:27] = True
    assert np.abs(result.heatmap[~near]).max() == 0
    mass = np.abs(result.heatmap)
    assert mass[inside].sum() / mass.sum() > 0.6, mass[inside].sum() / mass.sum()
    assert result.target == int(np.argmax(result.probabilities))
    # The 8 pixels that matter most all lie in the region itself.
    top = np.argsort(-mass.ravel())[:8]
    assert inside.ravel()[top].all()


def predictor_input(predictor, pixels):
    from tandem.runtime.preprocess import preprocess

    return preprocess(pixels[None], predictor.mean, predictor.std)


# --- (2) Integrated Gradients' completeness -------------------------------------------------------------------


def test_integrated_gradients_adds_up_to_the_change_in_probability(trained_bundle):
    explainer = TorchExplainer(trained_bundle)
    pixels, _ = _test_images(trained_bundle, 4)
    x, baseline = explainer.inputs(pixels), explainer.baseline(pixels)
    with torch.no_grad():
        p_image = torch.softmax(explainer.model(x), 1)
        p_black = torch.softmax(explainer.model(baseline), 1)
    targets = p_image.argmax(1)
    change = (p_image[torch.arange(4), targets] - p_black[0, targets]).numpy()
    attributions, delta = integrated_gradients(explainer.model, x, targets, baseline, n_steps=50)
    delta = delta.detach().numpy()
    # Captum's delta is exactly what it claims: the sum of the map minus the change it explains...
    np.testing.assert_allclose(attributions.sum((1, 2, 3)).detach().numpy() - change, delta, atol=1e-5)
    # ...and it is small: within 3% of the change on every image, at the 50 steps the command uses.
    assert (np.abs(delta) <= 0.03 * np.abs(change) + 1e-4).all(), (delta, change)
    assert np.abs(change).min() > 0.05  # a change worth explaining
    result = explainer.attribute("ig", pixels, targets.numpy())  # the maps the command writes: channels summed
    np.testing.assert_allclose(result.maps.sum((1, 2)) - change, result.convergence_delta, atol=1e-5)


# --- (3) faithfulness: Integrated Gradients deletes the class faster than a random order ------------------------


@pytest.mark.slow
def test_integrated_gradients_beats_random_deletion_on_a_trained_model(trained_bundle):
    predictor = Predictor.load(trained_bundle, precision="fp32")
    pixels, _ = _test_images(trained_bundle, 60)
    targets = predictor.probabilities(pixels).argmax(1)
    maps = TorchExplainer(trained_bundle).attribute("ig", pixels, targets).maps
    report = faithfulness.evaluate(predictor.probabilities, pixels, {"ig": maps}, steps=28, seed=0, targets=targets)
    ig = report.methods["ig"]
    assert ig.deletion_auc < 0.8 * float(report.random.deletion_auc.mean()), ig
    assert ig.deletion_vs_random == "better" and ig.insertion_vs_random == "better", ig
    assert ig.beats_random and ig.verdict.startswith("beats random")
    # The same pixels in the reverse order (least important first) must do worse than random: the order matters.
    reversed_ = faithfulness.evaluate(predictor.probabilities, pixels, {"reverse": -maps}, 28, 0, targets)
    assert reversed_.methods["reverse"].deletion_vs_random == "worse"
    assert reversed_.methods["reverse"].verdict.startswith("does not beat random")


def test_curves_are_computed_as_defined():
    """Deletion and insertion on a model whose probability is the mean brightness, by hand."""
    pixels = np.zeros((1, 2, 2, 1), np.uint8)
    pixels[0, :, :, 0] = [[255, 0], [51, 102]]

    def brightness(batch):
        p = batch.reshape(len(batch), -1).mean(1) / 255
        return np.stack([p, 1 - p], 1)

    order = faithfulness.pixel_order(np.array([[[3.0, 0.0], [1.0, 2.0]]]))
    assert order.tolist() == [[0, 3, 2, 1]]
    c = faithfulness.curves(brightness, pixels, order, steps=4)
    assert c.targets.tolist() == [1]  # the class predicted for the untouched image is tracked (dark: class 1)
    total = (255 + 51 + 102) / 4 / 255
    np.testing.assert_allclose(1 - c.deletion[0], [total, (51 + 102) / 4 / 255, 51 / 4 / 255, 0, 0])
    np.testing.assert_allclose(1 - c.insertion[0], [0, 255 / 4 / 255, (255 + 102) / 4 / 255, total, total])
    np.testing.assert_allclose(c.fractions, [0, .25, .5, .75, 1])
    np.testing.assert_allclose(c.deletion_auc, [faithfulness.area_under(c.fractions, c.deletion[0])])
    # the trapezoid rule, by hand
    np.testing.assert_allclose(c.deletion_auc, [sum((c.deletion[0][1:] + c.deletion[0][:-1]) / 2 * 0.25)])


def test_a_random_curve_on_its_floor_gives_no_ratio():
    """Where random's deletion AUC is (nearly) the floor, a ratio above the floor says nothing: None, not infinity,
    and the report stays valid JSON."""
    fractions = np.linspace(0, 1, 5)
    flat = faithfulness.Curves(fractions, np.full((3, 5), 0.2), np.full((3, 5), 0.2), np.zeros(3, int))
    falls = faithfulness.Curves(fractions, np.array([[0.9, 0.2, 0.2, 0.2, 0.2]] * 3), np.full((3, 5), 0.2),
                                np.zeros(3, int))
    score = faithfulness.score(falls, flat)
    assert score.deletion_above_floor_ratio is None and score.deletion_ratio == pytest.approx(
        falls.deletion_auc.mean() / 0.2)
    zero = faithfulness.Curves(fractions, np.zeros((3, 5)), np.zeros((3, 5)), np.zeros(3, int))
    assert faithfulness.score(falls, zero).deletion_ratio is None
    report = faithfulness.Report(3, 4, 0, flat, {"m": falls}, {"m": score})
    json.dumps(report.to_dict(), allow_nan=False)
    # one image says nothing: never "beats random" from a single curve, however far apart
    one = [faithfulness.Curves(fractions, c.deletion[:1], c.insertion[:1], c.targets[:1]) for c in (falls, flat)]
    assert faithfulness.score(*one).deletion_vs_random == "no different"


# --- (4) the runtime's occlusion is Captum's ------------------------------------------------------------------


@pytest.mark.parametrize("window, stride", [(4, 2), (5, 3), (3, 3)])  # (5, 3): the last window is cut off
def test_runtime_occlusion_equals_captums(trained_bundle, window, stride):
    predictor = Predictor.load(trained_bundle, precision="fp32")
    explainer = TorchExplainer(trained_bundle)
    pixels, _ = _test_images(trained_bundle, 4)
    probabilities = predictor.probabilities(pixels)
    targets = [int(probabilities[0].argmax()), int(probabilities[1].argsort()[-2]), 3, int(probabilities[3].argmax())]
    ours = np.stack([occlusion(predictor, image, t, window, stride).heatmap for image, t in zip(pixels, targets)])
    x = explainer.inputs(pixels)
    theirs = captum_occlusion(explainer.model, x, targets, explainer.baseline(pixels), window, stride).numpy()
    assert np.abs(theirs).max() > 1e-3  # there is something to agree on
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


def test_occlusion_refuses_what_it_cannot_do(trained_bundle):
    predictor = Predictor.load(trained_bundle, precision="fp32")
    image = np.zeros((28, 28, 1), np.uint8)
    for kwargs, message in [({"window": 0}, "does not fit"), ({"window": 29}, "does not fit"),
                            ({"window": 4, "stride": 5}, "pixels go uncovered"), ({"target": 10}, "not a class index")]:
        with pytest.raises(UserError, match=message):
            occlusion(predictor, image, **kwargs)
    with pytest.raises(UserError, match="uint8 pixels of shape"):
        occlusion(predictor, np.zeros((32, 32, 3), np.uint8))
    assert len(window_starts(28, 1, 1)) ** 2 <= MAX_OCCLUDED  # every pixel alone still fits the bound


def test_pictures_show_the_map_where_it_is_and_nothing_elsewhere():
    import io

    from PIL import Image

    from tandem.explain.render import heatmap_png, overlay_png

    heatmap = np.zeros((28, 28), np.float32)
    heatmap[10:14, 10:14] = 1.0   # for the class: red to yellow
    heatmap[22, 22] = -1.0        # against it: blue
    rgba = np.asarray(Image.open(io.BytesIO(heatmap_png(heatmap))))
    assert rgba.shape == (224, 224, 4)
    assert rgba[:60, :60, 3].max() == 0  # transparent where the map is 0
    middle = rgba[88:104, 88:104].reshape(-1, 4).astype(int)
    assert (middle[:, 3] > 200).all() and (middle[:, 0] > middle[:, 2] + 100).all()
    against = rgba[178:182, 178:182].reshape(-1, 4).astype(int)
    assert (against[:, 3] > 100).all() and (against[:, 2] > against[:, 0] + 100).all()
    pixels = np.full((28, 28, 1), 128, np.uint8)
    picture = Image.open(io.BytesIO(overlay_png(pixels, heatmap, "zebra 97.0%\nIntegrated Gradients")))
    assert picture.mode == "RGB" and picture.width >= 2 * 224 and picture.height > 224 + 2 * 12
    grey = np.asarray(picture)[8:8 + 224, 8:8 + 224]  # the left panel: the image as the model saw it, untouched
    assert (grey == 128).all()


def test_grad_cam_needs_a_convolution():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UserError, match="explain it with ig or occlusion"):
        last_conv_block(mlp, "the mlp")


# --- (5) the command ------------------------------------------------------------------------------------------


def _one_line_error(proc, expected: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Two cat.png in different folders, an unreadable file, a large rotated RGB JPEG as a phone takes them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    x, _ = animals(1)
    for sub, image in (("a", x[2]), ("b", x[9])):
        (folder / sub).mkdir()
        Image.fromarray(image).save(folder / sub / "cat.png")
    (folder / "broken.png").write_bytes(b"not an image")
    big = np.array(Image.fromarray(x[6]).resize((1200, 1600)))
    photo = Image.fromarray(np.stack([big, big // 2, big], -1))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotated, as phones store portrait photos
    photo.save(folder / "phone.jpg", exif=exif, quality=90)
    return folder


@pytest.mark.slow
def test_explain_writes_a_picture_map_and_json_per_image(trained_bundle, photo_folder, tmp_path):
    out = tmp_path / "why"
    proc = run_tandem("explain", str(trained_bundle), str(photo_folder), "--out", str(out), "--json")
    assert proc.returncode == 1, proc.stderr  # one file could not be read: said, and the others explained
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and "broken.png" in lines[0] and "the others were explained" in lines[1], proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema"] == "tandem.explain/1" and report["kind"] == "images"
    assert report["method"] == "ig" and report["explained"] == 3 and report["failed"] == 1
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted(f"{n}.ig.{ext}" for n in ("a_cat", "b_cat", "phone") for ext in ("png", "npy", "json"))
    for entry in (e for e in report["images"] if "error" not in e):
        saved = json.loads((out / entry["files"]["json"]).read_text())
        heatmap = np.load(out / entry["files"]["map"])
        assert heatmap.shape == (28, 28) and saved["map"]["shape"] == [28, 28]
        np.testing.assert_allclose(np.array(saved["map"]["values"]), heatmap, rtol=1e-6, atol=1e-9)
        assert saved["target"] == {k: entry["prediction"][k] for k in ("label", "index", "probability")}
        assert abs(saved["convergence_delta"]) < 0.05
        assert (out / entry["files"]["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run into the same folder replaces nothing without --force.
    again = run_tandem("explain", str(trained_bundle), str(photo_folder / "b" / "cat.png"), str(photo_folder / "a"),
                       "--out", str(out))
    _one_line_error(again, "already holds 6 of these files")
    forced = run_tandem("explain", str(trained_bundle), str(photo_folder / "a"), "--out", str(out), "--force",
                        "--target", "Dog", "--method", "occlusion", check=True)
    assert "dog" in forced.stdout and (out / "cat.occlusion.dog.png").is_file()  # another class: its own files
    assert not (out / "cat.occlusion.png").exists()
    # --out the very folder of the images: its own pictures are not inputs next time, the images are
    folder = tmp_path / "same"
    shutil.copytree(photo_folder / "a", folder)
    for _ in range(2):
        run_tandem("explain", str(trained_bundle), str(folder), "--out", str(folder), "--method", "occlusion",
                   "--force", check=True)
    assert sorted(f.name for f in folder.iterdir()) == ["cat.occlusion.json", "cat.occlusion.npy",
                                                        "cat.occlusion.png", "cat.png"]


@pytest.mark.parametrize("args, expected", [
    (["IMG", "--target", "unicorn"], "--target 'unicorn' is not a label of this model; give one of bear"),
    (["IMG", "--target", "²"], "--target '²' is not a label of this model"),
    (["IMG", "--method", "ig", "--window", "3"], "--window and --stride set occlusion's square"),
    (["IMG", "--limit", "5"], "--limit applies only with --evaluate"),
    (["IMG", "--evaluate"], "drop the images"),
    (["--evaluate", "--methods", "ig,lime"], "--methods 'ig,lime'"),
    ([], "give images to explain"),
    (["/no/such.png"], "/no/such.png does not exist"),
])
def test_explain_mistakes_get_one_line(trained_bundle, photo_folder, args, expected):
    args = [str(photo_folder / "a" / "cat.png") if a == "IMG" else a for a in args]
    _one_line_error(run_tandem("explain", str(trained_bundle), *args), expected)


def test_explain_bad_numbers_get_usage(trained_bundle):
    proc = run_tandem("explain", str(trained_bundle), "--evaluate", "--limit", "0")
    assert proc.returncode == 2 and "argument --limit: 0 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "examples:" in run_tandem("explain", "--help", check=True).stdout


@pytest.mark.slow
def test_evaluate_reports_every_method_against_random(trained_bundle):
    proc = run_tandem("explain", str(trained_bundle), "--evaluate", "--limit", "30", "--json", check=True)
    report = json.loads(proc.stdout)
    assert report["schema"] == "tandem.explain/1" and report["kind"] == "evaluation"
    assert report["images"] == 30 and report["sample"] == "seeded" and report["steps"] == 28
    assert set(report["methods"]) == {"ig", "gradcam", "occlusion"}
    for method in report["methods"].values():
        assert 0 <= method["deletion_auc"] <= 1 and 0 <= method["insertion_auc"] <= 1
        assert method["deletion_ratio"] == pytest.approx(method["deletion_auc"] / report["random"]["deletion_auc"])
        assert method["verdict"].startswith("beats random" if method["beats_random"] else "does not beat random")
    better = [m for m in report["methods"] if report["methods"][m]["deletion_vs_random"] == "better"]
    assert report["best"] == min(better, key=lambda m: report["methods"][m]["deletion_ratio"], default=None)
    text = run_tandem("explain", str(trained_bundle), "--evaluate", "--limit", "10", "--methods", "occlusion",
                      check=True).stdout
    assert "random order" in text and "occlusion" in text and "Integrated" not in text


def test_occlusion_through_the_command_imports_no_torch(trained_bundle, photo_folder, tmp_path):
    """An inference-only install explains by occlusion, on images and on the test split (the randomisation check,
    which needs torch, skipped: tests/explain/test_faithfulness_baselines.py checks the report says so)."""
    code = f"""
import argparse, sys
from tandem.cli.explain import register
parser = argparse.ArgumentParser()
register(parser.add_subparsers())
for argv in ([{str(trained_bundle)!r}, {str(photo_folder / 'a')!r}, '--method', 'occlusion', '--out', {str(tmp_path)!r}],
             [{str(trained_bundle)!r}, '--evaluate', '--methods', 'occlusion', '--limit', '5', '--randomisation-images', '0',
              '--json']):
    args = parser.parse_args(['explain', *argv])
    assert args.func(args) == 0
assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    assert (tmp_path / "cat.occlusion.png").is_file()


def test_without_torch_the_default_is_occlusion_with_a_note(monkeypatch):
    from tandem.explain import methods as commands

    monkeypatch.setattr(commands, "torch_side_installed", lambda: False)
    method, note = commands.default_method()
    assert method == "occlusion" and "tandem[explain]" in note
    with pytest.raises(UserError, match="--method ig needs torch and captum"):
        commands.require_torch_side("ig")
    methods, notes = commands.parse_methods(None)
    assert methods == ["occlusion"] and "only occlusion is scored" in notes[0]


def test_output_names_never_collide(tmp_path):
    from tandem.explain.explain_images import output_names

    files = [tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png", tmp_path / "a" / "cat.jpg", tmp_path / "dog.png"]
    names = output_names(files)
    assert names == ["a_cat_png", "b_cat", "a_cat_jpg", "dog"] and len(set(names)) == len(names)


def test_evaluate_off_a_terminal_prints_a_line_every_few_seconds(capsys):
    from tandem.cli.args import LineProgress

    now = [0.0]
    progress = LineProgress("explain --evaluate", every=5.0, clock=lambda: now[0])
    task = progress.add_task("occlusion", total=10)
    for _ in range(9):
        now[0] += 1.0  # 9 s in all: one line at 5 s
        progress.advance(task, 1)
    progress.advance(task, 1)  # done: a last line
    progress.remove_task(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["explain --evaluate: occlusion 0/10 ...", "explain --evaluate: occlusion 5/10 ...",
                     "explain --evaluate: occlusion 10/10"]


def test_evaluate_through_a_pipe_says_what_it_is_doing(trained_bundle):
    proc = run_tandem("explain", str(trained_bundle), "--evaluate", "--methods", "occlusion", "--limit", "3", "--json",
                      check=True)
    assert json.loads(proc.stdout)["images"] == 3  # stdout holds only the report
    assert "explain --evaluate: loading the bundle and data ..." in proc.stderr
    assert "explain --evaluate: occlusion 3/3" in proc.stderr

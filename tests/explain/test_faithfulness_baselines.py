"""Faithfulness that a meaningless map fails (issue 19): maps that ignore the model are not called faithful, a
method that reads the model can be, the randomisation check tells them apart, Grad-CAM weighs only the cells that
reach the output, and the legend names the colours drawn."""

import colorsys

import numpy as np
import pytest
import torch
from torch import nn

from helpers.explainable import explainable_bundle, split_sample
from tandem.explain import faithful, faithfulness
from tandem.explain.baselines import brightness_maps, edge_maps, fill_images
from tandem.runtime import Predictor


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return explainable_bundle(tmp_path_factory.mktemp("faith"))


def _fills(pixels):
    return {name: fill_images(name, pixels) for name in ("black", "blur", "mean")}


@pytest.mark.slow
def test_maps_that_ignore_the_model_are_not_called_faithful(bundle):
    predictor = Predictor.load(bundle, precision="fp32")
    pixels, _ = split_sample(bundle, 40)
    targets = predictor.probabilities(pixels).argmax(1)
    bright = brightness_maps(pixels)
    # What today's check says: brightness beats random on both curves (60% of the animals' pixels are black).
    old = faithfulness.evaluate(predictor.probabilities, pixels, {"brightness": bright}, 28, 0, targets)
    assert old.methods["brightness"].beats_random, old.methods["brightness"]
    found = faithful.compare_with_baselines(predictor.probabilities, pixels,
                                            {"bright": bright, "edges": edge_maps(pixels)}, _fills(pixels), 28, 0,
                                            targets)
    for name in ("bright", "edges"):
        assert not found["methods"][name]["beats_every_baseline"], found["methods"][name]
    # The edge map is no copy of a baseline it is compared with but the edge baseline: it still loses to brightness.
    assert any("brightness" in why for why in found["methods"]["edges"]["failures"])
    verdicts = faithful.final_verdicts(found, {"bright": None, "edges": None}, "not run here")
    assert not verdicts["bright"]["faithful"] and verdicts["bright"]["verdict"].startswith("not faithful")


CHECKER = (np.indices((6, 6)).sum(0) % 2 == 0)   # the pattern the network looks for, in rows 4-9, columns 16-21


class CheckerNet(nn.Module):
    """Two classes from a checkerboard in one 6 x 6 region: nothing outside it can change the output, and neither
    black, nor a blur, nor a flat mean shows the pattern."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 28, 28)
        mask[..., 4:10, 16:22] = torch.from_numpy(np.where(CHECKER, 1.0, -1.0)).float()
        self.register_buffer("mask", mask)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[64.0], [-64.0]]))
            self.head.bias.copy_(torch.tensor([-4.0, 4.0]))

    def forward(self, x):
        return self.head((x * self.mask).sum((2, 3)) / 36)


def test_a_method_that_reads_the_model_beats_every_baseline_under_every_fill(tmp_path):
    """Runtime occlusion on a network that reads a pattern in one region of noise images: the region is neither the
    brightest nor the edgiest part of the image, and occlusion finds it, so it beats every baseline under every
    fill."""
    import onnxruntime as ort

    from tandem.explain.occlusion import occlusion
    from tandem.train.onnx_graph import export_onnx

    model = CheckerNet().eval()
    export_onnx(model, torch.zeros(2, 1, 28, 28), tmp_path / "model.onnx")
    manifest = {"labels": ["checked", "plain"], "inputs": [{"name": "input"}],
                "preprocessing": {"image_size": 28, "channels": 1, "mean": 0.0, "std": 1.0, "resize": "crop"}}
    predictor = Predictor(ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]),
                          manifest)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8)
    pixels[:, 4:10, 16:22, 0] = np.where(CHECKER, 160, 96)  # mid-grey: not the brightest
    targets = predictor.probabilities(pixels).argmax(1)
    assert (targets == 0).all()
    maps = np.stack([occlusion(predictor, image, 0, 4, 2).heatmap for image in pixels])
    found = faithful.compare_with_baselines(predictor.probabilities, pixels, {"occlusion": maps}, _fills(pixels), 28,
                                            0, targets)
    assert found["methods"]["occlusion"]["beats_every_baseline"], found["methods"]["occlusion"]["failures"]
    assert found["methods"]["occlusion"]["failures"] == []
    verdict = faithful.final_verdicts(found, {"occlusion": {"passed": True}})["occlusion"]
    assert verdict["faithful"] and verdict["verdict"].startswith("faithful")
    failed = faithful.final_verdicts(found, {"occlusion": {"passed": False, "final_correlation": 0.9,
                                                          "threshold": 0.5}})["occlusion"]
    assert not failed["faithful"] and "randomisation check" in failed["verdict"]


@pytest.mark.slow
def test_the_randomisation_check_fails_a_map_that_ignores_the_model_and_passes_grad_cam(bundle):
    from tandem.explain.attribute import TorchExplainer
    from tandem.explain.sanity import randomisation_check

    explainer = TorchExplainer(bundle)
    pixels, _ = split_sample(bundle, 16)
    targets = explainer.model(explainer.inputs(pixels)).argmax(1).numpy()
    bright = randomisation_check(explainer, lambda model, p, t: brightness_maps(p), pixels, targets)
    assert bright["final_correlation"] == pytest.approx(1.0) and not bright["passed"]
    assert len(bright["layers"]) >= 5  # every conv, batch norm and linear layer, randomised in turn from the top
    cam = randomisation_check(explainer, "gradcam", pixels, targets)
    assert cam["passed"] and cam["final_correlation"] < 0.5, cam


def _floor_cnn(ceil: bool = False) -> nn.Module:
    """The default cnn's shape, width 4: its last MaxPool maps 7 x 7 to 3 x 3 (floor) or 4 x 4 (ceil)."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    torch.manual_seed(0)
    side = 4 if ceil else 3
    return nn.Sequential(*block(1, 4), nn.MaxPool2d(2), *block(4, 8), nn.MaxPool2d(2), *block(8, 8),
                         nn.MaxPool2d(2, ceil_mode=ceil), nn.Flatten(), nn.Linear(8 * side * side, 10)).eval()


def test_grad_cam_puts_no_weight_on_cells_that_cannot_reach_the_output():
    from captum.attr import LayerGradCam

    from tandem.explain.gradcam import grad_cam, last_conv_block, probability_model, reach_mask

    model = _floor_cnn()
    layer = last_conv_block(model)
    reach = reach_mask(model, layer, (1, 28, 28))
    expected = torch.ones(7, 7, dtype=torch.bool)
    expected[6, :] = expected[:, 6] = False  # the floor pool never reads row 6 nor column 6
    assert torch.equal(reach, expected)
    inputs = torch.randn(8, 1, 28, 28)
    targets = model(inputs).argmax(1)
    plain = LayerGradCam(probability_model(model), layer).attribute(inputs, target=targets, relu_attributions=True)
    assert plain[:, 0][:, ~expected].sum() > 0  # what Grad-CAM did: weight where the network does not look
    cam = grad_cam(model, inputs, targets, layer, reach, upsample=False)
    assert cam.shape == (8, 7, 7) and cam[:, ~expected].abs().max() == 0
    assert torch.allclose(cam[:, expected], plain[:, 0][:, expected])  # elsewhere the same map
    assert cam[:, expected].sum() > 0
    # A ceil-mode pool (the fixed model) reads every cell: nothing masked.
    ceil = _floor_cnn(ceil=True)
    assert reach_mask(ceil, last_conv_block(ceil), (1, 28, 28)).all()


def test_the_legend_names_the_colours_the_ramps_draw():
    from tandem.explain.render import NEGATIVE_RAMP, POSITIVE_RAMP, legend, ramp_colour

    # Hue bands of the words, in degrees (independent of render's own naming).
    bands = {"red": [(0, 15), (345, 360)], "orange": [(15, 45)], "yellow": [(45, 70)], "cyan": [(170, 200)],
             "blue": [(200, 250)]}

    def hue(rgb):
        return colorsys.rgb_to_hsv(*(float(v) / 255 for v in rgb))[0] * 360

    text = legend("zebra")
    positive, negative = text.split(" (weak to strong): for zebra; ")
    assert negative.endswith(": against")
    for words, ramp in ((positive.split(" to "), POSITIVE_RAMP), (negative[:-len(": against")].split(" to "),
                                                                  NEGATIVE_RAMP)):
        # weak end, (middle,) strong end: each word's band holds the colour drawn there
        strengths = np.linspace(0, 1, len(words))
        for word, strength in zip(words, strengths):
            h = hue(ramp_colour(ramp, strength))
            assert any(lo <= h < hi for lo, hi in bands[word]), (word, strength, h)
    assert positive.split(" to ") == ["red", "orange", "yellow"] and negative.startswith("blue to cyan")
    assert legend("zebra", signed=False) == f"{positive} (weak to strong): for zebra"

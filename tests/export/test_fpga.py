"""The FPGA path (hls4ml): the bit-accurate emulation agrees with the float model, a model hls4ml cannot take gets a
one-line message, and the FPGA-sized variant trains and goes through export_fpga with its report."""

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tandem.errors import UserError
from tandem.train.models import count_parameters, create_model

needs_hls4ml = pytest.mark.skipif(importlib.util.find_spec("hls4ml") is None,
                                  reason="the FPGA path needs hls4ml (pip install hls4ml==1.3.0)")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the hls4ml emulation is compiled with g++")


def test_fpga_variant_is_fpga_sized():
    model = create_model("cnn-fpga", 1, 28, 10)
    assert 2_000 < count_parameters(model) < 5_000  # the default cnn has about 75k
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@needs_hls4ml
@pytest.mark.parametrize("model, words", [
    (create_model("resnet", 3, 32, 10, width=4), "has no hls4ml converter"),
    (DataDependent(), "cannot be traced by torch.fx"),
])
def test_an_unsupported_model_gets_one_line(model, words):
    from tandem.export.fpga import check_supported

    with pytest.raises(UserError) as err:
        check_supported(model, "model x")
    assert words in str(err.value) and "model.name=cnn-fpga" in str(err.value) and "\n" not in str(err.value)


@needs_hls4ml
def test_too_many_weights_for_on_chip_memory_gets_one_line():
    from tandem.export.fpga import check_on_chip

    assert check_on_chip(create_model("cnn-fpga", 1, 28, 10), 16) < 5_000
    with pytest.raises(UserError, match=r"more than the KV260's .* Mb of on-chip memory .*model.name=cnn-fpga") as err:
        check_on_chip(create_model("cnn", 1, 28, 10, width=256), 16)  # 14M parameters
    assert "\n" not in str(err.value)


@needs_hls4ml
@pytest.mark.parametrize("options", [{"precision": "ap_fixed<40,6>"}, {"precision": "16 bits"}, {"reuse_factor": 0}])
def test_bad_options_get_one_line(tmp_path, options):
    from tandem.export.fpga import export_fpga

    with pytest.raises(UserError, match="give auto"):
        export_fpga(tmp_path / "no-run", tmp_path / "bundle", **options)


@pytest.fixture(scope="module")
def fpga_run(tmp_path_factory, small_npz):
    """cnn-fpga trained briefly on 600 real animal images."""
    from tandem.config import TrainConfig
    from tandem.train.loop import train

    cfg = TrainConfig.model_validate({"data": {"source": str(small_npz)}, "model": {"name": "cnn-fpga"}, "epochs": 10,
                                      "batch_size": 64, "out_dir": str(tmp_path_factory.mktemp("fpga-run")),
                                      "progress": False})
    return train(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def fpga_export(tmp_path_factory, fpga_run):
    from tandem.export.fpga import export_fpga

    bundle = tmp_path_factory.mktemp("fpga-bundle")
    lines = []
    report = export_fpga(fpga_run.run_dir, bundle, log=lines.append)
    return bundle, report, lines


@pytest.mark.slow
@needs_hls4ml
@needs_gxx
def test_emulation_agrees_with_the_float_model(tmp_path, fpga_run, small_npz):
    """The reference is torch: the compiled ap_fixed<16,6> C++ emulation (rounding, saturating), fed channels-last,
    picks the same class and its logits stay within the rounding of four fixed-point layers."""
    from tandem.config import TrainConfig
    from tandem.export.fpga import convert, predict
    from tandem.train.models import build_model
    from tandem.runtime.preprocess import preprocess
    from tandem.train.checkpoint import resolve_checkpoint

    found = resolve_checkpoint(fpga_run.run_dir)
    model = build_model(TrainConfig.model_validate(found.state["config"]), 10, found.model)
    with np.load(small_npz) as data:
        x = preprocess(data["x"][::3, :, :, None], 0.5, 0.5)  # 200 images
    hls_model = convert(model, (1, 28, 28), "ap_fixed<16,6,AP_RND_CONV,AP_SAT>", tmp_path / "prj")
    hls_model.compile()
    got = predict(hls_model, x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    # Rounded weights and activations, 2^-10 each, summed over up to 144 inputs a layer through four layers: within
    # 64 LSBs (truncation instead of rounding drifts about 5x further: the reason export_fpga rounds).
    np.testing.assert_allclose(got, expected, atol=64 * 2.0 ** -10, rtol=0)
    assert expected.std() > 0.5


@pytest.mark.slow
@needs_hls4ml
@needs_gxx
def test_fpga_variant_goes_through_export(fpga_export, fpga_run):
    bundle, report, lines = fpga_export
    fpga = bundle / "fpga"
    assert json.loads((fpga / "report.json").read_text()) == report
    width, integer = map(int, re.fullmatch(r"ap_fixed<(\d+),(\d+)>", report["precision"]["chosen"]).groups())
    tried = report["precision"]["tried"]
    assert tried[-1]["precision"] == report["precision"]["chosen"] and width in (8, 10, 12, 14, 16, 18)
    # auto: the narrowest width that meets the target on the validation images (or the widest tried)
    assert all(t["calibration_agreement"] < 0.99 for t in tried[:-1])
    assert tried[-1]["calibration_agreement"] >= 0.99 or width == 18
    assert 2 ** (integer - 1) > report["precision"]["max_abs_value"]
    agreement, accuracy = report["agreement"], report["accuracy"]
    assert agreement["on"] == "test split"
    assert agreement["images"] == accuracy["test_images"] == fpga_run.metrics["test_images"]
    assert agreement["top1"] >= 0.95
    assert abs(accuracy["emulation_test"] - accuracy["float_test"]) <= 0.05
    assert accuracy["float_test"] == pytest.approx(fpga_run.metrics["test_accuracy"], abs=1e-6)
    res = report["resources"]
    assert res["fits_kv260"] and 0 < res["dsp_estimate"] <= 1248 and res["bram36_estimate"] <= 144
    assert res["macs_per_image"] == 28 * 28 * 9 * 4 + 14 * 14 * 36 * 8 + 7 * 7 * 72 * 16 + 144 * 10
    assert res["weight_bits"] == width * (36 + 4 + 288 + 8 + 1152 + 16 + 1440 + 10)  # batch norm folded into convs
    assert report["model"]["parameters"] == 2982 and report["tool"]["part"] == "xck26-sfvc784-2LV-c"
    # The project: sources and scripts, test-bench data, no compiled library, no Python objects in its YAML.
    assert (fpga / "firmware" / "myproject.cpp").is_file() and (fpga / "build_prj.tcl").is_file()
    assert (fpga / "README.md").is_file() and "export     1" in (fpga / "build_opt.tcl").read_text()
    assert len((fpga / "tb_data" / "tb_input_features.dat").read_text().splitlines()) == 10
    assert not list(fpga.rglob("*.so")) and not list(fpga.rglob("*.o"))
    text = (fpga / "hls4ml_config.yml").read_text()
    assert "!!python" not in text and yaml.safe_load(text)["Part"] == "xck26-sfvc784-2LV-c"
    summary = [line for line in lines if line.startswith(f"fpga {fpga}:")]
    assert len(summary) == 1 and report["precision"]["chosen"] in summary[0] and "KV260" in summary[0]


@pytest.mark.slow
@needs_hls4ml
def test_export_does_not_replace_an_fpga_folder(fpga_export, fpga_run):
    from tandem.export.fpga import export_fpga

    bundle, _, _ = fpga_export
    with pytest.raises(UserError, match="already exists"):
        export_fpga(fpga_run.run_dir, bundle)

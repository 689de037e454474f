"""Static int8 at export against fp32: the gates both ways (recorded in the manifest, fp32 kept alone when
one fails), int8 top-1 against fp32's on the test split, and the runtime's choice of model file: int8 when
the manifest lists it, its hash verified, fp32 on request, a one-line error for int8 a bundle lacks.

The speed gate's timing is replaced in these tests (`quantize.measure_speed`): a real measurement on a busy
2-core box could go either way and make them flaky; benchmarks/edge.py measures it for real."""

import json
import shutil

import numpy as np
import pytest

from helpers import run_tandem
from tandem.bundle import read_manifest, sha256_file, write_manifest
from tandem.errors import UserError
from tandem.export import quantize
from tandem.export.onnx_bundle import export_bundle
from tandem.runtime import Predictor


def _speed(speedup: float):
    """A stand-in for the timed speed gate: int8 runs `speedup` times as many images/s as fp32."""
    return lambda fp32, int8, x, rounds=0: {"fp32_images_per_second": 1000.0, "int8_images_per_second": 1000.0 * speedup}


def _export(run, out, monkeypatch=None, speedup=2.0, **kwargs):
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "measure_speed", _speed(speedup))
        if monkeypatch:
            monkeypatch(mp)
        export_bundle(run.run_dir, out, int8=True, calibration=64, log=logs.append, **kwargs)
    return read_manifest(out), logs


@pytest.fixture(scope="module")
def int8_bundle(tiny_run, tmp_path_factory):
    """The tiny run with int8 kept: a budget wide enough for its 60 validation images (one is 1.7 pp)."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    manifest, logs = _export(tiny_run, out, int8_budget_pp=20.0)
    return out, manifest, logs


def _pixels_and_labels(bundle):
    from tandem.config import TrainConfig
    from tandem.train.loop import load_splits

    splits = load_splits(TrainConfig.model_validate(read_manifest(bundle)["config"]))
    return splits.test.pixels, splits.test.labels


# The gates, recorded either way.

def test_kept_int8_is_listed_hashed_and_both_gates_are_recorded(int8_bundle):
    bundle, manifest, logs = int8_bundle
    entry = manifest["files"]["model.int8.onnx"]
    assert entry["sha256"] == sha256_file(bundle / "model.int8.onnx")
    record = manifest["export"]["int8"]
    assert record["kept"] is True and record["calibration_images"] == 64
    gate = record["accuracy_gate"]
    assert gate["split"] == "validation" and gate["images"] == 60 and gate["budget_pp"] == 20.0 and gate["passed"]
    assert gate["drop_pp"] == pytest.approx(100 * (gate["fp32_accuracy"] - gate["int8_accuracy"]))
    speed = record["speed_gate"]
    assert speed["passed"] and speed["speedup"] == pytest.approx(2.0) and speed["batch"] == quantize.SPEED_BATCH
    assert record["test"]["images"] == 60 and manifest["metrics"]["int8_test_accuracy"] == record["test"]["int8_accuracy"]
    assert entry["bytes"] < 0.5 * manifest["files"]["model.onnx"]["bytes"]  # int8 weights: about a quarter
    assert any(line.startswith("int8: model.int8.onnx kept") for line in logs)


def test_int8_weights_fit_seven_bits_so_no_cpu_saturates(int8_bundle):
    """uint8 x int8 products summed in pairs saturate int16 on x86 CPUs without VNNI (ONNX Runtime's AVX2
    kernel): the weights are quantized to 7 bits (reduce_range) so the bundle agrees with fp32 on any CPU."""
    import onnx
    from onnx import numpy_helper

    bundle, manifest, _ = int8_bundle
    graph = onnx.load(str(bundle / "model.int8.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(abs(w.astype(int)).max() <= 64 for w in weights)  # 2 x 255 x 64 < 32,767
    assert "reduce_range" in manifest["export"]["int8"]["method"]


def test_int8_agrees_with_fp32_on_most_test_images(int8_bundle):
    bundle, manifest, _ = int8_bundle
    pixels, labels = _pixels_and_labels(bundle)
    int8, fp32 = Predictor.load(bundle), Predictor.load(bundle, precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    int8_top1, fp32_top1 = int8.logits(pixels).argmax(1), fp32.logits(pixels).argmax(1)
    assert (int8_top1 == fp32_top1).mean() >= 0.9
    assert abs((int8_top1 == labels).mean() - (fp32_top1 == labels).mean()) <= 0.1
    # What export recorded is what the runtime computes.
    assert manifest["export"]["int8"]["test"]["int8_accuracy"] == pytest.approx((int8_top1 == labels).mean())


def test_accuracy_gate_over_budget_keeps_fp32_only_and_says_why(tiny_run, tmp_path):
    one_less = lambda mp: mp.setattr(quantize, "validation_answers", lambda f, i, x, y: (len(y), len(y) - 1))
    manifest, logs = _export(tiny_run, tmp_path / "b", monkeypatch=one_less, int8_budget_pp=0.5)
    record = manifest["export"]["int8"]
    assert not record["kept"] and not record["accuracy_gate"]["passed"] and record["speed_gate"]["passed"]
    assert record["accuracy_gate"]["drop_pp"] == pytest.approx(100 / 60)
    assert "over the 0.5 pp budget" in record["reason"] and "--int8-budget" in record["reason"]
    assert "model.int8.onnx" not in manifest["files"] and not (tmp_path / "b" / "model.int8.onnx").exists()
    assert "int8_test_accuracy" not in manifest["metrics"]
    assert any(line.startswith("int8: not kept, the bundle is fp32 only: validation accuracy") for line in logs)
    assert Predictor.load(tmp_path / "b").precision == "fp32"
    # The same one-image drop is within a budget of 2 pp: the budget decides, nothing else.
    manifest, _ = _export(tiny_run, tmp_path / "c", monkeypatch=one_less, int8_budget_pp=2.0)
    assert manifest["export"]["int8"]["kept"] and "model.int8.onnx" in manifest["files"]


def test_speed_gate_keeps_fp32_only_when_int8_is_not_faster(tiny_run, tmp_path):
    manifest, logs = _export(tiny_run, tmp_path / "b", speedup=0.8, int8_budget_pp=100.0)
    record = manifest["export"]["int8"]
    assert not record["kept"] and record["accuracy_gate"]["passed"] and not record["speed_gate"]["passed"]
    assert "not faster than fp32 here (0.80x" in record["reason"]
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors"}
    assert any("int8: not kept" in line for line in logs)


def test_no_data_no_int8_and_the_reason(tiny_run, tmp_path):
    from tandem.export import source

    gone = lambda mp: mp.setattr(source, "run_splits",
                                 lambda cfg, fingerprint, log: (None, None, "the run's data cannot be read (gone)"))
    manifest, _ = _export(tiny_run, tmp_path / "b", monkeypatch=gone)
    record = manifest["export"]["int8"]
    assert not record["kept"] and "no training images to calibrate on" in record["reason"]
    assert record["accuracy_gate"] is None and "model.int8.onnx" not in manifest["files"]


def test_no_validation_split_no_int8(tiny_bundle, tmp_path):
    x = np.zeros((4, 1, 28, 28), np.float32)
    record = quantize.quantize_and_gate(tiny_bundle / "model.onnx", tmp_path / "model.int8.onnx",
                                        quantize.QuantData(calibration=x, x_val=x[:0], y_val=np.zeros(0)), log=print)
    assert not record["kept"] and "data.val_fraction" in record["reason"]
    assert not (tmp_path / "model.int8.onnx").exists()


# The runtime's choice of model file.

def test_runtime_prefers_int8_and_fp32_overrides(int8_bundle, tiny_bundle):
    bundle, _, _ = int8_bundle
    x = _pixels_and_labels(bundle)[0][:8]
    auto = Predictor.load(bundle)
    assert auto.precision == "int8" and auto.model_file == "model.int8.onnx"
    assert "QuantizeLinear" in (bundle / "model.int8.onnx").read_bytes().decode("latin-1")
    fp32 = Predictor.load(bundle, precision="fp32")
    assert fp32.model_file == "model.onnx"
    # fp32 from the int8 bundle is exactly the fp32 bundle of the same run (an older bundle, no int8 in it).
    old = Predictor.load(tiny_bundle)
    assert old.precision == "fp32"
    np.testing.assert_allclose(fp32.logits(x), old.logits(x), atol=1e-6)
    assert not np.array_equal(auto.logits(x), fp32.logits(x))  # int8 really runs


def test_a_tampered_int8_model_is_refused(int8_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle[0], bundle)
    data = bytearray((bundle / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / "model.int8.onnx").write_bytes(bytes(data))
    for precision in ("auto", "int8", "fp32"):  # fp32 too: every listed file is verified before use
        with pytest.raises(UserError, match="model.int8.onnx does not match its sha256") as caught:
            Predictor.load(bundle, precision=precision)
        assert "\n" not in str(caught.value)
    proc = run_tandem("predict", str(bundle), str(bundle / "manifest.json"))
    assert proc.returncode == 2 and "model.int8.onnx does not match its sha256" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_an_unlisted_int8_file_is_never_read(int8_bundle, tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    shutil.copy(int8_bundle[0] / "model.int8.onnx", bundle)  # dropped in, not in the manifest
    assert Predictor.load(bundle).precision == "fp32"
    with pytest.raises(UserError, match="has no int8 model"):
        Predictor.load(bundle, precision="int8")
    # A manifest that lists it (re-hashed) makes it the bundle's int8 model: the manifest decides.
    manifest = read_manifest(bundle)
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")})
    assert Predictor.load(bundle).precision == "int8"


def test_asking_int8_of_a_bundle_without_it_is_one_line(tiny_bundle, tmp_path):
    with pytest.raises(UserError, match=r"has no int8 model \(model.int8.onnx\); use --precision fp32 or auto"):
        Predictor.load(tiny_bundle, precision="int8")
    with pytest.raises(UserError, match="precision 'int4' is not one of auto, fp32, int8"):
        Predictor.load(tiny_bundle, precision="int4")
    proc = run_tandem("predict", str(tiny_bundle), str(tmp_path), "--precision", "int8")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--int8" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_int8_options_need_int8_and_sane_values(tiny_run, tmp_path):
    proc = run_tandem("export", str(tiny_run.run_dir), "--out", str(tmp_path / "b"), "--int8-budget", "1")
    assert proc.returncode == 2 and "add --int8" in proc.stderr and proc.stderr.count("\n") == 1
    for option, value, message in (("--int8-budget", "-1", "out of range"), ("--int8-budget", "x", "not a number"),
                                   ("--calibration", "0", "out of range")):
        proc = run_tandem("export", str(tiny_run.run_dir), "--out", str(tmp_path / "b"), "--int8", option, value)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_export_int8_through_the_command_records_what_it_decided(tiny_run, tmp_path):
    """The real command, real timing: whichever way the gates go, the bundle and its manifest agree."""
    out = tmp_path / "b"
    proc = run_tandem("export", str(tiny_run.run_dir), "--out", str(out), "--int8", "--int8-budget", "0",
                      "--calibration", "32", "--json", check=True)
    report = json.loads(proc.stdout)
    record = report["int8"]
    assert record["accuracy_gate"]["budget_pp"] == 0 and record["calibration_images"] == 32
    kept = record["accuracy_gate"]["drop_pp"] <= 0 and record["speed_gate"]["speedup"] > 1
    assert record["kept"] == kept == (out / "model.int8.onnx").exists()
    assert ("int8: model.int8.onnx kept" if kept else "int8: not kept") in proc.stderr
    assert Predictor.load(out).precision == ("int8" if kept else "fp32")


def test_the_server_serves_int8_unless_its_settings_say_fp32(int8_bundle):
    """`tandem serve` opens bundles through the runtime: int8 where a bundle has it, and `models.<m>.precision: fp32`
    gives model.onnx, what Triton serves from the same repository."""
    from tandem.serve.config import ServeConfig
    from tandem.serve.repository import _open_version

    bundle = int8_bundle[0]
    auto = ServeConfig.model_validate({})
    pinned = ServeConfig.model_validate({"models": {"animals": {"precision": "fp32"}}})
    served = [_open_version(bundle, 1, (1,), cfg.model("animals").precision)[0] for cfg in (auto, pinned)]
    assert [p.model_file for p in served] == ["model.int8.onnx", "model.onnx"]
    x = np.zeros((2, 1, 28, 28), np.float32)
    np.testing.assert_array_equal(served[1].logits(x), Predictor.load(bundle, precision="fp32").logits(x))

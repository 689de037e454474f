"""The planner: roofline estimates, fit verdicts for inference and training, and the JSON of `tandem plan`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

from tandem.errors import UserError

pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tandem.hardware.analysis import analyze_model  # noqa: E402
from tandem.hardware.devices import Device, load_devices  # noqa: E402
from tandem.hardware.plan import estimate_inference, estimate_training, inference_fit, roofline  # noqa: E402


def mlp(inputs: int, hidden: int) -> bytes:
    """x (N, inputs) -> Gemm to `hidden` -> Relu -> Gemm to 10: a model whose size is set by two numbers."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w1", (hidden, inputs)), ("b1", (hidden,)), ("w2", (10, hidden)), ("b2", (10,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


SMALL = analyze_model(mlp(64, 32))        # 2,410 parameters: fits a microcontroller
BIG = analyze_model(mlp(1024, 1024))      # 1,059,850 parameters: 4.2 MB in fp32, more than its 2 MB of flash


def board(**fields) -> Device:
    base = {"name": "board", "title": "a board", "kind": "cpu", "precisions": ["fp32"],
            "peak_ops": {"fp32": {"value": 1e9, "source": "s"}}, "memory_bandwidth": {"value": 1e9, "source": "s"},
            "memory": {"value": 1e9, "source": "s"}, "runtime_overhead": {"value": 0, "source": "s"},
            "power": {"value": 2.0, "source": "s"}}
    return Device.model_validate({**base, **fields})


def test_min_depth_charges_shallow_layers_as_deep_ones():
    """min_depth (the host's int8, measured): an output of a layer whose reduction depth is below it costs min_depth
    MACs; deeper layers and layers without MACs cost what they did."""
    fast_memory = {"memory_bandwidth": {"value": 1e15, "source": "s"}}
    plain = roofline(SMALL, board(**fast_memory), "fp32")
    deep = roofline(SMALL, board(**fast_memory, min_depth={"fp32": {"value": 10, "source": "s"}}), "fp32")
    assert deep.seconds == pytest.approx(plain.seconds)  # both Gemms have depth 64 and 32, above 10
    shallow = roofline(SMALL, board(**fast_memory, min_depth={"fp32": {"value": 100, "source": "s"}}), "fp32")
    extra = sum(2 * (layer.output_elements * 100 - layer.macs) for layer in SMALL.layers if layer.macs)
    assert SMALL.layers[0].macs == 64 * 32 and SMALL.layers[0].output_elements == 32  # depth 64: charged 100 each
    assert shallow.compute_seconds == pytest.approx(plain.compute_seconds + extra / 1e9)
    with pytest.raises(Exception, match="min_depth"):
        board(min_depth={"int8": {"value": 100, "source": "s"}})  # no int8 peak to go with it


def test_roofline_takes_the_slower_of_compute_and_memory_per_layer():
    device = board()
    line = roofline(SMALL, device, "fp32", batch=4)
    expected = sum(max(layer.flops * 4 / 1e9, (layer.weight_bytes("fp32") + 4 * layer.activation_bytes("fp32")) / 1e9)
                   for layer in SMALL.layers)
    assert line.seconds == pytest.approx(expected)
    estimate = estimate_inference(SMALL, device, "fp32", batch=4)
    assert estimate.throughput_per_s == pytest.approx(4 / expected)
    assert estimate.energy_j == pytest.approx(2.0 * expected / 4)  # power x time, per image
    fast_memory = roofline(SMALL, board(memory_bandwidth={"value": 1e15, "source": "s"}), "fp32")
    assert fast_memory.bound == "compute" and fast_memory.seconds == pytest.approx(SMALL.flops / 1e9)
    launches = roofline(SMALL, board(kernel_overhead={"value": 1e-3, "source": "s"}), "fp32")
    assert launches.seconds == pytest.approx(roofline(SMALL, device, "fp32").seconds + 2e-3)  # two Gemms (relu fused)


def test_the_microcontroller_runs_a_small_model_and_refuses_a_big_one():
    mcu = load_devices()["stm32h7"]
    small = inference_fit(SMALL, mcu, "fp32")
    assert small.fits and "weight memory" in small.reason
    big = inference_fit(BIG, mcu, "fp32")
    assert not big.fits and "exceed the 2.1 MB weight memory" in big.reason
    assert inference_fit(BIG, mcu, "int8").fits  # the same model quantized: 1 MB of weights fit the flash
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 400_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 400_000])])
    wide = analyze_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    verdict = inference_fit(wide, mcu, "int8")  # no weights, but 800 KB of activations: more than 512 KB of SRAM
    assert not verdict.fits and "of 524 KB" in verdict.reason and "activations 800 KB" in verdict.reason
    pi = load_devices()["rpi5"]
    assert inference_fit(BIG, pi, "fp32").fits


def test_an_edge_tpu_keeps_a_small_model_on_chip_and_streams_a_big_one():
    tpu = load_devices()["coral-edgetpu"]
    small = estimate_inference(SMALL, tpu, "int8")
    assert small.fits and small.memory_s < 1e-5  # only the input and output cross USB
    huge = analyze_model(mlp(4096, 2048))  # 8.4 M int8 weights: more than the 8 MB of SRAM
    streamed = estimate_inference(huge, tpu, "int8")
    assert streamed.fits and "stream from the host" in streamed.reason
    assert streamed.memory_s > huge.weight_bytes("int8") / tpu.memory_bandwidth.value * 0.99


def _training_model(analysis, images=1000):
    from tandem.hardware.plan import TrainingModel

    trainable = analysis.parameters
    return TrainingModel(analysis, trainable, 10, images, images * 28 * 28 * 5)


def test_training_fits_a_board_and_not_the_microcontroller():
    from tandem.config import load_config

    cfg = load_config(None, ["optim.name=adamw"])
    devices = load_devices()
    pi = estimate_training(_training_model(SMALL), cfg, devices["rpi5"], "fp32", batch=128)
    params = SMALL.parameters
    assert pi.fits and pi.memory["optimizer"] == params * 4 * 2  # AdamW: two fp32 moments per parameter
    assert pi.memory["weights"] == pi.memory["gradients"] == params * 4
    assert pi.memory["data"] == 1000 * 28 * 28 * 5 and pi.largest_batch == 1000  # no bigger than the data set
    mcu = estimate_training(_training_model(BIG), cfg, devices["stm32h7"], "fp32", batch=128)
    assert not mcu.fits and mcu.largest_batch == 0 and "even batch 1 does not fit" in mcu.reason
    # The largest batch that fits is the largest: one more image would not.
    tight = board(memory={"value": 1.2e6, "source": "s"}, train_precisions=["fp32"],
                  train_overhead={"value": 0, "source": "s"})
    sgd = load_config(None, ["data.stream=on"])
    at = estimate_training(_training_model(SMALL, 10**6), sgd, tight, "fp32", batch=1)
    largest = at.largest_batch
    assert 0 < largest < 10**6
    assert estimate_training(_training_model(SMALL, 10**6), sgd, tight, "fp32", largest).fits
    assert not estimate_training(_training_model(SMALL, 10**6), sgd, tight, "fp32", largest + 1).fits
    # Time per epoch: about 3x the forward roofline per step, times the steps.
    assert at.epoch_s == pytest.approx(at.step_s * 10**6, rel=1e-9)


def _run(capsys, *argv) -> dict:
    from tandem.cli.hardware import register

    parser = argparse.ArgumentParser(prog="tandem")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


ESTIMATE_KEYS = {"device", "title", "kind", "precision", "batch", "latency_s", "throughput_per_s", "energy_j", "bound",
                 "compute_s", "memory_s", "overhead_s", "fits", "reason", "memory", "measured_figures",
                 "derived_figures"}


def test_plan_json_schema_with_the_host_measured(tiny_bundle, capsys):
    report = _run(capsys, "plan", str(tiny_bundle), "--device", "host,stm32h7,coral-edgetpu", "--seconds", "0.2",
                  "--json")
    assert set(report) == {"bundle", "batch", "model", "host_probe", "estimates", "skipped", "measured"}
    assert set(report["model"]) == {"fp32", "int8", "input_shape", "output_shape", "kernels"}
    assert {e["device"] for e in report["estimates"]} == {"host", "stm32h7", "coral-edgetpu"}
    for e in report["estimates"]:
        assert set(e) == ESTIMATE_KEYS
        assert isinstance(e["fits"], bool) and e["latency_s"] > 0 and e["reason"]
        assert {"weights", "activations", "runtime", "total", "available"} <= set(e["memory"])
        assert e["energy_j"] is None if e["device"] == "host" else e["energy_j"] > 0
    probe = report["host_probe"]
    assert probe["fp32_flops"] > 0 and probe["copy_bandwidth"] > 0
    (fp32,) = [m for m in report["measured"] if m["precision"] == "fp32"]
    assert set(fp32) >= {"device", "precision", "batch", "runs", "median_s", "best_s", "predicted_s", "ratio",
                         "best_ratio", "model_file"}
    assert fp32["ratio"] > 0 and fp32["model_file"] == "model.onnx"


def test_plan_without_the_host_and_with_a_device_file(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": {"tiny-mcu": {
        "title": "a 16 KB part", "kind": "mcu", "precisions": ["int8"], "peak_ops": {"int8": {"value": 1e8, "source": "s"}},
        "memory_bandwidth": {"value": 1e8, "source": "s"}, "memory": {"value": 16384, "source": "s"},
        "runtime_overhead": {"value": 2048, "source": "s"}}}}))
    report = _run(capsys, "plan", str(tiny_bundle), "--devices", str(path), "--device", "tiny-mcu,rpi5",
                  "--precision", "int8", "--batch", "2", "--json")
    assert report["host_probe"] is None and report["measured"] == []
    rows = {e["device"]: e for e in report["estimates"]}
    assert not rows["tiny-mcu"]["fits"] and "of 16.4 KB" in rows["tiny-mcu"]["reason"]
    assert rows["rpi5"]["fits"] and rows["rpi5"]["batch"] == 2
    with pytest.raises(UserError, match="unknown device 'nope'"):
        _run(capsys, "plan", str(tiny_bundle), "--device", "nope")
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        _run(capsys, "plan", str(tiny_bundle), "--precision", "fp8")
    with pytest.raises(UserError, match="give one bundle"):
        _run(capsys, "plan")


def test_plan_train_json_schema_and_verdicts(capsys):
    pytest.importorskip("torch")
    report = _run(capsys, "plan", "--train", "model.width=8", "batch_size=32", "--device", "host,stm32h7,rpi5,kv260",
                  "--seconds", "0.3", "--json")
    assert set(report) == {"config", "model", "data", "host_probe", "estimates", "skipped", "measured"}
    assert report["config"]["batch_size"] == 32 and report["data"]["train_images"] > 0
    rows = {e["device"]: e for e in report["estimates"]}
    assert set(rows) == {"host", "stm32h7", "rpi5"}
    assert [s["device"] for s in report["skipped"]] == ["kv260"]  # an inference-only FPGA
    assert rows["rpi5"]["fits"] and not rows["stm32h7"]["fits"] and rows["stm32h7"]["largest_batch"] == 0
    for row in rows.values():
        assert {"weights", "gradients", "optimizer", "activations", "data", "runtime", "total",
                "available"} <= set(row["memory"])
        assert row["step_s"] > 0 and row["epoch_s"] > row["step_s"] and isinstance(row["largest_batch"], int)
    (measured,) = report["measured"]
    assert measured["batch"] == 32 and measured["median_s"] > 0 and measured["activation_bytes"] > 0
    assert measured["trainable_parameters"] == report["model"]["trainable_parameters"]
    assert 0.25 < measured["activation_ratio"] < 4  # the graph's estimate of what autograd keeps, against torch

"""Model analysis (`tandem inspect`) against counts worked out by hand, and device profiles (devices.yaml)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tandem.errors import UserError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tandem.hardware.analysis import analyze_bundle, analyze_model  # noqa: E402
from tandem.hardware.devices import load_devices, parse_devices  # noqa: E402


def conv_relu_gemm() -> bytes:
    """x (N, 2, 5, 5) -> Conv 3x3, 3 filters, pad 1, bias -> Relu -> Flatten -> Gemm to 4 outputs, bias."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (3, 2, 3, 3)), ("b1", (3,)), ("w2", (4, 75)), ("b2", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="gemm")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_counts_equal_the_hand_computed_model():
    a = analyze_model(conv_relu_gemm())
    # Conv: 75 outputs (3 x 5 x 5), each 2 x 3 x 3 = 18 MACs; 2 FLOPs per MAC plus one bias add per output.
    # Relu: 1 FLOP per output. Flatten: a view. Gemm: 4 outputs x 75 MACs, plus 4 bias adds.
    conv, relu, flatten, gemm = a.layers
    assert (conv.macs, conv.flops, conv.parameters) == (75 * 18, 2 * 75 * 18 + 75, 3 * 2 * 9 + 3)
    assert (relu.macs, relu.flops, relu.parameters) == (0, 75, 0)
    assert (flatten.flops, flatten.view) == (0, True)
    assert (gemm.macs, gemm.flops, gemm.parameters) == (300, 600 + 4, 304)
    assert (a.parameters, a.macs, a.flops) == (361, 1650, 2775 + 75 + 604)
    assert a.input_shape == [1, 2, 5, 5] and a.output_shape == [1, 4]
    # Weight bytes: 354 weights and 7 biases; int8 keeps the biases as int32.
    assert {p: a.weight_bytes(p) for p in ("fp32", "fp16", "bf16", "int8")} == \
        {"fp32": 361 * 4, "fp16": 361 * 2, "bf16": 361 * 2, "int8": 354 + 7 * 4}
    # Liveness: x (50) and conv's output (75) while the conv runs; then conv's output and relu's (75 + 75) = the
    # peak; flatten shares relu's memory; then 75 + 4 for the gemm.
    assert a.peak_activation_elements == 150
    assert a.peak_activation_bytes("fp32", batch=8) == 150 * 8 * 4
    # Traffic: conv reads 50 and writes 75, relu 75 + 75, gemm 75 + 4 (the flatten view moves nothing).
    assert a.activation_traffic_bytes("fp32") == (125 + 150 + 79) * 4
    assert a.intensity("fp32") == pytest.approx(3454 / (361 * 4 + 354 * 4))
    assert a.kernels == 2  # the conv (its relu fused into it) and the gemm
    assert a.uncounted == [] and not a.quantized


def test_int8_qdq_graph_counts_the_same_macs_and_stores_int8_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(conv_relu_gemm())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 2, 5, 5), np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    q, f = analyze_model((tmp_path / "q.onnx").read_bytes()), analyze_model(fp32.read_bytes())
    assert q.quantized and (q.macs, q.parameters) == (f.macs, f.parameters)
    assert q.stored_bytes < f.stored_bytes / 2  # int8 weights (plus scales and int32 biases) against fp32


def test_a_bundle_is_analysed_like_its_config(tiny_bundle, tiny_run):
    pytest.importorskip("torch")
    from tandem.config import TrainConfig
    from tandem.hardware.train_memory import inference_graph

    cfg = TrainConfig.model_validate(yaml.safe_load((tiny_run.run_dir / "config.yaml").read_text()))
    from_config = analyze_model(inference_graph(cfg, 10)[0])
    from_bundle = analyze_bundle(tiny_bundle)
    assert from_bundle.totals() | {"stored_bytes": 0} == from_config.totals() | {"stored_bytes": 0}
    assert from_bundle.macs > 0 and [layer.op for layer in from_bundle.layers] == [layer.op for layer in from_config.layers]


try:  # every registered model, where the training side is installed
    from tandem.train.models import MODELS
except ImportError:
    MODELS = {}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size, channels", [(28, 1), (64, 3)])
def test_macs_agree_with_torch_for_every_model(name, size, channels):
    """The reference: a forward hook on every Conv2d and Linear of the torch model counts the same MACs."""
    torch = pytest.importorskip("torch")
    from tandem.config import load_config
    from tandem.hardware.train_memory import inference_graph
    from tandem.train.models import create_model

    cfg = load_config(None, [f"model.name={name}", f"data.image_size={size}", f"data.channels={channels}"])
    analysis = analyze_model(inference_graph(cfg, 10)[0])
    model, macs = create_model(name, channels, size, 10, cfg.model.width).eval(), []

    def count(module, _, out):
        if isinstance(module, torch.nn.Conv2d):
            macs.append(out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, torch.nn.Linear):
            macs.append(out.numel() * module.in_features)

    for module in model.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, channels, size, size))
    assert analysis.macs == sum(macs) and analysis.uncounted == []


def _inspect(capsys, *argv) -> str:
    from tandem.cli.hardware import register

    parser = argparse.ArgumentParser(prog="tandem")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_inspect_json_schema(tiny_bundle, capsys):
    report = json.loads(_inspect(capsys, "inspect", str(tiny_bundle), "--json"))
    assert set(report) == {"source", "input_shape", "output_shape", "quantized", "per_image", "totals", "layers",
                           "uncounted"}
    totals = report["totals"]
    assert set(totals) == {"parameters", "macs", "flops", "weight_bytes", "stored_bytes", "peak_activation_bytes",
                           "activation_traffic_bytes", "arithmetic_intensity"}
    for key in ("parameters", "macs", "flops", "stored_bytes"):
        assert isinstance(totals[key], int) and totals[key] > 0
    for key in ("weight_bytes", "peak_activation_bytes", "activation_traffic_bytes", "arithmetic_intensity"):
        assert set(totals[key]) == {"fp32", "fp16", "bf16", "int8"}
    layer = report["layers"][0]
    assert set(layer) == {"name", "op", "output_shape", "parameters", "macs", "flops", "weight_bytes",
                          "activation_bytes", "arithmetic_intensity"}
    assert layer["op"] == "Conv" and isinstance(layer["output_shape"], list)
    assert sum(row["macs"] for row in report["layers"]) == totals["macs"]
    text = _inspect(capsys, "inspect", str(tiny_bundle))
    assert "MACs" in text and f"{totals['parameters']:,}" in text


def test_inspect_refuses_a_missing_int8_model_in_words(tiny_bundle):
    with pytest.raises(UserError, match="no model.int8.onnx"):
        analyze_bundle(tiny_bundle, "int8")
    with pytest.raises(UserError, match="not an ONNX model"):
        analyze_model(b"not a protobuf at all")


# --- device profiles ---------------------------------------------------------------------------------------

GOOD = {"title": "a board", "kind": "cpu", "precisions": ["fp32", "int8"],
        "peak_ops": {"fp32": {"value": 1e9, "source": "datasheet"}, "int8": {"value": 4e9, "source": "datasheet"}},
        "memory_bandwidth": {"value": 1e9, "source": "datasheet"}, "memory": {"value": 1e6, "source": "datasheet"},
        "runtime_overhead": {"value": 0, "source": "none"}}


def test_builtin_profiles_load_with_a_source_for_every_figure():
    devices = load_devices()
    for name in ("desktop-x86", "rpi4", "rpi5", "jetson-orin-nano", "coral-edgetpu", "tpu-v5e", "kv260", "h100",
                 "h200", "stm32h7"):
        assert name in devices
    kinds = {d.kind for d in devices.values()}
    assert kinds == {"cpu", "gpu", "asic", "fpga", "mcu"}
    for device in devices.values():
        for figure in device.figures().values():
            assert figure.source.strip()
    assert devices["stm32h7"].memory.value == 512 * 1024 and devices["coral-edgetpu"].precisions == ["int8"]


@pytest.mark.parametrize("change, field, words", [
    ({"peak_ops": {"fp32": {"value": -1, "source": "s"}, "int8": {"value": 1, "source": "s"}}},
     "peak_ops.fp32.value", "greater than 0"),
    ({"precisions": ["fp32", "fp64"]}, "precisions.1", "'fp32', 'fp16', 'bf16' or 'int8'"),
    ({"memory": None}, "memory", ""),
    ({"memory_bandwidth": {"value": "fast", "source": "s"}}, "memory_bandwidth.value", "must be a number"),
    ({"kind": "tpu"}, "kind", "'cpu', 'gpu', 'asic', 'fpga' or 'mcu'"),
    ({"precisions": ["fp32", "bf16"]}, "peak_ops", "no figure for bf16"),
    ({"memory": {"value": 1e6}}, "memory.source", "is missing"),
    ({"speed": 3}, "speed", "is not a device field"),
    ({"train_precisions": ["fp32"]}, "train_overhead", "required"),
])
def test_a_bad_entry_is_refused_naming_entry_and_field(tmp_path, change, field, words):
    entry = {**GOOD, **change}
    if change.get("memory", 0) is None:
        del entry["memory"]
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": {"my-board": entry}}))
    with pytest.raises(UserError) as err:
        load_devices(path)
    message = str(err.value)
    assert f"entry 'my-board', field {field}:" in message and words in message and "\n" not in message
    assert str(path) in message


def test_a_device_file_adds_and_replaces_entries(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": {"my-board": GOOD, "rpi5": {**GOOD, "title": "my own pi"}}}))
    devices = load_devices(path)
    assert devices["my-board"].peak("int8") == 4e9 and devices["rpi5"].title == "my own pi"
    assert "h100" in devices
    with pytest.raises(UserError, match="must hold a mapping `devices:`"):
        parse_devices({"boards": {}}, "x.yaml")


def test_hardware_imports_no_torch(tiny_bundle):
    """DESIGN.md rule 1: analysis, profiles, the probe, the planner and their commands run without torch."""
    code = (
        "import argparse, sys\n"
        "import tandem.hardware.analysis, tandem.hardware.devices, tandem.hardware.plan, tandem.hardware.probe\n"
        "from tandem.cli.hardware import register\n"
        "parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest='command'))\n"
        f"for argv in (['inspect', {str(tiny_bundle)!r}], ['plan', {str(tiny_bundle)!r}, '--device', 'host,stm32h7', "
        "'--seconds', '0.1'], ['plan', '--list-devices']):\n"
        "    args = parser.parse_args(argv); assert args.func(args) == 0\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]

"""Triton config.pbtxt: parsed with Triton's own ModelConfig schema (the model_config.proto that tritonclient
ships), checked against the bundle's real ONNX graph, and never written over a user's own config."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tandem.bundle import read_manifest
from tandem.errors import UserError
from tandem.serve.triton import DATA_TYPES, HEADER, triton_config, write_triton_config

text_format = pytest.importorskip("google.protobuf.text_format")
tritonclient = pytest.importorskip("tritonclient")


def _model_config_pb2():
    """Triton's model_config_pb2, loaded by path: `import tritonclient.grpc...` needs the grpc extra,
    but the generated module itself needs only protobuf, and tritonclient[http] ships it too."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()

MANIFEST = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    "labels": ["cat", "dog", "horse", "zebra", "owl", "fish", "frog", "bee", "snail", "crab"],
}


def parse(text: str):
    """Triton's parser is protobuf's text format into inference.ModelConfig: unknown fields, wrong
    types and bad enum names fail here as they would in tritonserver."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_parses_as_tritons_model_config():
    config = parse(triton_config(MANIFEST, 64, True, 2.0, "latest", name="animals"))
    assert config.name == "animals"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    (inp,) = config.input
    assert (inp.name, list(inp.dims)) == ("input", [1, 28, 28])
    assert inp.data_type == model_config_pb2.TYPE_FP32
    (out,) = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [10], "labels.txt")
    assert out.data_type == model_config_pb2.TYPE_FP32
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_first_line_is_tandems_comment():
    text = triton_config(MANIFEST, name="animals")
    assert text.splitlines()[0].startswith(HEADER + ";")


@pytest.mark.parametrize("versions, which, numbers", [
    ("latest", "latest", None), ("all", "all", None), ([3, 1], "specific", [1, 3]), ([2, 2], "specific", [2])])
def test_version_policies(versions, which, numbers):
    config = parse(triton_config(MANIFEST, 8, True, 1, versions, name="m"))
    assert config.version_policy.WhichOneof("policy_choice") == which
    if numbers is not None:
        assert list(config.version_policy.specific.versions) == numbers


@pytest.mark.parametrize("versions", ["newest", [], [0], [1, -2], ["1"], [True], 3])
def test_bad_version_policies_are_refused(versions):
    with pytest.raises(UserError, match="versions"):
        triton_config(MANIFEST, versions=versions, name="m")


def test_queue_delay_in_microseconds_and_batching_off():
    config = parse(triton_config(MANIFEST, 32, True, 0.25, "latest", name="m"))
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    config = parse(triton_config(MANIFEST, 32, False, 2.0, "latest", name="m"))
    assert not config.HasField("dynamic_batching")
    assert config.max_batch_size == 32  # a client may still send batches; Triton just does not merge requests


def test_max_batch_size_zero_keeps_the_batch_dimension():
    config = parse(triton_config(MANIFEST, 0, True, 2.0, "latest", name="m"))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 1, 28, 28]
    assert list(config.output[0].dims) == [-1, 10]
    assert not config.HasField("dynamic_batching")  # Triton cannot batch a model without a batch dimension


def test_fixed_first_dimension_means_no_batching():
    manifest = {**MANIFEST, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10]}]}
    config = parse(triton_config(manifest, 64, True, 2.0, "latest", name="m"))
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 1, 28, 28]


def test_every_protocol_datatype_maps_to_a_triton_datatype():
    names = set(model_config_pb2.DataType.keys())
    assert set(DATA_TYPES.values()) <= names
    for datatype, triton in DATA_TYPES.items():
        manifest = {**MANIFEST, "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 3]}]}
        config = parse(triton_config(manifest, 4, False, 0, "latest", name="m"))
        assert model_config_pb2.DataType.Name(config.input[0].data_type) == triton


def test_names_are_escaped():
    manifest = {**MANIFEST, "inputs": [{"name": 'in"put\\x', "datatype": "INT64", "shape": [-1, 2]}]}
    config = parse(triton_config(manifest, 4, True, 1, "all", name="m"))
    assert config.input[0].name == 'in"put\\x'
    assert config.input[0].data_type == model_config_pb2.TYPE_INT64


@pytest.mark.parametrize("manifest, match", [
    ({**MANIFEST, "inputs": []}, "no inputs"),
    ({**MANIFEST, "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1, 3]}]}, "datatype 'FLOAT'"),
    ({**MANIFEST, "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 0]}]}, "malformed"),
    ({**MANIFEST, "labels": ["a\nb"] + MANIFEST["labels"][1:]}, "line break"),
])
def test_bad_manifests_are_refused(manifest, match):
    with pytest.raises(UserError, match=match):
        triton_config(manifest, name="m")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65])
def test_bad_model_names_are_refused(name, tmp_path):
    with pytest.raises(UserError, match="model name"):
        triton_config(MANIFEST, name=name)
    with pytest.raises(UserError, match="model name"):
        write_triton_config(tmp_path, name, MANIFEST)


def test_labels_reference_only_the_matching_output():
    manifest = {**MANIFEST, "labels": ["a", "b"]}  # 2 labels, 10 scores: a label file would mislabel them
    config = parse(triton_config(manifest, name="m"))
    assert config.output[0].label_filename == ""


def test_write_for_a_real_bundle_matches_its_onnx_graph(tmp_path, tiny_bundle):
    ort = pytest.importorskip("onnxruntime")
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / "animals" / "1")
    manifest = read_manifest(repo / "animals" / "1")
    path = write_triton_config(repo, "animals", manifest, max_batch_size=16, max_queue_delay_ms=3,
                               versions="all")
    assert path == repo / "animals" / "config.pbtxt"
    config = parse(path.read_text())
    assert config.name == "animals" and config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 3000
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    # Triton's layout: <repo>/<model>/<version>/model.onnx, the ONNX Runtime backend's default file name.
    session = ort.InferenceSession(str(repo / "animals" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in [(config.input, session.get_inputs()), (config.output, session.get_outputs())]:
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, a in zip(declared, actual):
            assert list(t.dims) == list(a.shape[1:])  # the batch dimension is left out
            assert a.type == "tensor(float)" and t.data_type == model_config_pb2.TYPE_FP32
    labels = (repo / "animals" / config.output[0].label_filename).read_text().splitlines()
    assert labels == manifest["labels"] and len(labels) == config.output[0].dims[-1]
    assert sorted(p.name for p in (repo / "animals").iterdir()) == ["1", "config.pbtxt", "labels.txt"]  # no temp files


def test_rewrites_its_own_config_but_not_a_users(tmp_path):
    (tmp_path / "m").mkdir()
    path = write_triton_config(tmp_path, "m", MANIFEST, max_batch_size=8)
    assert parse(path.read_text()).max_batch_size == 8
    write_triton_config(tmp_path, "m", MANIFEST, max_batch_size=4)  # tandem's own: rewritten
    assert parse(path.read_text()).max_batch_size == 4

    mine = 'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 2\ninstance_group [{ kind: KIND_CPU count: 4 }]\n'
    path.write_text(mine)
    with pytest.raises(UserError, match="not written by tandem"):
        write_triton_config(tmp_path, "m", MANIFEST, max_batch_size=16)
    assert path.read_text() == mine
    write_triton_config(tmp_path, "m", MANIFEST, max_batch_size=16, force=True)
    assert parse(path.read_text()).max_batch_size == 16
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.pbtxt", "labels.txt"]


def test_model_folder_must_exist(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        write_triton_config(tmp_path, "missing", MANIFEST)

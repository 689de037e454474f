"""`tandem serve` against references: the real tritonclient.http (binary and JSON) against the runtime's own
logits, every error path as a 4xx with a message, hot swaps under load with zero failures, a tampered bundle
refused while the old version serves, auth on and off, batching, metrics and the access log."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import animals, png_bytes, png_claiming
from helpers.serving import make_repo, request, running_server
from tandem.runtime import Predictor
from tandem.runtime.preprocess import preprocess

ADMIN = "admin-secret"


@pytest.fixture
def repo(tmp_path, tiny_bundle) -> Path:
    return make_repo(tmp_path / "repo", tiny_bundle)


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return Predictor.load(tiny_bundle)


def _config(tmp_path: Path, **extra) -> dict:
    return {"store": {"url": str(tmp_path / "store.sqlite")}, **extra}


def _tensor(predictor: Predictor, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real animals, preprocessed as the manifest says, and the runtime's own logits for them."""
    x, _ = animals(1, seed=seed)  # one of each of the ten animals
    x = preprocess(predictor.pixels(x[:n, ..., None]), predictor.mean, predictor.std)
    return x, predictor.session.run(None, {predictor.input_name: x})[0]


def _client(base: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(base.removeprefix("http://"), connection_timeout=30, network_timeout=30)


def _input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# -- the protocol, through the real tritonclient --------------------------------------------------------------------

def test_tritonclient_binary_and_json_match_the_runtime(repo, tmp_path, predictor):
    x, expected = _tensor(predictor, 7)
    with running_server(repo, _config(tmp_path)) as base:
        client = _client(base)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("animals") and client.is_model_ready("animals", "1")
        meta = client.get_model_metadata("animals")
        assert meta["versions"] == ["1"] and meta["inputs"][0] == {"name": "input", "datatype": "FP32",
                                                                   "shape": [-1, 1, 28, 28]}
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification", "model_repository"]
        # tritonclient's defaults: binary input, no outputs named (so binary outputs); latest version.
        got = client.infer("animals", [_input(x, True)]).as_numpy("logits")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # JSON both ways, an explicit version.
        result = client.infer("animals", [_input(x, False)], model_version="1",
                              outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-5)
        assert result.get_response()["model_version"] == "1"
        ids = result.get_response()["parameters"]["prediction_ids"].split(",")
        assert len(ids) == 7 and len(set(ids)) == 7
        # The classification extension: Triton's "value:index:label", best first.
        top = client.infer("animals", [_input(x, True)], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
        rows = top.as_numpy("logits")
        assert rows.shape == (7, 3)
        for row, logits in zip(rows, expected):
            value, index, label = row[0].decode().split(":")
            assert int(index) == int(np.argmax(logits)) and label == predictor.labels[int(index)]
            assert float(value) == pytest.approx(float(logits.max()), abs=1e-5)
        # Compressed requests (tritonclient's request_compression_algorithm).
        got = client.infer("animals", [_input(x, True)], request_compression_algorithm="gzip").as_numpy("logits")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_json_tensors_nested_or_flat_as_curl_sends_them(repo, tmp_path, predictor):
    x, expected = _tensor(predictor, 2)
    with running_server(repo, _config(tmp_path)) as base:
        for data in (x.tolist(), x.ravel().tolist()):
            status, _, body = request(base + "/v2/models/animals/infer", {
                "id": "r1", "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": data}]},
                {"Content-Type": "application/json"})
            reply = json.loads(body)
            assert status == 200 and reply["id"] == "r1" and reply["model_name"] == "animals"
            np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(2, 10), expected, atol=1e-5)


# -- images in, labels out -----------------------------------------------------------------------------------------

def test_classify_matches_the_runtime_on_real_images(repo, tmp_path, predictor):
    x, _ = animals(1, seed=3)
    rgb = np.stack([x[0]] * 3, axis=-1)
    phone = Image.fromarray(np.kron(rgb, np.ones((40, 40, 1), np.uint8)))  # a 1120x1120 RGB JPEG, like a phone's
    jpeg = io.BytesIO()
    phone.save(jpeg, "JPEG", quality=90)
    sixteen = (x[1].astype(np.uint16) * 257)
    images = {"png": png_bytes(x[0]), "jpeg": jpeg.getvalue(), "png16": png_bytes(sixteen)}
    with running_server(repo, _config(tmp_path)) as base:
        for kind, data in images.items():
            status, _, body = request(base + "/v1/models/animals/classify?top_k=3", data,
                                      {"Content-Type": "application/octet-stream"})
            reply = json.loads(body)
            assert status == 200, body
            file = tmp_path / f"image.{kind}"  # the reference: `tandem predict` on the same bytes as a file
            file.write_bytes(data)
            [(_, expected)] = predictor.predict_paths([file], k=3, workers=1)
            assert [p["label"] for p in reply["top_k"]] == [p.label for p in expected], kind
            assert reply["top_k"][0]["probability"] == pytest.approx(expected[0].probability, abs=1e-5)
            assert reply["model"] == "animals" and reply["version"] == 1 and len(reply["prediction_id"]) == 32
            assert set(reply["latency_ms"]) == {"queue", "compute", "total"}
        # multipart/form-data, as an HTML form or `curl -F image=@cat.png` sends it
        boundary = "XyZ"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + images["png"] + f"\r\n--{boundary}--\r\n".encode()
        status, _, body = request(base + "/v1/models/animals/classify", form,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200 and json.loads(body)["top_k"][0]["label"] == predictor.top_k([x[0]], k=1)[0][0].label
        assert len(json.loads(body)["top_k"]) == 5  # the default top_k
        # feedback on it: a label the model does not know is refused, a known one is stored with the image
        pid = json.loads(body)["prediction_id"]
        status, _, body = request(base + "/v1/models/animals/feedback", {"prediction_id": pid, "label": "unicorn"})
        assert status == 400 and "unicorn" in json.loads(body)["error"]
        status, _, body = request(base + "/v1/models/animals/feedback", {"prediction_id": pid, "label": "zebra"})
        assert status == 200 and json.loads(body)["image_stored"] is True
        status, _, body = request(base + "/v1/models/animals/feedback", {"prediction_id": pid + "0" * 64, "label": "zebra"})
        assert status == 404


# -- every error path is a 4xx with a message ------------------------------------------------------------------

def _infer_body(shape=(1, 1, 28, 28), datatype="FP32", name="input", data=None) -> dict:
    count = int(np.prod(shape))
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype,
                        "data": data if data is not None else [0.0] * count}]}


def test_every_error_is_a_4xx_with_a_one_line_message(repo, tmp_path, predictor):
    x, _ = _tensor(predictor, 1)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 3136}}]}).encode()
    cases = [
        ("POST", "/v2/models/zebra/infer", _infer_body(), {}, 404, "unknown model"),
        ("POST", "/v2/models/animals/versions/9/infer", _infer_body(), {}, 404, "no version 9"),
        ("POST", "/v2/models/animals/versions/x/infer", _infer_body(), {}, 400, "invalid version"),
        ("POST", "/v2/models/animals/versions/0/infer", _infer_body(), {}, 400, "invalid version"),
        ("POST", "/v2/models/animals/infer", _infer_body(shape=(1, 3, 28, 28)), {}, 400, "shape"),
        ("POST", "/v2/models/animals/infer", _infer_body(shape=(0, 1, 28, 28)), {}, 400, "shape"),
        ("POST", "/v2/models/animals/infer", _infer_body(datatype="INT64"), {}, 400, "datatype"),
        ("POST", "/v2/models/animals/infer", _infer_body(name="image"), {}, 400, "unknown input"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=[1.0] * 10), {}, 400, "784"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=["a"] * 784), {}, 400, "numbers"),
        ("POST", "/v2/models/animals/infer", {**_infer_body(), "outputs": [{"name": "probs"}]}, {}, 400, "unknown output"),
        ("POST", "/v2/models/animals/infer", b"{not json", {}, 400, "not valid JSON"),
        ("POST", "/v2/models/animals/infer", b"[1, 2]", {}, 400, "JSON object"),
        ("POST", "/v2/models/animals/infer", b"[" * 50_000 + b"]" * 50_000, {}, 400, "deeply"),
        ("POST", "/v1/models/animals/feedback", b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", {}, 400, "deeply"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=[10**400] + [0] * 783), {}, 400, "numbers only"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=["1"] * 784), {}, 400, "numbers only"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=[True] * 784), {}, 400, "numbers only"),
        ("POST", "/v2/models/animals/infer", _infer_body(data=[3e38] * 784), {}, 400, "NaN or infinity"),
        ("POST", "/v2/models/animals/infer", header + x.tobytes()[:100],
         {"Inference-Header-Content-Length": str(len(header))}, 400, "binary_data_size"),
        ("POST", "/v2/models/animals/infer", header + x.tobytes() + b"extra",
         {"Inference-Header-Content-Length": str(len(header))}, 400, "add up"),
        ("POST", "/v2/models/animals/infer", header + x.tobytes(),
         {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
        ("POST", "/v2/models/animals/infer", b"x", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        ("POST", "/v2/models/animals/infer", b"\x00" * 200, {"Content-Encoding": "gzip"}, 400, "gzip"),
        ("POST", "/v2/models/..%5Cetc/infer", _infer_body(), {}, 400, "is not allowed"),
        ("POST", "/v2/models/..%2F..%2Fetc/infer", _infer_body(), {}, 404, "no such endpoint"),
        ("GET", "/v2/models/animals/versions/5", None, {}, 404, "no version 5"),
        ("POST", "/v1/models/animals/classify", b"not an image", {}, 400, "not an image"),
        ("POST", "/v1/models/animals/classify", b"", {}, 400, "empty"),
        ("POST", "/v1/models/animals/classify", png_claiming(7000, 7000), {}, 400, "more than the 40000000"),
        ("POST", "/v1/models/animals/classify", png_claiming(20000, 20000), {}, 400, "more pixels than"),
        ("POST", "/v1/models/animals/classify?top_k=0", png_bytes(np.zeros((28, 28), np.uint8)), {}, 400, "top_k"),
        ("POST", "/v1/models/animals/classify?top_k=many", b"x", {}, 400, "top_k"),
        ("POST", "/v1/models/animals/feedback", {"prediction_id": "0" * 32, "label": "cat"}, {}, 404, "prediction"),
        ("POST", "/v1/models/animals/feedback", {"label": "cat"}, {}, 400, "prediction_id"),
        ("GET", "/v1/feedback", None, {}, 403, "admin"),
        ("POST", "/v2/repository/models/animals/load", {}, {}, 403, "admin"),
        ("GET", "/no/such/endpoint", None, {}, 404, "no such endpoint"),
        ("DELETE", "/v2/models/animals/infer", None, {}, 405, "not allowed"),
    ]
    for bad in (1e39, float("nan")):  # too big for FP32; NaN (Python's json writes it, and reads it back)
        cases.append(("POST", "/v2/models/animals/infer", _infer_body(data=[bad] + [0.0] * 783), {}, 400, "NaN or inf"))
    with running_server(repo, _config(tmp_path, limits={"max_body_bytes": 200_000})) as base:
        for method, path, body, headers, status, words in cases:
            got, reply_headers, reply = request(base + path, body, headers, method=method)
            assert got == status, (path, got, reply)
            error = json.loads(reply)["error"]
            assert words.lower() in error.lower() and "\n" not in error and "Traceback" not in error, (path, error)
        # A body over the limit is refused before it is read (413), with Content-Length and chunked.
        big = _infer_body(shape=(64, 1, 28, 28))
        got, _, reply = request(base + "/v2/models/animals/infer", big)
        assert got == 413 and "max_body_bytes" in json.loads(reply)["error"]
        chunks = iter([json.dumps(big).encode()[i:i + 65536] for i in range(0, len(json.dumps(big)), 65536)])
        got, _, reply = request(base + "/v2/models/animals/infer", chunks, {"Content-Type": "application/json"})
        assert got == 413
        # the server still serves after all of that
        assert request(base + "/v2/models/animals/infer", _infer_body())[0] == 200
        assert request(base + "/", method="HEAD")[0] == 200 and request(base + "/v2/health/ready", method="HEAD")[0] == 200
        metrics = request(base + "/metrics")[2].decode()
        # failures on a loaded model count against it; on unknown names, under no model (bounded labels)
        assert 'tandem_request_failures_total{code="400",endpoint="infer_latest",model="animals",version="1"}' in metrics
        assert 'tandem_request_failures_total{code="404",endpoint="infer_latest",model="",version=""}' in metrics


def test_request_timeout_is_a_504(repo, tmp_path):
    with running_server(repo, _config(tmp_path, limits={"request_timeout_s": 1e-6})) as base:
        status, _, body = request(base + "/v2/models/animals/infer", _infer_body())
        assert status == 504 and "request_timeout_s" in json.loads(body)["error"]



def test_a_client_that_stops_sending_its_body_gets_a_504(repo, tmp_path):
    with running_server(repo, _config(tmp_path, limits={"request_timeout_s": 1})) as base:
        host, port = base.removeprefix("http://").split(":")
        for path in ("/v2/models/animals/infer", "/v1/models/animals/classify"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc".encode())
                start = time.monotonic()
                reply = sock.recv(4096).decode()
                assert reply.startswith("HTTP/1.1 504") and time.monotonic() - start < 5, (path, reply)


# -- auth ------------------------------------------------------------------------------------------------------------

def test_tokens_protect_inference_and_admin(repo, tmp_path):
    env = {"TANDEM_TOKEN": "device-secret", "TANDEM_ADMIN_TOKEN": ADMIN}
    png = png_bytes(animals(1)[0][0])
    with running_server(repo, _config(tmp_path), env=env) as base:
        url = base + "/v1/models/animals/classify"
        status, headers, body = request(url, png)
        assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
        assert request(url, png, {"Authorization": "Bearer wrong"})[0] == 401
        assert request(url, png, {"Authorization": "Basic device-secret"})[0] == 401
        assert request(url, png, {"Authorization": "Bearer device-secret"})[0] == 200
        assert request(base + "/v2/health/ready")[0] == 200  # health stays open for load balancers
        # the inference token is not an admin token; the admin token also runs inference
        index = base + "/v2/repository/index"
        assert request(index, {}, {"Authorization": "Bearer device-secret"})[0] == 403
        assert request(index, {}, {"Authorization": "Bearer nope"})[0] == 401
        status, _, body = request(index, {}, {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200 and json.loads(body) == [{"name": "animals", "version": "1", "state": "READY"}]
        assert request(url, png, {"Authorization": f"Bearer {ADMIN}"})[0] == 200
        client = triton.InferenceServerClient(base.removeprefix("http://"))
        with pytest.raises(InferenceServerException, match="401"):
            client.get_model_metadata("animals")
        assert client.get_model_metadata("animals", headers={"Authorization": "Bearer device-secret"})["name"] == "animals"
    # protect_inference: false leaves inference open while the admin endpoints keep their token
    with running_server(repo, _config(tmp_path, auth={"protect_inference": False}), env=env) as base:
        assert request(base + "/v1/models/animals/classify", png)[0] == 200
        assert request(base + "/v2/repository/index", {})[0] == 401


def test_a_token_file_and_a_missing_token_are_clear(repo, tmp_path, capsys):
    from tandem.cli import main

    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    with running_server(repo, _config(tmp_path, auth={"token_file": str(token)})) as base:
        png = png_bytes(animals(1)[0][0])
        assert request(base + "/v1/models/animals/classify", png, {"Authorization": "Bearer from-a-file"})[0] == 200
    config = tmp_path / "serve.yaml"
    config.write_text("auth: {protect_inference: true, token_env: NO_SUCH_VARIABLE_SET}\n")
    assert main(["serve", str(repo), "--config", str(config)]) == 2
    assert "NO_SUCH_VARIABLE_SET" in capsys.readouterr().err
    config.write_text("batching: {max_batch_size: 0}\n")
    assert main(["serve", str(repo), "--config", str(config)]) == 2
    assert "batching.max_batch_size" in capsys.readouterr().err
    config.write_text("batchingg: {}\n")
    assert main(["serve", str(repo), "--config", str(config)]) == 2
    assert "--help-config" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["serve", str(repo), "--store", ""]) == 2
    assert "--store is empty" in capsys.readouterr().err
    for bad in ("models: {animals: {versions: [true]}}", "store: {url: ':memory:'}"):
        config.write_text(bad + "\n")
        assert main(["serve", str(repo), "--config", str(config)]) == 2
        assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    config.write_text("models: {animals: {versions: [1, 3]}}\n")
    assert main(["serve", str(repo), "--config", str(config), "--write-triton-config"]) == 2
    assert "no version 3" in capsys.readouterr().err


# -- versions without downtime ---------------------------------------------------------------------------------

def _load(base: str, body: dict | None = None) -> tuple[int, bytes]:
    status, _, reply = request(base + "/v2/repository/models/animals/load", body or {},
                               {"Authorization": f"Bearer {ADMIN}"})
    return status, reply


@pytest.mark.slow
def test_hot_swaps_under_concurrent_load_fail_no_request(repo, tiny_bundle, tmp_path, predictor):
    x, expected = _tensor(predictor, 1)
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer(base: str) -> None:
        client = _client(base)
        while not stop.is_set():
            try:
                result = client.infer("animals", [_input(x, True)])
                np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
                seen.append(result.get_response()["model_version"])
            except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                failures.append(repr(err))

    with running_server(repo, _config(tmp_path), env={"TANDEM_ADMIN_TOKEN": ADMIN}) as base:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(hammer, base)
            for version in range(2, 8):
                shutil.copytree(tiny_bundle, repo / "animals" / str(version))
                assert _load(base)[0] == 200
                time.sleep(0.15)
            assert _load(base, {"parameters": {"versions": [1]}})[0] == 200  # rollback
            time.sleep(0.3)
            stop.set()
        assert not failures, failures[:3]
        assert set(seen) == {str(v) for v in range(1, 8)} and seen[-1] == "1"
        status, _, body = request(base + "/v2/models/animals")
        assert json.loads(body)["versions"] == ["1"]


def test_a_tampered_bundle_is_refused_while_the_old_version_serves(repo, tiny_bundle, tmp_path, predictor):
    x, expected = _tensor(predictor, 2)
    with running_server(repo, _config(tmp_path), env={"TANDEM_ADMIN_TOKEN": ADMIN}) as base:
        shutil.copytree(tiny_bundle, repo / "animals" / "2")
        onnx = repo / "animals" / "2" / "model.onnx"
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx.write_bytes(bytes(data))
        status, reply = _load(base)
        error = json.loads(reply)["error"]
        assert status == 400 and "version 2" in error and "model.onnx" in error
        result = _client(base).infer("animals", [_input(x, True)])
        assert result.get_response()["model_version"] == "1"
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
        index = json.loads(request(base + "/v2/repository/index", {}, {"Authorization": f"Bearer {ADMIN}"})[2])
        assert {"name": "animals", "version": "1", "state": "READY"} in index
        assert [row["state"] for row in index if row["version"] == "2"] == ["UNAVAILABLE"]
        # a broken manifest, and a folder that is no bundle at all, likewise
        (repo / "animals" / "2" / "manifest.json").write_text("{")
        assert _load(base)[0] == 400
        # unload; feedback on an earlier prediction still lands; then load again
        pid = result.get_response()["parameters"]["prediction_ids"].split(",")[0]
        assert request(base + "/v2/repository/models/animals/unload", {}, {"Authorization": f"Bearer {ADMIN}"})[0] == 200
        assert request(base + "/v2/models/animals/ready")[0] == 404
        status, _, body = request(base + "/v1/models/animals/feedback", {"prediction_id": pid, "label": "cow"})
        assert status == 200, body
        assert _load(base, {"parameters": {"versions": "1"}})[0] == 200
        assert _client(base).is_model_ready("animals", "1")
    # restarted with the broken version 2 still on disk: the newest good version serves, and the index says why
    shutil.rmtree(repo / "animals" / "2")
    shutil.copytree(tiny_bundle, repo / "animals" / "2")
    (repo / "animals" / "2" / "model.onnx").write_bytes(bytes(data))
    with running_server(repo, _config(tmp_path), env={"TANDEM_ADMIN_TOKEN": ADMIN}) as base:
        assert request(base + "/v2/health/ready")[0] == 200
        assert json.loads(request(base + "/v2/models/animals")[2])["versions"] == ["1"]
        index = json.loads(request(base + "/v2/repository/index", {}, {"Authorization": f"Bearer {ADMIN}"})[2])
        assert "model.onnx" in [row for row in index if row["version"] == "2"][0]["reason"]


def test_version_policies(repo, tiny_bundle, tmp_path):
    for version in (2, 3):
        shutil.copytree(tiny_bundle, repo / "animals" / str(version))
    (repo / "animals" / "config.pbtxt").write_text("name: \"animals\"\n")  # Triton's file beside the versions
    (repo / "animals" / "notes").mkdir()
    for policy, served in (("latest", ["3"]), ("all", ["1", "2", "3"]), ([1, 3], ["1", "3"])):
        with running_server(repo, _config(tmp_path, models={"animals": {"versions": policy}})) as base:
            assert json.loads(request(base + "/v2/models/animals")[2])["versions"] == served


# -- batching, metrics, access log -------------------------------------------------------------------------------

def _samples(metrics: str, name: str, **labels: str) -> dict[str, float]:
    """{sample name + le: value} of one metric family, for the samples carrying these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name.startswith(name) and all(sample.labels.get(k) == v for k, v in labels.items()):
                out[sample.name + sample.labels.get("le", "")] = sample.value
    return out


@pytest.mark.parametrize("enabled", [True, False])
def test_dynamic_batching_and_metrics(repo, tmp_path, predictor, enabled):
    x, expected = _tensor(predictor, 1)
    log = tmp_path / "access.log"
    config = _config(tmp_path, batching={"enabled": enabled, "max_batch_size": 16, "max_queue_delay_ms": 20},
                     access_log=str(log))
    with running_server(repo, config) as base:
        def one(_):
            return _client(base).infer("animals", [_input(x, True)]).as_numpy("logits")

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(64)))
        for got in results:
            np.testing.assert_allclose(got, expected, atol=1e-5)
        metrics = request(base + "/metrics")[2].decode()
    sizes = _samples(metrics, "tandem_batch_size", model="animals", version="1")
    runs, images = sizes["tandem_batch_size_count"], sizes["tandem_batch_size_sum"]
    assert images == 64
    if enabled:
        assert runs < 32  # requests ran together
    else:
        assert runs == 64 and sizes["tandem_batch_size_bucket1.0"] == 64
    for name in ("tandem_queue_seconds_count", "tandem_compute_seconds_count"):
        assert f'{name}{{model="animals",version="1"}} 64.0' in metrics
    assert 'tandem_requests_total{code="200",endpoint="infer_latest",model="animals",version="1"} 64.0' in metrics
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    infer = [line for line in lines if line["endpoint"] == "infer_latest"]
    assert len(infer) == 64 and all(line["status"] == 200 and line["model"] == "animals" for line in infer)


def test_failures_are_counted_without_unbounded_labels(repo, tmp_path):
    with running_server(repo, _config(tmp_path)) as base:
        for i in range(20):
            request(base + f"/v2/models/nosuch{i}/infer", _infer_body())
        metrics = request(base + "/metrics")[2].decode()
    assert 'tandem_request_failures_total{code="404",endpoint="infer_latest",model="",version=""} 20.0' in metrics
    assert "nosuch" not in metrics


# -- the repository as users fill it ------------------------------------------------------------------------------

def test_export_to_a_repository_adds_versions_and_a_triton_config(tiny_run, tmp_path):
    from helpers import run_tandem
    from test_triton_config import parse

    repo = tmp_path / "models"
    for version in (1, 2):
        proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(repo), "--name", "animals", check=True)
        assert f"animals version {version}" in proc.stdout + proc.stderr
        manifest = json.loads((repo / "animals" / str(version) / "manifest.json").read_text())
        assert manifest["name"] == "animals" and manifest["version"] == version
    config = parse((repo / "animals" / "config.pbtxt").read_text())  # Triton's own ModelConfig schema
    assert config.name == "animals" and config.platform == "onnxruntime_onnx" and list(config.input[0].dims) == [1, 28, 28]
    proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(repo), "--name", "../evil")
    assert proc.returncode == 2 and "is not allowed" in proc.stderr and not (tmp_path / "evil").exists()
    proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(repo))
    assert proc.returncode == 2 and "--name" in proc.stderr
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(not_a_folder), "--name", "animals")
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot write or read") and "Traceback" not in proc.stderr
    with running_server(repo, _config(tmp_path)) as base:
        assert json.loads(request(base + "/v2/models/animals")[2])["versions"] == ["2"]
    # the serve settings rewrite tandem's config.pbtxt; a user's own is kept, by export and by serve
    settings = tmp_path / "serve.yaml"
    settings.write_text("batching: {max_batch_size: 32, max_queue_delay_ms: 5}\nmodels: {animals: {versions: all}}\n")
    run_tandem("serve", str(repo), "--config", str(settings), "--write-triton-config", check=True)
    config = parse((repo / "animals" / "config.pbtxt").read_text())
    assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(repo), "--name", "animals", check=True)
    assert parse((repo / "animals" / "config.pbtxt").read_text()).max_batch_size == 32  # export keeps the settings
    (repo / "animals" / "config.pbtxt").write_text('name: "animals"\nplatform: "onnxruntime_onnx"\n')
    proc = run_tandem("export", str(tiny_run.run_dir), "--repo", str(repo), "--name", "animals", check=True)
    assert "left as it is" in proc.stdout + proc.stderr and (repo / "animals" / "4").is_dir()
    assert (repo / "animals" / "config.pbtxt").read_text().startswith('name: "animals"')
    proc = run_tandem("serve", str(repo), "--write-triton-config")
    assert proc.returncode == 2 and "--force" in proc.stderr


@pytest.mark.multiprocess
def test_two_exports_into_one_repository_at_once_get_two_versions(tiny_run, tmp_path):
    repo = tmp_path / "models"
    command = [sys.executable, "-m", "tandem", "export", str(tiny_run.run_dir), "--repo", str(repo), "--name", "animals"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    versions = sorted(int(p.name) for p in (repo / "animals").iterdir() if p.is_dir())
    assert versions == [1, 2, 3]
    assert sorted(json.loads((repo / "animals" / str(v) / "manifest.json").read_text())["version"] for v in versions) == [1, 2, 3]


def test_without_the_serve_extra_the_command_says_what_to_install(repo):
    code = ("import sys; sys.modules['fastapi'] = None\n"  # as if `pip install tandem[infer]` only
            f"from tandem.cli import main; raise SystemExit(main(['serve', {str(repo)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pip install 'tandem[serve]'" in proc.stderr and "Traceback" not in proc.stderr

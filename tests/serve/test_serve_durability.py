"""What `tandem serve` acknowledged survives a SIGKILL of the server, on SQLite and on a real PostgreSQL; and no
request body, however malformed, gets a 5xx (hypothesis fuzzing against the app and its OpenAPI document)."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import pngs
from helpers.pg import drop_database, new_database, postgres_url  # noqa: F401
from helpers.serving import ServeProcess, make_repo, request

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _kill_mid_stream_and_restart(repo, config_file, tmp_path) -> None:
    env = {"TANDEM_ADMIN_TOKEN": ADMIN}
    server = ServeProcess(repo, config_file, env=env, cwd=tmp_path)
    acknowledged: list[tuple[str, str, str]] = []  # (prediction id, feedback id, label) the server answered 200 to
    lock = threading.Lock()
    stop = threading.Event()
    labels = ["bear", "zebra", "cat"]

    def device(i: int, png: bytes) -> None:
        while not stop.is_set():
            try:
                status, _, body = request(server.base + "/v1/models/animals/classify", png, timeout=10)
                if status != 200:
                    continue
                pid = json.loads(body)["prediction_id"]
                label = labels[i % 3]
                status, _, body = request(server.base + "/v1/models/animals/feedback",
                                          {"prediction_id": pid, "label": label}, timeout=10)
                if status == 200:
                    with lock:
                        acknowledged.append((pid, str(json.loads(body)["feedback_id"]), label))
            except (OSError, http.client.HTTPException):  # the server is gone (a refused connection, or a reply
                # cut between its headers and its body: IncompleteRead): not acknowledged; what was before counts
                return

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(device, i, png) for i, png in enumerate(pngs(8))]
            deadline = 60.0
            while len(acknowledged) < 40 and deadline > 0:
                stop.wait(0.1)
                deadline -= 0.1
            server.kill()  # SIGKILL in the middle of the stream: no shutdown, no flush
            stop.set()
            for future in futures:
                future.result(timeout=30)
    finally:
        stop.set()
        server.kill()
    assert len(acknowledged) >= 40
    again = ServeProcess(repo, config_file, env=env, cwd=tmp_path)
    try:
        status, _, body = request(again.base + "/v1/feedback?limit=1000", headers=AUTH)
        assert status == 200
        stored = {(row["prediction_id"], str(row["id"]), row["label"]) for row in json.loads(body)["feedback"]}
        lost = set(acknowledged) - stored
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged feedbacks lost"
        rows = {str(row["id"]): row for row in json.loads(body)["feedback"]}
        pid, fid, _ = acknowledged[0]
        assert rows[fid]["image_stored"] is True and rows[fid]["model"] == "animals"
        status, headers, image = request(again.base + f"/v1/feedback/{fid}/image", headers=AUTH)
        assert status == 200 and image[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        again.kill()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_feedback_survives_sigkill_on_sqlite(tmp_path, tiny_bundle):
    repo = make_repo(tmp_path / "repo", tiny_bundle)
    config = tmp_path / "serve.yaml"
    config.write_text(f"store: {{url: {tmp_path / 'store.sqlite'}}}\naccess_log: 'off'\n")
    _kill_mid_stream_and_restart(repo, config, tmp_path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_feedback_survives_sigkill_on_postgresql(tmp_path, tiny_bundle, postgres_url):  # noqa: F811
    url = new_database(postgres_url)
    try:
        repo = make_repo(tmp_path / "repo", tiny_bundle)
        config = tmp_path / "serve.yaml"
        config.write_text(f"store: {{url: '{url}'}}\naccess_log: 'off'\n")
        _kill_mid_stream_and_restart(repo, config, tmp_path)
    finally:
        drop_database(postgres_url, url)


# -- fuzzing ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tiny_bundle):
    from fastapi.testclient import TestClient

    from tandem.serve.app import create_app
    from tandem.serve.config import ServeConfig

    tmp = tmp_path_factory.mktemp("fuzz")
    repo = make_repo(tmp / "repo", tiny_bundle)
    import os

    os.environ["TANDEM_ADMIN_TOKEN"] = ADMIN
    try:
        app = create_app(repo, ServeConfig.model_validate({"store": {"url": str(tmp / "store.sqlite")},
                                                           "access_log": "off", "limits": {"max_body_bytes": 100_000}}),
                         log=lambda message: None)
    finally:
        del os.environ["TANDEM_ADMIN_TOKEN"]
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
tensor = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["input", "logits", ""]) | st.text(max_size=5),
    "shape": st.lists(st.integers(-2, 30), max_size=5) | json_values,
    "datatype": st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "fp32"]) | json_values,
    "data": st.lists(st.floats(width=32) | st.integers(-300, 300), max_size=10) | json_values,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 4000) | json_values,
                                                      "binary_data": json_values, "classification": json_values})})
infer_request = st.fixed_dictionaries({}, optional={
    "id": json_values, "inputs": st.lists(tensor, max_size=2) | json_values,
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "x"]),
                                               "parameters": json_values}), max_size=2) | json_values,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": json_values}) | json_values})
paths = st.sampled_from(["/v2/models/animals/infer", "/v2/models/animals/versions/1/infer",
                         "/v1/models/animals/classify", "/v1/models/animals/feedback",
                         "/v2/repository/models/animals/load", "/v2/repository/index"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, body=infer_request, tail=st.binary(max_size=64), header=st.none() | st.integers(-3, 400)
       | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4))
def test_fuzzed_requests_never_get_a_5xx(fuzz_client, path, body, tail, header):
    raw = json.dumps(body, allow_nan=True).encode()
    headers = dict(AUTH)
    if header is not None:
        headers["Inference-Header-Content-Length"] = str(header) if isinstance(header, int) else header
    response = fuzz_client.post(path, content=raw + tail, headers=headers)
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), content_type=st.sampled_from(
    ["image/png", "application/octet-stream", "multipart/form-data; boundary=x", "multipart/form-data", ""]))
def test_fuzzed_images_never_get_a_5xx(fuzz_client, data, content_type):
    png = pngs(1)[0]
    for body in (data, png[:len(data) % len(png)] + data, b"--x\r\nContent-Disposition: form-data; name=\"image\"; "
                 b"filename=\"a\"\r\n\r\n" + data + b"\r\n--x--\r\n"):
        for url in ("/v1/models/animals/classify", "/v2/models/animals/explain"):
            response = fuzz_client.post(url, content=body, headers={"Content-Type": content_type})
            assert response.status_code < 500, response.text


def test_every_documented_operation_answers_without_a_5xx(fuzz_client):
    """Walk the OpenAPI document: each operation, with the path parameters filled in, empty and junk bodies."""
    spec = fuzz_client.get("/openapi.json").json()
    assert {"/v1/models/{model}/classify", "/v1/models/{model}/feedback", "/v1/feedback"} <= set(spec["paths"])
    fills = {"model": ["animals", "zebra", "..", "a" * 80], "version": ["1", "0", "x", "99"], "feedback_id": ["1", "x"],
             "concept": ["0", "x", "-1", "99"]}
    for path, operations in spec["paths"].items():
        for method in operations:
            names = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
            for i in range(4):
                filled = path
                for name in names:
                    options = fills[name]
                    filled = filled.replace("{" + name + "}", options[i % len(options)])
                for body in (b"", b"{}", b"\xff\x00junk"):
                    response = fuzz_client.request(method.upper(), filled, content=body if method != "get" else None,
                                                   headers=AUTH)
                    assert response.status_code < 500, (method, filled, body, response.text)

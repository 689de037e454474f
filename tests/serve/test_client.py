"""`tandem client`: against a small stdlib server that answers like the spec's /v1 endpoints (every error path:
refused connection, 401, 404, a bad image, non-JSON replies, a timeout), then end to end against the real
`tandem serve` app under uvicorn, classifying real animal PNGs as the runtime does."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import UserError
from tandem.serve.client import ServerError, Unreachable, base_url, classify, feedback, list_models, run_client

PNG = b"\x89PNG\r\n\x1a\nfake"
LABELS = ["cat", "dog", "zebra"]


class Fake:
    """What the fake server serves, and what it received."""

    def __init__(self) -> None:
        self.models = ["animals"]
        self.token: str | None = None
        self.requests: list[dict] = []
        self.feedback: list[dict] = []
        self.html = False       # answer 200 with an HTML page instead of JSON
        self.sleep = 0.0        # seconds before answering classify


class Handler(BaseHTTPRequestHandler):
    fake: Fake

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _handle(self, method: str) -> None:
        fake = self.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(self.path)
        fake.requests.append({"method": method, "path": url.path, "query": dict(urllib.parse.parse_qsl(url.query)),
                              "headers": dict(self.headers), "body": body})
        if fake.html:
            return self._send(200, b"<html><body>a login page</body></html>", "text/html; charset=utf-8")
        if url.path.startswith("/bad-gateway"):
            return self._send(502, b"<html>502 Bad Gateway</html>", "text/html")
        if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
            return self._json(401, {"error": "missing or bad token"})
        parts = url.path.strip("/").split("/")
        if method == "GET" and parts == ["v1", "models"]:
            return self._json(200, {"models": [{"name": m, "versions": [1, 2], "latest": 2, "labels": LABELS}
                                               for m in fake.models]})
        if method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "models"]:
            model = urllib.parse.unquote(parts[2])
            if model not in fake.models:
                return self._json(404, {"error": f"unknown model {model!r}"})
            if parts[3] == "classify":
                time.sleep(fake.sleep)
                if not body.startswith(b"\x89PNG"):
                    return self._json(400, {"error": "the body is not an image (PNG, JPEG, BMP)"})
                k = int(dict(urllib.parse.parse_qsl(url.query)).get("top_k", 5))
                top = [{"label": label, "index": i, "probability": p}
                       for i, (label, p) in enumerate(zip(LABELS, [0.971, 0.02, 0.009]))][:k]
                return self._json(200, {"prediction_id": uuid.uuid4().hex, "model": model, "version": 2,
                                        "top_k": top, "latency_ms": {"queue": 0.1, "compute": 0.5, "total": 0.7}})
            if parts[3] == "feedback":
                request = json.loads(body)
                if request["label"] not in LABELS:
                    return self._json(400, {"error": f"{request['label']!r} is not one of the model's labels"})
                fake.feedback.append(request)
                return self._json(200, {"feedback_id": len(fake.feedback), **request, "image_stored": True})
        return self._json(404, {"error": f"no route {url.path}"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


@pytest.fixture
def fake():
    state = Fake()
    handler = type("BoundHandler", (Handler,), {"fake": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    paths = []
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(PNG + name.encode())
        paths.append(tmp_path / name)
    return paths


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv("TANDEM_TOKEN", raising=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the library -------------------------------------------------------------------------------------


def test_classify_sends_the_file_as_is(fake, images):
    reply = classify(fake.url, images[0], model="animals", version=2, top_k=2, token=None)
    assert [p["label"] for p in reply["top_k"]] == ["cat", "dog"]
    assert len(reply["prediction_id"]) == 32 and reply["model"] == "animals" and reply["version"] == 2
    (request,) = fake.requests
    assert request["method"] == "POST" and request["path"] == "/v1/models/animals/classify"
    assert request["query"] == {"top_k": "2", "version": "2"}
    assert request["body"] == images[0].read_bytes()
    assert request["headers"]["Content-Type"] == "image/png"
    assert "Authorization" not in request["headers"]


def test_classify_bytes_finds_the_only_model_and_sends_the_token(fake):
    fake.token = "s3cret"
    reply = classify(fake.url.removeprefix("http://"), PNG, token="s3cret")  # no scheme: http
    assert reply["model"] == "animals"
    assert [(r["method"], r["path"]) for r in fake.requests] == [("GET", "/v1/models"),
                                                                 ("POST", "/v1/models/animals/classify")]
    assert all(r["headers"]["Authorization"] == "Bearer s3cret" for r in fake.requests)
    assert fake.requests[1]["headers"]["Content-Type"] == "application/octet-stream"
    assert "version" not in fake.requests[1]["query"]


def test_several_models_must_be_named(fake):
    fake.models = ["animals", "birds"]
    with pytest.raises(UserError, match=r"serves 2 models \(animals, birds\); pick one with --model"):
        classify(fake.url, PNG)
    fake.models = []
    with pytest.raises(UserError, match="serves no model"):
        classify(fake.url, PNG)


def test_model_names_cannot_escape_the_path(fake):
    with pytest.raises(ServerError) as err:
        classify(fake.url, PNG, model="../../v1/models")
    assert err.value.status == 404
    assert fake.requests[0]["path"] == "/v1/models/..%2F..%2Fv1%2Fmodels/classify"


def test_refused_connection_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(Unreachable) as err:
        classify(url, PNG, model="animals")
    message = str(err.value)
    assert message.startswith(f"cannot reach {url} (") and message.endswith("is `tandem serve` running?")
    assert "\n" not in message


def test_http_errors_carry_the_servers_message_and_status(fake):
    fake.token = "s3cret"
    with pytest.raises(ServerError) as err:
        classify(fake.url, PNG, model="animals")
    assert err.value.status == 401
    assert "missing or bad token" in str(err.value) and "HTTP 401" in str(err.value)
    assert "TANDEM_TOKEN" in str(err.value)  # says how to pass one
    with pytest.raises(ServerError, match=r"unknown model 'cats' \(HTTP 404") as err:
        classify(fake.url, PNG, model="cats", token="s3cret")
    assert err.value.status == 404
    with pytest.raises(ServerError, match=r"not an image .*\(HTTP 400"):
        classify(fake.url, b"GIF89a", model="animals", token="s3cret")


def test_non_json_replies_are_named(fake):
    with pytest.raises(ServerError, match=r"Bad Gateway \(no JSON error message: is .* a tandem server\?\) \(HTTP 502"):
        list_models(fake.url + "/bad-gateway")  # a proxy's error page
    fake.html = True
    with pytest.raises(ServerError, match=r"HTTP 200 but not JSON \(text/html\); is it a tandem server\?"):
        classify(fake.url, PNG, model="animals")


def test_a_slow_server_times_out(fake):
    fake.sleep = 2.0
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match="no answer from .* within 0.3 s"):
        classify(fake.url, PNG, model="animals", timeout=0.3)
    assert time.perf_counter() - t0 < 1.5


def test_feedback(fake):
    reply = classify(fake.url, PNG, model="animals")
    given = feedback(fake.url, "animals", reply["prediction_id"], "zebra")
    assert given == {"feedback_id": 1, "prediction_id": reply["prediction_id"], "label": "zebra", "image_stored": True}
    assert fake.requests[-1]["headers"]["Content-Type"] == "application/json"
    with pytest.raises(ServerError, match="'unicorn' is not one of"):
        feedback(fake.url, "animals", reply["prediction_id"], "unicorn")


@pytest.mark.parametrize("url, expected", [("127.0.0.1:8000", "http://127.0.0.1:8000"),
                                           ("localhost:8000/", "http://localhost:8000"),
                                           ("https://example.org/tandem/", "https://example.org/tandem")])
def test_base_url(url, expected):
    assert base_url(url) == expected


@pytest.mark.parametrize("url", ["", "ftp://host/", "http://"])
def test_bad_urls(url):
    with pytest.raises(UserError, match="URL"):
        base_url(url)


# --- run_client, what `tandem client` prints -----------------------------------------------------------


def test_run_client_prints_like_predict(fake, images, capsys):
    assert run_client(fake.url, [str(images[0].parent)], top_k=2) == 0  # a folder: its images, sorted
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{images[0]}: cat 97.1%  dog 2.0%", f"{images[1]}: cat 97.1%  dog 2.0%"]
    assert sum(r["path"] == "/v1/models" for r in fake.requests) == 1  # the model is looked up once


def test_run_client_json_lines_and_a_bad_image(fake, images, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code = run_client(fake.url, [str(images[0]), str(bad), str(images[1])], model="animals", top_k=1,
                      as_json=True)
    assert code == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["path"] for r in records] == [str(images[0]), str(bad), str(images[1])]
    assert set(records[0]) == {"path", "prediction_id", "model", "version", "top_k"}
    assert records[0]["top_k"] == [{"label": "cat", "index": 0, "probability": 0.971}]
    assert records[0]["model"] == "animals" and records[0]["version"] == 2
    assert set(records[1]) == {"path", "error"} and "HTTP 400" in records[1]["error"]
    assert "1 of 3 image(s) failed" in captured.err


def test_run_client_token_from_the_environment(fake, images, monkeypatch, capsys):
    fake.token = "from-env"
    with pytest.raises(ServerError, match="HTTP 401"):  # the same for every image: stop at once
        run_client(fake.url, [str(images[0]), str(images[1])], model="animals")
    assert len(fake.requests) == 1
    monkeypatch.setenv("TANDEM_TOKEN", "from-env")
    assert run_client(fake.url, [str(images[0])], model="animals") == 0
    assert fake.requests[-1]["headers"]["Authorization"] == "Bearer from-env"


def test_run_client_unknown_model_stops_at_once(fake, images):
    with pytest.raises(ServerError, match="unknown model 'cats'"):
        run_client(fake.url, [str(p) for p in images], model="cats")
    assert len(fake.requests) == 1


def test_run_client_missing_file_and_unreachable_server(tmp_path, images):
    with pytest.raises(UserError, match="does not exist"):
        run_client(f"127.0.0.1:{free_port()}", [str(tmp_path / "nope.png")], model="animals")
    with pytest.raises(Unreachable, match="is `tandem serve` running"):
        run_client(f"127.0.0.1:{free_port()}", [str(images[0])], model="animals")


def test_run_client_sends_feedback(fake, images, capsys):
    assert run_client(fake.url, [str(images[0])], model="animals", as_json=True, feedback_label="zebra") == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["feedback"]["label"] == "zebra" and record["feedback"]["prediction_id"] == record["prediction_id"]
    assert fake.feedback == [{"prediction_id": record["prediction_id"], "label": "zebra"}]
    before = len(fake.requests)
    with pytest.raises(UserError, match="'unicorn' is not one of model animals's labels"):
        run_client(fake.url, [str(images[0])], model="animals", feedback_label="unicorn")
    assert all(r["path"] == "/v1/models" for r in fake.requests[before:])  # refused before sending an image


# --- end to end: the real app under uvicorn --------------------------------------------------------------


@pytest.fixture
def served(tmp_path, tiny_bundle):
    """`tandem serve` on a repository holding the tiny bundle as animals/1, with an inference token."""
    from helpers.serving import make_repo, running_server

    config = {"auth": {"token_env": "TANDEM_TEST_SERVE_TOKEN", "admin_token_env": "TANDEM_TEST_SERVE_ADMIN"},
              "store": {"url": f"sqlite:///{tmp_path / 'serve.sqlite'}"}}
    with running_server(make_repo(tmp_path / "repo", tiny_bundle), config,
                        env={"TANDEM_TEST_SERVE_TOKEN": "device-token"}) as base:
        yield base.removeprefix("http://")


def test_end_to_end_with_the_real_server(served, tiny_bundle, tmp_path, capsys):
    from PIL import Image

    from helpers import animals
    from tandem.cli import main
    from tandem.runtime import Predictor

    x, _ = animals(1)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, pixels in enumerate(x):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(pixels).save(paths[-1])
    expected = [preds[0].label for preds in Predictor.load(tiny_bundle).top_k(x, k=1)]

    assert main(["client", served, str(folder), "--token", "device-token", "--top-k", "3", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert [r["top_k"][0]["label"] for r in records] == expected
    assert all(r["model"] == "animals" and r["version"] == 1 and len(r["top_k"]) == 3 for r in records)
    assert all(len(r["prediction_id"]) == 32 for r in records)

    # The library: same answer, feedback accepted for the prediction it made.
    reply = classify(served, paths[0], token="device-token", top_k=1)
    assert reply["top_k"][0]["label"] == expected[0]
    probs = Predictor.load(tiny_bundle).probabilities(x[:1])[0]
    assert reply["top_k"][0]["probability"] == pytest.approx(float(np.max(probs)), abs=1e-5)
    given = feedback(served, "animals", reply["prediction_id"], "zebra", token="device-token")
    assert given["prediction_id"] == reply["prediction_id"] and given["label"] == "zebra"
    assert isinstance(given["feedback_id"], int)

    # The real server's errors, as the device sees them.
    assert main(["client", served, str(paths[0])]) == 2  # no token
    assert "HTTP 401" in capsys.readouterr().err
    with pytest.raises(ServerError) as err:
        classify(served, paths[0], model="cats", token="device-token")
    assert err.value.status == 404
    with pytest.raises(ServerError) as err:
        classify(served, b"not an image", model="animals", token="device-token")
    assert err.value.status == 400 and "\n" not in str(err.value)

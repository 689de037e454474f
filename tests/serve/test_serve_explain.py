"""`tandem serve`'s explain endpoints against references: the heatmap is tandem.explain.occlusion's on the served
bundle's fp32 model (also when the server runs its int8 model), the rule path is RuleSet.explain's and the
prototype strips are RuleSet.prototype_png's bytes; every bad request is a 4xx with a one-line message."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import animals, png_bytes, png_claiming
from helpers.serving import make_repo, request, running_server
from tandem.bundle import read_manifest
from tandem.explain.occlusion import occlusion
from tandem.explain.render import heatmap_png
from tandem.explain.rules_pictures import fired_png
from tandem.runtime import Predictor


@pytest.fixture
def repo(tmp_path, tiny_bundle) -> Path:
    return make_repo(tmp_path / "repo", tiny_bundle)


@pytest.fixture(scope="module")
def fp32(tiny_bundle) -> Predictor:
    return Predictor.load(tiny_bundle, precision="fp32")


def bundle_with_rules(bundle: Path, folder: Path) -> Path:
    """A copy of `bundle` with rules fit and stored in it, as `tandem rules` does (a few concepts: tiny data)."""
    from tandem.explain.fit_rules import fit_rules

    shutil.copytree(bundle, folder)
    fit_rules(folder, max_leaves=8, concepts=6, log=lambda *a, **k: None)
    return folder


@pytest.fixture(scope="module")
def rules_bundle(tmp_path_factory, tiny_bundle) -> Path:
    return bundle_with_rules(tiny_bundle, tmp_path_factory.mktemp("rules") / "bundle")


def _config(tmp_path: Path, **extra) -> dict:
    return {"store": {"url": str(tmp_path / "store.sqlite")}, **extra}


def _multipart(png: bytes) -> tuple[bytes, dict]:
    boundary = "tandem-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _explain(base: str, path: str, body: bytes, headers: dict | None = None) -> dict:
    status, _, reply = request(base + path, body, headers or {"Content-Type": "image/png"})
    assert status == 200, (path, status, reply[:300])
    return json.loads(reply)


def _image(png_base64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(png_base64)))


def test_the_heatmap_is_the_runtimes_occlusion_and_no_rules_say_why(repo, tmp_path, fp32):
    images, _ = animals(1)
    with running_server(repo, _config(tmp_path)) as base:
        for n, (query, window, stride, target) in enumerate([("", 4, 2, None), ("?window=7&stride=3", 7, 3, None),
                                                               ("?window=5&target=Giraffe", 5, 2, "giraffe"),
                                                               ("?stride=1&target=3", 4, 1, 3)]):
            png = png_bytes(images[n])
            body, headers = _multipart(png) if n % 2 else (png, None)  # raw bytes and a form, as curl sends them
            answer = _explain(base, "/v2/models/animals/explain" + query, body, headers)
            pixels = fp32.pixels([images[n]])[0]
            index = fp32.labels.index(target) if isinstance(target, str) else target
            expected = occlusion(fp32, pixels, index, window, stride)

            heat = answer["heatmap"]
            values = np.array(heat["values"], np.float32)
            assert heat["shape"] == [28, 28] and values.shape == (28, 28)
            np.testing.assert_allclose(values, expected.heatmap, rtol=0, atol=1e-6)
            assert (heat["window"], heat["stride"], heat["target"]) == (window, stride, expected.target)
            assert heat["windows"] == (-(-(28 - window) // stride) + 1) ** 2
            assert heat["label"] == fp32.labels[expected.target]
            assert heat["probability"] == pytest.approx(float(expected.probabilities[expected.target]), abs=1e-6)
            # The PNG is render.heatmap_png's picture of these values.
            drawn = np.asarray(_image(heat["png_base64"]))
            assert drawn.shape == (224, 224, 4)
            reference = np.asarray(Image.open(io.BytesIO(heatmap_png(expected.heatmap, 8))))
            assert np.abs(drawn.astype(int) - reference).max() <= 1
            # The image as the model saw it, and its top 5 by the fp32 model.
            assert np.array_equal(np.asarray(_image(answer["image"]["png_base64"])), pixels[..., 0])
            order = np.argsort(-expected.probabilities, kind="stable")[:5]
            assert [t["index"] for t in answer["top_k"]] == order.tolist()
            assert [t["probability"] for t in answer["top_k"]] == pytest.approx(expected.probabilities[order], abs=1e-6)
            assert (answer["model"], answer["version"], answer["precision"]) == ("animals", 1, "fp32")
            # No rules.json in this bundle: null, and the reason says how to get them.
            assert answer["rules"] is None and "no rules" in answer["rules_reason"]
            assert "tandem rules" in answer["rules_reason"]

        versioned = _explain(base, "/v2/models/animals/versions/1/explain", png_bytes(images[0]))
        assert versioned["heatmap"]["values"] == _explain(base, "/v2/models/animals/explain",
                                                          png_bytes(images[0]))["heatmap"]["values"]
        status, _, reply = request(base + "/v2/models/animals/versions/1/concepts/0")
        assert status == 404 and "no rules" in json.loads(reply)["error"]

        metrics = request(base + "/metrics")[2].decode()
        assert 'tandem_explain_seconds_count{model="animals",part="occlusion",version="1"} 6.0' in metrics
        assert 'tandem_requests_total{code="200",endpoint="explain_latest",model="animals",version="1"} 5.0' in metrics
        assert 'tandem_requests_total{code="200",endpoint="explain_version",model="animals",version="1"} 1.0' in metrics


def test_the_rule_path_is_the_rule_sets_and_its_prototypes_are_served(rules_bundle, tmp_path, fp32, monkeypatch):
    import gc
    import weakref

    from tandem.explain.rules import RuleSet

    rules = RuleSet.load(rules_bundle)
    images, _ = animals(1)
    # One image at a time, as the server explains them (a batch may round the last bit of a score otherwise).
    expected = [rules.explain(fp32.pixels([image]))[0] for image in images]
    assert len({e["label"] for e in expected}) > 1  # the rules do tell the images apart
    loaded = []

    def counted(*args, **kwargs):  # the server loads a version's rules once, and lets them go with it
        found = real(*args, **kwargs)
        loaded.append(weakref.ref(found))
        return found

    real = RuleSet.load
    monkeypatch.setattr(RuleSet, "load", counted)
    repo = make_repo(tmp_path / "repo", rules_bundle)
    admin = {"Authorization": "Bearer explain-admin"}
    with running_server(repo, _config(tmp_path), env={"TANDEM_ADMIN_TOKEN": "explain-admin"}) as base:
        for image, reference in zip(images, expected):
            answer = _explain(base, "/v2/models/animals/explain", png_bytes(image))
            assert answer["rules_reason"] is None
            path = answer["rules"]
            urls = [condition.pop("prototype_url") for condition in path["conditions"]]
            wheres = [condition.pop("where_png_base64") for condition in path["conditions"]]
            assert path == json.loads(json.dumps(reference)) and path["label"] in path["text"]
            for condition, where in zip(path["conditions"], wheres):  # where it fired, drawn over this image
                assert base64.b64decode(where) == fired_png(fp32.pixels([image])[0], np.asarray(condition["where"]))
            for condition, url in zip(path["conditions"], urls):
                fit = read_manifest(repo / "animals" / "1")["files"]["rules.json"]["sha256"][:12]
                assert url == f"/v2/models/animals/versions/1/concepts/{condition['concept']}?rules={fit}"
                status, headers, png = request(base + url)
                assert status == 200 and png == rules.prototype_png(condition["concept"])
                assert headers["content-type"] == "image/png"
        assert request(base + "/v2/models/animals/concepts/0")[2] == rules.prototype_png(0)
        status, _, reply = request(base + f"/v2/models/animals/concepts/{len(rules.concepts)}")
        assert status == 404 and "does not exist" in json.loads(reply)["error"]
        assert request(base + "/v2/models/animals/concepts/-1")[0] == 404
        assert len(loaded) == 1
        assert request(base + "/v2/repository/models/animals/unload", {}, admin)[0] == 200
        gc.collect()
        assert loaded[0]() is None, "the unloaded version's rules are still held"
        assert request(base + "/v2/repository/models/animals/load", {}, admin)[0] == 200
        assert _explain(base, "/v2/models/animals/explain", png_bytes(images[0]))["rules"]["text"] == expected[0]["text"]
        assert len(loaded) == 2
        metrics = request(base + "/metrics")[2].decode()
        assert 'tandem_explain_seconds_count{model="animals",part="rules",version="1"} 11.0' in metrics


def test_an_int8_server_explains_with_the_fp32_model(tiny_bundle, tmp_path, fp32):
    from tandem.bundle import read_manifest, write_manifest
    from tandem.export.quantize import quantize
    from tandem.runtime.preprocess import preprocess

    folder = tmp_path / "repo" / "animals" / "1"
    shutil.copytree(tiny_bundle, folder)
    calibration, _ = animals(8, seed=1)
    quantize(folder / "model.onnx", folder / "model.int8.onnx",
             preprocess(fp32.pixels(calibration[..., None]), fp32.mean, fp32.std))
    manifest = read_manifest(folder)
    manifest.pop("files")
    write_manifest(folder, manifest)
    int8 = Predictor.load(folder)
    assert int8.precision == "int8"

    image = animals(1, seed=2)[0][4]
    pixels = fp32.pixels([image])[0]
    expected, other = occlusion(fp32, pixels), occlusion(int8, pixels)
    assert np.abs(expected.heatmap - other.heatmap).max() > 1e-4  # the two models do differ
    with running_server(tmp_path / "repo", _config(tmp_path)) as base:
        classified = json.loads(request(base + "/v1/models/animals/classify", png_bytes(image))[2])
        assert classified["top_k"][0]["probability"] == pytest.approx(
            float(int8.probabilities([image])[0].max()), abs=1e-6)  # the server runs int8
        answer = _explain(base, "/v2/models/animals/explain", png_bytes(image))
    assert answer["precision"] == "fp32"
    np.testing.assert_allclose(np.array(answer["heatmap"]["values"], np.float32), expected.heatmap, rtol=0, atol=1e-6)


def test_every_bad_explain_request_is_a_4xx_with_a_one_line_message(repo, tmp_path):
    png = png_bytes(animals(1)[0][0])
    explain = "/v2/models/animals/explain"
    cases = [
        ("POST", "/v2/models/zebra/explain", png, 404, "unknown model"),
        ("POST", "/v2/models/animals/versions/9/explain", png, 404, "no version 9"),
        ("POST", "/v2/models/animals/versions/0/explain", png, 400, "invalid version"),
        ("POST", "/v2/models/..%5Cetc/explain", png, 400, "is not allowed"),
        ("POST", explain, b"not an image", 400, "not an image"),
        ("POST", explain, b"", 400, "empty"),
        ("POST", explain, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 400, "image"),
        ("POST", explain, png + b"\x00" * 8000, 413, "explain.max_image_bytes"),
        ("POST", explain, png_claiming(2100, 2000), 400, "more than the 4000000"),  # explain.max_image_pixels
        ("POST", explain, png_claiming(20000, 20000), 400, "more pixels than"),
        ("POST", explain + "?window=0", png, 400, "window 0"),
        ("POST", explain + "?window=29", png, 400, "window 29"),
        ("POST", explain + "?window=-3", png, 400, "window -3"),
        ("POST", explain + "?window=4&stride=0", png, 400, "stride 0"),
        ("POST", explain + "?window=4&stride=5", png, 400, "stride 5"),
        ("POST", explain + "?stride=40", png, 400, "window"),
        ("POST", explain + "?window=2&stride=1", png, 400, "explain.max_windows"),  # 27 x 27 = 729 copies
        ("POST", explain + "?window=big", png, 400, "window"),
        ("POST", explain + "?window=99999999999999999999999", png, 400, "window"),
        ("POST", explain + "?target=unicorn", png, 400, "target"),
        ("POST", explain + "?target=10", png, 400, "target"),
        ("POST", explain + "?target=-1", png, 400, "target"),
        ("POST", explain + "?target=%C2%B2", png, 400, "target"),  # a Unicode digit, not an index
        ("GET", explain, None, 405, "not allowed"),
        ("GET", "/v2/models/animals/concepts/x", None, 400, "concept"),
        ("GET", "/v2/models/animals/concepts/0", None, 404, "no rules"),
        ("GET", "/v2/models/zebra/concepts/0", None, 404, "unknown model"),
    ]
    config = _config(tmp_path, explain={"max_image_bytes": 8192, "max_image_pixels": 4_000_000, "max_windows": 500})
    with running_server(repo, config) as base:
        for method, path, body, status, words in cases:
            got, _, reply = request(base + path, body, {"Content-Type": "image/png"}, method=method)
            assert got == status, (path, got, reply)
            error = json.loads(reply)["error"]
            assert words.lower() in error.lower() and "\n" not in error and "Traceback" not in error, (path, error)
        # gzip does not carry a larger image past explain.max_image_bytes: the limit holds for the inflated body
        import gzip

        padded = png + b"\x00" * 20000
        got, _, reply = request(base + explain, gzip.compress(padded),
                                {"Content-Type": "image/png", "Content-Encoding": "gzip"})
        assert len(gzip.compress(padded)) < 8192 and got == 413, reply
        # the server still explains after all of that, and counted failures, no 500
        assert request(base + explain, png, {"Content-Type": "image/png"})[0] == 200
        metrics = request(base + "/metrics")[2].decode()
        assert 'tandem_request_failures_total{code="400",endpoint="explain_latest",model="animals",version="1"}' in metrics
        assert 'code="500"' not in metrics


def test_explain_keeps_the_servers_auth_switch_and_timeout(repo, tmp_path):
    png = png_bytes(animals(1)[0][0])
    env = {"TANDEM_TOKEN": "device-secret"}
    with running_server(repo, _config(tmp_path), env=env) as base:
        url = base + "/v2/models/animals/explain"
        status, _, body = request(url, png)
        assert status == 401 and "token" in json.loads(body)["error"]
        assert request(url, png, {"Authorization": "Bearer wrong"})[0] == 401
        assert request(base + "/v2/models/animals/concepts/0")[0] == 401
        assert request(url, png, {"Authorization": "Bearer device-secret"})[0] == 200
    with running_server(repo, _config(tmp_path, explain={"enabled": False})) as base:
        status, _, body = request(base + "/v2/models/animals/explain", png)
        assert status == 403 and "explain.enabled" in json.loads(body)["error"]
        assert request(base + "/v1/models/animals/classify", png)[0] == 200
    with running_server(repo, _config(tmp_path, limits={"request_timeout_s": 1e-6})) as base:
        status, _, body = request(base + "/v2/models/animals/explain", png)
        assert status == 504 and "request_timeout_s" in json.loads(body)["error"]


def test_explanations_at_once_are_bounded(repo, tmp_path):
    """One at a time and none waiting: of eight sent together, the ones that find the slot taken get a 503."""
    from concurrent.futures import ThreadPoolExecutor

    png = png_bytes(animals(1)[0][0])
    config = _config(tmp_path, explain={"max_concurrent": 1, "max_waiting": 0})
    with running_server(repo, config) as base:
        url = base + "/v2/models/animals/explain?window=1&stride=1"  # 784 copies: long enough to overlap
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: request(url, png, {"Content-Type": "image/png"}), range(8)))
        statuses = sorted(status for status, _, _ in answers)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
        busy = next(json.loads(body)["error"] for status, _, body in answers if status == 503)
        assert "explain.max_waiting" in busy
        assert request(url, png, {"Content-Type": "image/png"})[0] == 200  # the slot is free again


def test_the_openapi_document_lists_the_explain_endpoints(repo, tmp_path):
    with running_server(repo, _config(tmp_path)) as base:
        paths = json.loads(request(base + "/openapi.json")[2])["paths"]
    for path in ("/v2/models/{model}/explain", "/v2/models/{model}/versions/{version}/explain"):
        post = paths[path]["post"]
        assert {"image/*", "multipart/form-data"} <= set(post["requestBody"]["content"])
        assert {p["name"] for p in post["parameters"]} >= {"model", "window", "stride", "target"}
        schema = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert {"heatmap", "rules", "rules_reason", "top_k"} <= set(schema["properties"])
        assert "4XX" in post["responses"] and "422" not in post["responses"]
    assert "get" in paths["/v2/models/{model}/versions/{version}/concepts/{concept}"]


def test_explaining_imports_no_torch(rules_bundle, tmp_path):
    from test_torch_free import _no_torch_after

    make_repo(tmp_path / "repo", rules_bundle)
    (tmp_path / "a.png").write_bytes(png_bytes(animals(1)[0][0]))
    _no_torch_after(
        "from fastapi.testclient import TestClient\n"
        "from tandem.serve.app import create_app\n"
        "from tandem.serve.config import ServeConfig\n"
        f"cfg = ServeConfig.model_validate({{'store': {{'url': {str(tmp_path / 'db.sqlite')!r}}}, 'access_log': 'off'}})\n"
        f"with TestClient(create_app({str(tmp_path / 'repo')!r}, cfg, log=print)) as client:\n"
        f"    answer = client.post('/v2/models/animals/explain', content=open({str(tmp_path / 'a.png')!r}, 'rb').read())\n"
        "    assert answer.status_code == 200 and answer.json()['rules'] is not None, answer.text\n"
        "    assert client.get('/v2/models/animals/concepts/0').status_code == 200"
    )

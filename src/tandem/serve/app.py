"""The HTTP server: the Open Inference Protocol v2 over a model repository, plus images in, labels out.

    tandem serve models/ --port 8000 [--config serve.yaml]

    app = create_app(Path("models"), ServeConfig())      # a FastAPI app (ASGI); run it with uvicorn
    serve(Path("models"), config)                        # what the CLI runs

Endpoints: /v2/... (the protocol, with the binary tensor extension, classification and the model
repository extension), /v1/models, /v1/models/{m}/classify and /feedback, /v1/feedback (admin), /metrics,
/v2/models/{m}[/versions/{v}]/explain (an occlusion heatmap and the rule path of one image) and
/v2/models/{m}[/versions/{v}]/concepts/{c} (a concept's prototype strip, a PNG), and the web page at /.
The OpenAPI document is at /openapi.json (no browsable /docs: it would load its script from a CDN, on
the origin where the web page keeps its token). Every error is
{"error": "..."} with a 4xx status (503 when a model cannot run now, 504 past the request timeout).
Inference runs off the event loop, in each model version's own thread; explanations in worker threads, at most
explain.max_concurrent at once (their work: serve/explain.py). Never imports torch.
"""

from __future__ import annotations

import asyncio
import gc
import os
import hashlib
import hmac
import io
import json
import re
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import tandem
from tandem.errors import UserError
from tandem.images import decode_image_bytes
from tandem.runtime.predictor import softmax
from tandem.runtime.preprocess import preprocess
from tandem.serve.config import ServeConfig, check_model_name, tokens
from tandem.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from tandem.serve.protocol import (HEADER_LENGTH, NotFound, ProtocolError, Unavailable, decompress, encode_infer,
                                   json_object, parse_infer)
from tandem.serve.explain import (EXPLAIN_OFF, EXPLAIN_SCHEMA, explain_image, occlusion_window, prototype_png,
                                  target_index)
from tandem.serve.repository import ModelVersion, Repository, parse_version
from tandem.serve.store import NotFound as UnknownPrediction
from tandem.serve.store import PredictionRecord, Store, StoreError

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
_timeout = getattr(asyncio, "timeout", None)
_JSON_LIMIT = 1 << 16  # feedback and repository requests are small
_OFF_LOOP_BYTES = 1 << 16  # bigger infer bodies are parsed in a thread, not on the event loop
_STORED_TOP_K = 5
# The explain endpoints' query parameters (module level: FastAPI resolves the annotations in the module's names).
Window = Annotated[int | None, Query(description="occlusion window, in pixels of the model's input (default: about "
                                                 "a seventh of its side, 4 at 28)")]
Stride = Annotated[int | None, Query(description="occlusion stride, 1 to window (default: half the window)")]
Target = Annotated[str | None, Query(description="the class to explain, a label or an index (default: the "
                                                 "predicted class)")]


class AuthError(ProtocolError):
    status = 401


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": message}).encode()
    return Response(body, status, headers=headers, media_type="application/json")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status, media_type="application/json")


class Server:
    """What the routes share: the repository, the store, the metrics, the tokens and the limits."""

    def __init__(self, repo: Path, config: ServeConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.metrics = Metrics()
        self.repository = Repository(repo, config, on_batch=self.metrics.observe_batch, log=log, after=self.after_batch)
        self.token, self.admin_token = tokens(config.auth)
        protect = config.auth.protect_inference
        self.protect_inference = self.token is not None if protect is None else protect
        if self.protect_inference and self.token is None:
            raise UserError(f"auth.protect_inference is true but no inference token is set: export "
                            f"{config.auth.token_env}=... or set auth.token_file")
        self.store = Store(config.store.url, keep_images=config.store.keep_images,
                           max_image_bytes=config.store.max_image_bytes,
                           image_cache_bytes=config.store.image_cache_bytes, sync=config.store.sync)
        self.limits = config.limits
        self.access_log = _access_log(config.access_log)
        self.big_bodies = asyncio.Semaphore(2)  # large bodies parsed at once: bounds the memory they take
        self.explain_slots = asyncio.Semaphore(config.explain.max_concurrent)
        self.explain_waiting = 0
        page = resources.files("tandem.serve").joinpath("static/index.html")
        self.page = page.read_bytes() if page.is_file() else None

    # -- auth -------------------------------------------------------------------------------------------------
    def check(self, headers: Headers, admin: bool = False) -> None:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode() if scheme.lower() == "bearer" else b""
        if admin:
            if self.admin_token is None:
                raise ProtocolError(f"admin endpoints are off: start the server with an admin token "
                                    f"({self.config.auth.admin_token_env}=... or auth.admin_token_file)", 403)
            if _same(given_bytes, self.admin_token):
                return
            if self.token is not None and _same(given_bytes, self.token):
                raise ProtocolError("this needs the admin token, not the inference token", 403)
            raise AuthError("missing or wrong admin token: send 'Authorization: Bearer <admin token>'")
        if not self.protect_inference:
            return
        if _same(given_bytes, self.token) or (self.admin_token is not None and _same(given_bytes, self.admin_token)):
            return
        raise AuthError("missing or wrong token: send 'Authorization: Bearer <token>'")

    # -- bodies -----------------------------------------------------------------------------------------------
    async def body(self, headers: Headers, chunks: AsyncIterator[bytes], limit: int | None = None) -> bytes:
        """The request body (decompressed), refused with a 413 past `limit` before or while it is read."""
        limit = limit or self.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise ProtocolError(f"the body is {length} bytes, more than this endpoint takes ({limit}; "
                                    "limits.max_body_bytes)", 413)
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the body is larger than this endpoint takes ({limit} bytes; "
                                    "limits.max_body_bytes)", 413)
            parts.append(chunk)
        return decompress(b"".join(parts), headers.get("content-encoding"), limit)  # this endpoint's limit, inflated too

    async def request_body(self, request: Request, limit: int | None = None) -> bytes:
        body = await self.body(request.headers, request.stream(), limit)
        request._body = body  # so request.form() can parse what was read  # noqa: SLF001
        return body

    async def json_body(self, request: Request) -> dict:
        raw = await self.request_body(request, _JSON_LIMIT)
        return json_object(raw, "the body") if raw.strip() else {}

    # -- running models ---------------------------------------------------------------------------------------
    def acquire(self, scope: dict, name: str, version: int | None) -> ModelVersion:
        """The version to run (held until repository.release); failures from here on count against it."""
        model = self.repository.acquire(name, version)
        scope["tandem.model"] = (model.name, str(model.version))
        return model

    async def run(self, model: ModelVersion, x: np.ndarray, meta: "Meta"):
        """Run x in the model's next batch; the answer comes once its predictions are committed to the log."""
        result = await model.batcher.submit(x, meta)
        self.metrics.observe_run(model.name, model.version, result.queue_s, result.compute_s)
        if result.extra is None:
            raise ProtocolError(f"model {model.name} version {model.version} gives NaN or infinity for this input: "
                                "its values are far outside what the model was trained on (preprocess as the "
                                "manifest says: (pixel / 255 - mean) / std)")
        return result

    def after_batch(self, name: str, version: int, labels: list[str]):
        """What runs in a version's model thread after each batch: its predictions, logged in one write."""
        keep = self.config.store.keep_images
        # The stored top-k is JSON text, written here directly: a dict per class and json.dumps per row cost more
        # than the rest of the row, in the thread that must hand the GIL back to the event loop quickly.
        entries = [f'{{"label":{json.dumps(label)},"index":{c},"probability":' for c, label in enumerate(labels)]
        store_seconds = self.metrics.child(self.metrics.store, name, str(version))

        def log_batch(x: np.ndarray, out: np.ndarray, metas: list, queues: list[float], compute: float):
            finite = np.isfinite(out).all(axis=1)
            with np.errstate(invalid="ignore", over="ignore"):  # rows that are not finite are not logged
                probs = softmax(out.astype(np.float32, copy=True))
            best = np.argsort(-probs, axis=1, kind="stable")[:, :min(_STORED_TOP_K, probs.shape[1])]
            now, rows, extras, row = time.time(), [], [], 0
            npy_header = _npy(x[0])[:-x[0].nbytes] if keep else b""  # every row has the same dtype and shape
            for meta, queue in zip(metas, queues):
                n = meta.images
                if not finite[row:row + n].all():  # not logged: the request gets a 400
                    extras.append(None)
                    row += n
                    continue
                ids = prediction_ids(n)
                for pid, j in zip(ids, range(row, row + n)):
                    top = "[" + ",".join(f"{entries[c]}{float(probs[j, c])!r}}}" for c in best[j]) + "]"
                    data = x[j].tobytes()
                    image = meta.image if meta.image is not None else (npy_header + data if keep else None)
                    digest = meta.digest or _sha256(data)
                    rows.append(PredictionRecord(pid, name, version, now, digest, top,
                                                 meta.before_ms + (queue + compute) * 1e3, queue * 1e3, compute * 1e3,
                                                 meta.endpoint, image, meta.image_format or "npy"))
                extras.append(ids)
                row += n
            if not rows:
                return extras, None
            started = time.perf_counter()
            pending = self.store.submit_predictions(rows)
            pending.add_done_callback(lambda _: store_seconds.observe(time.perf_counter() - started))
            return extras, pending

        return log_batch

    async def infer(self, scope: dict, headers: Headers, body: bytes, name: str,
                    version: int | None) -> tuple[bytes, dict[str, str]]:
        """POST /v2/models/{name}[/versions/{version}]/infer, after auth and with the body read."""
        started = time.perf_counter()
        model = self.acquire(scope, name, version)
        try:
            header = headers.get(HEADER_LENGTH)
            max_images = self.limits.max_images_per_request
            if len(body) > _OFF_LOOP_BYTES:
                async with self.big_bodies:  # a JSON tensor takes ~10x its size in memory while parsed
                    parsed = await asyncio.to_thread(parse_infer, body, header, model.spec, max_images)
            else:
                parsed = parse_infer(body, header, model.spec, max_images)
            meta = Meta("infer", len(parsed.array), (time.perf_counter() - started) * 1e3)
            result = await self.run(model, parsed.array, meta)
        finally:
            self.repository.release(model)
        return encode_infer(model.name, model.version, parsed, result.output, model.labels,
                            {"prediction_ids": ",".join(result.extra)})

    async def explain_off_loop(self, model: ModelVersion, work: Callable, *args):
        """work(*args) in a worker thread, in one of the explain slots. The slot and the model version stay held
        until the thread ends, even when the request times out first: a thread cannot be stopped, and the slots
        are what bounds the cores explanations take from inference."""
        if self.explain_slots.locked() and self.explain_waiting >= self.config.explain.max_waiting:
            limit = self.config.explain.max_waiting
            raise Unavailable(f"the server is explaining as many images as it may ({self.config.explain.max_concurrent}"
                              f" at once, {limit} waiting: explain.max_concurrent, explain.max_waiting); retry later")
        self.explain_waiting += 1
        try:
            await self.explain_slots.acquire()
        finally:
            self.explain_waiting -= 1
        self.repository.hold(model)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, work, *args)
        except BaseException:
            self.explain_slots.release()
            self.repository.release(model)
            raise

        def done(finished: asyncio.Future) -> None:
            self.explain_slots.release()
            self.repository.release(model)
            if not finished.cancelled():
                finished.exception()  # retrieved: the request that timed out has answered already

        future.add_done_callback(done)
        return await asyncio.shield(future)

    async def _read_and_infer(self, scope: dict, receive, headers: Headers, name: str, version: int | None):
        body = await self.body(headers, _chunks(receive))  # within the timeout: a slow sender gets a 504 too
        return await self.infer(scope, headers, body, name, version)

    async def infer_asgi(self, scope: dict, receive, send, name: str, version: str | None) -> None:
        """The protocol's hot path as a plain ASGI handler: no router, no framework request objects."""
        headers = Headers(scope=scope)
        try:
            self.check(headers)
            number = parse_version(version) if version is not None else None
            reply, reply_headers = await self.with_timeout(self._read_and_infer(scope, receive, headers, name, number))
            status = 200
            raw_headers = [(key.encode(), value.encode()) for key, value in reply_headers.items()]
            raw_headers.append((b"content-length", str(len(reply)).encode()))
        except Exception as err:  # noqa: BLE001 - every failure becomes the protocol's {"error"} answer
            response = self.error_response(err, scope["path"])
            status, reply, raw_headers = response.status_code, response.body, response.raw_headers
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": reply})

    def error_response(self, err: Exception, path: str) -> Response:
        if isinstance(err, UserError):
            status = (404 if isinstance(err, UnknownPrediction) else 503 if isinstance(err, StoreError)
                      else getattr(err, "status", 400))
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return _error(status, str(err).splitlines()[0] if str(err) else type(err).__name__, headers)
        self.log("error: unexpected failure on " + path + "\n" + "".join(traceback.format_exception(err)))
        return _error(500, "internal error; the server log has the details")

    async def with_timeout(self, work):
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(work, self.limits.request_timeout_s)
            async with _timeout(self.limits.request_timeout_s):  # no extra task per request
                return await work
        except asyncio.TimeoutError:
            raise ProtocolError(f"no answer within {self.limits.request_timeout_s:g} s "
                                "(limits.request_timeout_s); the server is overloaded, retry later", 504) from None


@dataclass(frozen=True)
class Meta:
    """What the prediction log needs about one request, handed through its batch to the model thread."""

    endpoint: str
    images: int
    before_ms: float                  # arrival to the batcher: body, decoding, checks
    image: bytes | None = None        # the encoded image (classify); None: the tensor rows, as .npy
    image_format: str | None = None
    digest: str | None = None         # sha256 of the encoded image; None: of each tensor row


async def _chunks(receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client went away before sending the whole body", 400)
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _same(given: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected.encode())


def _access_log(target: str):
    if target == "off":
        return None
    if target == "-":
        return sys.stderr
    try:
        return open(target, "a", buffering=1)  # noqa: SIM115 - kept open for the server's life
    except OSError as err:
        raise UserError(f"cannot open the access log {target} ({err.strerror}); fix access_log") from None


def prediction_ids(n: int) -> list[str]:
    """n new ids, 32 hex digits: the time in ns, then 64 random bits. Ids that grow with time go in at the end of
    the database's index (random ones, like uuid4's, land all over it: writes were half as fast)."""
    now, noise = time.time_ns(), os.urandom(8 * n).hex()
    return [f"{now + i:016x}{noise[16 * i:16 * i + 16]}" for i in range(n)]


def _sha256(data: bytes) -> str:
    """sha256 in pieces under 2 KiB: hashlib lets go of the GIL for bigger ones, and getting it back from a
    busy event loop costs this thread up to sys.getswitchinterval() (5 ms) each time."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), 2000):
        digest.update(view[start:start + 2000])
    return digest.hexdigest()


def _npy(row: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, row, allow_pickle=False)
    return buffer.getvalue()


# -- the routes ---------------------------------------------------------------------------------------------------

def _routes(app: FastAPI, server: Server) -> None:  # noqa: C901 - one place lists every endpoint
    repo, limits = server.repository, server.limits
    protocol, ours = ["Open Inference Protocol v2"], ["tandem"]

    @app.get("/v2/health/live", tags=protocol, summary="200 while the server runs")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=protocol, summary="200 once the models are loaded, else 400")
    async def ready() -> Response:
        return Response(status_code=200 if repo.ready else 400)

    for path, probe in (("/v2/health/live", live), ("/v2/health/ready", ready)):  # load balancers probe with HEAD
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/v2", tags=protocol, summary="server metadata")
    async def server_metadata() -> Response:
        return _json({"name": "tandem", "version": tandem.__version__, "extensions": EXTENSIONS})

    def metadata(model: ModelVersion, versions: list[int]) -> dict:
        return {"name": model.name, "versions": [str(v) for v in versions], "platform": "onnxruntime_onnx",
                "inputs": [dict(item) for item in model.manifest["inputs"]],
                "outputs": [dict(item) for item in model.manifest["outputs"]],
                "parameters": {"labels": ",".join(model.labels)}}

    @app.get("/v2/models/{model}", tags=protocol, summary="model metadata (latest version)")
    async def model_metadata(request: Request, model: str) -> Response:
        server.check(request.headers)
        found = repo.get(model)
        return _json(metadata(found, sorted(repo.versions(model))))

    @app.get("/v2/models/{model}/versions/{version}", tags=protocol, summary="model metadata")
    async def version_metadata(request: Request, model: str, version: str) -> Response:
        server.check(request.headers)
        found = repo.get(model, parse_version(version))
        return _json(metadata(found, [found.version]))

    @app.get("/v2/models/{model}/ready", tags=protocol, summary="200 when the model can run")
    async def model_ready(request: Request, model: str) -> Response:
        server.check(request.headers)
        repo.get(model)
        return Response(status_code=200)

    @app.get("/v2/models/{model}/versions/{version}/ready", tags=protocol, summary="200 when the version can run")
    async def version_ready(request: Request, model: str, version: str) -> Response:
        server.check(request.headers)
        repo.get(model, parse_version(version))
        return Response(status_code=200)

    @app.post("/v2/repository/index", tags=protocol, summary="every model and version in the repository (admin)")
    async def repository_index(request: Request) -> Response:
        server.check(request.headers, admin=True)
        body = await server.json_body(request)
        rows = repo.index()
        if body.get("ready") is True:
            rows = [row for row in rows if row["state"] == "READY"]
        return _json(rows)

    @app.post("/v2/repository/models/{model}/load", tags=protocol,
              summary="load or reload a model (admin); parameters.versions=[n] pins versions, for a rollback")
    async def repository_load(request: Request, model: str) -> Response:
        server.check(request.headers, admin=True)
        check_model_name(model)
        params = (await server.json_body(request)).get("parameters") or {}
        versions = params.get("versions") if isinstance(params, dict) else None
        if versions is not None:
            if isinstance(versions, str):  # tritonclient sends parameter values as given; allow "1,2"
                versions = [parse_version(v) for v in versions.split(",") if v.strip()]
            elif isinstance(versions, int) and not isinstance(versions, bool):
                versions = [parse_version(versions)]
            elif isinstance(versions, list) and versions:
                versions = [parse_version(v) for v in versions]
            else:
                raise ProtocolError("parameters.versions must be a version number, a list of them, or \"1,2\"")
        loaded = await repo.load(model, versions)
        server.metrics.set_loaded(repo.loaded())
        server.log(f"model {model}: loaded version(s) {', '.join(map(str, loaded))} on request")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload", tags=protocol, summary="unload a model (admin)")
    async def repository_unload(request: Request, model: str) -> Response:
        server.check(request.headers, admin=True)
        await server.json_body(request)
        await repo.unload(model)
        server.metrics.set_loaded(repo.loaded())
        return Response(status_code=200)

    # -- tandem's own endpoints --------------------------------------------------------------------------------
    @app.get("/v1/models", tags=ours, summary="the loaded models with their versions and labels")
    async def list_models(request: Request) -> Response:
        server.check(request.headers)
        models = []
        for name, versions in sorted(repo.loaded().items()):
            latest = versions[max(versions)]
            models.append({"name": name, "versions": sorted(versions), "latest": latest.version,
                           "labels": latest.labels, "input": latest.manifest["inputs"][0],
                           "preprocessing": latest.manifest["preprocessing"]})
        return _json({"models": models})

    classify_body = {"requestBody": {"required": True, "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}}, "required": ["image"]}}}}}

    @app.post("/v1/models/{model}/classify", tags=ours, openapi_extra=classify_body,
              summary="classify one encoded image (raw body, or multipart field 'image'): top-k labels")
    async def classify(request: Request, model: str, top_k: int | None = None, version: int | None = None) -> Response:
        return await server.with_timeout(_classify(request, model, top_k, version))

    async def _classify(request: Request, name: str, top_k: int | None, version: int | None) -> Response:
        server.check(request.headers)
        started = time.perf_counter()
        if version is not None:
            version = parse_version(version)
        data = await server.request_body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data = await _form_image(request)
        model = server.acquire(request.scope, name, version)
        try:
            k = server.config.top_k if top_k is None else top_k
            if k < 1:
                raise ProtocolError(f"top_k must be at least 1, got {k}")
            p = model.predictor
            try:
                pixels, image_format = await asyncio.to_thread(decode_image_bytes, data, p.image_size, p.channels,
                                                               p.resize, limits.max_image_pixels)
            except UserError as err:
                raise ProtocolError(str(err)) from None
            meta = Meta("classify", 1, (time.perf_counter() - started) * 1e3, data, image_format,
                        hashlib.sha256(data).hexdigest())
            result = await server.run(model, preprocess(pixels[None], p.mean, p.std), meta)
        finally:
            repo.release(model)
        latency = {"queue": result.queue_s * 1e3, "compute": result.compute_s * 1e3,
                   "total": (time.perf_counter() - started) * 1e3}
        probs = softmax(result.output.astype(np.float32, copy=True))[0]
        order = np.argsort(-probs, kind="stable")[:min(k, len(probs))]
        return _json({"prediction_id": result.extra[0], "model": model.name, "version": model.version,
                      "top_k": [{"label": model.labels[j], "index": int(j), "probability": float(probs[j])} for j in order],
                      "latency_ms": {key: round(value, 3) for key, value in latency.items()}})

    async def _form_image(request: Request) -> bytes:
        try:
            form = await request.form(max_files=4, max_fields=16)
        except Exception as err:  # noqa: BLE001 - python-multipart raises several types for a malformed body
            raise ProtocolError(f"the multipart body cannot be read ({err}); send the image as the raw body or "
                                "as the multipart field 'image'") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            upload = next((value for value in form.values() if not isinstance(value, str)), None)
        if upload is None:
            raise ProtocolError("the multipart body holds no file; send the image in the field 'image'")
        return await upload.read()

    # -- explanations ------------------------------------------------------------------------------------------
    explain_extra = {**classify_body, "responses": {"200": {
        "description": "the occlusion heatmap of the image (fp32 model, through the runtime) and its rule path",
        "content": {"application/json": {"schema": EXPLAIN_SCHEMA}}}}}

    @app.post("/v2/models/{model}/explain", tags=ours, openapi_extra=explain_extra,
              summary="why: one encoded image's occlusion heatmap and rule path (latest version)")
    async def explain_latest(request: Request, model: str, window: Window = None, stride: Stride = None,
                             target: Target = None) -> Response:
        return await server.with_timeout(_explain(request, model, None, window, stride, target))

    @app.post("/v2/models/{model}/versions/{version}/explain", tags=ours, openapi_extra=explain_extra,
              summary="why: one encoded image's occlusion heatmap and rule path (one version)")
    async def explain_version(request: Request, model: str, version: str, window: Window = None,
                              stride: Stride = None, target: Target = None) -> Response:
        return await server.with_timeout(_explain(request, model, parse_version(version), window, stride, target))

    async def _explain(request: Request, name: str, version: int | None, window: int | None, stride: int | None,
                       target: str | None) -> Response:
        server.check(request.headers)
        started = time.perf_counter()
        settings = server.config.explain
        if not settings.enabled:
            raise ProtocolError(EXPLAIN_OFF, 403)
        limit = min(settings.max_image_bytes or limits.max_body_bytes, limits.max_body_bytes)
        try:
            data = await server.request_body(request, limit)
        except ProtocolError as err:
            if err.status != 413:
                raise
            key = "explain.max_image_bytes" if limit == settings.max_image_bytes else "limits.max_body_bytes"
            raise ProtocolError(f"the image is larger than this server explains ({limit} bytes: {key}); send a "
                                "smaller image", 413) from None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data = await _form_image(request)
        model = server.acquire(request.scope, name, version)
        try:
            p = model.predictor
            window, stride, windows = occlusion_window(p.image_size, window, stride, settings.max_windows)
            index = target_index(model.labels, target)
            try:
                pixels, _ = await asyncio.to_thread(decode_image_bytes, data, p.image_size, p.channels, p.resize,
                                                    min(limits.max_image_pixels,
                                                        settings.max_image_pixels or limits.max_image_pixels))
            except UserError as err:
                raise ProtocolError(str(err)) from None

            def observe(part: str, seconds: float) -> None:
                server.metrics.observe_explain(model.name, model.version, part, seconds)

            body = await server.explain_off_loop(model, explain_image, model, pixels, index, window, stride, windows,
                                                 started, observe, _STORED_TOP_K)
        finally:
            repo.release(model)
        return Response(body, 200, media_type="application/json")

    png_response = {"response_class": Response, "responses": {200: {
        "description": "a PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}}

    @app.get("/v2/models/{model}/concepts/{concept}", tags=ours, **png_response,
             summary="a concept's prototype strip: the training images that show it most (latest version)")
    async def prototype_latest(request: Request, model: str, concept: int) -> Response:
        return await server.with_timeout(_prototype(request, model, None, concept))

    @app.get("/v2/models/{model}/versions/{version}/concepts/{concept}", tags=ours, **png_response,
             summary="a concept's prototype strip: the training images that show it most (one version)")
    async def prototype_version(request: Request, model: str, version: str, concept: int) -> Response:
        return await server.with_timeout(_prototype(request, model, parse_version(version), concept))

    async def _prototype(request: Request, name: str, version: int | None, concept: int) -> Response:
        server.check(request.headers)
        if not server.config.explain.enabled:
            raise ProtocolError(EXPLAIN_OFF, 403)
        model = server.acquire(request.scope, name, version)
        try:
            rules, reason = await asyncio.to_thread(model.rules)
            if rules is None:
                raise NotFound(reason)
            png = await asyncio.to_thread(prototype_png, rules, concept, model)
        finally:
            repo.release(model)
        return Response(png, 200, media_type="image/png")

    feedback_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["prediction_id", "label"],
        "properties": {"prediction_id": {"type": "string"}, "label": {"type": "string"}}}}}}}

    @app.post("/v1/models/{model}/feedback", tags=ours, openapi_extra=feedback_body,
              summary="the true label of an earlier prediction (stored with its image, for learning)")
    async def feedback(request: Request, model: str) -> Response:
        server.check(request.headers)
        body = await server.json_body(request)
        pid, label = body.get("prediction_id"), body.get("label")
        if not isinstance(pid, str) or not pid or not isinstance(label, str) or not label:
            raise ProtocolError("send JSON {\"prediction_id\": \"...\", \"label\": \"...\"}")
        check_model_name(model)
        found = await asyncio.to_thread(server.store.prediction, pid) if len(pid) <= 64 else None
        if found is None or found["model"] != model:
            raise NotFound(f"model {model} made no prediction {pid!r}; send the prediction_id that classify or "
                           "infer returned")
        labels = repo.labels(model, found["version"])  # the labels of the version that made the prediction
        if label not in labels:
            raise ProtocolError(f"label {label!r} is not one of model {model}'s labels: {', '.join(labels)}")
        feedback_id, stored = await server.with_timeout(server.store.add_feedback(pid, label, model))
        return _json({"feedback_id": feedback_id, "prediction_id": pid, "label": label, "image_stored": stored})

    @app.get("/v1/feedback", tags=ours, summary="feedback received, oldest first (admin)")
    async def list_feedback(request: Request, model: str | None = None, limit: int = 100, after: int = 0) -> Response:
        server.check(request.headers, admin=True)
        if model is not None:
            check_model_name(model)
        if not 1 <= limit <= 1000 or after < 0:
            raise ProtocolError("limit must be 1 to 1000 and after at least 0")
        rows = await asyncio.to_thread(server.store.feedback, model, limit, after)
        return _json({"feedback": rows})

    @app.get("/v1/feedback/{feedback_id}/image", tags=ours, summary="the image stored with a feedback (admin)")
    async def feedback_image(request: Request, feedback_id: int) -> Response:
        server.check(request.headers, admin=True)
        found = await asyncio.to_thread(server.store.feedback_image, feedback_id)
        if found is None:
            raise NotFound(f"feedback {feedback_id} has no stored image")
        data, image_format = found
        media = "application/octet-stream" if image_format in (None, "npy") else f"image/{image_format.lower()}"
        return Response(data, 200, media_type=media)

    @app.get("/metrics", tags=ours, summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        if server.config.auth.protect_metrics:
            server.check(request.headers, admin=True)
        return Response(server.metrics.render(), 200, media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/", methods=["GET", "HEAD"], tags=ours, summary="the web page", include_in_schema=False)
    async def page() -> Response:
        if server.page is None:
            raise NotFound("the web page is not installed with this tandem")
        return Response(server.page, 200, media_type="text/html; charset=utf-8")


# -- errors and the access log ----------------------------------------------------------------------------------------

def _handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> Response:
        return server.error_response(err, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message = {404: f"no such endpoint {request.url.path}; see /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json"}.get(err.status_code, str(err.detail))
        return _error(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        server.log("error: unexpected failure on " + request.url.path + "\n" + "".join(traceback.format_exception(err)))
        return _error(500, "internal error; the server log has the details")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, saying what the server really does: bearer tokens, and errors as {"error"} with a 4xx
    (never FastAPI's 422 validation body)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # Infer is served by _Front, outside the router: described here by hand.
    tensors = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object"}}, "outputs": {"type": "array", "items": {"type": "object"}}}}
    body = {"required": True, "content": {"application/json": {"schema": tensors},
                                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    ok = {"200": {"description": "the outputs (JSON, or a JSON header and binary tensors: the binary extension)",
                  "content": {"application/json": {"schema": {"type": "object"}}}}}

    def operation(summary: str, params: list[str]) -> dict:
        return {"post": {"tags": ["Open Inference Protocol v2"], "summary": summary, "requestBody": body,
                         "operationId": summary.replace(" ", "_"), "responses": dict(ok),
                         "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                        for p in params]}}

    schema["paths"]["/v2/models/{model}/infer"] = operation("run the latest version", ["model"])
    schema["paths"]["/v2/models/{model}/versions/{version}/infer"] = operation("run one version", ["model", "version"])
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "TANDEM_TOKEN (inference) or TANDEM_ADMIN_TOKEN"}}
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    schema["security"] = [{"bearer": []}, {}]
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = {"description": "bad request (400), token (401, 403), not found (404), body too "
                                               "large (413), unsupported encoding (415)", **error}
            responses["5XX"] = {"description": "model not available now (503), timeout (504)", **error}
    app.openapi_schema = schema
    return schema


_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class _Front:
    """Pure ASGI middleware: protocol infer requests go straight to Server.infer_asgi (the hot path, no
    router); everything else to FastAPI. One JSON access-log line and the request metrics for each."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, sent = [500], [0]

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        infer = _INFER.fullmatch(scope["path"])
        try:
            if infer is not None and scope["method"] != "POST":
                response = _error(405, f"{scope['method']} is not allowed on {scope['path']}; infer takes POST",
                                  {"Allow": "POST"})
                await response(scope, receive, capture)
            elif infer is not None:
                await self.server.infer_asgi(scope, receive, capture, infer.group(1), infer.group(2))
            else:
                await self.app(scope, receive, capture)
        finally:
            seconds = time.perf_counter() - started
            if infer is not None:
                endpoint = "infer_latest" if infer.group(2) is None else "infer_version"
            else:
                endpoint = getattr(scope.get("route"), "name", None) or "unknown"
            model, version = scope.get("tandem.model", ("", ""))
            self.server.metrics.observe_request(endpoint, model, version, status[0], seconds)
            if self.server.access_log is not None:
                client = scope.get("client") or ("", 0)
                line = {"time": round(time.time(), 3), "client": client[0], "method": scope["method"],
                        "path": scope["path"], "status": status[0], "ms": round(seconds * 1e3, 3),
                        "endpoint": endpoint, "model": model or None, "version": version or None, "bytes_out": sent[0]}
                self.server.access_log.write(json.dumps(line, separators=(",", ":")) + "\n")


class _App(FastAPI):
    """FastAPI with _Front outermost: the protocol's infer requests skip FastAPI's middleware stack too."""

    def build_middleware_stack(self):
        return _Front(super().build_middleware_stack(), self.state.server)


def create_app(repo: str | Path, config: ServeConfig | None = None, log: Callable[[str], None] | None = None) -> FastAPI:
    """The server for a model repository; models load when the app starts (its lifespan)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"model repository {repo} is not a folder; make one with "
                        f"`tandem export RUN --repo {repo} --name NAME`")
    config = config or ServeConfig()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    server = Server(repo, config, log)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.store.start()
        await server.repository.load_all()
        server.metrics.set_loaded(server.repository.loaded())
        gc.collect()
        gc.freeze()  # what start-up made lives as long as the server: full collections need not walk it again
        if not server.repository.loaded():
            log(f"warning: no model loaded from {repo}; add one with `tandem export RUN --repo {repo} --name NAME`, "
                "then POST /v2/repository/models/NAME/load")
        try:
            yield
        finally:
            try:
                await server.repository.close()
            finally:
                await asyncio.to_thread(server.store.close)  # writes what is queued; blocks, so off the loop

    app = _App(title="tandem serve", version=tandem.__version__, lifespan=lifespan, redoc_url=None, docs_url=None,
                  description="Open Inference Protocol v2 (KServe v2, Triton) over a repository of tandem bundles, "
                              "plus images in, labels out, explanations, feedback, and metrics.")
    app.state.server = server
    _routes(app, server)
    app.openapi = lambda: _openapi(app)
    _handlers(app, server)
    return app


def serve(repo: str | Path, config: ServeConfig) -> None:
    """Run the server until interrupted (what `tandem serve` does)."""
    import uvicorn

    sock = _listen(config.host, config.port)  # before the models load: a taken port is a one-line error
    app = create_app(repo, config)
    where = f"http://{config.host}:{sock.getsockname()[1]}"
    print(f"tandem serve: {repo} on {where} (web page {where}/, API {where}/openapi.json); store {app.state.server.store.display_url}; "
          f"inference {'needs a token' if app.state.server.protect_inference else 'open'}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False,
                                           timeout_graceful_shutdown=10, server_header=False))
    server.run(sockets=[sock])


def _listen(host: str, port: int):
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host") from None
    return sock

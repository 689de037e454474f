"""Every endpoint of the server, in one list: `add_routes` below, from the health probes to the web page. The
protocol's infer endpoints are in it too, as FastRoutes: the ASGI front (serve/front.py) runs them before the
router, the hot path. The work behind them: serve/server.py (bodies, running a version, errors), the Predictor
(decode, preprocess, rank), serve/explain.py. Torch-free.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated

from fastapi import FastAPI, Query, Request
from starlette.responses import Response

import tandem
from tandem.errors import UserError
from tandem.serve.config import check_model_name
from tandem.serve.explain import (EXPLAIN_OFF, EXPLAIN_SCHEMA, explain_image, occlusion_window, prototype_png,
                                  target_index)
from tandem.serve.front import FastRoute, json_response
from tandem.serve.metrics import CONTENT_TYPE_LATEST
from tandem.serve.predlog import STORED_TOP_K, Meta
from tandem.serve.protocol import NotFound, ProtocolError
from tandem.serve.repository import ModelVersion, parse_version
from tandem.serve.server import Server

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
# The explain endpoints' query parameters (module level: FastAPI resolves the annotations in the module's names).
Window = Annotated[int | None, Query(description="occlusion window, in pixels of the model's input (default: about "
                                                 "a seventh of its side, 4 at 28)")]
Stride = Annotated[int | None, Query(description="occlusion stride, 1 to window (default: half the window)")]
Target = Annotated[str | None, Query(description="the class to explain, a label or an index (default: the "
                                                 "predicted class)")]



class _Infer:
    """POST /v2/models/{model}[/versions/{version}]/infer as a plain ASGI endpoint (no framework request objects)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        params = scope["path_params"]
        await self.server.infer_asgi(scope, receive, send, params["model"], params.get("version"))


def add_routes(app: FastAPI, server: Server) -> None:  # noqa: C901 - one place lists every endpoint
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
        return json_response({"name": "tandem", "version": tandem.__version__, "extensions": EXTENSIONS})

    def metadata(model: ModelVersion, versions: list[int]) -> dict:
        return {"name": model.name, "versions": [str(v) for v in versions], "platform": "onnxruntime_onnx",
                "inputs": [dict(item) for item in model.manifest["inputs"]],
                "outputs": [dict(item) for item in model.manifest["outputs"]],
                "parameters": {"labels": ",".join(model.labels)}}

    @app.get("/v2/models/{model}", tags=protocol, summary="model metadata (latest version)")
    async def model_metadata(request: Request, model: str) -> Response:
        server.check(request.headers)
        found = repo.get(model)
        return json_response(metadata(found, sorted(repo.versions(model))))

    @app.get("/v2/models/{model}/versions/{version}", tags=protocol, summary="model metadata")
    async def version_metadata(request: Request, model: str, version: str) -> Response:
        server.check(request.headers)
        found = repo.get(model, parse_version(version))
        return json_response(metadata(found, [found.version]))

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

    # The protocol's inference, run by the front before the router (the hot path; described in serve/openapi.py).
    app.router.routes.append(FastRoute("/v2/models/{model}/infer", _Infer(server), name="infer_latest"))
    app.router.routes.append(FastRoute("/v2/models/{model}/versions/{version}/infer", _Infer(server),
                                       name="infer_version"))

    @app.post("/v2/repository/index", tags=protocol, summary="every model and version in the repository (admin)")
    async def repository_index(request: Request) -> Response:
        server.check(request.headers, admin=True)
        body = await server.json_body(request)
        rows = repo.index()
        if body.get("ready") is True:
            rows = [row for row in rows if row["state"] == "READY"]
        return json_response(rows)

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
        return json_response({"models": models})

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
                pixels, image_format = await asyncio.to_thread(p.decode, data, limits.max_image_pixels)
            except UserError as err:
                raise ProtocolError(str(err)) from None
            meta = Meta("classify", 1, (time.perf_counter() - started) * 1e3, data, image_format,
                        hashlib.sha256(data).hexdigest())
            result = await server.run(model, p.preprocess(pixels[None]), meta)
        finally:
            repo.release(model)
        latency = {"queue": result.queue_s * 1e3, "compute": result.compute_s * 1e3,
                   "total": (time.perf_counter() - started) * 1e3}
        best = model.predictor.rank(result.output, k)[0]
        return json_response({"prediction_id": result.extra[0], "model": model.name, "version": model.version,
                              "top_k": [{"label": c.label, "index": c.index, "probability": c.probability} for c in best],
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
                pixels, _ = await asyncio.to_thread(p.decode, data, min(limits.max_image_pixels,
                                                                        settings.max_image_pixels or limits.max_image_pixels))
            except UserError as err:
                raise ProtocolError(str(err)) from None

            def observe(part: str, seconds: float) -> None:
                server.metrics.observe_explain(model.name, model.version, part, seconds)

            body = await server.explain_off_loop(model, explain_image, model, pixels, index, window, stride, windows,
                                                 started, observe, STORED_TOP_K)
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
        return json_response({"feedback_id": feedback_id, "prediction_id": pid, "label": label, "image_stored": stored})

    @app.get("/v1/feedback", tags=ours, summary="feedback received, oldest first (admin)")
    async def list_feedback(request: Request, model: str | None = None, limit: int = 100, after: int = 0) -> Response:
        server.check(request.headers, admin=True)
        if model is not None:
            check_model_name(model)
        if not 1 <= limit <= 1000 or after < 0:
            raise ProtocolError("limit must be 1 to 1000 and after at least 0")
        rows = await asyncio.to_thread(server.store.feedback, model, limit, after)
        return json_response({"feedback": rows})

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


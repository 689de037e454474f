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

The parts: routes.py (every endpoint, in one list), front.py (the ASGI front, the access log), server.py
(what the routes share), auth.py, predlog.py (the prediction log), openapi.py; here, the app and its launch.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import traceback
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import tandem
from tandem.errors import UserError
from tandem.serve.config import ServeConfig
from tandem.serve.front import App, error
from tandem.serve.openapi import openapi
from tandem.serve.routes import add_routes
from tandem.serve.server import Server


def _handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(UserError)
    async def usererror(request: Request, err: UserError) -> Response:
        return server.error_response(err, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def httperror(request: Request, err: StarletteHTTPException) -> Response:
        message = {404: f"no such endpoint {request.url.path}; see /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json"}.get(err.status_code, str(err.detail))
        return error(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        server.log("error: unexpected failure on " + request.url.path + "\n" + "".join(traceback.format_exception(err)))
        return error(500, "internal error; the server log has the details")



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

    app = App(title="tandem serve", version=tandem.__version__, lifespan=lifespan, redoc_url=None, docs_url=None,
              description="Open Inference Protocol v2 (KServe v2, Triton) over a repository of tandem bundles, "
                          "plus images in, labels out, explanations, feedback, and metrics.")
    app.state.server = server
    add_routes(app, server)
    app.openapi = lambda: openapi(app)
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

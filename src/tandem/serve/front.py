"""The ASGI front: what every request passes first. It runs the protocol's infer endpoints itself (the hot path:
no router, no FastAPI middleware), hands the rest to FastAPI, and writes one JSON access-log line and the request
metrics for each. Also the plain answers every part gives: {"error": ...} and compact JSON. Torch-free.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import Match, Route

from tandem.errors import UserError


def error(status: int, message: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": message}).encode()
    return Response(body, status, headers=headers, media_type="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status, media_type="application/json")


def open_access_log(target: str):
    if target == "off":
        return None
    if target == "-":
        return sys.stderr
    try:
        return open(target, "a", buffering=1)  # noqa: SIM115 - kept open for the server's life
    except OSError as err:
        raise UserError(f"cannot open the access log {target} ({err.strerror}); fix access_log") from None


class FastRoute(Route):
    """A route in the app's one list of endpoints that the front runs itself, before the router; its endpoint is
    a plain ASGI callable reading scope["path_params"]. Any method but POST gets the front's 405."""

    def __init__(self, path: str, endpoint: Any, name: str) -> None:
        super().__init__(path, endpoint, methods=["POST"], name=name, include_in_schema=False)

    def matches(self, scope) -> tuple[Match, dict]:
        return Match.NONE, {}  # the front runs it or nobody: the router's looser match ("$" before a newline) never


class Front:
    """Pure ASGI middleware, outermost: FastRoutes first, everything else to FastAPI; the access log and metrics."""

    def __init__(self, app, server, routes: list) -> None:
        self.app, self.server = app, server
        self.fast = [route for route in routes if isinstance(route, FastRoute)]

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

        fast, found = None, None
        for route in self.fast:
            found = route.path_regex.fullmatch(scope["path"])
            if found is not None:
                fast = route
                break
        try:
            if fast is not None:
                scope["route"], scope["path_params"] = fast, found.groupdict()
            if fast is not None and scope["method"] != "POST":
                response = error(405, f"{scope['method']} is not allowed on {scope['path']}; infer takes POST",
                                 {"Allow": "POST"})
                await response(scope, receive, capture)
            elif fast is not None:
                await fast.endpoint(scope, receive, capture)
            else:
                await self.app(scope, receive, capture)
        finally:
            seconds = time.perf_counter() - started
            endpoint = getattr(scope.get("route"), "name", None) or "unknown"
            model, version = scope.get("tandem.model", ("", ""))
            self.server.metrics.observe_request(endpoint, model, version, status[0], seconds)
            if self.server.access_log is not None:
                client = scope.get("client") or ("", 0)
                line = {"time": round(time.time(), 3), "client": client[0], "method": scope["method"],
                        "path": scope["path"], "status": status[0], "ms": round(seconds * 1e3, 3),
                        "endpoint": endpoint, "model": model or None, "version": version or None, "bytes_out": sent[0]}
                self.server.access_log.write(json.dumps(line, separators=(",", ":")) + "\n")


class App(FastAPI):
    """FastAPI with the Front outermost: the fast routes skip FastAPI's middleware stack too."""

    def build_middleware_stack(self):
        return Front(super().build_middleware_stack(), self.state.server, self.router.routes)

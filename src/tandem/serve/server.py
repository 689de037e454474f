"""What the routes share: the repository, the store, the metrics, the auth and the limits; reading bodies within
them, running a model version (the protocol's infer too), explanations' worker slots, and the one mapping of a
failure to its {"error"} answer. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np
from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import Response

from tandem.errors import UserError
from tandem.serve.auth import Auth
from tandem.serve.config import ServeConfig
from tandem.serve.database import NotFound as UnknownPrediction
from tandem.serve.database import StoreError
from tandem.serve.front import error, open_access_log
from tandem.serve.metrics import Metrics
from tandem.serve.predlog import Meta, batch_logger
from tandem.serve.protocol import (HEADER_LENGTH, ProtocolError, Unavailable, decompress, encode_infer, json_object,
                                   parse_infer)
from tandem.serve.repository import ModelVersion, Repository, parse_version
from tandem.serve.store import Store

_timeout = getattr(asyncio, "timeout", None)
JSON_LIMIT = 1 << 16  # feedback and repository requests are small
_OFF_LOOP_BYTES = 1 << 16  # bigger infer bodies are parsed in a thread, not on the event loop


class Server:
    """What the routes share: the repository, the store, the metrics, the tokens and the limits."""

    def __init__(self, repo: Path, config: ServeConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.metrics = Metrics()
        self.repository = Repository(repo, config, on_batch=self.metrics.observe_batch, log=log, after=self.after_batch)
        self.auth = Auth(config.auth)
        self.protect_inference = self.auth.protect_inference
        self.store = Store(config.store.url, keep_images=config.store.keep_images,
                           max_image_bytes=config.store.max_image_bytes,
                           image_cache_bytes=config.store.image_cache_bytes, sync=config.store.sync)
        self.limits = config.limits
        self.access_log = open_access_log(config.access_log)
        self.big_bodies = asyncio.Semaphore(2)  # large bodies parsed at once: bounds the memory they take
        self.explain_slots = asyncio.Semaphore(config.explain.max_concurrent)
        self.explain_waiting = 0
        page = resources.files("tandem.serve").joinpath("static/index.html")
        self.page = page.read_bytes() if page.is_file() else None

    def check(self, headers: Headers, admin: bool = False) -> None:
        """A 401 or 403 unless the request carries the token the endpoint needs (serve/auth.py)."""
        self.auth.check(headers, admin)

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
        raw = await self.request_body(request, JSON_LIMIT)
        return json_object(raw, "the body") if raw.strip() else {}

    # -- running models ---------------------------------------------------------------------------------------
    def acquire(self, scope: dict, name: str, version: int | None) -> ModelVersion:
        """The version to run (held until repository.release); failures from here on count against it."""
        model = self.repository.acquire(name, version)
        scope["tandem.model"] = (model.name, str(model.version))
        return model

    async def run(self, model: ModelVersion, x: np.ndarray, meta: Meta):
        """Run x in the model's next batch; the answer comes once its predictions are committed to the log."""
        result = await model.batcher.submit(x, meta)
        self.metrics.observe_run(model.name, model.version, result.queue_s, result.compute_s)
        if result.extra is None:
            raise ProtocolError(f"model {model.name} version {model.version} gives NaN or infinity for this input: "
                                "its values are far outside what the model was trained on (preprocess as the "
                                "manifest says: (pixel / 255 - mean) / std)")
        return result


    def after_batch(self, name: str, version: int, labels: list[str]):
        """What runs in a version's model thread after each batch: its predictions, logged (serve/predlog.py)."""
        return batch_logger(self.store, self.metrics, self.config.store.keep_images, name, version, labels)

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
            return error(status, str(err).splitlines()[0] if str(err) else type(err).__name__, headers)
        self.log("error: unexpected failure on " + path + "\n" + "".join(traceback.format_exception(err)))
        return error(500, "internal error; the server log has the details")

    async def with_timeout(self, work):
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(work, self.limits.request_timeout_s)
            async with _timeout(self.limits.request_timeout_s):  # no extra task per request
                return await work
        except asyncio.TimeoutError:
            raise ProtocolError(f"no answer within {self.limits.request_timeout_s:g} s "
                                "(limits.request_timeout_s); the server is overloaded, retry later", 504) from None



async def _chunks(receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client went away before sending the whole body", 400)
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


"""The prediction log and the feedback it gets, in SQLite (default) or PostgreSQL. Torch-free.

    store = Store("sqlite:///tandem-serve.sqlite")   # or a plain path, or "postgresql://user@host:5432/db"
    store.start()                                     # the one writer thread
    await store.add_predictions([PredictionRecord(id, "animals", 2, time.time(), digest, top_k, 3.1, 0.4, 2.7,
                                                  "classify", image_bytes, "png")])   # returns once committed
    feedback_id, image_stored = await store.add_feedback(id, "zebra", "animals")     # NotFound: no such prediction
    store.feedback(model="animals", limit=100, after=0); store.feedback_image(feedback_id); store.prediction(id)
    store.close()                                     # writes what is queued, then stops the writer

Writes never run on the event loop: one writer thread takes everything queued, writes it in one transaction
(group commit), commits, then resolves every waiter, so an awaited write is durable. SQLite runs in WAL mode
with synchronous=NORMAL, which survives a killed process (sync="full" also survives a power loss); on
PostgreSQL a commit is durable. A failed write fails only its own waiters (`StoreError`); the writer goes on.
Inputs are kept in a bounded in-memory cache (oldest evicted) and written only when feedback arrives for them.
The schema carries a version (`SCHEMA_VERSION`); a database written by a newer tandem is refused. The tables,
URLs, engine and schema: serve/database.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from tandem.errors import UserError
from tandem.serve.database import (NotFound, StoreError, connection_problem, create_engine, create_schema, database_url,
                                   feedback_table, one_line, predictions,
                                   schema_version_table)

SYNC_MODES = ("normal", "full")
MAX_FEEDBACK_PAGE = 1000
_MAX_BATCH = 4096  # requests per transaction: bounds one transaction, not the throughput
_MAX_ID = 2**31 - 1  # feedback ids are 32-bit integers on PostgreSQL


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction (one image or one batch row). `image`: the input as received (encoded image or .npy)."""

    id: str
    model: str
    version: int
    created: float  # unix time
    input_digest: str
    top_k: list | str  # [{"label", "index", "probability"}, ...], stored as JSON text (a str: already that text)
    latency_ms: float
    queue_ms: float
    compute_ms: float
    endpoint: str
    image: bytes | None = None
    image_format: str | None = None


def _resolve(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # the waiter gave up (cancelled); the write itself happened or failed all the same


class _ImageCache:
    """Inputs by prediction id, bounded by their total size in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._items: OrderedDict[str, tuple[bytes, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, fmt: str | None) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old[0])
            self._items[key] = (bytes(data), fmt)
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self.bytes -= len(evicted)

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def __len__(self) -> int:
        return len(self._items)


class _Request:
    __slots__ = ("kind", "payload", "future")

    def __init__(self, kind: str, payload: Any):
        self.kind, self.payload, self.future = kind, payload, concurrent.futures.Future()


_STOP = object()


class Store:
    """Predictions and feedback in one database; see the module docstring. Readers are thread-safe."""

    def __init__(self, url: str, keep_images: bool = True, max_image_bytes: int = 2_000_000,
                 image_cache_bytes: int = 64 * 1024 * 1024, sync: str = "normal"):
        if sync not in SYNC_MODES:
            raise UserError(f"store.sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.keep_images = bool(keep_images)
        self.max_image_bytes = int(max_image_bytes)
        self.sync = sync
        self.cache = _ImageCache(min(int(image_cache_bytes), 1 << 62) if self.keep_images else 0)
        self.commits = 0  # transactions the writer committed (group commit: usually far fewer than rows)
        self.url = database_url(url)
        self.display_url = self.url.render_as_string(hide_password=True)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.engine = self._create_engine()
        try:
            self._create_schema()
        except BaseException:
            self.engine.dispose()
            raise

    # -- setup ---------------------------------------------------------------------------------------
    def _create_engine(self) -> sa.Engine:
        return create_engine(self.url, self.display_url, self.sync)

    def _create_schema(self) -> None:
        create_schema(self.engine, self.display_url)

    def schema_version(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar()

    # -- the writer ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._closed:
            raise StoreError("the prediction store is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="tandem-store-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Write everything queued, stop the writer, release the connections. Blocks until done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(_STOP)
        if thread is not None:
            thread.join()
        else:  # never started: nothing can have been queued by add_*, which start the writer
            self._drain_without_writer()
        self.engine.dispose()

    def _drain_without_writer(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                _resolve(item.future, error=StoreError("the prediction store is closed"))

    def _submit(self, kind: str, payload: Any) -> concurrent.futures.Future:
        request = _Request(kind, payload)
        with self._lock:
            self._start_locked()
            self._queue.put(request)
        return request.future

    def _writer(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):
                stop = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                try:
                    self._write(batch)
                except BaseException as e:  # never let the writer die: fail this batch and go on
                    for request in batch:
                        _resolve(request.future, error=StoreError(f"the prediction store failed ({one_line(e)})"))

    def _write(self, batch: list[_Request]) -> None:
        try:
            with self.engine.begin() as conn:
                results = self._apply(conn, batch)
        except Exception as e:
            if len(batch) > 1 and not connection_problem(e):
                for request in batch:  # one bad request (a duplicate id, ...) must not fail the others
                    self._write([request])
                return
            error = StoreError(f"the prediction store could not write ({one_line(e)}); is the database "
                               f"{self.display_url} up?")
            for request in batch:
                _resolve(request.future, error=error)
            return
        self.commits += 1
        for request, result in zip(batch, results):
            if isinstance(result, BaseException):
                _resolve(request.future, error=result)
            else:
                _resolve(request.future, result)

    def _apply(self, conn: sa.Connection, batch: list[_Request]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        rows = [row for request in batch if request.kind == "predictions" for row in request.payload]
        if rows:
            self._insert_predictions(conn, rows)
        wanted = [i for i, request in enumerate(batch) if request.kind == "feedback"]
        if not wanted:
            return results
        ids = sorted({batch[i].payload["prediction_id"] for i in wanted})
        found = {row.id: row for row in conn.execute(
            sa.select(predictions.c.id, predictions.c.model, predictions.c.version, predictions.c.top_k)
            .where(predictions.c.id.in_(ids)))}
        new_rows, owners = [], []
        for i in wanted:
            fb = batch[i].payload
            pred = found.get(fb["prediction_id"])
            if pred is None or pred.model != fb["model"]:
                results[i] = NotFound(f"no prediction {fb['prediction_id']!r} of model {fb['model']!r}")
                continue
            try:
                top = json.loads(pred.top_k)
                predicted = str(top[0]["label"]) if top else None
            except (ValueError, TypeError, KeyError, IndexError):
                predicted = None
            image = self.cache.get(fb["prediction_id"]) if self.keep_images else None
            if image is not None and len(image[0]) > self.max_image_bytes:
                image = None
            new_rows.append({"prediction_id": fb["prediction_id"], "model": fb["model"], "version": pred.version,
                             "label": fb["label"], "predicted": predicted, "created": fb["created"],
                             "image": image[0] if image else None, "image_format": image[1] if image else None})
            owners.append(i)
        if new_rows:
            inserted = conn.execute(feedback_table.insert().returning(feedback_table.c.id, sort_by_parameter_order=True),
                                    new_rows).scalars().all()
            for i, row, feedback_id in zip(owners, new_rows, inserted):
                results[i] = (int(feedback_id), row["image"] is not None)
        return results

    def _insert_predictions(self, conn: sa.Connection, rows: list[dict]) -> None:
        """All rows in multi-row INSERTs: one statement step per chunk. An executemany steps once per row, and
        the sqlite3 driver lets go of the GIL at each step: getting it back from the server's busy event loop
        costs up to sys.getswitchinterval() per row, which slowed every request in the process."""
        columns = [column.name for column in predictions.columns]
        mark = "?" if self.url.get_backend_name() == "sqlite" else "%s"
        one = "(" + ", ".join([mark] * len(columns)) + ")"
        per_statement = 500  # 5,000 parameters: under PostgreSQL's limit (65,535) and recent SQLite's (32,766)
        if self.url.get_backend_name() == "sqlite":  # SQLite before 3.32 allows 999 unless built otherwise
            limit = getattr(conn.connection.dbapi_connection, "getlimit", None)
            most = limit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if limit is not None else 999
            per_statement = max(1, min(per_statement, most // len(columns)))
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            sql = f"INSERT INTO predictions ({', '.join(columns)}) VALUES " + ", ".join([one] * len(chunk))
            conn.exec_driver_sql(sql, tuple(row[name] for row in chunk for name in columns))

    # -- the API the server awaits -------------------------------------------------------------------
    def submit_predictions(self, records: list[PredictionRecord]) -> concurrent.futures.Future:
        """Queue predictions for the writer; the future resolves (None) once they are committed."""
        rows = []
        for r in records:
            rows.append({"id": r.id, "model": r.model, "version": int(r.version), "created": float(r.created),
                         "input_digest": r.input_digest, "top_k": r.top_k if isinstance(r.top_k, str) else json.dumps(r.top_k, separators=(",", ":")),
                         "latency_ms": float(r.latency_ms), "queue_ms": float(r.queue_ms),
                         "compute_ms": float(r.compute_ms), "endpoint": r.endpoint})
            if self.keep_images and r.image is not None and len(r.image) <= self.max_image_bytes:
                self.cache.put(r.id, r.image, r.image_format)
        return self._submit("predictions", rows)

    def submit_feedback(self, prediction_id: str, label: str, model: str) -> concurrent.futures.Future:
        """Queue feedback; the future resolves to (feedback_id, image_stored) once committed, or raises NotFound."""
        if not isinstance(prediction_id, str) or not 0 < len(prediction_id) <= 64:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(NotFound(f"no prediction {str(prediction_id)[:64]!r} of model {model!r}"))
            return future
        return self._submit("feedback", {"prediction_id": prediction_id, "label": str(label), "model": model,
                                         "created": time.time()})

    async def add_predictions(self, records: list[PredictionRecord]) -> None:
        """Store predictions; returns once they are committed. StoreError when the database fails."""
        if not records:
            return
        await asyncio.wrap_future(self.submit_predictions(list(records)))

    async def add_feedback(self, prediction_id: str, label: str, model: str) -> tuple[int, bool]:
        """Store the true label for a prediction (and its cached input); returns (feedback_id, image_stored)."""
        return await asyncio.wrap_future(self.submit_feedback(prediction_id, label, model))

    # -- readers (their own pooled connections; safe from any thread) --------------------------------
    def feedback(self, model: str | None = None, limit: int = 100, after: int = 0) -> list[dict]:
        """Feedback with id > after, oldest first, at most `limit` (1..1000) rows."""
        if not 1 <= int(limit) <= MAX_FEEDBACK_PAGE:
            raise UserError(f"limit must be between 1 and {MAX_FEEDBACK_PAGE}, not {limit}")
        if int(after) < 0:
            raise UserError(f"after must be a feedback id (>= 0), not {after}")
        if int(after) >= _MAX_ID:
            return []
        f = feedback_table.c
        query = (sa.select(f.id, f.prediction_id, f.model, f.version, f.label, f.predicted, f.created,
                           f.image.is_not(None).label("image_stored"))
                 .where(f.id > int(after)).order_by(f.id).limit(int(limit)))
        if model is not None:
            query = query.where(f.model == model)
        with self.engine.connect() as conn:
            return [{**row._asdict(), "image_stored": bool(row.image_stored)} for row in conn.execute(query)]

    def feedback_image(self, feedback_id: int) -> tuple[bytes, str | None] | None:
        """The input stored with a feedback row, or None when there is none."""
        if not 0 < int(feedback_id) <= _MAX_ID:
            return None
        f = feedback_table.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(f.image, f.image_format).where(f.id == int(feedback_id))).first()
        if row is None or row.image is None:
            return None
        return bytes(row.image), row.image_format

    def prediction(self, prediction_id: str) -> dict | None:
        """One stored prediction (top_k decoded), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(predictions).where(predictions.c.id == str(prediction_id))).first()
        if row is None:
            return None
        return {**row._asdict(), "top_k": json.loads(row.top_k)}

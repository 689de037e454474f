"""The prediction and feedback store, on SQLite and on a real PostgreSQL server started by the tests."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from helpers.pg import drop_database, new_database, postgres_url  # noqa: F401
from tandem.errors import UserError
from tandem.serve.database import SCHEMA_VERSION
from tandem.serve.store import NotFound, PredictionRecord, Store, StoreError

SRC = Path(__file__).resolve().parents[2] / "src"
TOP = [{"label": "cat", "index": 3, "probability": 0.75}, {"label": "dog", "index": 4, "probability": 0.2}]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "store.sqlite")  # a plain path means SQLite
        return
    server = request.getfixturevalue("postgres_url")
    url = new_database(server)
    yield url
    drop_database(server, url)


@pytest.fixture
def open_store():
    """Store(...) that is closed at the end of the test, whatever happens."""
    stores: list[Store] = []

    def make(url, **kwargs) -> Store:
        store = Store(url, **kwargs)
        stores.append(store)
        store.start()
        return store

    yield make
    for store in stores:
        store.close()


def record(model="animals", image=None, fmt="png", pid=None, version=1) -> PredictionRecord:
    return PredictionRecord(pid or uuid.uuid4().hex, model, version, time.time(), "ab" * 32, TOP, 3.5, 0.5, 3.0,
                            "classify", image, fmt)


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_schema_is_created_once_and_versioned(db_url, open_store):
    store = open_store(db_url)
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"schema_version", "predictions", "feedback"} <= tables
    assert store.schema_version() == SCHEMA_VERSION == 1
    store.close()
    again = open_store(db_url)  # a second start finds the schema and adds nothing
    with again.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalars().all() == [1]


def test_a_newer_schema_is_refused(db_url, open_store):
    store = open_store(db_url)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
    store.close()
    with pytest.raises(UserError, match="schema version 2, newer .*upgrade tandem") as e:
        Store(db_url)
    assert "\n" not in str(e.value)


def test_predictions_and_feedback_round_trip(db_url, open_store):
    store = open_store(db_url)
    a, b, c = record(image=b"\x89PNG-a"), record(image=None), record(model="birds", image=b"npy", fmt="npy")
    run(store.add_predictions([a, b]))
    run(store.add_predictions([c]))
    got = store.prediction(a.id)
    assert got["model"] == "animals" and got["version"] == 1 and got["top_k"] == TOP and got["endpoint"] == "classify"
    assert got["input_digest"] == a.input_digest and abs(got["created"] - a.created) < 1e-6
    assert (got["latency_ms"], got["queue_ms"], got["compute_ms"]) == (3.5, 0.5, 3.0)
    assert store.prediction("0" * 32) is None

    fa = run(store.add_feedback(a.id, "zebra", "animals"))
    fb = run(store.add_feedback(b.id, "cat", "animals"))
    fc = run(store.add_feedback(c.id, "owl", "birds"))
    assert fa[1] is True and fb[1] is False and fc[1] is True
    assert fa[0] < fb[0] < fc[0]
    rows = store.feedback()
    assert [r["id"] for r in rows] == [fa[0], fb[0], fc[0]]
    assert rows[0] == {"id": fa[0], "prediction_id": a.id, "model": "animals", "version": 1, "label": "zebra",
                       "predicted": "cat", "created": rows[0]["created"], "image_stored": True}
    assert abs(rows[0]["created"] - time.time()) < 60
    assert [r["id"] for r in store.feedback(model="birds")] == [fc[0]]
    assert [r["id"] for r in store.feedback(model="animals", after=fa[0])] == [fb[0]]
    assert [r["id"] for r in store.feedback(limit=1)] == [fa[0]]
    assert store.feedback_image(fa[0]) == (b"\x89PNG-a", "png")
    assert store.feedback_image(fc[0]) == (b"npy", "npy")
    assert store.feedback_image(fb[0]) is None and store.feedback_image(10**6) is None
    assert store.feedback_image(10**30) is None and store.feedback(after=10**30) == []
    with pytest.raises(UserError, match="limit"):
        store.feedback(limit=0)


def test_feedback_for_an_unknown_prediction_or_another_model_is_not_found(db_url, open_store):
    store = open_store(db_url)
    a = record(image=b"x")
    run(store.add_predictions([a]))
    for pid, model in [("f" * 32, "animals"), (a.id, "birds"), ("", "animals"), ("x" * 1000, "animals")]:
        with pytest.raises(NotFound, match="no prediction"):
            run(store.add_feedback(pid, "zebra", model))
    assert issubclass(NotFound, UserError) and store.feedback() == []
    # a failed lookup in a group does not fail the others committed with it
    async def mixed():
        return await asyncio.gather(store.add_feedback(a.id, "dog", "animals"),
                                    store.add_feedback("e" * 32, "dog", "animals"), return_exceptions=True)
    ok, missing = run(mixed())
    assert isinstance(missing, NotFound) and ok[1] is True
    assert [r["label"] for r in store.feedback()] == ["dog"]


def test_kept_images_are_bounded(db_url, open_store):
    store = open_store(db_url, max_image_bytes=100, image_cache_bytes=250)
    small, big = record(image=b"s" * 100), record(image=b"b" * 101)
    run(store.add_predictions([small, big]))
    assert run(store.add_feedback(small.id, "cat", "animals"))[1] is True
    assert run(store.add_feedback(big.id, "cat", "animals"))[1] is False  # over max_image_bytes: never kept
    olds = [record(image=bytes([i]) * 100) for i in range(3)]  # 300 bytes into a 250-byte cache
    run(store.add_predictions(olds))
    assert store.cache.bytes <= 250
    assert [run(store.add_feedback(r.id, "cat", "animals"))[1] for r in olds] == [False, True, True]
    stored = [r for r in store.feedback() if r["image_stored"]]
    assert [store.feedback_image(r["id"])[0] for r in stored] == [b"s" * 100, bytes([1]) * 100, bytes([2]) * 100]

    nothing = open_store(db_url, keep_images=False)
    r = record(image=b"n" * 10)
    run(nothing.add_predictions([r]))
    assert len(nothing.cache) == 0 and run(nothing.add_feedback(r.id, "cat", "animals")) [1] is False


def test_concurrent_writers_are_group_committed(db_url, open_store):
    store = open_store(db_url)
    records = [record(image=b"i" * 10) for _ in range(400)]

    async def burst():
        await asyncio.gather(*(store.add_predictions([r]) for r in records))
        return await asyncio.gather(*(store.add_feedback(r.id, "dog", "animals") for r in records[:100]))

    feedback = run(burst())
    assert store.commits < 100, store.commits  # 500 acknowledged writes, far fewer transactions
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 400
    assert len({f[0] for f in feedback}) == 100 and all(f[1] for f in feedback)


def test_a_failed_write_fails_only_its_waiters(db_url, open_store):
    store = open_store(db_url)
    first = record()
    run(store.add_predictions([first]))

    async def with_a_duplicate():
        good = [record() for _ in range(20)]
        results = await asyncio.gather(*(store.add_predictions([r]) for r in good[:10]),
                                       store.add_predictions([record(pid=first.id)]),
                                       *(store.add_predictions([r]) for r in good[10:]), return_exceptions=True)
        return good, results

    good, results = run(with_a_duplicate())
    assert isinstance(results[10], StoreError) and "\n" not in str(results[10])
    assert all(r is None for i, r in enumerate(results) if i != 10)
    assert all(store.prediction(r.id) for r in good)
    run(store.add_predictions([record()]))  # the writer goes on


def test_a_waiter_that_gives_up_does_not_stop_the_writer(db_url, open_store):
    store = open_store(db_url)
    records = [record() for _ in range(50)]

    async def impatient():
        tasks = [asyncio.create_task(store.add_predictions([r])) for r in records]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()  # a request timeout: the write still happens or fails, nobody waits for it
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.add_predictions([record()])

    run(impatient())
    run(store.add_predictions([record()]))
    assert store._thread.is_alive()


def test_postgresql_down_fails_the_write_and_the_store_recovers(postgres_url, open_store, request):  # noqa: F811
    import psycopg

    url = new_database(postgres_url)
    request.addfinalizer(lambda: drop_database(postgres_url, url))
    name = url.rsplit("/", 1)[1]
    store = open_store(url)
    kept = record()
    run(store.add_predictions([kept]))
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        with pytest.raises(StoreError, match="could not write"):
            run(store.add_predictions([record()]))
        with pytest.raises(StoreError):
            run(store.add_feedback(kept.id, "cat", "animals"))
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    again = record()
    run(store.add_predictions([again]))
    assert store.prediction(kept.id) and store.prediction(again.id)


def test_close_writes_everything_queued(db_url):
    store = Store(db_url)
    store.start()
    records = [record() for _ in range(300)]
    futures = [store.submit_predictions([r]) for r in records]
    store.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(StoreError, match="closed"):
        store.submit_predictions([record()])
    reopened = Store(db_url)
    try:
        assert all(reopened.prediction(r.id) for r in records)
    finally:
        reopened.close()


def test_sqlite_runs_in_wal_with_the_configured_sync(tmp_path, open_store):
    for sync, level in [("normal", 1), ("full", 2)]:
        store = open_store(f"sqlite:///{tmp_path / sync / 'nested' / 's.sqlite'}", sync=sync)  # folders are made
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == level
    with pytest.raises(UserError, match="store.sync"):
        Store(str(tmp_path / "x.sqlite"), sync="sometimes")


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "not supported"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("", "empty"),
    ("postgresql://tandem@127.0.0.1:1/postgres", "cannot open the store .*running and reachable"),
])
def test_unusable_urls_are_one_line_user_errors(url, message):
    with pytest.raises(UserError, match=message) as e:
        Store(url)
    assert "\n" not in str(e.value)


def test_a_folder_or_a_non_database_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        Store(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a database, " * 100)
    with pytest.raises(UserError, match="cannot open the store"):
        Store(str(tmp_path / "notes.txt"))


def test_passwords_are_hidden_and_postgres_urls_use_psycopg():
    from tandem.serve.store import database_url

    assert database_url("postgres://u:secret@h:5/db").drivername == "postgresql+psycopg"
    assert database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert database_url("store.sqlite").drivername == "sqlite"
    with pytest.raises(UserError) as e:
        Store("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(e.value)


def test_the_store_imports_no_torch():
    code = "import tandem.serve.store, sys; assert 'torch' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


CHILD = r"""
import asyncio, sys, time, uuid
from tandem.serve.store import PredictionRecord, Store

store = Store(sys.argv[1])
store.start()

async def writer():
    while True:
        pid = uuid.uuid4().hex
        await store.add_predictions([PredictionRecord(pid, "animals", 1, time.time(), "d" * 64,
            [{"label": "cat", "index": 3, "probability": 0.9}], 1.0, 0.1, 0.9, "classify", b"img-" + pid.encode(), "png")])
        print("p", pid, flush=True)  # only after the store acknowledged it
        feedback_id, stored = await store.add_feedback(pid, "zebra", "animals")
        print("f", feedback_id, pid, int(stored), flush=True)

async def main():
    await asyncio.gather(*(writer() for _ in range(16)))

asyncio.run(main())
"""


def test_acknowledged_writes_survive_sigkill(db_url):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    acknowledged: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while len(acknowledged) < 600:  # then kill it mid-stream, writes still in flight
            try:
                acknowledged.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"the writer child printed {len(acknowledged)} lines in 20 s; stderr:\n"
                            f"{proc.stderr.read() if proc.poll() is not None else '(still running)'}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    reader.join(timeout=10)
    while not lines.empty():
        acknowledged.append(lines.get())
    complete = [line.split() for line in acknowledged if line.endswith("\n")]
    assert proc.returncode == -signal.SIGKILL
    predicted = [w[1] for w in complete if w[0] == "p"]
    fed = {int(w[1]): (w[2], w[3] == "1") for w in complete if w[0] == "f"}
    assert len(predicted) > 200 and len(fed) > 200

    store = Store(db_url)
    try:
        missing = [pid for pid in predicted if store.prediction(pid) is None]
        assert not missing, f"{len(missing)} acknowledged predictions lost"
        rows, after = {}, 0
        while page := store.feedback(limit=1000, after=after):
            rows.update((r["id"], r) for r in page)
            after = page[-1]["id"]
        for feedback_id, (pid, stored) in fed.items():
            assert feedback_id in rows, f"acknowledged feedback {feedback_id} lost"
            assert rows[feedback_id]["prediction_id"] == pid and rows[feedback_id]["image_stored"] == stored
        assert store.feedback_image(next(iter(fed))) == (b"img-" + fed[next(iter(fed))][0].encode(), "png")
    finally:
        store.close()


def test_multi_row_inserts_fit_an_old_sqlite_limit_of_999_parameters(tmp_path):
    """SQLite before 3.32 allows 999 parameters a statement: the rows go in smaller statements there."""
    import sqlite3

    store = Store(str(tmp_path / "old.sqlite"))
    try:
        rows = [{"id": f"{i:032x}", "model": "m", "version": 1, "created": 1.0, "input_digest": "d", "top_k": "[]",
                 "latency_ms": 1.0, "queue_ms": 0.5, "compute_ms": 0.5, "endpoint": "infer"} for i in range(250)]
        with store.engine.begin() as conn:
            dbapi = conn.connection.dbapi_connection
            if not hasattr(dbapi, "setlimit"):
                pytest.skip("sqlite3 limits need Python 3.11")
            dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            store._insert_predictions(conn, rows)  # noqa: SLF001
        assert store.prediction(f"{249:032x}")["endpoint"] == "infer"
    finally:
        store.close()

"""The prediction log: every answered prediction, one row each, written by the model's thread after its batch.

The request awaits the write: an answer (and its prediction_id) comes only once its row is committed, so feedback
on any answered prediction finds it. Torch-free.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from tandem.runtime.predictor import ranked
from tandem.serve.metrics import Metrics
from tandem.serve.store import PredictionRecord, Store

STORED_TOP_K = 5


@dataclass(frozen=True)
class Meta:
    """What the prediction log needs about one request, handed through its batch to the model thread."""

    endpoint: str
    images: int
    before_ms: float                  # arrival to the batcher: body, decoding, checks
    image: bytes | None = None        # the encoded image (classify); None: the tensor rows, as .npy
    image_format: str | None = None
    digest: str | None = None         # sha256 of the encoded image; None: of each tensor row


def batch_logger(store: Store, metrics: Metrics, keep_images: bool, name: str, version: int, labels: list[str]):
    """What runs in a version's model thread after each batch: its predictions, logged in one write."""
    keep = keep_images
    # The stored top-k is JSON text, written here directly: a dict per class and json.dumps per row cost more
    # than the rest of the row, in the thread that must hand the GIL back to the event loop quickly.
    entries = [f'{{"label":{json.dumps(label)},"index":{c},"probability":' for c, label in enumerate(labels)]
    store_seconds = metrics.child(metrics.store, name, str(version))

    def log_batch(x: np.ndarray, out: np.ndarray, metas: list, queues: list[float], compute: float):
        finite = np.isfinite(out).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):  # rows that are not finite are not logged
            probs, best = ranked(out, STORED_TOP_K)
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
        pending = store.submit_predictions(rows)
        pending.add_done_callback(lambda _: store_seconds.observe(time.perf_counter() - started))
        return extras, pending

    return log_batch


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

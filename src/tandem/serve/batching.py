"""Dynamic batching: requests queued on the event loop run together, off the loop, on one model thread.

    batcher = Batcher(run, BatchingConfig(max_batch_size=64, max_queue_delay_ms=2))
    result = await batcher.submit(x)      # x: (n, ...) float32; result.output[:n], result.queue_s, result.compute_s
    Batcher(run, settings, after=log_batch)  # log_batch runs in the model thread after each batch
    await batcher.close()                 # the queued requests finish first

The first request of a batch waits at most `max_queue_delay_ms` for others; a batch holds at most
`max_batch_size` images (a larger request runs alone). While a batch computes, the next one gathers, so
under load batches fill without waiting. With batching off each request runs alone, one after another.
Queue time (submit to start of its batch) and compute time (the batch's run) are measured apart.
Torch-free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from tandem.serve.config import BatchingConfig
from tandem.serve.protocol import Unavailable


@dataclass(frozen=True)
class BatchResult:
    output: np.ndarray
    queue_s: float
    compute_s: float
    batch_size: int
    extra: Any = None       # what `after` gave this request (tandem: its prediction ids)


# after(x, out, metas, queue_seconds, compute_seconds) -> (one extra per request, a future to wait for or None):
# runs in the model thread right after each batch (tandem logs the batch's predictions there), and the
# requests are answered only once that future is done (their rows committed).
After = Callable[[np.ndarray, np.ndarray, list, list, float], tuple[list, Optional[concurrent.futures.Future]]]


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], settings: BatchingConfig, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None, after: After | None = None) -> None:
        self._run = run
        self._after = after
        self.settings = settings
        self.name = name
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tandem-{name}")
        self._queue: deque[tuple[np.ndarray, asyncio.Future, float, Any]] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._waiting: set[concurrent.futures.Future] = set()  # batches computed, their `after` not yet done
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{name}")

    async def submit(self, x: np.ndarray, meta: Any = None) -> BatchResult:
        if self._closing:
            raise Unavailable(f"{self.name} is being unloaded; retry")
        if self._queued_images + len(x) > self.settings.max_queue_size:
            raise Unavailable(f"{self.name}: {self._queued_images} images are queued (batching.max_queue_size "
                              f"{self.settings.max_queue_size}); retry later")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((x, future, time.perf_counter(), meta))
        self._queued_images += len(x)
        self._wakeup.set()
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future, float, Any]]:
        limit = self.settings.max_batch_size if self.settings.enabled else 1
        taken, images = [], 0
        while self._queue:
            n = len(self._queue[0][0])
            if taken and (not self.settings.enabled or images + n > limit):
                break
            item = self._queue.popleft()
            self._queued_images -= n
            if not item[1].done():  # a request that timed out or was cancelled is not run
                taken.append(item)
                images += n
        return taken

    def _work(self, x: np.ndarray, metas: list, queues: list[float]):
        """In the model thread: the run, then `after` on its result."""
        start = time.perf_counter()
        out = self._run(x)
        compute = time.perf_counter() - start
        extras, pending = self._after(x, out, metas, queues, compute) if self._after else ([None] * len(metas), None)
        return out, compute, extras, pending

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.settings.max_queue_delay_ms / 1000
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.settings.enabled and delay > 0 and self._queued_images < self.settings.max_batch_size:
                wait = self._queue[0][2] + delay - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            batch = self._take()
            if not batch:
                continue
            x = batch[0][0] if len(batch) == 1 else np.concatenate([item[0] for item in batch])
            now = time.perf_counter()
            queues = [now - item[2] for item in batch]
            try:
                out, compute, extras, pending = await loop.run_in_executor(
                    self._executor, self._work, x, [item[3] for item in batch], queues)
            except Exception as err:  # noqa: BLE001 - every waiter hears of it; the loop goes on
                _fail(batch, err)
                continue
            if self._on_batch is not None:
                self._on_batch(len(x), compute)
            answer = functools.partial(_answer, batch, out, queues, compute, len(x), extras)
            if pending is None:
                answer(None)
            else:  # the next batch runs while this one's rows commit
                self._waiting.add(pending)
                pending.add_done_callback(lambda done, answer=answer: loop.call_soon_threadsafe(self._done, done, answer))

    def _done(self, pending: concurrent.futures.Future, answer) -> None:
        self._waiting.discard(pending)
        answer(pending.exception())

    async def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued and answer it (waiting at most `timeout` s for batches still committing: a
        failed or slow write is their requests' answer, not the caller's), then stop the model thread."""
        self._closing = True
        self._wakeup.set()
        try:
            await self._task
            if self._waiting:
                await asyncio.wait([asyncio.wrap_future(f) for f in self._waiting], timeout=timeout)
                await asyncio.sleep(0)  # let their answers run
        finally:
            self._executor.shutdown(wait=True)


def _fail(batch, err: BaseException) -> None:
    for _, future, _, _ in batch:
        if not future.done():
            future.set_exception(err)


def _answer(batch, out: np.ndarray, queues: list[float], compute: float, size: int, extras: list,
            error: BaseException | None) -> None:
    if error is not None:
        _fail(batch, error)
        return
    offset = 0
    for (item, future, _, _), queue, extra in zip(batch, queues, extras):
        n = len(item)
        if not future.done():
            future.set_result(BatchResult(out[offset:offset + n], queue, compute, size, extra))
        offset += n

"""The batcher on its own: batches form under load, and closing never hangs or fails on a batch whose log
write failed or never finishes (its requests hear of it; the unload does not)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest

from tandem.serve.batching import Batcher
from tandem.serve.config import BatchingConfig


def _double(x: np.ndarray) -> np.ndarray:
    return x * 2


def test_requests_get_their_own_rows_back_in_batches():
    async def main():
        batcher = Batcher(_double, BatchingConfig(max_batch_size=8, max_queue_delay_ms=20))
        inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(24)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return inputs, results

    inputs, results = asyncio.run(main())
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result.output, x * 2)
    assert max(result.batch_size for result in results) > 3  # they ran together, none over the limit
    assert all(result.batch_size <= 8 or len(x) > 8 for x, result in zip(inputs, results))


@pytest.mark.parametrize("outcome", ["fails", "never"])
def test_close_neither_raises_nor_hangs_on_a_commit_still_pending(outcome):
    pending: list[concurrent.futures.Future] = []

    def after(x, out, metas, queues, compute):
        future = concurrent.futures.Future()
        pending.append(future)
        return [["id"] for _ in metas], future

    async def main():
        batcher = Batcher(_double, BatchingConfig(max_queue_delay_ms=0), after=after)
        request = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32)))
        while not pending:
            await asyncio.sleep(0.01)
        request.cancel()  # the request timed out while its batch was committing
        if outcome == "fails":
            pending[0].set_exception(RuntimeError("database down"))
        start = time.monotonic()
        await batcher.close(timeout=0.5)
        return time.monotonic() - start, batcher

    took, batcher = asyncio.run(main())
    assert took < 5
    assert batcher._executor._shutdown  # noqa: SLF001 - the model thread was stopped


def test_a_failed_commit_fails_its_requests():
    def after(x, out, metas, queues, compute):
        future = concurrent.futures.Future()
        future.set_exception(RuntimeError("database down"))
        return [["id"] for _ in metas], future

    async def main():
        batcher = Batcher(_double, BatchingConfig(), after=after)
        try:
            with pytest.raises(RuntimeError, match="database down"):
                await batcher.submit(np.ones((1, 2), np.float32))
        finally:
            await batcher.close()

    asyncio.run(main())

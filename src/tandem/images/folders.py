"""Many image files: found in folders, decoded in a process pool in input order (tandem.images.pixels.load_image
for each), a bad file reported, not raised, so the caller decides. Torch-free.

    for path, pixels, error in decode_files(expand_paths(["photos/"]), 64, 3):
        ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tandem.errors import UserError
from tandem.images.pixels import IMAGE_SUFFIXES, check_resize, load_image
from tandem.threads import core_budget

POOL_MIN_FILES = 16  # below this, starting worker processes costs more than it saves


def decode_task(paths: list[str], size: int, channels: int, resize: str) -> list[tuple[np.ndarray | None, str | None]]:
    """The pool's task: decode a few files -> (pixels, None) or (None, one-line message) for each."""
    results: list[tuple[np.ndarray | None, str | None]] = []
    for path in paths:
        try:
            results.append((load_image(path, size, channels, resize), None))
        except UserError as err:
            results.append((None, str(err)))
    return results


def pool_size(n_files: int, workers: int | None = None) -> int:
    """How many processes `decode_files` decodes `n_files` with (1: in this process, no pool)."""
    if workers is None:  # one per core this process may use (its CPUs, its cgroup quota: tandem.threads)
        workers = core_budget().whole
    return 1 if workers <= 1 or n_files < POOL_MIN_FILES else workers


Decoded = tuple[Path, np.ndarray | None, str | None]  # (file, pixels, None) or (file, None, message)


def decode_files(paths: Iterable[str | Path], size: int, channels: int, resize: str = "crop",
                 workers: int | None = None) -> Iterator[Decoded]:
    """Decode image files -> (path, uint8 (size, size, channels), None) or (path, None, message), in input
    order, each as soon as it and those before it are ready.

    `workers` processes (default: the CPUs this process may use) decode in a pool; fewer than 16 files,
    or workers=1, decode in this process. One bad file never stops the others. Close the iterator (or
    leave the `for` loop) to stop early; the pool is shut down then, and on Ctrl-C.
    """
    return _one_by_one(decode_file_batches(paths, size, channels, resize, workers))


def _one_by_one(chunks: Iterator[list[Decoded]]) -> Iterator[Decoded]:
    try:
        for chunk in chunks:
            yield from chunk
    finally:
        chunks.close()  # closing this iterator stops the pool at once, not whenever it is collected


def decode_file_batches(paths: Iterable[str | Path], size: int, channels: int, resize: str = "crop",
                        workers: int | None = None) -> Iterator[list[Decoded]]:
    """`decode_files`, a list at a time: each list is what one task decoded (up to 16 files), yielded as
    soon as it is ready, for callers that act on whatever is ready (the predictor's batches)."""
    check_resize(resize)
    paths = [Path(p) for p in paths]
    processes = pool_size(len(paths), workers)
    if processes == 1:  # small chunks: the caller sees results soon
        return ([(p, *result) for p, result in zip(part, decode_task([str(p) for p in part], size, channels, resize))]
                for part in (paths[i:i + 8] for i in range(0, len(paths), 8)))
    return _decode_in_pool(paths, size, channels, resize, processes)


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group; only the parent should act on it (by shutting the pool down).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_in_pool(paths: list[Path], size: int, channels: int, resize: str, workers: int) -> Iterator[list[Decoded]]:
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Several paths per task keep the pool's overhead small; at most 16 (about 0.5 s of 12-megapixel JPEGs)
    # so the first results come soon; at least 4 tasks per worker keep every worker busy to the end.
    chunk = max(1, min(16, len(paths) // (4 * workers)))
    chunks = iter([paths[i:i + chunk] for i in range(0, len(paths), chunk)])
    # Never fork: the training process runs torch threads, and a forked child can deadlock on their locks.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # The server imports the decoder once; each worker is then a fork of it, ready at once (~0.1 s each saved).
        context.set_forkserver_preload(["tandem.images", "PIL.Image", "PIL.JpegImagePlugin", "PIL.ImageOps"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
    pending: deque = deque()

    def submit() -> None:
        part = next(chunks, None)
        if part is not None:
            pending.append((part, pool.submit(decode_task, [str(p) for p in part], size, channels, resize)))

    try:
        for _ in range(4 * workers):  # a bounded window: results wait in memory only this far ahead
            submit()
        while pending:
            part, future = pending.popleft()
            results = future.result()
            submit()
            yield [(path, pixels, error) for path, (pixels, error) in zip(part, results)]
    except BrokenProcessPool:
        raise UserError("an image decoding process stopped (out of memory, or a script read from standard input "
                        "(python - <<EOF) or without `if __name__ == '__main__':`); pass workers=1 to decode in "
                        "this process") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- finding files ----------------------------------------------------------------------------------------


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside a folder, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files stay, folders become their image files (recursively, sorted). Missing paths raise UserError."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders of images")
    return files

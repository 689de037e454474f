"""Batch sources for the training loop: a split held in memory, or a folder streamed from disk. One interface.

    source = make_batches(splits.train, cfg, device)    # InMemoryBatches or StreamedBatches, by the split's type
    for xb, yb in source.batches(order.split(batch)):  # float32 (N, C, H, W) and int64 (N,), on `device`
        ...

`batches(index_batches)` takes tensors of positions into the split and yields, for each, the images
preprocessed by tandem.runtime.preprocess.preprocess (the runtime's own function) and their labels, in
exactly that order; the loop calls it once per epoch (or evaluation), with a list that may start
mid-epoch on resume. Both sources give the same tensors for the same positions.

InMemoryBatches preprocesses the whole split once into one tensor on the device. StreamedBatches decodes
and preprocesses each batch in DataLoader worker processes (tandem.data.stream.FileDataset.read: the
same decoder as the in-memory path, with each image's pixels checked against the digest the split was
made from), one DataLoader with persistent workers serving every call.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from tandem.data.sources import Dataset
from tandem.data.stream import FileDataset
from tandem.errors import UserError
from tandem.runtime.preprocess import preprocess

Batch = tuple[torch.Tensor, torch.Tensor]
PREFETCH_BYTES = 256 * 2**20  # preprocessed batches in flight, over all workers, stay below this


class InMemoryBatches:
    """A tandem.data Dataset preprocessed once into a float32 tensor on `device`."""

    def __init__(self, data: Dataset, mean: Any, std: Any, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(data.labels, dtype=np.int64))
        self.x = torch.from_numpy(preprocess(data.pixels, mean, std)).to(self.device)
        self.y = self.labels.to(self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[Batch]:
        for index in index_batches:
            index = torch.as_tensor(index, dtype=torch.long).reshape(-1).to(self.device)
            yield self.x[index], self.y[index]

    def close(self) -> None:
        pass


class _FileImages(torch.utils.data.Dataset):
    """What each worker holds: the files and the preprocessing parameters. A whole batch per call
    (__getitems__), so the preprocessing runs once per batch, as the in-memory path runs it per split."""

    def __init__(self, files: FileDataset, mean: Any, std: Any):
        self.files, self.mean, self.std = files, mean, std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = preprocess(self.files.read(i)[None], self.mean, self.std)[0]
        return torch.from_numpy(x), int(self.files.labels[i])

    def __getitems__(self, index: list[int]) -> Batch | str:
        try:
            pixels = np.stack([self.files.read(i) for i in index])
        except UserError as err:  # sent back as a value: the main process raises it with its one-line message
            return str(err)
        x = preprocess(pixels, self.mean, self.std)
        return torch.from_numpy(x), torch.from_numpy(self.files.labels[index])


def _collate(batch: Batch | str) -> Batch | str:
    return batch  # __getitems__ made the batch already


def _worker_init(worker_id: int) -> None:
    # One thread each: the workers decode with Pillow and NumPy, and the training process needs the cores.
    torch.set_num_threads(1)


class _IndexBatches:
    """The DataLoader's batch sampler: lists of positions the main process sets before each iteration."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[list[int]]:
        return (index.tolist() for index in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_context() -> Any:
    """How DataLoader workers start: never fork (torch's default on Linux).

    The training process runs torch's intra-op threads, gloo's or NCCL's threads under torchrun, and
    perhaps CUDA; a forked child inherits their locks held and can deadlock, and cannot use CUDA. The
    forkserver (as tandem.images' decoding pool uses) forks workers from a clean single-threaded server
    instead, and unlike spawn does not re-run `python -m tandem`'s __main__ in each worker. Plain scripts
    need the usual `if __name__ == '__main__':` guard, as for any spawn-style start."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect only if no forkserver runs yet: workers then start with torch and the decoder imported.
    context.set_forkserver_preload(["tandem.train.loader", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin"])
    return context


class StreamedBatches:
    """A FileDataset decoded and preprocessed batch by batch in `workers` DataLoader processes (0: here)."""

    def __init__(self, files: FileDataset, mean: Any, std: Any, device: torch.device | str = "cpu",
                 workers: int = 2, batch_size: int = 128):
        self.device = torch.device(device)
        self.files = files
        self.labels = torch.from_numpy(np.ascontiguousarray(files.labels, dtype=np.int64))
        self.workers = workers
        self._sampler = _IndexBatches()
        self._generation = 0
        options: dict[str, Any] = {}
        if workers > 0:
            batch_bytes = max(1, batch_size) * files.channels * files.size * files.size * 4
            options = {"multiprocessing_context": _worker_context(), "persistent_workers": True,
                       "worker_init_fn": _worker_init,
                       "prefetch_factor": int(min(4, max(2, PREFETCH_BYTES // (workers * batch_bytes))))}
        self._pin = self.device.type == "cuda"
        self._loader: DataLoader | None = DataLoader(
            _FileImages(files, mean, std), batch_sampler=self._sampler, collate_fn=_collate, num_workers=workers,
            pin_memory=self._pin, **options)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[Batch]:
        """The batches for `index_batches`, in order. A new call ends any earlier call's iteration."""
        if self._loader is None:
            raise RuntimeError("this StreamedBatches was closed")
        index_batches = [torch.as_tensor(i, dtype=torch.long).reshape(-1).cpu() for i in index_batches]
        return self._iterate(index_batches)

    def _iterate(self, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        self._generation += 1
        generation = self._generation
        self._sampler.batches = [index for index in index_batches if len(index)]
        empty = (torch.empty((0, self.files.channels, self.files.size, self.files.size), device=self.device),
                 torch.empty(0, dtype=torch.long, device=self.device))
        loaded = None
        for index in index_batches:
            if not len(index):
                yield empty
                continue
            if generation != self._generation:
                raise RuntimeError("a newer batches() call on this source ended this iteration")
            try:
                if loaded is None:
                    loaded = iter(self._loader)  # persistent workers: the same processes, reset to this list
                out = next(loaded)
            except RuntimeError as err:
                if "DataLoader worker" not in str(err):
                    raise
                first = str(err).strip().splitlines()[0]
                raise UserError(f"a data loading process stopped ({first}): out of memory, or a script read from "
                                "standard input (python - <<EOF) or without `if __name__ == '__main__':`; set "
                                "data.workers lower, or 0 to decode in the training process") from None
            if isinstance(out, str):
                raise UserError(out)
            x, y = out
            yield x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin)

    def close(self) -> None:
        """Stop the worker processes now (they stop anyway when this object is collected)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self) -> StreamedBatches:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_batches(split: Dataset | FileDataset, cfg: Any, device: torch.device | str = "cpu"
                 ) -> InMemoryBatches | StreamedBatches:
    """The batch source for one split: streamed for a FileDataset (tandem.data.stream), else in memory.

    `cfg` is the run's TrainConfig: data.mean and data.std preprocess, data.workers decode a stream."""
    if isinstance(split, FileDataset):
        return StreamedBatches(split, cfg.data.mean, cfg.data.std, device, cfg.data.workers, cfg.batch_size)
    return InMemoryBatches(split, cfg.data.mean, cfg.data.std, device)

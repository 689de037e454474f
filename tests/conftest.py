"""Shared fixtures: small real data (a slice of the embedded animals), a tiny trained run and its bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers import animals
from tandem.data.sources import ANIMAL_CLASSES

# Every process the tests start computes on the same number of threads, whatever else runs on the machine: runs
# compared with each other (resumed against uninterrupted, a command against a reference) must not differ by a
# thread count tandem.threads chose from the load. Set before torch loads; tests/test_threads.py unsets it where
# it tests that choice.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def _private_decode_cache(tmp_path_factory):
    """Decoded folders are cached; tests keep theirs out of the user's ~/.cache."""
    old = os.environ.get("TANDEM_CACHE_DIR")
    os.environ["TANDEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
    if old is None:
        os.environ.pop("TANDEM_CACHE_DIR", None)
    else:
        os.environ["TANDEM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    """600 real animal images (60 per class) as an .npz with class names."""
    x, y = animals(60)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x, y=y, classes=np.array(ANIMAL_CLASSES))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_npz):
    """A run trained for a few steps in this process (the accuracy does not matter, but its answers must depend on
    the image: after 2 epochs the batch-norm statistics of the cnn had not settled and every image was "horse" at
    probability 1.0)."""
    from tandem.config import TrainConfig
    from tandem.train.loop import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.model_validate({"data": {"source": str(small_npz)}, "model": {"width": 8}, "epochs": 3,
                                      "batch_size": 64, "out_dir": str(out), "progress": False})
    return train(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run) -> Path:
    from tandem.export.onnx_bundle import export_bundle

    return export_bundle(tiny_run.run_dir, tmp_path_factory.mktemp("bundles") / "tiny", log=lambda *a, **k: None)

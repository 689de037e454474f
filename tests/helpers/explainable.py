"""A cnn trained well enough to explain (about 85% test accuracy on 1,000 animals, ~10 s on 2 cores), exported as
a bundle: what the faithfulness and option tests explain. A map of a model at chance says nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import animals
from tandem.data.sources import ANIMAL_CLASSES


def explainable_bundle(folder: Path, epochs: int = 6) -> Path:
    from tandem.config import TrainConfig
    from tandem.export.onnx_bundle import export_bundle
    from tandem.train.loop import train

    x, y = animals(100)
    np.savez(folder / "animals.npz", x=x, y=y, classes=np.array(ANIMAL_CLASSES))
    cfg = TrainConfig.model_validate({"data": {"source": str(folder / "animals.npz")}, "model": {"width": 8},
                                      "epochs": epochs, "batch_size": 64, "out_dir": str(folder / "run"),
                                      "progress": False})
    run = train(cfg, log=lambda *a, **k: None)
    assert run.metrics["test_accuracy"] > 0.6, run.metrics
    return export_bundle(run.run_dir, folder / "bundle", log=lambda *a, **k: None)


def split_sample(bundle: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n test images of the bundle's split, spread over it, and their labels."""
    from tandem.bundle import read_manifest
    from tandem.explain.data import bundle_splits, split_pixels

    test = bundle_splits(bundle, read_manifest(bundle)).test
    return split_pixels(test, np.linspace(0, len(test.labels) - 1, n).astype(int))

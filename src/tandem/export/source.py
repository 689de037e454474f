"""What every exporter starts from: a run's best checkpoint, its model, and the run's own data, checked.

    source = open_source("runs/latest", log=print)     # resolve the checkpoint, build the model, read the splits
    x_test, y_test = source.test_inputs()              # preprocessed as training did; (None, None) without data
    calibration, _ = source.inputs(source.splits.val)  # any split, or some of its images (index=)

The ONNX bundle, int8 and the FPGA project are all made from one Source, so the checkpoint is resolved, the model
built and the data read (and checked against the run's fingerprint) once per export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tandem.config import TrainConfig
from tandem.data.stream import DataChanged, load_checked_splits, split_pixels
from tandem.errors import UserError
from tandem.runtime.preprocess import preprocess
from tandem.train.checkpoint import Checkpoint, resolve_checkpoint
from tandem.train.models import build_model


@dataclass
class Source:
    """A checkpoint, its config, classes and model, and the run's splits. `splits` is None when the data is gone or
    changed since training (`why_no_data` says which, `decode` how the data was read when it could be)."""

    found: Checkpoint
    cfg: TrainConfig
    classes: list[str]
    model: nn.Module
    splits: Any = None
    decode: dict | None = None
    why_no_data: str | None = None

    def inputs(self, split: Any, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A split's images (all, or those at `index`) preprocessed as training did, and their labels."""
        pixels, labels = split_pixels(split, index)  # a streamed run's images are decoded here, one at a time
        return preprocess(pixels, self.cfg.data.mean, self.cfg.data.std), labels

    def test_inputs(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The preprocessed test split and its labels; (None, None) when the run's data is gone or changed."""
        return self.inputs(self.splits.test) if self.splits is not None else (None, None)


def run_splits(cfg: TrainConfig, fingerprint: str | None, log) -> tuple[Any, dict | None, str | None]:
    """The run's splits (the same images as in training) and how they were read; (None, decode, why) when the
    data is gone or is no longer the data the model was trained on: its test split would then hold other
    images, some of them perhaps trained on, and its accuracy would describe nothing."""
    try:
        splits = load_checked_splits(cfg.data, cfg.seed, fingerprint)
    except DataChanged as err:
        log(f"warning: the images in {cfg.data.source} changed since this checkpoint was trained; the bundle "
            "will carry no test accuracy (parity is still checked)")
        return None, err.splits.train.decode, f"the images in {cfg.data.source} changed since this checkpoint was trained"
    except UserError as err:
        log(f"warning: the run's data cannot be read ({err}); the bundle will carry no test accuracy")
        return None, None, f"the run's data cannot be read ({err})"
    return splits, splits.train.decode, None


def open_source(path: str | Path, log=print) -> Source:
    """Resolve a run folder (its best checkpoint) or a checkpoint folder, build its model, read its data."""
    found = resolve_checkpoint(Path(path))
    cfg = TrainConfig.model_validate(found.state["config"])
    classes = found.state["classes"]
    model = build_model(cfg, len(classes), found.model)
    splits, decode, why = run_splits(cfg, found.state.get("data_fingerprint"), log)
    return Source(found, cfg, classes, model, splits, decode, why)

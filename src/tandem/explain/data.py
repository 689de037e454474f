"""The images a bundle was trained and tested on, read torch-free from its manifest (config and data fingerprint).

    splits = bundle_splits(bundle_dir, manifest)       # the very train / val / test split of the training run
    pixels, labels = split_pixels(splits.test)          # uint8 (N, H, W, C) and int labels (tandem.data.stream)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.data.stream import split_pixels
from tandem.errors import UserError

__all__ = ["bundle_splits", "split_pixels"]  # split_pixels lives in tandem.data.stream, beside load_splits


def bundle_splits(bundle: str | Path, manifest: dict) -> Any:
    """The run's splits (tandem.data.stream.load_splits with the manifest's config and seed), checked against the
    manifest's data fingerprint: a split of other images would make every figure computed on it meaningless."""
    from pydantic import ValidationError

    from tandem.config import TrainConfig
    from tandem.data.stream import DataChanged, load_checked_splits

    try:
        cfg = TrainConfig.model_validate(manifest["config"])
    except (KeyError, TypeError, ValidationError) as err:
        raise UserError(f"bundle {bundle}: its manifest has no readable training config ({str(err).splitlines()[0]}); "
                        "re-export it with `tandem export`") from None
    expected = (manifest.get("provenance") or {}).get("data_fingerprint")
    try:
        return load_checked_splits(cfg.data, cfg.seed, expected)
    except DataChanged:
        raise UserError(f"bundle {bundle}: the images in {cfg.data.source} changed since the model was trained, so its "
                        "test split would hold other images; run this against the data it was trained on") from None
    except UserError as err:
        raise UserError(f"bundle {bundle}: the data it was trained on ({cfg.data.source}) cannot be read ({err}); "
                        "run this where that data is") from None

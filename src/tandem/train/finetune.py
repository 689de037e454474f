"""Fine-tuning from a bundle: start a run from a bundle's weights, with a new head when the classes differ.

    tandem train init_from=bundles/animals/1 data.source=my_photos/ epochs=5 optim.lr=0.01

The run keeps the bundle's architecture and preprocessing (model.name, model.width, data.image_size,
data.channels, data.mean, data.std, data.resize): they are taken from the bundle unless the run sets
them, and a run that sets them to other values is refused. Classes found in both keep their rows of
the classifier head; new classes start from a fresh row.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from tandem.bundle import read_bundle_file, read_manifest, verify_files
from tandem.config import TrainConfig
from tandem.errors import UserError

# What must match for the bundle's weights to mean the same thing in the new run.
INHERITED = {"model": ("name", "width"), "data": ("image_size", "channels", "mean", "std", "resize")}


def inherit_from_bundle(cfg: TrainConfig) -> TrainConfig:
    """cfg with the bundle's architecture and preprocessing filled in; refuses values set otherwise."""
    manifest = read_manifest(cfg.init_from, verify=False)
    verify_files(cfg.init_from, manifest, skip=("weights.safetensors",))  # those are checked where they are loaded
    saved = manifest.get("config", {})
    updates, conflicts = {}, []
    for section, keys in INHERITED.items():
        ours = getattr(cfg, section)
        theirs = saved.get(section, {})
        values = {}
        for key in keys:
            if key not in theirs:
                continue
            if key in ours.model_fields_set and getattr(ours, key) != theirs[key]:
                conflicts.append(f"{section}.{key}={getattr(ours, key)!r} (the bundle has {theirs[key]!r})")
            values[key] = theirs[key]
        updates[section] = ours.model_copy(update=values)
    if conflicts:
        raise UserError(f"init_from={cfg.init_from}: this run sets {', '.join(conflicts)}; fine-tuning keeps the "
                        "bundle's architecture and preprocessing, so drop those settings")
    return cfg.model_copy(update=updates)


def classifier_head(model: torch.nn.Module) -> str:
    """Name of the last Linear layer: every model in the zoo ends in one."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not names:
        raise UserError("init_from: the model has no Linear classifier head to adapt")
    return names[-1]


def load_bundle_weights(model: torch.nn.Module, bundle: str | Path, classes: list[str]) -> dict:
    """Load the bundle's verified weights into model; returns provenance (bundle, classes kept and new)."""
    manifest = read_manifest(bundle, verify=False)
    weights = load_safetensors(read_bundle_file(bundle, manifest, "weights.safetensors"))
    old = list(manifest["labels"])
    head = classifier_head(model)
    if old != classes:
        fresh = model.state_dict()
        for part in ("weight", "bias"):
            key = f"{head}.{part}"
            rows = fresh[key].clone()
            for i, name in enumerate(classes):
                if name in old:
                    rows[i] = weights[key][old.index(name)]
            weights[key] = rows
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"init_from={bundle}: its weights do not fit this model ({first})") from None
    return {"bundle": str(bundle), "name": manifest.get("name"), "version": manifest.get("version"),
            "weights_sha256": manifest["files"]["weights.safetensors"]["sha256"],
            "classes_kept": [c for c in classes if c in old], "classes_new": [c for c in classes if c not in old]}

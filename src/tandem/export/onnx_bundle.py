"""Checkpoint -> bundle: ONNX fp32 with a dynamic batch, safetensors weights, manifest; parity checked.

    tandem export runs/latest --out bundles/animals/1

Export fails, and writes nothing, unless ONNX Runtime and torch agree on held-out inputs to within
`atol` (max abs logit difference).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import tandem
from tandem.bundle import read_manifest, write_manifest
from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.train.checkpoint import resolve_checkpoint
from tandem.train.models import create_model

INPUT, OUTPUT = "input", "logits"


class ParityError(UserError):
    """ONNX Runtime and torch disagree by more than the tolerance."""


def build_model(cfg: TrainConfig, num_classes: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, num_classes,
                         cfg.model.width, cfg.model.dropout)
    model.load_state_dict(weights)
    return model.eval()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str = "torchscript") -> None:
    """Write model.onnx with a dynamic batch dimension."""
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamo=True, dynamic_shapes=({0: batch},), optimize=True, verbose=False,
                          external_data=False)
        return
    # The TorchScript exporter is deprecated but ~15x faster for these models; parity is checked either way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamo=False, opset_version=17,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def held_out_inputs(cfg: TrainConfig, count: int) -> tuple[np.ndarray, str]:
    """Preprocessed test-split images of the run (or, if its data is gone, seeded noise), and which."""
    from tandem.data import load_dataset, split_dataset
    from tandem.runtime.preprocess import preprocess

    try:
        data = load_dataset(cfg.data.source, cfg.data.image_size, cfg.data.channels, cfg.data.skip_bad_files)
        test = split_dataset(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed).test
        return preprocess(test.pixels[:count], cfg.data.mean, cfg.data.std), f"{min(count, len(test))} test-split images"
    except UserError:
        rng = np.random.default_rng(0)
        shape = (count, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        return rng.standard_normal(shape).astype(np.float32), f"{count} random inputs (training data not found)"


def parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray) -> float:
    """Max abs difference of logits, ONNX Runtime vs torch, over x (checked at batch 1 and in batches)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.concatenate([session.run(None, {INPUT: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    single = session.run(None, {INPUT: x[:1]})[0]
    return float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def export_bundle(source: str | Path, out: str | Path, name: str | None = None, version: int = 1,
                  atol: float = 1e-4, exporter: str = "torchscript", force: bool = False, log=print) -> Path:
    """Export a run folder (its newest good checkpoint) or one checkpoint folder to a bundle folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty; pass --force to replace it or choose another --out")
    found = resolve_checkpoint(Path(source))
    cfg = TrainConfig.model_validate(found.state["config"])
    classes = found.state["classes"]
    model = build_model(cfg, len(classes), found.model)
    x, parity_source = held_out_inputs(cfg, 256)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        export_onnx(model, torch.from_numpy(x[:2]), tmp / "model.onnx", exporter)
        diff = parity(model, tmp / "model.onnx", x)
        if not diff <= atol:
            raise ParityError(f"parity check failed: ONNX Runtime differs from torch by {diff:.3g} "
                              f"(max abs logit) > {atol:g} on {parity_source}; nothing was written")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
        run_dir = found.path.parent.parent
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        metrics = {k: v for k, v in results.items() if k not in ("classes", "confusion", "checkpoint")}
        if Path(results.get("checkpoint", "")).name != found.path.name:
            metrics = {}  # results.json belongs to another checkpoint of the run
        size = cfg.data.image_size
        manifest = {
            "name": name or f"{Path(cfg.data.source).stem}-{cfg.model.name}",
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, cfg.data.channels, size, size]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]}],
            "preprocessing": {"image_size": size, "channels": cfg.data.channels, "mean": cfg.data.mean,
                              "std": cfg.data.std, "layout": "NCHW", "resize": "bilinear",
                              "formula": "(pixel / 255 - mean) / std"},
            "labels": classes,
            "metrics": metrics,
            "config": found.state["config"],
            "provenance": {"data_source": cfg.data.source, "data_fingerprint": found.state.get("data_fingerprint"),
                           "checkpoint_step": found.state["step"], "tandem_version": tandem.__version__,
                           "git_commit": _git_commit(), "torch_version": torch.__version__,
                           "python": platform.python_version()},
            "export": {"exporter": exporter, "parity_max_abs_diff": diff, "parity_atol": atol,
                       "parity_inputs": parity_source},
        }
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        write_manifest(tmp, manifest)
        read_manifest(tmp)  # what we wrote verifies
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"bundle {out}: parity {diff:.2g} (max abs logit, {parity_source}), {len(classes)} classes")
    return out

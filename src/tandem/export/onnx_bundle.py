"""Checkpoint -> bundle: ONNX fp32 with a dynamic batch, safetensors weights, manifest; parity checked.

    tandem export runs/latest --out bundles/animals/1 [--sign key.pem]

A run folder exports its best checkpoint (by validation accuracy). Export fails, and writes nothing,
unless ONNX Runtime and torch agree on held-out inputs to within `atol` (max abs logit difference).
The bundle's test accuracy is the exported graph's, computed by ONNX Runtime as the runtime will.
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
from tandem.bundle import MANIFEST, SIGNATURE, check_signing_key, is_bundle, read_manifest, sign_bundle, write_manifest
from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.train.checkpoint import Checkpoint, resolve_checkpoint
from tandem.train.models import create_model

INPUT, OUTPUT = "input", "logits"


class ParityError(UserError):
    """ONNX Runtime and torch disagree by more than the tolerance."""


def build_model(cfg: TrainConfig, num_classes: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, num_classes,
                         cfg.model.width, cfg.model.dropout)
    model.load_state_dict(weights)
    return model.eval()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str = "torchscript",
                metadata: dict[str, str] | None = None) -> None:
    """Write model.onnx with a dynamic batch dimension (and `metadata` in its metadata_props)."""
    _export_graph(model, example, path, exporter)
    if metadata:
        import onnx

        graph = onnx.load(str(path))
        onnx.helper.set_model_props(graph, metadata)
        onnx.save(graph, str(path))


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
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


def held_out_data(cfg: TrainConfig, fingerprint: str | None, log) -> tuple[np.ndarray | None, np.ndarray | None, dict | None]:
    """The run's preprocessed test split and its labels, and how they were read. (None, None, ...) when the
    data is gone or is no longer the data the model was trained on: its test split would then hold other
    images, some of them perhaps trained on, and its accuracy would describe nothing."""
    from tandem.runtime.preprocess import preprocess
    from tandem.train.loop import load_splits

    try:
        splits = load_splits(cfg)
    except UserError as err:
        log(f"warning: the run's data cannot be read ({err}); the bundle will carry no test accuracy")
        return None, None, None
    if fingerprint and splits.train.fingerprint() != fingerprint:
        log(f"warning: the images in {cfg.data.source} changed since this checkpoint was trained; the bundle "
            "will carry no test accuracy (parity is still checked)")
        return None, None, splits.train.decode
    test = splits.test
    # A streamed run (tandem.data.stream) lists files: its test split is decoded here, one image at a time.
    pixels = test.pixels if hasattr(test, "pixels") else np.stack([test.read(i) for i in range(len(test))])
    return preprocess(pixels, cfg.data.mean, cfg.data.std), test.labels, splits.train.decode


def parity(model: torch.nn.Module, session, x: np.ndarray) -> float:
    """Max abs difference of logits, ONNX Runtime vs torch, over x (checked at batch 1 and in batches)."""
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = _run_batches(session, x)
    single = session.run(None, {INPUT: x[:1]})[0]
    return float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))


def _run_batches(session, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([session.run(None, {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_out(out: Path, force: bool) -> None:
    """--force replaces a bundle, never anything else: a wrong --out must not delete a user's files."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a link; give the folder itself ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()):
        if not is_bundle(out):
            raise UserError(f"--out {out} is not empty and is not a bundle; tandem will not replace it, even with "
                            "--force: choose another --out")
        if not force:
            raise UserError(f"{out} already holds a bundle; pass --force to replace it or choose another --out")
        listed = set(read_manifest(out, verify=False)["files"]) | {MANIFEST, SIGNATURE}
        extra = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                       if p.is_file() and p.relative_to(out).as_posix() not in listed)
        if extra:
            raise UserError(f"{out} holds files that are not part of its bundle ({', '.join(extra[:3])}"
                            f"{' ...' if len(extra) > 3 else ''}); move them out first, or choose another --out")


def _training_metrics(found: Checkpoint) -> dict:
    """What the run measured about the exported checkpoint: its validation accuracy and how it was trained."""
    run_dir = found.path.parent.parent
    step = found.state["step"]
    metrics = {"checkpoint_step": step}
    log_file = run_dir / "metrics.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            record = json.loads(line)
            if record["step"] == step and "val_accuracy" in record:
                metrics["val_accuracy"] = record["val_accuracy"]
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    for key in ("train_seconds", "images_per_second", "precision", "device", "parameters", "epochs", "stopped_early"):
        if key in results:
            metrics[key] = results[key]
    return metrics


def _manifest(cfg: TrainConfig, found: Checkpoint, name, version, metrics, export_info) -> dict:
    classes, size = found.state["classes"], cfg.data.image_size
    return {
        "name": name or f"{Path(cfg.data.source).stem}-{cfg.model.name}",
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, cfg.data.channels, size, size]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]}],
        "preprocessing": preprocessing(cfg),
        "labels": classes,
        "metrics": metrics,
        "config": found.state["config"],
        "provenance": {"data_source": cfg.data.source, "data_fingerprint": found.state.get("data_fingerprint"),
                       "checkpoint_step": found.state["step"], "init_from": found.state["loop"].get("init_from"),
                       "tandem_version": tandem.__version__, "git_commit": _git_commit(),
                       "torch_version": torch.__version__, "python": platform.python_version()},
        "export": export_info,
    }


def preprocessing(cfg: TrainConfig) -> dict:
    """The runtime's half of the contract: how to turn an image into the model's input."""
    return {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "mean": cfg.data.mean,
            "std": cfg.data.std, "resize": cfg.data.resize, "interpolation": "bilinear", "layout": "NCHW",
            "formula": "(pixel / 255 - mean[c]) / std[c]"}


def export_bundle(source: str | Path, out: str | Path, name: str | None = None, version: int = 1,
                  atol: float = 1e-4, exporter: str = "torchscript", force: bool = False, sign: str | Path | None = None,
                  log=print) -> Path:
    """Export a run folder (its best checkpoint) or one checkpoint folder to a bundle folder."""
    import onnxruntime as ort

    out = Path(out)
    _check_out(out, force)
    if sign:
        check_signing_key(sign)  # a bad key fails now, not after the export's work
    found = resolve_checkpoint(Path(source))
    cfg = TrainConfig.model_validate(found.state["config"])
    classes = found.state["classes"]
    model = build_model(cfg, len(classes), found.model)
    x_test, y_test, decode = held_out_data(cfg, found.state.get("data_fingerprint"), log)
    if x_test is None:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)).astype(np.float32)
        parity_source = "256 random inputs (no test accuracy: the training data is gone or changed)"
    else:
        x, parity_source = x_test[:256], f"{min(256, len(x_test))} test-split images"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # 1. The graph, with the labels and preprocessing inside it, so it describes itself outside tandem too.
        metadata = {"tandem.labels": json.dumps(classes), "tandem.preprocessing": json.dumps(preprocessing(cfg))}
        export_onnx(model, torch.from_numpy(x[:2]), tmp / "model.onnx", exporter, metadata)
        # 2. Parity on the test split, and the test accuracy of this very graph as the runtime computes it.
        session = ort.InferenceSession((tmp / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"])
        diff = parity(model, session, x)
        if not diff <= atol:
            raise ParityError(f"parity check failed: ONNX Runtime differs from torch by {diff:.3g} (max abs logit) "
                              f"> {atol:g} on {parity_source}; nothing was written. Large logits round further: if "
                              f"the predictions agree, pass a larger --atol (e.g. --atol {10 * diff:.0e})")
        metrics = _training_metrics(found)
        if y_test is not None:
            guesses = _run_batches(session, x_test).argmax(1)
            metrics.update(test_accuracy=float((guesses == y_test).mean()), test_images=len(y_test),
                           test_accuracy_by="onnxruntime, fp32 model.onnx")
        # 3. Weights for fine-tuning, the manifest with every hash, the signature over everything.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
        export_info = {"exporter": exporter, "parity_max_abs_diff": diff, "parity_atol": atol,
                       "parity_inputs": parity_source, "data_decode": decode}
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        write_manifest(tmp, _manifest(cfg, found, name, version, metrics, export_info))
        read_manifest(tmp)  # what we wrote verifies
        if sign:
            sign_bundle(tmp, sign)
        if out.exists() and any(out.iterdir()):  # a bundle that --force replaces (_check_out made sure)
            shutil.rmtree(out)
        os.rename(tmp, out)  # onto an empty folder too (export --repo reserves the version's folder first)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    accuracy = f", test accuracy {metrics['test_accuracy']:.4f} (ONNX Runtime)" if "test_accuracy" in metrics else ""
    log(f"bundle {out}: checkpoint {found.path.name}, parity {diff:.2g} (max abs logit, {parity_source}), "
        f"{len(classes)} classes{accuracy}{', signed' if sign else ''}")
    return out

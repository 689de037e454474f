"""Checkpoint -> bundle: ONNX fp32 with a dynamic batch, safetensors weights, manifest; parity checked.

    tandem export runs/latest --out bundles/animals/1 [--sign key.pem] [--int8 [--int8-budget 0.5]]

A run folder exports its best checkpoint (by validation accuracy). Export fails, and writes nothing,
unless ONNX Runtime and torch agree on held-out inputs to within `atol` (max abs logit difference).
The bundle's test accuracy is the exported graph's, computed by ONNX Runtime as the runtime will.
With --int8 it also holds model.int8.onnx where that passes its gates (tandem.export.quantize).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import tandem
from tandem.bundle import MANIFEST, SIGNATURE, check_signing_key, is_bundle, read_manifest, sign_bundle, write_manifest
from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.export.source import Source, open_source
from tandem.train.checkpoint import Checkpoint
from tandem.train.onnx_graph import INPUT, OUTPUT, export_onnx

class ParityError(UserError):
    """ONNX Runtime and torch disagree by more than the tolerance."""


def int8_data(source: Source, calibration: int):
    """What quantization needs: `calibration` training images (a seeded sample), the validation and test splits."""
    from tandem.export.quantize import QuantData

    splits = source.splits
    if splits is None:
        return QuantData(missing=f"{source.why_no_data}, so there are no training images to calibrate on and no "
                                 "validation split to gate on")
    n = len(splits.train.labels)
    pick = np.sort(np.random.default_rng(source.cfg.seed).choice(n, min(calibration, n), replace=False))
    x_val, y_val = source.inputs(splits.val)
    x_test, y_test = source.test_inputs()
    return QuantData(calibration=source.inputs(splits.train, pick)[0], x_val=x_val, y_val=y_val,
                     x_test=x_test, y_test=y_test)


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
                  log=print, int8: bool = False, int8_budget_pp: float | None = None,
                  calibration: int | None = None, fpga: bool = False, fpga_precision: str = "auto",
                  fpga_reuse: int | str = "auto") -> Path:
    """Export a run folder (its best checkpoint) or one checkpoint folder to a bundle folder.

    int8: also write model.int8.onnx, calibrated on `calibration` training images (default 512), kept only
    if its validation accuracy is within `int8_budget_pp` percentage points of fp32's (default 0.5) and it
    is faster than fp32 on this CPU; the manifest's export.int8 records both gates either way.
    fpga: also write fpga/ (tandem.export.fpga: an hls4ml HLS project for the Kria KV260, its fixed-point
    emulation checked against the float model, report.json); fpga_precision "auto" or "ap_fixed<W,I>",
    fpga_reuse "auto" or a reuse factor."""
    import onnxruntime as ort

    from tandem.export.quantize import DEFAULT_BUDGET_PP, DEFAULT_CALIBRATION

    if not int8 and (int8_budget_pp is not None or calibration is not None):
        raise UserError("--int8-budget and --calibration apply to int8 export: add --int8")
    budget = DEFAULT_BUDGET_PP if int8_budget_pp is None else int8_budget_pp
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    if not (budget >= 0 and budget <= 100):  # also refuses NaN
        raise UserError(f"--int8-budget is {int8_budget_pp}; give percentage points from 0 to 100 (e.g. 0.5)")
    if calibration < 1:
        raise UserError(f"--calibration is {calibration}; give a number of training images, at least 1 (e.g. 512)")

    out = Path(out)
    _check_out(out, force)
    if sign:
        check_signing_key(sign)  # a bad key fails now, not after the export's work
    if fpga:
        from tandem.export.fpga import require_hls4ml

        require_hls4ml()  # hls4ml and g++ are there: checked now, not after the export's work
    run = open_source(source, log)
    found, cfg, classes, model, decode = run.found, run.cfg, run.classes, run.model, run.decode
    x_test, y_test = run.test_inputs()
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
        # 3. Optionally int8, kept only where it passes its accuracy and speed gates.
        int8_record = None
        if int8:
            from tandem.export.quantize import quantize_and_gate

            int8_record = quantize_and_gate(tmp / "model.onnx", tmp / "model.int8.onnx",
                                            int8_data(run, calibration), budget, log)
            if int8_record["kept"] and int8_record["test"]:
                metrics["int8_test_accuracy"] = int8_record["test"]["int8_accuracy"]
        # 4. Weights for fine-tuning, the manifest with every hash, the signature over everything.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
        export_info = {"exporter": exporter, "parity_max_abs_diff": diff, "parity_atol": atol,
                       "parity_inputs": parity_source, "data_decode": decode}
        if int8_record is not None:
            export_info["int8"] = int8_record
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if fpga:  # a folder of its own, hashed into the manifest below with everything else
            from tandem.export.fpga import export_fpga

            report = export_fpga(run, tmp, precision=fpga_precision, reuse_factor=fpga_reuse, log=log)
            export_info["fpga"] = {"report": "fpga/report.json", "precision": report["precision"]["chosen"],
                                   "agreement_top1": report["agreement"]["top1"],
                                   "fits_kv260": report["resources"]["fits_kv260"]}
            if report["accuracy"]:
                metrics["fpga_emulation_test_accuracy"] = report["accuracy"]["emulation_test"]
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
    kept = int8_record is not None and int8_record["kept"]
    log(f"bundle {out}: checkpoint {found.path.name}, parity {diff:.2g} (max abs logit, {parity_source}), "
        f"{len(classes)} classes{accuracy}{', fp32 and int8' if kept else ''}{', signed' if sign else ''}")
    return out

"""Static int8 quantization at export, kept only where it passes an accuracy gate and a speed gate.

    tandem export runs/latest --out bundles/animals/1 --int8 [--int8-budget 0.5] [--calibration 512]

    record = quantize_and_gate(tmp / "model.onnx", tmp / "model.int8.onnx", data, budget_pp=0.5, log=print)

onnxruntime.quantization does the work, as its documentation advises for CNNs: `quant_pre_process` (shape
inference, graph clean-up), then `quantize_static` in the QDQ format with per-channel int8 weights in 7 bits
(`reduce_range`) and uint8 activations, calibrated (MinMax) on N images of the run's training split, preprocessed as training
did. Then two gates, both recorded in the manifest (`export.int8`):

- accuracy: on the validation split, int8 may be at most `budget_pp` percentage points less accurate than
  fp32 (the test split stays unseen by every decision; its int8 accuracy is recorded beside);
- speed: int8 must classify more images per second than fp32 at batch 64 on this CPU, in the runtime's
  own session settings, timed in alternated rounds (medians), so that drift hits both alike.

Where a gate fails (or quantization fails, or the run's data is gone) model.int8.onnx is removed, the
bundle is fp32 only, and the record and a log line say why. Int8 gains need VNNI/AMX (x86) or dot-product
(ARM) instructions; on older CPUs int8 can be slower, which is what the speed gate is for.

Why 7-bit weights: on x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 3 or Intel before Cascade Lake) ONNX
Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW, which saturates the pairwise int16 sums
when both operands are near full range; a bundle made on a VNNI machine then disagrees with fp32 on such a CPU
(measured: top-1 agreement 0.75 with 8-bit weights, 0.98 with 7-bit, on a barely trained model). A bundle is
exported once and run on CPUs its exporter never sees, so the weights are quantized so that no CPU saturates.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_BUDGET_PP = 0.5
DEFAULT_CALIBRATION = 512
SPEED_BATCH = 64
SPEED_ROUNDS = 5
METHOD = ("onnxruntime.quantization: quant_pre_process, then quantize_static (QDQ, per-channel int8 weights in "
          "7 bits (reduce_range), uint8 activations, MinMax calibration)")


@dataclass
class QuantData:
    """What the gates need, preprocessed (float32 NCHW): calibration images (training split), the validation
    split and, for the record only, the test split. `missing` says why there is none (the data is gone)."""

    calibration: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    missing: str | None = None


def quantize(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch: int = 32) -> None:
    """fp32 ONNX -> static int8 QDQ ONNX (the metadata_props, labels and preprocessing, are kept)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), batch))

        def get_next(self) -> dict | None:
            start = next(self.batches, None)
            return None if start is None else {input_name: calibration[start:start + batch]}

    with tempfile.TemporaryDirectory(prefix="tandem-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=True,
                        calibrate_method=CalibrationMethod.MinMax)
    # The runtime checks the manifest against the labels and preprocessing the graph records (metadata_props);
    # onnxruntime 1.32 carries them over, but nothing promises that: copy any that went missing.
    source = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    graph = onnx.load(str(int8_path))
    have = {p.key for p in graph.metadata_props}
    if any(key not in have for key in source):
        for key, value in source.items():
            if key not in have:
                graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(int8_path))


def predicted_classes(session: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def validation_answers(fp32_session: Any, int8_session: Any, x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """How many of the validation images each model classifies correctly. Tests replace this."""
    return int((predicted_classes(fp32_session, x) == y).sum()), int((predicted_classes(int8_session, x) == y).sum())


def measure_speed(fp32_session: Any, int8_session: Any, x: np.ndarray, rounds: int = SPEED_ROUNDS) -> dict:
    """Images per second of each session on batch x, alternated rounds, medians. Tests replace this."""
    from tandem.hardware.timing import alternated_seconds_per_call

    name = fp32_session.get_inputs()[0].name
    fp32_s, int8_s = alternated_seconds_per_call(
        [lambda: fp32_session.run(None, {name: x}), lambda: int8_session.run(None, {name: x})], rounds=rounds)
    return {"fp32_images_per_second": len(x) / fp32_s, "int8_images_per_second": len(x) / int8_s}


def quantize_and_gate(fp32_path: Path, int8_path: Path, data: QuantData, budget_pp: float = DEFAULT_BUDGET_PP,
                      log: Callable = print) -> dict:
    """Write int8_path, gate it, and remove it again unless both gates pass. Returns the manifest's record."""
    import onnxruntime as ort

    from tandem.hardware.timing import cpu_name
    from tandem.runtime.predictor import runtime_session_options

    record: dict = {"kept": False, "reason": "", "method": METHOD, "onnxruntime_version": ort.__version__,
                    "calibration_images": 0, "accuracy_gate": None, "speed_gate": None,
                    "test": None}

    def refuse(reason: str) -> dict:
        int8_path.unlink(missing_ok=True)
        record.update(kept=False, reason=reason)
        log(f"int8: not kept, the bundle is fp32 only: {reason}")
        return record

    if data.missing:
        return refuse(data.missing)
    if data.x_val is None or len(data.x_val) == 0:
        return refuse("the run has no validation split (data.val_fraction=0) for the accuracy gate; "
                      "train with data.val_fraction > 0 to export int8")
    record["calibration_images"] = len(data.calibration)
    try:
        quantize(fp32_path, int8_path, data.calibration)
    except Exception as err:  # onnxruntime.quantization raises many types; a failure only means no int8
        text = str(err).strip().splitlines()
        return refuse(f"onnxruntime.quantization failed ({type(err).__name__}: {text[0] if text else ''})")
    record["int8_bytes"], record["fp32_bytes"] = int8_path.stat().st_size, fp32_path.stat().st_size

    sessions = [ort.InferenceSession(path.read_bytes(), runtime_session_options(), providers=["CPUExecutionProvider"])
                for path in (fp32_path, int8_path)]
    n = len(data.y_val)
    fp32_right, int8_right = validation_answers(*sessions, data.x_val, data.y_val)
    drop_pp = 100.0 * (fp32_right - int8_right) / n
    accuracy_ok = drop_pp <= budget_pp + 1e-9
    record["accuracy_gate"] = {"split": "validation", "images": n, "fp32_accuracy": fp32_right / n,
                               "int8_accuracy": int8_right / n, "drop_pp": drop_pp, "budget_pp": budget_pp,
                               "passed": accuracy_ok}

    x = np.resize(data.x_val, (SPEED_BATCH, *data.x_val.shape[1:]))  # repeats images when val has fewer
    speed = measure_speed(*sessions, x)
    speedup = speed["int8_images_per_second"] / speed["fp32_images_per_second"]
    speed_ok = speedup > 1.0
    record["speed_gate"] = {"batch": SPEED_BATCH, "rounds": SPEED_ROUNDS, "threads": "onnxruntime default",
                            "cpu": cpu_name(), **speed, "speedup": speedup, "passed": speed_ok}

    if data.x_test is not None and len(data.x_test):
        fp32_test, int8_test = (predicted_classes(s, data.x_test) for s in sessions)
        record["test"] = {"images": len(data.y_test), "fp32_accuracy": float((fp32_test == data.y_test).mean()),
                          "int8_accuracy": float((int8_test == data.y_test).mean()),
                          "top1_agreement_with_fp32": float((fp32_test == int8_test).mean())}

    accuracy = (f"validation accuracy {int8_right / n:.4f} vs fp32 {fp32_right / n:.4f}, a drop of {drop_pp:.2f} pp "
                f"({'within' if accuracy_ok else 'over'} the {budget_pp:g} pp budget)")
    faster = f"{speedup:.2f}x fp32's images/s at batch {SPEED_BATCH} on this CPU"
    failed = []
    if not accuracy_ok:
        failed.append(f"{accuracy}: raise --int8-budget, or calibrate on more images (--calibration)")
    if not speed_ok:
        failed.append(f"not faster than fp32 here ({faster}): int8 pays off on CPUs with VNNI/AMX or ARM dot-product")
    if failed:
        return refuse("; and ".join(failed))
    record.update(kept=True, reason=f"{accuracy}; {faster}")
    size = f"{record['int8_bytes'] / 1e3:.0f} kB, {record['int8_bytes'] / record['fp32_bytes']:.2f}x fp32's"
    log(f"int8: model.int8.onnx kept ({size}): {record['reason']}")
    return record


"""Which device a bundle fits, how fast it runs there, at what energy; and whether a device can train a config.
Torch-free, except `plan_training`'s measured step on this machine (tandem.hardware.train_memory).

    tandem plan bundles/animals/1 [--device rpi5,coral-edgetpu|all] [--batch 8] [--precision int8] [--json]
    tandem plan --train [run.yaml] [key=value ...] [--device stm32h7] [--json]

    report = plan_inference("bundles/animals/1", load_devices().values(), batch=1)
    report = plan_training(load_config(None, ["model.width=32"]), load_devices().values())

The estimate is a roofline per layer: each layer takes the longer of its FLOPs at the device's peak for that
precision and its bytes (weights, activations read and written) at the device's memory bandwidth; latency is the
sum over layers. On this machine ("host") the peak and bandwidth are measured (tandem.hardware.probe), ONNX
Runtime's measured cost per run and per kernel is added, and the bundle itself is timed beside the estimate.
Energy per image is the device's power times the time. A model fits when weights + activations at the batch +
the runtime's own memory fit the device's memory (weights may live in a separate weight memory, e.g. flash).
Training: weights, gradients, optimizer state, activations kept for the backward pass, the training set when it
is held in memory; time per step is about 3x the forward pass (forward, and a backward twice its cost).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from tandem.errors import UserError
from tandem.hardware.analysis import analyze_bundle, has_int8
from tandem.hardware.devices import Device
# The planner's public names, importable from here as before: the estimate model and the training planner.
from tandem.hardware.plan_train import (OPTIMIZER_STATES, TrainEstimate, TrainingModel,
                                        activation_elements_for_training, dataset_size, estimate_training,
                                        plan_training, steps_per_epoch)
from tandem.hardware.roofline import (Estimate, Fit, Roofline, check_precisions, derived, estimate_inference,
                                      inference_fit, roofline, wanted_precisions)

__all__ = ["OPTIMIZER_STATES", "Estimate", "Fit", "Roofline", "TrainEstimate", "TrainingModel",
           "activation_elements_for_training", "check_precisions", "dataset_size", "derived", "estimate_inference",
           "estimate_training", "inference_fit", "measure_bundle", "plan_inference", "plan_training", "roofline",
           "steps_per_epoch"]


# --- measuring the bundle on this machine ---------------------------------------------------------------


def measure_bundle(bundle: str | Path, precision: str, batch: int, seconds: float = 1.0) -> dict:
    """Time the bundle's model for `precision` on this machine, loaded by tandem.runtime's Predictor (its checks,
    its session options), on preprocessed inputs: the model's time, without decoding images."""
    import numpy as np

    from tandem.runtime import Predictor

    try:
        predictor = Predictor.load(bundle, verify=False, precision=precision)  # the model file's hash is checked
    except TypeError:  # a runtime that runs model.onnx only
        if precision != "fp32":
            raise UserError(f"this tandem's runtime cannot run the {precision} model; upgrade tandem") from None
        predictor = Predictor.load(bundle, verify=False)
    x = np.random.default_rng(0).standard_normal(
        (batch, predictor.channels, predictor.image_size, predictor.image_size)).astype(np.float32)
    feed = {predictor.input_name: x}
    for _ in range(3):
        predictor.session.run(None, feed)
    times, stop = [], time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < stop and len(times) < 20_000):
        start = time.perf_counter()
        predictor.session.run(None, feed)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"precision": precision, "batch": batch, "runs": len(times), "median_s": times[len(times) // 2],
            "best_s": times[0], "model_file": "model.int8.onnx" if precision == "int8" else "model.onnx"}


# --- inference ------------------------------------------------------------------------------------------


def plan_inference(bundle: str | Path, devices: Iterable[Device], precisions: list[str] | None = None,
                   batch: int = 1, measure: bool = True, seconds: float = 1.0, host: bool = True) -> dict:
    """Estimates for every device and precision it runs (of `precisions`, default all); with `host`, this machine
    too, probed, and with `measure`, the bundle timed on it beside its estimate."""
    from tandem.bundle import read_manifest

    read_manifest(bundle)  # every hash checked once, here
    fp32 = analyze_bundle(bundle, "fp32")
    int8 = analyze_bundle(bundle, "int8") if has_int8(bundle) else None
    devices = list(devices)
    probe = None
    if host:
        from tandem.hardware.probe import host_device, probe_host

        probe = probe_host()
        devices = [host_device(probe)] + [d for d in devices if d.name != "host"]
    estimates, skipped, measured = [], [], []
    for device in devices:
        wanted, missing = wanted_precisions(device, precisions, device.precisions)
        skipped += [{"device": device.name, "precision": p, "reason": f"{device.name} does not run {p}"} for p in missing]
        for precision in wanted:
            analysis = int8 if precision == "int8" and int8 is not None else fp32
            estimate = estimate_inference(analysis, device, precision, batch)
            estimates.append(estimate)
            if device.measured and measure and (precision == "fp32" or (precision == "int8" and int8 is not None)):
                got = measure_bundle(bundle, precision, batch, seconds)
                measured.append({**got, "device": "host", "predicted_s": estimate.latency_s,
                                 "ratio": got["median_s"] / estimate.latency_s,
                                 "best_ratio": got["best_s"] / estimate.latency_s})
    return {
        "bundle": str(bundle), "batch": batch,
        "model": {"fp32": fp32.totals(), "int8": int8.totals() if int8 else None,
                  "input_shape": fp32.input_shape, "output_shape": fp32.output_shape, "kernels": fp32.kernels},
        "host_probe": probe.to_dict() if probe else None,
        "estimates": [e.to_dict() for e in estimates],
        "skipped": skipped,
        "measured": measured,
    }

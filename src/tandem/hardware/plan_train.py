"""Whether a device can train a config, and how fast: weights, gradients, optimizer state, activations kept for the
backward pass and the training set held in memory, against the device's memory; a step at about 3x the forward
pass's roofline time. Torch-free, except `plan_training`'s measured step on this machine
(tandem.hardware.train_memory, whose torch is imported only there).

    report = plan_training(load_config(None, ["model.width=32"]), load_devices().values())
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.errors import UserError
from tandem.hardware.analysis import format_bytes
from tandem.hardware.costs import PRECISION_BYTES, Analysis
from tandem.hardware.devices import Device
from tandem.hardware.roofline import derived, describe_parts, roofline, wanted_precisions


@dataclass
class TrainingModel:
    """What a config trains, from tandem.hardware.train_memory: its inference graph's analysis and its trainable size."""

    analysis: Analysis
    trainable_parameters: int
    classes: int
    train_images: int
    data_bytes: int            # the training split held in memory (uint8 pixels + float32 copy)


def activation_elements_for_training(analysis: Analysis) -> int:
    """Activations autograd keeps for the backward pass, per image: the input and every layer's output
    (an estimate from the inference graph; batch-norm layers folded into convs there keep one more)."""
    return analysis.input_elements + sum(layer.output_elements for layer in analysis.layers if not layer.view)


OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}  # fp32 tensors per parameter: momentum; first and second moments


@dataclass
class TrainEstimate:
    device: str
    title: str
    kind: str
    precision: str
    batch: int
    memory: dict
    fits: bool
    reason: str
    largest_batch: int
    step_s: float
    epoch_s: float
    energy_per_epoch_j: float | None
    data_in_memory: bool
    measured_figures: bool
    derived_figures: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _optimizer_states(cfg) -> int:
    return OPTIMIZER_STATES[cfg.optim.name] if cfg.optim.name != "sgd" or cfg.optim.momentum > 0 else 0


def steps_per_epoch(images: int, batch: int) -> int:
    return images // batch + (1 if images % batch > 1 else 0)  # as tandem.train.loop (a last batch of one is dropped)


def estimate_training(model: TrainingModel, cfg, device: Device, precision: str, batch: int) -> TrainEstimate:
    a = model.analysis
    params = model.trainable_parameters
    per_image = activation_elements_for_training(a) * PRECISION_BYTES[precision]
    # fp32 master weights and gradients, also under bf16 autocast; optimizer state in fp32.
    fixed = {"weights": params * 4, "gradients": params * 4, "optimizer": params * 4 * _optimizer_states(cfg),
             "runtime": int(device.train_overhead.value if device.train_overhead else 0)}
    memory = device.memory.value
    # data.stream: on streams a folder from disk; auto holds the split in memory unless it would take more than
    # a quarter of the memory (tandem.data.stream.should_stream); off always holds it.
    stream = cfg.data.stream == "on" or (cfg.data.stream == "auto" and model.data_bytes > memory / 4
                                         and cfg.data.source != "animals" and Path(cfg.data.source).is_dir())
    data = 0 if stream else model.data_bytes
    parts = {**fixed, "activations": per_image * batch, "data": data}
    total = sum(parts.values())
    room = memory - sum(fixed.values()) - data
    largest = max(0, min(65536, model.train_images, int(room // per_image))) if per_image else 0
    fits = total <= memory
    why = f"{format_bytes(total)} ({describe_parts(parts)}) of {format_bytes(memory)}"
    if fits:
        whole = " (the whole training set)" if largest == model.train_images else ""
        reason = why + f"; batches up to {largest:,}{whole} fit"
    elif largest:
        reason = f"needs {why}; batch_size={largest:,} would fit"
    else:
        without = sum(fixed.values()) + per_image
        reason = (f"needs {why}; even batch 1 does not fit" +
                  (f" (the training set alone takes {format_bytes(data)}: data.stream=on would stream a folder)"
                   if data and without <= memory else ""))
    step = 3 * roofline(a, device, precision, batch).seconds
    step += params * 4 * (3 + 2 * _optimizer_states(cfg)) / device.memory_bandwidth.value  # optimizer: read w, g, state; write w, state
    epoch = step * steps_per_epoch(model.train_images, batch)
    power = device.power.value if device.power else None
    return TrainEstimate(device.name, device.title, device.kind, precision, batch, {**parts, "total": total,
                         "available": int(memory)}, fits, reason, largest, step, epoch,
                         power * epoch if power else None, not stream, device.measured, derived(device))


def dataset_size(cfg) -> tuple[int, int]:
    """(images in the training split, about; classes) of a config's data, without decoding images."""
    import numpy as np

    source = cfg.data.source
    if source == "animals":
        from tandem.data.sources import ANIMAL_CLASSES, ANIMALS_FILE

        with np.load(ANIMALS_FILE, allow_pickle=False) as arrays:
            total, classes = len(arrays["y"]), len(ANIMAL_CLASSES)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            from tandem.data.sources import list_folder

            names, files, _ = list_folder(path)
            total, classes = len(files), len(names)
        elif path.is_file():
            try:
                with np.load(path, allow_pickle=False) as arrays:
                    y = arrays["y"]
                    classes = len(arrays["classes"]) if "classes" in arrays else int(y.max()) + 1
                    total = len(y)
            except (OSError, ValueError, KeyError) as err:
                raise UserError(f"cannot read {path} as an .npz with x and y ({err})") from None
        else:
            raise UserError(f"data.source {source} does not exist; give a folder, an .npz or 'animals'")
    train = int(round(total * (1 - cfg.data.val_fraction - cfg.data.test_fraction)))
    return max(1, train), classes


def _training_precision(cfg, device: Device, native_bf16: bool) -> str | None:
    if cfg.precision != "auto":
        return cfg.precision if cfg.precision in device.train_precisions else None
    if device.measured:  # this machine trains as tandem.train.device.pick_precision decides
        return "bf16" if native_bf16 and "bf16" in device.train_precisions else "fp32"
    for precision in ("bf16", "fp32"):  # what `precision=auto` picks there (no fp16: it needs loss scaling)
        if precision in device.train_precisions:
            return precision
    return device.train_precisions[0]


def plan_training(cfg, devices: Iterable[Device], precisions: list[str] | None = None, batch: int | None = None,
                  measure: bool = True, seconds: float = 2.0, host: bool = True) -> dict:
    """Can each device train `cfg` (a TrainConfig)? Memory, time per epoch, the largest batch; on this machine
    a real training step is measured beside the estimate (needs torch)."""
    from tandem.hardware import train_memory  # torch: the training side, imported only here

    batch = batch or cfg.batch_size
    train_images, classes = dataset_size(cfg)
    onnx_bytes, trainable = train_memory.inference_graph(cfg, classes)
    from tandem.hardware.analysis import analyze_model

    analysis = analyze_model(onnx_bytes, f"{cfg.model.name} (width {cfg.model.width}) from the config")
    size = cfg.data.image_size ** 2 * cfg.data.channels
    model = TrainingModel(analysis, trainable, classes, train_images, train_images * size * 5)  # uint8 + float32
    devices = list(devices)
    probe = None
    if host:
        from tandem.hardware.probe import host_device, probe_host

        probe = probe_host()
        peaks = train_memory.gemm_peaks(["fp32", "bf16"] if probe.native_bf16 else ["fp32"])
        devices = [host_device(probe, train_peaks=peaks)] + [d for d in devices if d.name != "host"]
    estimates, skipped, measured = [], [], []
    for device in devices:
        if not device.train_precisions:
            skipped.append({"device": device.name, "precision": None,
                            "reason": f"{device.name} does not train ({device.kind}, inference only)"})
            continue
        if precisions:
            wanted, missing = wanted_precisions(device, precisions, device.train_precisions)
        else:
            chosen = _training_precision(cfg, device, bool(probe and probe.native_bf16))
            wanted, missing = ([chosen], []) if chosen else ([], [cfg.precision])
        skipped += [{"device": device.name, "precision": p, "reason": f"{device.name} does not train in {p}"}
                    for p in missing]
        for precision in wanted:
            estimate = estimate_training(model, cfg, device, precision, batch)
            estimates.append(estimate)
            if device.measured and measure:
                got = train_memory.measure_training_step(cfg, classes, batch, precision, seconds)
                predicted_act = estimate.memory["activations"]
                measured.append({**got, "device": "host", "predicted_step_s": estimate.step_s,
                                 "ratio": got["median_s"] / estimate.step_s,
                                 "best_ratio": got["best_s"] / estimate.step_s,
                                 "predicted_activation_bytes": predicted_act,
                                 "activation_ratio": got["activation_bytes"] / predicted_act if predicted_act else None,
                                 "measured_epoch_s": got["median_s"] * steps_per_epoch(train_images, batch)})
    return {
        "config": {"model": cfg.model.name, "width": cfg.model.width, "image_size": cfg.data.image_size,
                   "channels": cfg.data.channels, "classes": classes, "optimizer": cfg.optim.name,
                   "batch_size": batch, "precision": cfg.precision, "data_source": cfg.data.source,
                   "data_stream": cfg.data.stream},
        "model": {**analysis.totals(), "trainable_parameters": trainable,
                  "training_activation_bytes_per_image": {p: activation_elements_for_training(analysis) * b
                                                          for p, b in PRECISION_BYTES.items()}},
        "data": {"train_images": train_images, "bytes_in_memory": model.data_bytes},
        "host_probe": probe.to_dict() if probe else None,
        "estimates": [e.to_dict() for e in estimates],
        "skipped": skipped,
        "measured": measured,
    }

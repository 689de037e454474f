"""Which device a bundle fits, how fast it runs there, at what energy; and whether a device can train a config.
Torch-free, except `plan_training`'s measured step on this machine (tandem.train.memory, imported only there).

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

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.errors import UserError
from tandem.hardware.analysis import PRECISION_BYTES, PRECISIONS, Analysis, analyze_bundle, format_bytes, has_int8
from tandem.hardware.devices import Device


@dataclass
class Roofline:
    seconds: float           # one batch
    compute_seconds: float   # the sum over layers of FLOPs / peak
    memory_seconds: float    # the sum over layers of bytes / bandwidth
    overhead_seconds: float = 0.0

    @property
    def bound(self) -> str:
        """What limits it: compute, memory, or the fixed cost per run and kernel ("launch")."""
        if self.overhead_seconds > max(self.compute_seconds, self.memory_seconds):
            return "launch"
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def roofline(analysis: Analysis, device: Device, precision: str, batch: int = 1,
             weights_resident: bool = False) -> Roofline:
    """Time for one batch: per layer the longer of compute and memory time, plus the device's fixed cost per run
    and per kernel where it has one (measured on the host; a GPU's launch latency). weights_resident: weights and
    activations stay on chip, so only the inputs and outputs cross memory_bandwidth (device.on_chip)."""
    peak, bandwidth, size = device.peak(precision), device.memory_bandwidth.value, PRECISION_BYTES[precision]
    depth = device.min_depth[precision].value if precision in device.min_depth else 0.0
    total = compute = memory = 0.0
    if device.on_chip:
        io = (analysis.input_elements + math.prod(analysis.output_shape or [1])) * size * batch
        weights = 0 if weights_resident else analysis.weight_bytes(precision)
        compute = analysis.flops * batch / peak
        memory = (io + weights) / bandwidth
        total = max(compute, memory)
    else:
        for layer in analysis.layers:
            # A shallow Conv / Gemm (a grey image's first layer) costs at least min_depth MACs per output.
            shallow = max(0.0, layer.output_elements * depth - layer.macs) if layer.macs else 0.0
            c = (layer.flops + 2 * shallow) * batch / peak
            m = (layer.weight_bytes(precision) + layer.activation_bytes(precision) * batch) / bandwidth
            compute, memory, total = compute + c, memory + m, total + max(c, m)
    extra = (device.run_overhead.value if device.run_overhead else 0.0) + \
        (device.kernel_overhead.value if device.kernel_overhead else 0.0) * analysis.kernels
    return Roofline(total + extra, compute, memory, extra)


@dataclass
class Fit:
    fits: bool
    reason: str
    needed: dict   # bytes by part, "total", and "available" (and "weight_memory" where the device has one)
    weights_resident: bool = False


def _parts(parts: dict) -> str:
    return " + ".join(f"{name} {format_bytes(value)}" for name, value in parts.items() if value)


def inference_fit(analysis: Analysis, device: Device, precision: str, batch: int = 1) -> Fit:
    weights = analysis.weight_bytes(precision)
    activations = analysis.peak_activation_bytes(precision, batch)
    runtime = int(device.runtime_overhead.value)
    memory = device.memory.value
    where = "on-chip memory" if device.on_chip else "memory"
    if device.weight_memory is not None:
        ram = {"activations": activations, "runtime": runtime}
        needed = {"weights": weights, **ram, "total": sum(ram.values()), "available": int(memory),
                  "weight_memory": int(device.weight_memory.value)}
        if weights > device.weight_memory.value:
            return Fit(False, f"weights {format_bytes(weights)} exceed the {format_bytes(device.weight_memory.value)} "
                              "weight memory", needed)
        if needed["total"] > memory:
            return Fit(False, f"needs {format_bytes(needed['total'])} ({_parts(ram)}) of {format_bytes(memory)} "
                              f"{where}; weights {format_bytes(weights)} fit the weight memory", needed)
        return Fit(True, f"{format_bytes(needed['total'])} ({_parts(ram)}) of {format_bytes(memory)} {where}; "
                         f"weights {format_bytes(weights)} of {format_bytes(device.weight_memory.value)} weight memory",
                   needed)
    parts = {"weights": weights, "activations": activations, "runtime": runtime}
    needed = {**parts, "total": sum(parts.values()), "available": int(memory)}
    if needed["total"] <= memory:
        return Fit(True, f"{format_bytes(needed['total'])} ({_parts(parts)}) of {format_bytes(memory)} {where}",
                   needed, weights_resident=device.on_chip)
    if device.on_chip and activations + runtime <= memory:
        # An on-chip accelerator (the Edge TPU) streams parameters that do not fit from the host, every inference.
        return Fit(True, f"weights {format_bytes(weights)} exceed the {format_bytes(memory)} on-chip memory: they "
                         "stream from the host on every inference (slower)", needed)
    return Fit(False, f"needs {format_bytes(needed['total'])} ({_parts(parts)}) of {format_bytes(memory)} {where}",
               needed)


@dataclass
class Estimate:
    device: str
    title: str
    kind: str
    precision: str
    batch: int
    latency_s: float           # one batch
    throughput_per_s: float    # images per second
    energy_j: float | None     # per image; None where the device publishes no power figure
    bound: str
    compute_s: float
    memory_s: float
    overhead_s: float
    fits: bool
    reason: str
    memory: dict
    measured_figures: bool     # the device's figures were measured here (host), not read from a datasheet
    derived_figures: bool      # some of the device's figures are derived estimates, not datasheet values

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_inference(analysis: Analysis, device: Device, precision: str, batch: int = 1) -> Estimate:
    fit = inference_fit(analysis, device, precision, batch)
    line = roofline(analysis, device, precision, batch, fit.weights_resident)
    power = device.power.value if device.power else None
    return Estimate(device.name, device.title, device.kind, precision, batch, line.seconds, batch / line.seconds,
                    power * line.seconds / batch if power else None, line.bound, line.compute_seconds,
                    line.memory_seconds, line.overhead_seconds, fit.fits, fit.reason, fit.needed, device.measured,
                    derived(device))


def derived(device: Device) -> bool:
    """Whether any of the device's figures is a derived estimate (marked ~ in tables)."""
    return any(figure.estimate for figure in device.figures().values())


def _wanted(device: Device, precisions: list[str] | None, supported: list[str]) -> tuple[list[str], list[str]]:
    """(precisions to estimate, those asked for that the device does not run)."""
    if not precisions:
        return list(supported), []
    return [p for p in precisions if p in supported], [p for p in precisions if p not in supported]


def check_precisions(precisions: list[str] | None) -> list[str] | None:
    if not precisions:
        return None
    out = [p.strip() for item in precisions for p in item.split(",") if p.strip()]
    unknown = [p for p in out if p not in PRECISIONS]
    if unknown:
        raise UserError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))


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
        wanted, missing = _wanted(device, precisions, device.precisions)
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


# --- training -------------------------------------------------------------------------------------------


@dataclass
class TrainingModel:
    """What a config trains, from tandem.train.memory: its inference graph's analysis and its trainable size."""

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
    why = f"{format_bytes(total)} ({_parts(parts)}) of {format_bytes(memory)}"
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
    from tandem.train import memory as train_memory  # torch: the training side, imported only here

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
            wanted, missing = _wanted(device, precisions, device.train_precisions)
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

"""`tandem inspect` and `tandem plan`: what a network costs, which device it fits, how fast and at what energy it
runs there, and whether a device can train it. Torch-free, except `plan --train` (the training side).

    tandem inspect BUNDLE [--precision int8] [--json]
    tandem plan BUNDLE [--device NAME[,NAME...]|all] [--batch N] [--precision P] [--devices FILE] [--json]
    tandem plan --train [CONFIG.yaml] [key=value ...] [--device NAME] [--batch N] [--json]
    tandem plan --list-devices [--devices FILE] [--json]

cli.py calls register(sub) with its subparsers; each handler takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.cli import _positive_float, _positive_int, _print_json  # the command line's own argument types
from tandem.errors import UserError
from tandem.hardware.analysis import Analysis, format_bytes, format_count

PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")

INSPECT_EXAMPLES = """examples:
  tandem inspect bundles/animals/1                    per-layer table and totals of model.onnx
  tandem inspect bundles/animals/1 --precision int8   the same for model.int8.onnx (when the bundle has it)
  tandem inspect bundles/animals/1 --json             {source, input_shape, output_shape, quantized, totals, layers}

MACs count the multiply-accumulates of Conv, Gemm and MatMul; FLOPs are 2 per MAC plus bias adds, elementwise
ops and pooling. Weight bytes are given at fp32, fp16/bf16 and int8 (int8 keeps biases as int32). Peak activation
memory walks the graph in order, freeing each tensor after its last reader. Intensity is FLOPs per byte moved."""

PLAN_EXAMPLES = """examples:
  tandem plan bundles/animals/1                          every device and precision, and this machine, measured
  tandem plan bundles/animals/1 --device rpi5,coral-edgetpu,stm32h7 --precision int8
  tandem plan bundles/animals/1 --device host --batch 64 --json
  tandem plan bundles/animals/1 --devices my_devices.yaml --device my-board
  tandem plan --train                                    can each device train the default config?
  tandem plan --train run.yaml model.width=64 --device stm32h7,rpi5
  tandem plan --list-devices                             every profile with each figure's source

Estimates are a roofline per layer: the longer of the layer's FLOPs at the device's peak for the precision and
its bytes (weights, activations read and written) at the memory bandwidth; energy is the device's power times
that time. A model fits when weights + activations at the batch + the runtime's memory fit the device memory.
Devices marked ~ have figures derived from their datasheets (see --list-devices). This machine ("host") is
measured instead: a GEMM and a copy calibrate its roofline, then the bundle (or, with --train, a real training
step) is timed beside the estimate. Leave it out with --no-host; skip the timing with --no-measure."""


def register(sub) -> None:
    """Add `inspect` and `plan` to the `tandem` command's subparsers."""
    p = sub.add_parser("inspect", help="per-layer parameters, MACs, FLOPs, weight bytes and activation memory of a bundle",
                       description="Analyse a bundle's ONNX graph (shape inference at batch 1): per layer and in total, "
                                   "parameters, MACs and FLOPs per image, weight bytes per precision, peak activation "
                                   "memory, arithmetic intensity. Torch-free; needs the onnx package.",
                       epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="which graph: fp32 = model.onnx, int8 = model.int8.onnx (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="which device a bundle fits, how fast, at what energy; or whether a device can train",
                       description="Estimate latency, throughput, energy and memory fit of a bundle on device profiles "
                                   "(CPU, GPU, ASIC, FPGA, microcontroller) with a roofline model, and measure it on "
                                   "this machine. With --train: memory, time per epoch and the largest batch for "
                                   "training a config on each device.",
                       epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="BUNDLE | [CONFIG.yaml] [key=value ...]",
                   help="a bundle folder; with --train, an optional config file and key=value overrides "
                        "(as `tandem train` takes them)")
    p.add_argument("--train", action="store_true", help="plan training of a config instead of inference of a bundle")
    p.add_argument("--device", action="append", metavar="NAME",
                   help="device names (comma list, repeatable), 'host' for this machine, or all (default: all)")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                   help="images per batch (default: 1; with --train, the config's batch_size)")
    p.add_argument("--precision", action="append", metavar="P",
                   help=f"only these precisions ({', '.join(PRECISION_CHOICES)}; comma list, repeatable; default: "
                        "every precision a device runs; with --train, the one the config's precision picks)")
    p.add_argument("--devices", metavar="FILE", help="a YAML file of more device profiles (the layout of the "
                   "built-in devices.yaml); an entry with a built-in name replaces it")
    p.add_argument("--list-devices", action="store_true", help="list the device profiles with each figure's source")
    p.add_argument("--no-host", action="store_true", help="leave this machine out (no probe, no measurement)")
    p.add_argument("--no-measure", action="store_true", help="estimate this machine without timing the bundle "
                   "(or the training step)")
    p.add_argument("--seconds", type=_positive_float, default=None, metavar="S",
                   help="how long to time the bundle or the training step on this machine (default: 1, --train: 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_inspect(args) -> int:
    from tandem.hardware.analysis import analyze_bundle

    analysis = analyze_bundle(args.bundle, args.precision)
    if args.json:
        _print_json(analysis.to_dict())
    else:
        print(describe(analysis))
    return 0


def _device_selection(args) -> tuple[list[str] | None, bool]:
    """(device names other than the host, or None for all; whether this machine is included)."""
    names = [n.strip() for item in (args.device or []) for n in item.split(",") if n.strip()]
    if args.device and not names:
        raise UserError("--device names no device; give names such as rpi5,stm32h7, host or all")
    if not names or "all" in names:
        return None, not args.no_host
    host = "host" in names
    if host and args.no_host:
        raise UserError("--device host and --no-host contradict each other; drop one")
    return [n for n in names if n != "host"], host


def cmd_plan(args) -> int:
    from tandem.hardware.devices import load_devices, select
    from tandem.hardware.plan import check_precisions

    devices = load_devices(args.devices)
    if args.list_devices:
        if args.json:
            _print_json({name: device.model_dump(exclude_none=True) for name, device in devices.items()})
        else:
            print(describe_devices(devices))
        return 0
    names, host = _device_selection(args)
    chosen = select(devices, names) if names is None or names else []
    precisions = check_precisions(args.precision)
    if args.train:
        return _plan_training(args, chosen, host, precisions)
    if len(args.targets) != 1 or "=" in args.targets[0]:
        raise UserError("give one bundle: tandem plan BUNDLE (or --train [CONFIG.yaml] [key=value ...] to plan "
                        "training)")
    from tandem.hardware.plan import plan_inference

    report = plan_inference(args.targets[0], chosen, precisions, args.batch or 1, measure=not args.no_measure,
                            seconds=args.seconds or 1.0, host=host)
    if args.json:
        _print_json(report)
    else:
        print(format_inference(report))
    return 0


def _plan_training(args, chosen, host: bool, precisions) -> int:
    from tandem.config import load_config
    from tandem.hardware.plan import plan_training

    settings = list(args.targets)
    config_file = settings.pop(0) if settings and "=" not in settings[0] else None
    if config_file and (Path(config_file) / "manifest.json").is_file():
        raise UserError(f"{config_file} is a bundle; --train plans training from a config (tandem plan --train "
                        f"[CONFIG.yaml] [key=value ...]); for inference drop --train: tandem plan {config_file}")
    cfg = load_config(config_file, settings)
    report = plan_training(cfg, chosen, precisions, args.batch, measure=not args.no_measure,
                           seconds=args.seconds or 2.0, host=host)
    if args.json:
        _print_json(report)
    else:
        print(format_training(report))
    return 0


# --- text output ----------------------------------------------------------------------------------------


def describe_devices(devices: dict) -> str:
    """Every profile, one block each: the figures with their sources (~ marks derived estimates)."""
    units = {"peak_ops": "ops/s", "memory_bandwidth": "B/s", "power": "W", "run_overhead": "s", "kernel_overhead": "s"}
    lines = []
    for device in devices.values():
        lines.append(f"{device.name}: {device.title} [{device.kind}; runs {', '.join(device.precisions)}; trains "
                     f"{', '.join(device.train_precisions) or 'no'}]")
        for field, figure in device.figures().items():
            unit = units.get(field.split(".")[0], "B")
            value = (format_count(figure.value) + " " + unit) if unit not in ("B", "s", "W") else (
                format_bytes(figure.value) if unit == "B" else f"{figure.value:g} {unit}")
            mark = "~" if figure.estimate else " "
            lines.append(f"  {mark}{field:<18} {value:<14} {figure.source}"
                         + (f"  [estimate: {figure.estimate}]" if figure.estimate else ""))
    return "\n".join(lines)


def _name(row: dict) -> str:
    """The device column: ~ before a device whose figures are partly derived estimates."""
    return ("~" if row["derived_figures"] else "") + row["device"]


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 600:
        return f"{s:.3g} s"
    if s < 36_000:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def format_energy(j: float | None) -> str:
    if j is None:
        return "n/a"
    for unit, scale in (("J", 1), ("mJ", 1e-3), ("µJ", 1e-6)):
        if j >= scale:
            return f"{j / scale:.3g} {unit}"
    return f"{j * 1e9:.3g} nJ"


def _probe_line(probe: dict | None) -> str:
    if not probe:
        return ""
    int8 = f", int8 conv {probe['int8_ops'] / 1e9:.0f} GOP/s" if probe.get("int8_ops") else ""
    if probe.get("int8_min_depth"):
        int8 += f" (at least {probe['int8_min_depth']:.0f} MACs per output)"
    return (f"host probe ({probe['seconds']:.1f} s): {probe['cpu']}, {probe['cores']} cores: fp32 GEMM "
            f"{probe['fp32_flops'] / 1e9:.0f} GFLOP/s{int8}, copy {probe['copy_bandwidth'] / 1e9:.1f} GB/s, "
            f"ONNX Runtime {probe['run_overhead_s'] * 1e6:.1f} µs per run + {probe['kernel_overhead_s'] * 1e6:.2f} µs "
            "per kernel")


def format_inference(report: dict) -> str:
    m = report["model"]["fp32"]
    lines = [f"bundle {report['bundle']}: {m['parameters']:,} parameters, {m['macs'] / 1e6:.3g} M MACs "
             f"({m['flops'] / 1e6:.3g} MFLOP) per image; model.int8.onnx: "
             f"{'yes' if report['model']['int8'] else 'no (int8 rows assume its weights quantized)'}",
             _probe_line(report["host_probe"]),
             f"batch {report['batch']}; roofline per layer (the longer of FLOPs at peak and bytes at bandwidth); "
             "energy = power x time; ~ marks devices with derived (not datasheet) figures", ""]
    lines.append(f"{'device':<17} {'prec':<5} {'latency':>9} {'images/s':>10} {'energy/img':>10} {'bound':<8} "
                 f"{'memory needed':>13} {'of':>8}  fits")
    for e in report["estimates"]:
        lines.append(f"{_name(e):<17} {e['precision']:<5} {format_seconds(e['latency_s']):>9} "
                     f"{e['throughput_per_s']:>10,.0f} {format_energy(e['energy_j']):>10} {e['bound']:<8} "
                     f"{format_bytes(e['memory']['total']):>13} {format_bytes(e['memory']['available']):>8}  "
                     f"{'yes' if e['fits'] else 'NO'}")
    lines.append("")
    for e in report["estimates"]:
        if not e["fits"] or "stream" in e["reason"]:
            lines.append(f"{e['device']} {e['precision']}: {'fits, but ' if e['fits'] else 'does not fit: '}{e['reason']}")
    for s in report["skipped"]:
        lines.append(f"skipped: {s['reason']}")
    for r in report["measured"]:
        lines.append(f"host {r['precision']} ({r['model_file']}, batch {r['batch']}): predicted "
                     f"{format_seconds(r['predicted_s'])}, measured {format_seconds(r['median_s'])} (median of "
                     f"{r['runs']:,} runs; best {format_seconds(r['best_s'])}): measured/predicted {r['ratio']:.2f} "
                     f"(best {r['best_ratio']:.2f})")
    return "\n".join(line for line in lines if line is not None)


def format_training(report: dict) -> str:
    c, m, d = report["config"], report["model"], report["data"]
    lines = [f"train {c['model']} (width {c['width']}) on {c['data_source']}: {c['classes']} classes, about "
             f"{d['train_images']:,} training images ({format_bytes(d['bytes_in_memory'])} in memory), "
             f"{c['optimizer']}, batch {c['batch_size']}",
             f"{m['trainable_parameters']:,} trainable parameters, {m['flops'] / 1e6:.3g} MFLOP forward per image; "
             f"activations kept for backward about {format_bytes(m['training_activation_bytes_per_image']['fp32'])} "
             "per image in fp32",
             _probe_line(report["host_probe"]),
             "step = 3 x forward roofline + optimizer update; ~ marks devices with derived figures", ""]
    lines.append(f"{'device':<17} {'prec':<5} {'step':>9} {'epoch':>9} {'energy/epoch':>12} {'memory':>9} "
                 f"{'of':>8} {'largest batch':>13}  fits")
    for e in report["estimates"]:
        lines.append(f"{_name(e):<17} {e['precision']:<5} {format_seconds(e['step_s']):>9} "
                     f"{format_seconds(e['epoch_s']):>9} {format_energy(e['energy_per_epoch_j']):>12} "
                     f"{format_bytes(e['memory']['total']):>9} {format_bytes(e['memory']['available']):>8} "
                     f"{e['largest_batch']:>13,}  {'yes' if e['fits'] else 'NO'}")
    lines.append("")
    for e in report["estimates"]:
        lines.append(f"{e['device']} {e['precision']}: {'fits: ' if e['fits'] else 'does not fit: '}{e['reason']}")
    for s in report["skipped"]:
        lines.append(f"skipped: {s['reason']}")
    for r in report["measured"]:
        lines.append(f"host {r['precision']} (batch {r['batch']}, a real training step on random images): step "
                     f"predicted {format_seconds(r['predicted_step_s'])}, measured {format_seconds(r['median_s'])} "
                     f"(median of {r['steps']} steps; best {format_seconds(r['best_s'])}): measured/predicted "
                     f"{r['ratio']:.2f} (best {r['best_ratio']:.2f}); activations predicted "
                     f"{format_bytes(r['predicted_activation_bytes'])}, measured {format_bytes(r['activation_bytes'])} "
                     f"(tensors autograd saved): {r['activation_ratio']:.2f}; epoch about "
                     f"{format_seconds(r['measured_epoch_s'])} measured")
    return "\n".join(lines)


def describe(analysis: Analysis) -> str:
    """The text `tandem inspect` prints: one row per layer, then the totals."""
    rows = [f"{'layer':<24} {'op':<18} {'output':<16} {'params':>9} {'MACs':>9} {'FLOPs':>9} "
            f"{'fp32 B':>9} {'int8 B':>9} {'FLOP/B':>7}"]
    for layer in analysis.layers:
        shape = "x".join(str(d) for d in layer.output_shape)
        rows.append(f"{layer.name[-24:]:<24} {layer.op:<18} {shape:<16} {format_count(layer.parameters):>9} "
                    f"{format_count(layer.macs):>9} {format_count(layer.flops):>9} "
                    f"{format_bytes(layer.weight_bytes('fp32')):>9} {format_bytes(layer.weight_bytes('int8')):>9} "
                    f"{layer.intensity('fp32'):>7.2f}")
    a = analysis
    rows += [
        "",
        f"{a.source}: input {'x'.join(map(str, a.input_shape))}, output {'x'.join(map(str, a.output_shape))}"
        f"{', int8 QDQ graph' if a.quantized else ''}; per image (batch 1)",
        f"parameters        {a.parameters:,}",
        f"MACs              {a.macs:,}  ({format_count(a.macs)})",
        f"FLOPs             {a.flops:,}  ({format_count(a.flops)})",
        "weight bytes      " + ", ".join(f"{p} {format_bytes(a.weight_bytes(p))}" for p in ("fp32", "fp16", "int8"))
        + f"  (stored in this file: {format_bytes(a.stored_bytes)})",
        "peak activations  " + ", ".join(f"{p} {format_bytes(a.peak_activation_bytes(p))}" for p in ("fp32", "fp16", "int8")),
        "FLOP per byte     " + ", ".join(f"{p} {a.intensity(p):.2f}" for p in ("fp32", "fp16", "int8"))
        + "  (weights + activations read and written once per layer)",
    ]
    if a.uncounted:
        rows.append(f"not counted (unknown cost, taken as 0): {', '.join(a.uncounted)}")
    return "\n".join(rows)

"""What `tandem inspect` and `tandem plan` print: the analysis, the device profiles and the plans as text."""

from __future__ import annotations

from tandem.hardware.analysis import Analysis, format_bytes, format_count


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
                     f"(median of {r['steps']} step{'' if r['steps'] == 1 else 's'}; best {format_seconds(r['best_s'])}): measured/predicted "
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

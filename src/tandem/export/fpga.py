"""Checkpoint -> FPGA: an hls4ml HLS project for the AMD Kria KV260 and its bit-accurate fixed-point emulation.

    tandem export runs/latest --out bundles/animals/1 --fpga      # also writes bundles/animals/1/fpga/
    report = export_fpga("runs/latest", "bundles/animals/1")      # the same from Python; returns fpga/report.json

hls4ml (PyTorch front end, Vitis backend, io_stream) turns the run's best checkpoint into an HLS C++ project in
`<bundle>/fpga/`, and g++ compiles its C++ emulation, which computes what the synthesized design computes (ap_fixed
arithmetic, bit for bit). The report holds the ap_fixed<W,I> precision chosen, the emulation's top-1 agreement with
the float model and its accuracy on the run's test split, and an estimate of resources against the KV260. Synthesis
needs AMD Vitis HLS / Vivado, which tandem does not: `fpga/README.md` says what to run with them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from tandem.errors import UserError
from tandem.export.fpga_resources import (
    BRAM36_BITS,
    CLOCK_MHZ,
    KV260,
    URAM_BITS,
    estimate_resources,
    mult_layers,
    plan_reuse,
)
from tandem.export.source import Source, open_source

FPGA_DIR, REPORT = "fpga", "report.json"
AGREEMENT_TARGET = 0.99  # top-1 agreement with the float model, issue 9's target
WIDTHS = (8, 10, 12, 14, 16, 18)  # tried in order by precision="auto"; 18 bits is a DSP48E2's narrower port
FIXED = re.compile(r"ap_fixed<\s*(\d+)\s*,\s*(\d+)\s*>")
# Round to nearest and saturate: an activation beyond the range clamps instead of wrapping round to the other sign.
MODES = "AP_RND_CONV,AP_SAT"
LATENCY_MAX_PARAMETERS = 10_000  # hls4ml's fully parallel (Latency) designs keep weights in registers: small models
UNROLL_LIMIT = 4096  # Vivado/Vitis HLS refuses to unroll more multiplications per layer (hls4ml issue 1013)
TRY_THIS = "train the FPGA-sized variant: tandem train model.name=cnn-fpga"


def require_hls4ml():
    """hls4ml, once it and g++ are known to be there; else a one-line UserError (call it before long work)."""
    try:
        import hls4ml
    except ImportError:
        raise UserError("the FPGA export needs hls4ml: pip install hls4ml==1.3.0") from None
    if shutil.which("g++") is None:
        raise UserError("the FPGA export compiles its C++ emulation with g++, which is not installed: "
                        "apt-get install g++ (or your system's C++ compiler package)")
    return hls4ml


def check_supported(model: nn.Module, name: str = "model") -> None:
    """A one-line UserError unless hls4ml's PyTorch front end can read the model: torch.fx-traceable, and every
    layer one it converts."""
    from hls4ml.converters.pytorch_to_hls import get_supported_pytorch_layers
    from hls4ml.utils.torch import CustomFXTracer

    try:
        graph = CustomFXTracer().trace(model)
    except Exception as err:  # fx raises several types for data-dependent Python
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name} cannot be traced by torch.fx ({first}), which hls4ml needs; {TRY_THIS}") from None
    supported = set(get_supported_pytorch_layers()) | {"Dropout", "Sequential"}
    modules = dict(model.named_modules())
    if not any(isinstance(module, (nn.Conv1d, nn.Conv2d)) for module in modules.values()):
        # The stream is planned per image row (pixels per layer): a model of Linear layers alone has none.
        raise UserError(f"{name} has no convolution: the FPGA export streams images through convolutional models; "
                        f"{TRY_THIS}")
    for node in graph.nodes:
        if node.op == "call_module" and type(modules[node.target]).__name__ not in supported:
            kind = type(modules[node.target]).__name__
            raise UserError(f"{name}: layer {node.target} ({kind}) has no hls4ml converter (it reads "
                            f"Conv1d/2d, Linear, BatchNorm, pooling, ReLU and a few more); {TRY_THIS}")


def check_on_chip(model: nn.Module, width: int, name: str = "model") -> int:
    """hls4ml keeps every weight on chip: a one-line UserError when they cannot fit the KV260 at `width` bits."""
    params = sum(p.numel() for p in model.parameters())
    capacity = KV260["bram36"] * BRAM36_BITS + KV260["uram"] * URAM_BITS
    if params * width > capacity:
        raise UserError(f"{name} has {params:,} parameters: at {width} bits they need {params * width / 1e6:.1f} Mb, "
                        f"more than the KV260's {capacity / 1e6:.1f} Mb of on-chip memory (hls4ml keeps every weight "
                        f"on chip); {TRY_THIS}")
    return params


def _precision(width: int, integer: int) -> str:
    return f"ap_fixed<{width},{integer},{MODES}>"


def _quiet(call, *args, **kwargs):
    """hls4ml prints its progress (and g++'s errors) on stdout: keep them for a message, off the user's screen."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return call(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:  # hls4ml raises bare Exceptions for what it cannot convert or compile
        lines = [line for line in (out.getvalue() + "\n" + str(err)).splitlines() if line.strip()]
        raise UserError(f"hls4ml failed: {lines[-1] if lines else type(err).__name__}; {TRY_THIS}") from None


def convert(model: nn.Module, input_shape: tuple[int, int, int], precision: str, out_dir: Path,
            reuse: dict[str, int] | int = 1, strategy: str = "Latency"):
    """The hls4ml model (not yet written) of a float torch model: Vitis, io_stream, the KV260's part, one precision
    for weights, biases and activations (the accumulators are as wide as they need)."""
    hls4ml = require_hls4ml()
    # internal: the design takes channels-last pixels, the natural order for a stream; the one transpose left
    # puts the last feature map in torch's order before the linear head.
    cfg = _quiet(hls4ml.utils.config_from_pytorch_model, model, tuple(input_shape), granularity="name",
                 backend="Vitis", default_precision=precision, channels_last_conversion="internal")
    cfg["Model"]["Strategy"] = strategy
    for layer, layer_cfg in cfg["LayerName"].items():
        for key, value in layer_cfg.get("Precision", {}).items():
            if key != "accum" and value == "auto":
                layer_cfg["Precision"][key] = precision
        if "ReuseFactor" in layer_cfg:
            layer_cfg["ReuseFactor"] = reuse.get(layer, 1) if isinstance(reuse, dict) else reuse
    return _quiet(hls4ml.converters.convert_from_pytorch_model, model, hls_config=cfg, output_dir=str(out_dir),
                  project_name="myproject", backend="Vitis", io_type="io_stream", part=KV260["part"],
                  clock_period=1000 / CLOCK_MHZ)


def predict(hls_model, x: np.ndarray) -> np.ndarray:
    """Logits of the compiled emulation for NCHW float32 images (fed channels-last, as the design takes them)."""
    out = _quiet(hls_model.predict, np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32))
    return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


def _max_abs(model: nn.Module, hls_model, x: np.ndarray) -> float:
    """The largest magnitude the design must represent: inputs, every layer's output, the weights and biases as
    hls4ml folded them (batch norm into the conv before it)."""
    peak = [float(np.abs(x).max())]
    hooks = [m.register_forward_hook(lambda _m, _i, out: peak.append(float(out.detach().abs().max())))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in hls_model.get_layers():
        peak += [float(np.abs(w.data).max()) for w in layer.weights.values() if w.data.size]
    return max(peak)


def _integer_bits(peak: float) -> int:
    """Integer bits, sign included, for values up to `peak`."""
    return max(1, math.floor(math.log2(peak)) + 2) if peak > 0 else 1


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def _write_project(hls_model, src: Path, dst: Path, x: np.ndarray, logits: np.ndarray) -> None:
    """Copy the project into the bundle: sources, weights, scripts, C-simulation inputs; no compiled library (a
    bundle holds no code that runs on load: `sh build_lib.sh` rebuilds it). hls4ml's own hls4ml_config.yml holds
    the torch module as Python-tagged YAML, an unpickle in all but name: the bundle gets a plain-YAML copy."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "*.o", "hls4ml_config.yml"))
    config = {k: v for k, v in hls_model.config.config.items() if k not in ("PytorchModel", "OutputDir")}
    (dst / "hls4ml_config.yml").write_text(yaml.safe_dump(json.loads(json.dumps(config, default=_plain))))
    # What `vitis-run --mode hls --tcl build_prj.tcl` does: C simulation, synthesis, the IP, Vivado's utilization.
    steps = {"reset": 1, "csim": 1, "synth": 1, "cosim": 0, "validation": 0, "export": 1, "vsynth": 1, "fifo_opt": 0}
    lines = "".join(f"    {step:<10} {on}\n" for step, on in steps.items())
    (dst / "build_opt.tcl").write_text(f"array set opt {{\n{lines}}}\n")
    # The testbench (myproject_test.cpp) reads these: C simulation in Vitis HLS runs real test images.
    (dst / "tb_data").mkdir(exist_ok=True)
    np.savetxt(dst / "tb_data" / "tb_input_features.dat", x.transpose(0, 2, 3, 1).reshape(len(x), -1), fmt="%.7g")
    np.savetxt(dst / "tb_data" / "tb_output_predictions.dat", logits, fmt="%.7g")


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else list(value) if isinstance(value, tuple) else str(value)


NEXT_STEPS = """\
# FPGA project (hls4ml {hls4ml}, Vitis backend, io_stream, part {part})

Written by `tandem export ... --fpga`; `report.json` holds the precision, the emulation's agreement and accuracy, and
the resource estimate. Synthesis needs AMD Vitis (HLS) and Vivado, which tandem does not:

    bash build_lib.sh                                # g++: rebuild the bit-accurate C++ emulation (firmware/*.so)
    vitis-run --mode hls --tcl build_prj.tcl         # Vitis 2023.2+; older Vitis HLS: vitis_hls -f build_prj.tcl
    less myproject_prj/solution1/syn/report/myproject_csynth.rpt   # HLS estimate: latency, interval, DSP, BRAM, LUT
    less vivado_synth.rpt                                          # Vivado's post-synthesis utilization

build_opt.tcl picks the steps: C simulation on tb_data/ (10 test images and the float model's logits), synthesis,
export of the IP, Vivado synthesis; set cosim 1 for C/RTL co-simulation. Then place the IP
(myproject_prj/solution1/impl/ip) in a Vivado block design for the KV260 behind an AXI DMA. Input: an AXI4-Stream of
pixels, one per beat with all its channels (channels last), preprocessed as the bundle's manifest says; output:
{classes} logits.
"""


def export_fpga(source: Source | str | Path, bundle_dir: str | Path, *, precision: str = "auto",
                reuse_factor: int | str = "auto", calibration_images: int = 300, log=print) -> dict:
    """Write `<bundle_dir>/fpga/` (the HLS project, README.md, report.json) for a run's best checkpoint (a run or
    checkpoint folder, or the Source an export already opened: its model and data are used as given); return the
    report. precision: "auto" (the narrowest of WIDTHS whose emulation agrees with the float model on >= 99% of
    `calibration_images` validation images) or "ap_fixed<W,I>". reuse_factor: "auto" (see plan_reuse) or an int."""
    start = time.perf_counter()
    hls4ml = require_hls4ml()
    fixed = FIXED.fullmatch(precision.strip()) if precision != "auto" else None
    if precision != "auto" and not (fixed and 2 <= int(fixed[1]) <= 32 and 1 <= int(fixed[2]) <= int(fixed[1])):
        raise UserError(f"--fpga-precision {precision!r}: give auto or ap_fixed<W,I> with 2 <= W <= 32, 1 <= I <= W "
                        "(e.g. ap_fixed<16,6>)")
    if not (reuse_factor == "auto" or (isinstance(reuse_factor, int) and reuse_factor >= 1)):
        raise UserError(f"--fpga-reuse {reuse_factor!r}: give auto or a whole number >= 1")
    out = Path(bundle_dir) / FPGA_DIR
    if out.exists():
        raise UserError(f"{out} already exists; export to a new bundle folder")
    run = source if isinstance(source, Source) else open_source(source, log)
    cfg, classes, model = run.cfg, run.classes, run.model
    name = f"model {cfg.model.name} (width {cfg.model.width})"
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    check_supported(model, name)
    params = check_on_chip(model, int(fixed[1]) if fixed else min(WIDTHS), name)

    x_test, y_test = run.test_inputs()
    x_cal, cal_source = _calibration(run, calibration_images)
    x_eval = x_test if x_test is not None else x_cal
    with torch.no_grad():
        float_cal = model(torch.from_numpy(x_cal)).numpy()
        float_eval = model(torch.from_numpy(x_eval)).numpy()

    with tempfile.TemporaryDirectory(prefix="tandem-fpga-") as tmp:
        probe = convert(model, shape, "ap_fixed<16,6>", Path(tmp) / "probe")
        peak = _max_abs(model, probe, x_cal)
        reuse = plan_reuse(probe, reuse_factor)
        mults = [math.ceil(math.prod(probe.config.backend.get_layer_mult_size(layer)) / reuse[layer.name])
                 for layer in mult_layers(probe)]
        # Latency keeps weights in registers, fully parallel: for small models; Resource puts them in block RAM.
        strategy = "Latency" if params <= LATENCY_MAX_PARAMETERS and max(mults) <= UNROLL_LIMIT else "Resource"
        integer = int(fixed[2]) if fixed else _integer_bits(peak)
        if fixed and 2 ** (integer - 1) <= peak:
            log(f"warning: fpga: values reach {peak:.3g}, beyond ap_fixed<{fixed[1]},{integer}>'s range: they "
                f"saturate; {_integer_bits(peak)} integer bits would hold them")
        widths = [int(fixed[1])] if fixed else [w for w in WIDTHS if w > integer + 1] or [max(WIDTHS)]
        tried, chosen = [], None
        for width in widths:
            t0 = time.perf_counter()
            hls_model = convert(model, shape, _precision(width, integer), Path(tmp) / f"w{width}", reuse, strategy)
            _quiet(hls_model.compile)
            compiled = time.perf_counter() - t0
            agreement = _agreement(predict(hls_model, x_cal), float_cal)
            tried.append({"precision": f"ap_fixed<{width},{integer}>", "calibration_agreement": agreement,
                          "convert_compile_seconds": round(compiled, 2)})
            log(f"fpga: ap_fixed<{width},{integer}> agrees with the float model on {agreement:.2%} of {cal_source}")
            chosen = (width, hls_model, compiled)
            if agreement >= AGREEMENT_TARGET:
                break
        width, hls_model, compiled = chosen
        t0 = time.perf_counter()
        emulated = predict(hls_model, x_eval)
        emulation_seconds = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_project(hls_model, Path(tmp) / f"w{width}", out, x_eval[:10], float_eval[:10])

    agreement = _agreement(emulated, float_eval)
    report = {
        "tool": {"hls4ml": hls4ml.__version__, "backend": "Vitis", "io_type": "io_stream", "part": KV260["part"],
                 "strategy": strategy, "project": f"{FPGA_DIR}/", "top_function": "myproject",
                 "input_layout": "NHWC stream (one pixel, all channels, per beat)", "clock_mhz": CLOCK_MHZ},
        "model": {"name": cfg.model.name, "width": cfg.model.width, "parameters": params,
                  "input_shape": list(shape), "classes": len(classes),
                  "batch_norm": "folded into the conv before it by hls4ml"},
        "precision": {"chosen": f"ap_fixed<{width},{integer}>", "type": _precision(width, integer),
                      "width": width, "integer_bits": integer, "max_abs_value": round(peak, 4),
                      "how": ("given" if fixed else f"auto: the narrowest width whose emulation agrees with the float "
                              f"model on >= {AGREEMENT_TARGET:.0%} of {cal_source}; integer bits cover the largest "
                              "input, activation, logit or folded weight seen there"),
                      "tried": tried},
        "agreement": {"top1": agreement, "target": AGREEMENT_TARGET, "meets_target": agreement >= AGREEMENT_TARGET,
                      "images": len(x_eval),
                      "on": "test split" if x_test is not None else f"{cal_source} (the run's data is gone or changed)",
                      "max_abs_logit_diff": float(np.abs(emulated - float_eval).max()),
                      "mean_abs_logit_diff": float(np.abs(emulated - float_eval).mean())},
        "accuracy": ({"emulation_test": float((emulated.argmax(1) == y_test).mean()),
                      "float_test": float((float_eval.argmax(1) == y_test).mean()), "test_images": len(y_test)}
                     if y_test is not None else None),
        "resources": estimate_resources(hls_model, width),
        "seconds": {"convert_compile_chosen": round(compiled, 2),
                    "emulation_ms_per_image": round(1000 * emulation_seconds / len(x_eval), 3),
                    "total": round(time.perf_counter() - start, 1)},
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(NEXT_STEPS.format(hls4ml=hls4ml.__version__, part=KV260["part"],
                                                     classes=len(classes)))
    res = report["resources"]
    log(f"fpga {out}: {report['precision']['chosen']}, agreement {agreement:.2%} with the float model on "
        f"{len(x_eval)} images" + (f", emulation accuracy {report['accuracy']['emulation_test']:.4f}"
                                   if y_test is not None else "")
        + f"; ~{res['dsp_estimate']} of {KV260['dsp']} DSP, ~{res['bram36_estimate']} of {KV260['bram36']} BRAM36, "
          f"{res['images_per_second_estimate']:,} images/s at {CLOCK_MHZ} MHz (estimates; "
          f"{'fits' if res['fits_kv260'] else 'does NOT fit'} the KV260)")
    for problem in res["problems"]:
        log(f"warning: fpga: {problem}")
    if agreement < AGREEMENT_TARGET:
        log(f"warning: the emulation agrees with the float model on {agreement:.2%} (< {AGREEMENT_TARGET:.0%}); "
            "try a wider --fpga-precision")
    return report


def _calibration(run: Source, n: int) -> tuple[np.ndarray, str]:
    """Images to choose the precision on: the validation split (else training images), never the test split that
    the report measures; random inputs when the run's data is gone."""
    cfg, splits = run.cfg, run.splits
    if splits is not None:
        part, label = (splits.val, "validation") if len(splits.val.labels) else (splits.train, "training")
        count = min(n, len(part.labels))
        return run.inputs(part, np.arange(count))[0], f"{count} {label} images"
    rng = np.random.default_rng(0)
    size = (n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return np.clip(rng.standard_normal(size), -1, 1).astype(np.float32), f"{n} random inputs"

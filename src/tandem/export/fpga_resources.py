"""What an hls4ml design of the model needs on the AMD Kria KV260: reuse factors that fit its DSP slices, and an
estimate of multipliers, block RAM, registers and throughput (tandem.export.fpga writes it into report.json)."""

from __future__ import annotations

import math

CLOCK_MHZ = 200  # hls4ml's default clock period, 5 ns
# AMD Kria KV260 (K26 SOM, XCK26-SFVC784-2LV-C): https://www.amd.com/en/products/system-on-modules/kria/k26/
# kv260-vision-starter-kit.html and the K26 SOM data sheet DS987 (programmable logic resources).
KV260 = {"name": "AMD Kria KV260 (K26 SOM)", "part": "xck26-sfvc784-2LV-c", "dsp": 1248, "bram36": 144, "uram": 64,
         "lut": 117_120, "ff": 234_240,
         "source": "https://www.amd.com/en/products/system-on-modules/kria/k26/kv260-vision-starter-kit.html; "
                   "K26 SOM data sheet DS987"}
BRAM36_BITS, URAM_BITS = 36 * 1024, 288 * 1024


def mult_layers(hls_model) -> list:
    return [layer for layer in hls_model.get_layers() if layer.class_name in ("Conv2D", "Conv1D", "Dense")]


def _pixels(layer, side: str = "out") -> int:
    return int(layer.get_attr(f"{side}_height", 1) * layer.get_attr(f"{side}_width", 1))


def plan_reuse(hls_model, reuse_factor: int | str = "auto") -> dict[str, int]:
    """Reuse factor per multiplying layer. auto: balance the stream, so that each layer spends about as many cycles per
    image as the widest stage has pixels (a layer with fewer output pixels shares each multiplier more), doubling
    the budget until the multipliers fit the KV260's DSP slices."""
    backend = hls_model.config.backend
    layers = mult_layers(hls_model)
    valid = {layer.name: backend.get_valid_reuse_factors(*backend.get_layer_mult_size(layer)) for layer in layers}

    def closest(name: str, wanted: int) -> int:  # the largest valid reuse factor up to the one wanted
        return max([rf for rf in valid[name] if rf <= wanted] or [valid[name][0]])

    if reuse_factor != "auto":
        return {layer.name: closest(layer.name, int(reuse_factor)) for layer in layers}
    frame = max(_pixels(layer, side) for layer in hls_model.get_layers() for side in ("in", "out")
                if layer.get_attr(f"{side}_height") is not None)
    scale = 1
    while True:
        plan = {layer.name: closest(layer.name, max(1, frame * scale // _pixels(layer))) for layer in layers}
        mults = sum(math.ceil(math.prod(backend.get_layer_mult_size(layer)) / plan[layer.name]) for layer in layers)
        if mults <= KV260["dsp"] or all(plan[n] == valid[n][-1] for n in plan):
            return plan
        scale *= 2


def _bram36(width_bits: int, depth: int) -> int:
    """Block RAMs (36 Kb, 1K x 36 or 512 x 72) for a memory; tiny ones go to registers or LUT RAM."""
    if width_bits * depth <= 1024:
        return 0
    return math.ceil(width_bits / 72) * math.ceil(depth / 512) if depth <= 512 else \
        math.ceil(width_bits / 36) * math.ceil(depth / 1024)


def estimate_resources(hls_model, width: int) -> dict:
    """Multipliers, weight memory, stream buffers and cycles per image of the design, against the KV260. An estimate
    from the layer shapes (one DSP48E2 per multiplier up to 18 bits); Vitis HLS's synthesis report measures them."""
    backend = hls_model.config.backend
    dsp_per_mult = 1 if width <= 18 else 2
    layers, mults, weight_bits, bram, register_bits, cycles = [], 0, 0, 0, 0, 0
    for layer in mult_layers(hls_model):
        n_in, n_out = backend.get_layer_mult_size(layer)
        rf = int(layer.get_attr("reuse_factor"))
        layer_mults = math.ceil(n_in * n_out / rf)
        bits = sum(w.data.size for w in layer.weights.values()) * width
        resource = str(layer.get_attr("strategy", "latency")).lower() == "resource"
        layer_bram = _bram36(layer_mults * width, rf) if resource else 0  # weights reshaped by the reuse factor
        layer_cycles = max(_pixels(layer, "in"), _pixels(layer) * rf)
        layers.append({"layer": layer.name, "type": layer.class_name, "n_in": n_in, "n_out": n_out, "reuse_factor": rf,
                       "multipliers": layer_mults, "macs_per_image": _pixels(layer) * n_in * n_out,
                       "weight_bits": bits, "weights_in": "block RAM" if resource else "registers",
                       "cycles_per_image": layer_cycles})
        mults, weight_bits, bram = mults + layer_mults, weight_bits + bits, bram + layer_bram
        register_bits += 0 if resource else bits
        cycles = max(cycles, layer_cycles)
    # io_stream: a FIFO between layers, at hls4ml's conservative default depth (one frame); line buffers in the convs.
    fifo_bits, fifo_bram = 0, 0
    for layer in hls_model.get_layers():
        var = layer.get_output_variable()
        pragma = getattr(var, "pragma", None)
        if isinstance(pragma, tuple) and pragma[0] == "stream":
            word = int(var.shape[-1]) * int(var.type.precision.width)
            fifo_bits += word * int(pragma[1])
            fifo_bram += _bram36(word, int(pragma[1]))
    line_bits = sum((layer.get_attr("filt_height") - 1) * layer.get_attr("in_width") * layer.get_attr("n_chan") * width
                    for layer in mult_layers(hls_model) if layer.class_name == "Conv2D")
    line_bram = math.ceil(line_bits / BRAM36_BITS)
    dsp = mults * dsp_per_mult
    total_bram = bram + fifo_bram + line_bram
    fits = {"dsp": dsp <= KV260["dsp"], "block_ram": total_bram <= KV260["bram36"],
            "registers": register_bits <= KV260["ff"] // 2}
    problems = []
    if not fits["dsp"]:
        problems.append(f"{dsp} multipliers need more than the {KV260['dsp']} DSP slices: raise the reuse factor")
    if not fits["block_ram"]:
        problems.append(f"{total_bram} block RAMs (36 Kb) needed, {KV260['bram36']} there; {fifo_bram} of them are "
                        f"stream FIFOs at hls4ml's default depth: its FIFO depth optimization (Vitis co-simulation) "
                        f"shrinks them, or bind them to the {KV260['uram']} UltraRAMs; else the FPGA-sized model")
    if not fits["registers"]:
        problems.append(f"{register_bits:,} weight bits in registers is more than half the {KV260['ff']:,} "
                        "flip-flops: use the Resource strategy (a larger model) or the FPGA-sized model")
    return {
        "layers": layers,
        "multipliers": mults, "dsp_estimate": dsp, "dsp_available": KV260["dsp"],
        "dsp_utilization": round(dsp / KV260["dsp"], 4),
        "macs_per_image": sum(layer["macs_per_image"] for layer in layers),
        "weight_bits": weight_bits, "weight_bits_in_registers": register_bits,
        "weight_bram36": bram, "fifo_bits_default_depth": fifo_bits, "fifo_bram36": fifo_bram,
        "line_buffer_bits": line_bits, "line_buffer_bram36": line_bram,
        "bram36_estimate": total_bram, "bram36_available": KV260["bram36"], "uram_available": KV260["uram"],
        "bram36_utilization": round(total_bram / KV260["bram36"], 4),
        "cycles_per_image": cycles, "clock_mhz": CLOCK_MHZ,
        "images_per_second_estimate": round(CLOCK_MHZ * 1e6 / max(1, cycles)),
        "fits_kv260": all(fits.values()), "fits": fits, "problems": problems,
        "kv260": KV260,
        "basis": "one DSP48E2 per multiplier (ceil(n_in*n_out/reuse) per layer) at <= 18 bits; weights in registers "
                 "(Latency strategy) or block RAM reshaped by the reuse factor (Resource); stream FIFOs at hls4ml's "
                 "default depth (an upper bound: its FIFO depth optimization shrinks them); a block RAM holds 1K x 36 "
                 "or 512 x 72 bits (UltraRAM only where bound by pragma: not counted); at most half the flip-flops for "
                 "weights. "
                 "Vitis HLS's csynth report is the measurement.",
    }

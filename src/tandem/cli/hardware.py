"""`tandem bench`, `tandem inspect` and `tandem plan`: how fast a bundle runs here, what a network costs, which
device it fits, how fast and at what energy it runs there, and whether a device can train it. Torch-free, except
`plan --train` (the training side).

    tandem bench BUNDLE [--json] [--threads N] [--precision all|fp32|int8]

    tandem inspect BUNDLE [--precision int8] [--json]
    tandem plan BUNDLE [--device NAME[,NAME...]|all] [--batch N] [--precision P] [--devices FILE] [--json]
    tandem plan --train [CONFIG.yaml] [key=value ...] [--device NAME] [--batch N] [--json]
    tandem plan --list-devices [--devices FILE] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.args import batch_sizes, counted, positive_float, positive_int, print_json, threads
from tandem.errors import UserError

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
    """Add `bench`, `inspect` and `plan` to the `tandem` command's subparsers."""
    p = sub.add_parser("bench", help="benchmark a bundle on this machine: latency, throughput, memory (torch-free)",
                       description="MLPerf-style scenarios for each precision of a bundle (fp32, and int8 where it has "
                                   "model.int8.onnx), on the CPU and on ONNX Runtime's CUDA provider where installed: "
                                   "single-stream (batch-1 latency p50/p90/p99), offline (images/s at the best batch "
                                   "size), cold start (a fresh process to its first prediction) and its peak RSS. "
                                   "Precisions are timed in alternated rounds. Progress goes to stderr.",
                       epilog="--json prints one object of schema tandem.bench/1, documented in "
                              "src/tandem/hardware/bench.py and the README. Bounded: under 10 s for the demo bundle "
                              "(--seconds and --queries bound single-stream, --starts the fresh processes).")
    p.add_argument("bundle", help="bundle folder (from `tandem export`)")
    p.add_argument("--precision", choices=["all", "fp32", "int8"], default="all",
                   help="all (default): every precision the bundle has; int8 needs model.int8.onnx")
    p.add_argument("--threads", type=threads, default=None,
                   help="ONNX Runtime threads (default: the cores this process may use; OMP_NUM_THREADS wins)")
    p.add_argument("--seconds", type=positive_float, default=2.0,
                   help="single-stream: at most this many seconds per precision (default: %(default)s)")
    p.add_argument("--queries", type=positive_int, default=2000,
                   help="single-stream: at most this many queries per precision (default: %(default)s)")
    p.add_argument("--batches", type=batch_sizes, default=[16, 64, 256], metavar="B,B,...",
                   help="offline: batch sizes to try, the best counts (default: 16,64,256)")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternated timing rounds (default: %(default)s)")
    p.add_argument("--starts", type=counted(0, 100), default=3,
                   help="fresh processes for cold start and peak RSS, median (default: %(default)s; 0 skips them)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema tandem.bench/1)")
    p.set_defaults(func=cmd_bench)

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
    p.add_argument("--batch", type=positive_int, default=None, metavar="N",
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
    p.add_argument("--seconds", type=positive_float, default=None, metavar="S",
                   help="how long to time the bundle or the training step on this machine (default: 1, --train: 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_inspect(args) -> int:
    from tandem.hardware.analysis import analyze_bundle

    from tandem.hardware.report import describe

    analysis = analyze_bundle(args.bundle, args.precision)
    if args.json:
        print_json(analysis.to_dict())
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
    from tandem.hardware.report import describe_devices

    devices = load_devices(args.devices)
    if args.list_devices:
        if args.json:
            print_json({name: device.model_dump(exclude_none=True) for name, device in devices.items()})
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
    from tandem.hardware.report import format_inference

    report = plan_inference(args.targets[0], chosen, precisions, args.batch or 1, measure=not args.no_measure,
                            seconds=args.seconds or 1.0, host=host)
    if args.json:
        print_json(report)
    else:
        print(format_inference(report))
    return 0


def _plan_training(args, chosen, host: bool, precisions) -> int:
    from tandem.config import load_config
    from tandem.hardware.plan import plan_training
    from tandem.hardware.report import format_training

    settings = list(args.targets)
    config_file = settings.pop(0) if settings and "=" not in settings[0] else None
    if config_file and (Path(config_file) / "manifest.json").is_file():
        raise UserError(f"{config_file} is a bundle; --train plans training from a config (tandem plan --train "
                        f"[CONFIG.yaml] [key=value ...]); for inference drop --train: tandem plan {config_file}")
    cfg = load_config(config_file, settings)
    report = plan_training(cfg, chosen, precisions, args.batch, measure=not args.no_measure,
                           seconds=args.seconds or 2.0, host=host)
    if args.json:
        print_json(report)
    else:
        print(format_training(report))
    return 0


def cmd_bench(args) -> int:
    from tandem.hardware.bench import format_report, run_bench

    def progress(message: str) -> None:
        print(f"bench: {message} ...", file=sys.stderr, flush=True)

    precisions = None if args.precision == "all" else [args.precision]
    report = run_bench(args.bundle, precisions, threads=args.threads, seconds=args.seconds, queries=args.queries,
                       batches=args.batches, rounds=args.rounds, starts=args.starts, progress=progress)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0

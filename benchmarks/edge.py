"""int8 against fp32 on the default animal bundle, on this CPU, in one run (issue 9's edge targets).

    python benchmarks/edge.py                          # trains the default animal run, exports it with --int8
    python benchmarks/edge.py --run runs/latest        # exports this run with --int8 instead of training one
    python benchmarks/edge.py --bundle bundles/animals/1 [--threads 2] [--seconds 5] [--json]

The bundle comes from `tandem export RUN --out B --int8`, whose own gates (validation accuracy within
0.5 pp, faster than fp32 at batch 64) decide whether it holds model.int8.onnx at all; where they dropped
it, this run fails and prints why. Then, in this process: top-1 accuracy of each precision through the
runtime (Predictor, uint8 pixels in) on the run's whole test split, and `tandem bench`'s scenarios
(tandem.hardware.bench) with fp32 and int8 timed in alternated rounds: single-stream batch-1 latency
(the median is p50), offline images/s at the best of batches 16 to 1024 run one at a time or one per core
at once (the runtime's `streams`), cold start and peak RSS of
fresh processes, and the model files' sizes.

Then the planner (tandem.hardware.plan) against this machine: its host estimate beside the measured time, for
inference (fp32 and int8, batches 1 and 64, the bundle through the runtime) and training (a real step of the
bundle's config, in fp32 and, where the CPU has native bf16, bf16).

Targets: int8 accuracy drop <= 0.3 pp (test split); int8 batch-1 median latency <= 0.8x fp32's;
int8 offline throughput >= 1.8x fp32's; int8 model file <= 0.3x fp32's; every host estimate within 2x of
measured (the factor between them, max(m/p, p/m), <= 2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from targets import Target, report


def train_default_run(folder: Path) -> Path:
    """The default animal run (the README's `tandem train`), about a minute on 2 cores."""
    print(f"no --run or --bundle given: training the default animal run in {folder / 'run'} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "tandem", "train", f"out_dir={folder / 'run'}", "progress=false"],
                   check=True, stdout=subprocess.DEVNULL)
    return folder / "run"


def export_run(run: Path, bundle: Path, *flags: str) -> None:
    """`tandem export RUN --out BUNDLE --force [flags]` in a fresh process; its log on stderr."""
    print(f"exporting {run} {' '.join(flags)} to {bundle} ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "tandem", "export", str(run), "--out", str(bundle), *flags,
                           "--force", "--json"], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"export failed (exit {proc.returncode})")


def accuracy_on_test_split(bundle: Path, precision: str) -> tuple[float, np.ndarray]:
    """Top-1 accuracy through the runtime on the bundle's run's whole test split, and the answers."""
    from tandem.explain.data import bundle_splits, split_pixels
    from tandem.runtime import Predictor

    predictor = Predictor.load(bundle, precision=precision)
    pixels, labels = split_pixels(bundle_splits(bundle, predictor.manifest).test)
    answers = predictor.logits(pixels).argmax(1)
    return float((answers == labels).mean()), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", type=Path, help="a trained run to export with --int8 (default: train the default run)")
    source.add_argument("--bundle", type=Path, help="a bundle already exported with --int8")
    parser.add_argument("--out", type=Path, help="keep the trained run and the bundle here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: its own, all cores)")
    parser.add_argument("--seconds", type=float, default=5.0, help="single-stream seconds per precision (default: 5)")
    parser.add_argument("--rounds", type=int, default=5, help="alternated timing rounds (default: 5)")
    parser.add_argument("--starts", type=int, default=5, help="fresh processes for cold start and RSS (default: 5)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.bundle:
        run(args, args.bundle)
        return
    with tempfile.TemporaryDirectory(prefix="tandem-edge-") as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        source_run = args.run or train_default_run(folder)
        export_run(source_run, folder / "bundle", "--int8")
        run(args, folder / "bundle")


def run(args, bundle: Path) -> None:
    from tandem.bundle import read_manifest
    from tandem.hardware.bench import run_bench

    manifest = read_manifest(bundle)
    gates = manifest.get("export", {}).get("int8")
    if "model.int8.onnx" not in manifest["files"]:
        why = gates["reason"] if gates else "it was exported without --int8"
        print(f"FAIL: bundle {bundle} holds no int8 model: {why}")
        raise SystemExit(1)

    print("accuracy on the test split, fp32 and int8 ...", file=sys.stderr)
    (fp32_acc, fp32_answers), (int8_acc, int8_answers) = accuracy_on_test_split(bundle, "fp32"), accuracy_on_test_split(bundle, "int8")
    drop_pp = 100 * (fp32_acc - int8_acc)
    agreement = float((fp32_answers == int8_answers).mean())

    bench = run_bench(bundle, ["fp32", "int8"], threads=args.threads, seconds=args.seconds, queries=100_000,
                      batches=[16, 64, 256, 1024], rounds=args.rounds, starts=args.starts,
                      progress=lambda message: print(f"bench: {message} ...", file=sys.stderr, flush=True))
    fp32, int8 = (next(r for r in bench["results"] if r["precision"] == p and r["provider"] == "CPUExecutionProvider")
                  for p in ("fp32", "int8"))
    latency = [r["single_stream"]["p50_ms"] for r in (fp32, int8)]
    throughput = [r["offline"]["images_per_second"] for r in (fp32, int8)]
    size = [r["model_bytes"] / 1e3 for r in (fp32, int8)]

    def ratio_row(label: str, pair: list, scale: float = 1.0) -> list:
        return [label, pair[0] * scale, pair[1] * scale, pair[1] / pair[0] if pair[0] else ""]

    rows = [
        ["test accuracy (%)", 100 * fp32_acc, 100 * int8_acc, f"drop {drop_pp:.2f} pp"],
        ["  int8 top-1 agreement with fp32 (%)", "", 100 * agreement, ""],
        ratio_row("batch-1 latency, median (ms)", latency),
        ratio_row("batch-1 latency, p90 (ms)", [r["single_stream"]["p90_ms"] for r in (fp32, int8)]),
        ratio_row("batch-1 latency, p99 (ms)", [r["single_stream"]["p99_ms"] for r in (fp32, int8)]),
        ratio_row("offline throughput, best batch (images/s)", throughput),
        ["  best batch", fp32["offline"]["best_batch"], int8["offline"]["best_batch"], ""],
        ["  best streams (batches at once)", fp32["offline"]["best_streams"], int8["offline"]["best_streams"], ""],
        ratio_row("model file (kB)", size),
        ratio_row("cold start, fresh process (s)", [r["cold_start_s"] or 0.0 for r in (fp32, int8)]),
        ratio_row("peak RSS, fresh process (MB)", [r["peak_rss_mb"] or 0.0 for r in (fp32, int8)]),
    ]
    if gates:
        acc, speed = gates["accuracy_gate"], gates["speed_gate"]
        rows += [["export gate: validation drop (pp)", "", acc["drop_pp"], f"budget {acc['budget_pp']:g}"],
                 ["export gate: speed-up at batch 64", "", speed["speedup"], "needs > 1"]]
    targets = [
        Target("int8 accuracy drop (test split)", drop_pp, 0.3, higher_is_better=False, unit=" pp"),
        Target("int8/fp32 batch-1 median latency", latency[1] / latency[0], 0.8, higher_is_better=False),
        Target("int8/fp32 offline throughput", throughput[1] / throughput[0], 1.8, higher_is_better=True),
        Target("int8/fp32 model file size", size[1] / size[0], 0.3, higher_is_better=False),
    ]
    planner = planner_rows(bundle, manifest)
    for name, predicted, measured in planner:
        off = max(measured / predicted, predicted / measured)
        rows.append([f"planner: {name} (ms)", predicted * 1e3, measured * 1e3, f"measured/predicted {measured / predicted:.2f}"])
        targets.append(Target(f"planner {name}: factor off", off, 2.0, higher_is_better=False))
    details = {"bundle": str(bundle), "bench": bench, "export_int8": gates,
               "planner": [{"what": n, "predicted_s": p, "measured_s": m} for n, p, m in planner]}
    passed = report(f"int8 vs fp32, bundle {bundle} (ONNX Runtime {bench['machine']['onnxruntime']})",
                    ["measure", "fp32 (planner: predicted)", "int8 (planner: measured)", "int8/fp32"], rows, targets, args.json, details)
    if not args.json:
        threads = args.threads or "ONNX Runtime's default"
        print(f"\nthreads: {threads}; single-stream up to {args.seconds:g} s per precision, offline best of batches "
              f"16-1024 and streams {', '.join(map(str, bench['settings']['streams']))}, {args.rounds} alternated rounds (medians); {args.starts} fresh processes per precision; "
              f"accuracy on {len(fp32_answers)} test images")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run


def planner_rows(bundle: Path, manifest: dict) -> list[tuple[str, float, float]]:
    """(what, predicted seconds, measured median seconds) of `tandem plan`'s host rows: inference of the bundle at
    batches 1 and 64 in fp32 and int8, and a training step of its config at its batch size."""
    from tandem.config import TrainConfig
    from tandem.hardware.plan import plan_inference, plan_training

    out = []
    for batch in (1, 64):
        print(f"planner: host inference at batch {batch}, estimated and measured ...", file=sys.stderr, flush=True)
        plan = plan_inference(bundle, [], ["fp32", "int8"], batch=batch, seconds=2.0)
        out += [(f"inference {m['precision']} batch {batch}", m["predicted_s"], m["median_s"]) for m in plan["measured"]]
    cfg = TrainConfig.model_validate(manifest["config"])
    from tandem.hardware.probe import probe_host

    for precision in ["fp32", "bf16"] if probe_host().native_bf16 else ["fp32"]:
        print(f"planner: host training step in {precision}, estimated and measured ...", file=sys.stderr, flush=True)
        plan = plan_training(cfg, [], [precision], seconds=3.0)
        out += [(f"training step {m['precision']} batch {cfg.batch_size}", m["predicted_step_s"], m["median_s"])
                for m in plan["measured"]]
    return out


if __name__ == "__main__":
    main()

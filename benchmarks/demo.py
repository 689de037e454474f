"""The real user command, `tandem demo`, in a fresh process: accuracy and training time against targets.

    python benchmarks/demo.py [--seeds 0 1 2] [--precision auto|fp32|bf16] [--json]
    python benchmarks/demo.py --epochs 1        # a quick check of the script itself (fails the targets)

Each run is `python -m tandem demo --json --seed S --out <temp dir>` (train the default cnn, export,
classify 100 held-out PNGs in a torch-free process); a seed changes the split, the initial weights and
the augmentation. The table shows each run's report and the verdict. Test accuracy must reach the
target in every run (the lowest counts); training time is the slowest run's wall time of the whole
training call (data, training, evaluation, checkpoints, plots), not only the loop's own clock.

Targets: test accuracy >= 0.985; training wall time <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from targets import Target, report


def run_demo(seed: int, precision: str, epochs: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as out:
        command = [sys.executable, "-m", "tandem", "demo", "--json", "--out", out, "--seed", str(seed),
                   "--precision", precision]
        if epochs is not None:
            command += ["--epochs", str(epochs)]
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return {**json.loads(proc.stdout), "command_seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one demo run per seed")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's epochs (for trying the script)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    from tandem.train.device import cpu_has_native_bf16

    runs = []
    for i, seed in enumerate(args.seeds):
        print(f"run {i + 1}/{len(args.seeds)}: tandem demo --seed {seed} --precision {args.precision} ...",
              file=sys.stderr, flush=True)
        runs.append(run_demo(seed, args.precision, args.epochs))
    columns = [("test accuracy", "test_accuracy"), ("100 held-out PNGs right", "demo_accuracy_100"),
               ("training, loop clock (s)", "train_seconds"), ("training, wall (s)", "train_wall_seconds"),
               ("training (images/s)", "images_per_second"),
               ("whole command (s)", "command_seconds"), ("torch-free predict process (s)", "demo_predict_seconds")]
    rows = [[name] + [r[key] for r in runs] for name, key in columns]
    rows.append(["precision, device"] + [f"{r['precision']}, {r['device']}" for r in runs])
    accuracy = min(r["test_accuracy"] for r in runs)
    seconds = max(r["train_wall_seconds"] for r in runs)
    targets = [Target("test accuracy (lowest run)", accuracy, 0.985, higher_is_better=True),
               Target("training wall time (slowest run)", seconds, 60, higher_is_better=False, unit=" s")]
    bf16 = cpu_has_native_bf16()
    passed = report("tandem demo, the user's command", ["measure"] + [f"seed {r['seed']}" for r in runs], rows,
           targets, args.json, {"cpu_native_bf16": bf16, "epochs_override": args.epochs, "runs": runs})
    if not args.json:
        used = sorted({r["precision"] for r in runs})
        print(f"\nCPU native bf16 (AMX or AVX512-BF16): {'yes' if bf16 else 'no'}; training ran in {', '.join(used)}")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run (and `make bench`)


if __name__ == "__main__":
    main()

"""The demo's training on a CUDA GPU: eager steps against the whole step captured in one CUDA graph.

    python benchmarks/gpu.py [--inductor] [--epochs N] [--json]

Each run is `python -m tandem train --json compile=C precision=P out_dir=<temp dir>` in a fresh process: the
demo's own config (the default cnn on the embedded animals, 22 epochs, batch 128), only `compile` and
`precision` changed. Images/s is the loop's clock (validation and checkpoints excluded; the device is waited for
at each epoch's end, so queued GPU work counts). --inductor adds compile=inductor (its compile time is part of
the first steps).

Targets (lent H100, issue 8): compile=graphs (precision=auto) trains >= 4x the 31,600 images/s the eager loop
reached on an H100 before graphs existed (FIELD-NOTES.md), with test accuracy unchanged: >= 0.985, and within
0.5 points of the eager run of this benchmark. Needs a CUDA GPU; without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from targets import Target, report

EAGER_H100_BEFORE = 31_600  # images/s, bf16, eager, the demo on a lent H100 (FIELD-NOTES.md "On a GPU")


def run_train(compile_: str, precision: str, epochs: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-") as out:
        command = [sys.executable, "-m", "tandem", "train", "--json", f"compile={compile_}", f"precision={precision}",
                   "device=cuda", "progress=false", f"out_dir={out}/run"]
        if epochs is not None:
            command.append(f"epochs={epochs}")
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        captured = "captured in one CUDA graph" in proc.stderr
        return {**json.loads(proc.stdout), "compile": compile_, "asked_precision": precision,
                "command_seconds": time.perf_counter() - t0, "graph_captured": captured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--inductor", action="store_true", help="also run compile=inductor")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's 22 epochs (to try the script)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible here (it runs on a lent H100 / H200)",
              file=sys.stderr)
        raise SystemExit(2)
    gpu = torch.cuda.get_device_name(0)
    plan = [("off", "auto"), ("off", "fp32"), ("graphs", "auto"), ("graphs", "fp32")]
    if args.inductor:
        plan.append(("inductor", "auto"))
    runs = []
    for i, (mode, precision) in enumerate(plan):
        print(f"run {i + 1}/{len(plan)}: tandem train compile={mode} precision={precision} ...", file=sys.stderr,
              flush=True)
        runs.append(run_train(mode, precision, args.epochs))
    columns = [("training (images/s)", "images_per_second"), ("training, loop clock (s)", "train_seconds"),
               ("test accuracy", "test_accuracy"), ("whole command (s)", "command_seconds")]
    rows = [[name] + [r[key] for r in runs] for name, key in columns]
    rows.append(["precision"] + [r["precision"] for r in runs])
    rows.append(["graph captured"] + [r["graph_captured"] for r in runs])
    eager, graphed = runs[0], runs[2]
    rows.append(["vs eager of this run"] + [r["images_per_second"] / eager["images_per_second"] for r in runs])
    rows.append([f"vs {EAGER_H100_BEFORE:,} img/s (H100 before)"]
                + [r["images_per_second"] / EAGER_H100_BEFORE for r in runs])
    targets = [
        Target("compile=graphs images/s / 31,600", graphed["images_per_second"] / EAGER_H100_BEFORE, 4.0,
               higher_is_better=True, unit="x"),
        Target("compile=graphs test accuracy", graphed["test_accuracy"], 0.985, higher_is_better=True),
        Target("eager - graphs test accuracy (points)", 100 * (eager["test_accuracy"] - graphed["test_accuracy"]),
               0.5, higher_is_better=False),
    ]
    passed = report(f"the demo's training on {gpu} (torch {torch.__version__})",
                    ["measure"] + [f"{r['compile']} {r['asked_precision']}" for r in runs], rows, targets, args.json,
                    {"gpu": gpu, "torch": torch.__version__, "epochs_override": args.epochs, "runs": runs})
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

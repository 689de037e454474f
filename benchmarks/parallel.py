"""Every data / model-parallel strategy of `tandem train` against one process, side by side in one run.

    python benchmarks/parallel.py [--epochs 22] [--strategies ddp,local-sgd,tensor,pipeline] [--json]
    python benchmarks/parallel.py --epochs 1     # a quick check of the script itself (fails the accuracy targets)

Every run trains `tandem train`'s defaults (the cnn on the embedded animals, batch 128, auto precision,
seed 0, so the same split) on this machine's CPU cores, each in a fresh process tree and a temporary
out_dir that is removed afterwards:

    one process   python -m tandem train ...                   1 process, torch's own threads (all cores)
    ddp, ...      python -m torch.distributed.run --standalone --nproc-per-node 2 -m tandem train
                      parallel.strategy=S ...                  2 processes x 1 thread (OMP_NUM_THREADS=1)

local-sgd averages every 8 steps (parallel.average_every=8); pipeline runs 1F1B with 4 micro-batches.
Every run also passes out_dir=<temp> progress=false keep_checkpoints=100 epochs=N: with the default
checkpoint_every=0 tandem saves a checkpoint at each epoch's end, and keeping 100 keeps every one.
The runs go one after another, once each (no rounds: a 22-epoch run takes minutes).

Columns: images/s is results.json's images_per_second (the loop's own clock: training steps only,
not start-up, validation or checkpoints), and its ratio to the one-process run. Time to 98% test
accuracy: this script evaluates every epoch's checkpoint (model.safetensors, fp32, the run's own test
split from tandem.train.loop.load_splits, preprocessed by tandem.runtime.preprocess) and reports the
loop clock (metrics.jsonl train_seconds) at the first epoch whose checkpoint reaches 0.98. Test accuracy
is results.json's (the best-on-validation checkpoint, as `tandem export` ships it) and its difference to
one process in percentage points. Bytes per step per process is results.json's parallel.comm_bytes (what
all processes together handed to collectives: gradients, parameters, activations; local-sgd includes the
end-of-epoch state averaging; a pipeline's stage 0 sends activations, stage 1 their gradients back)
/ steps / processes. Bubble
is results.json's parallel.bubble_measured (1 - the stages' compute / the step's wall time, mean over
stages) beside bubble_formula ((p-1)/(m+p-1)). Two more short pipeline runs (batch 512, 4 and 8
micro-batches, max_steps=40 with epochs=3, as an epoch is only 16 steps of 512) show how the measured
bubble approaches the formula as micro-batches grow.

Targets: ddp images/s >= 0.9x one process; every strategy's test accuracy within 0.5 pp of one
process; each pipeline setting's measured bubble within 10% of the formula (|measured - formula| / formula).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import Target, report

PROCESSES = 2
STRATEGIES = {  # strategy -> its extra overrides
    "ddp": [],
    "local-sgd": ["parallel.average_every=8"],
    "tensor": [],
    "pipeline": ["parallel.schedule=1f1b", "parallel.microbatches=4"],
}
BUBBLE_SWEEP = [(512, 4), (512, 8)]  # (batch_size, microbatches) of the short pipeline runs
BUBBLE_STEPS = 40
TARGET_ACCURACY = 0.98


def environment(parallel: bool) -> dict:
    """One process: torch picks its threads (every core). torchrun: 1 thread per process, as torchrun sets it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if parallel:
        env["OMP_NUM_THREADS"] = "1"
    return env


def torch_threads(env: dict) -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def command(strategy: str | None, overrides: list[str], out: str, epochs: int) -> list[str]:
    if strategy is None:
        head = [sys.executable, "-m", "tandem", "train"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
                "-m", "tandem", "train", f"parallel.strategy={strategy}"]
    return head + overrides + [f"out_dir={out}", "progress=false", f"keep_checkpoints={max(100, epochs)}",
                               f"epochs={epochs}"]


def shown(cmd: list[str], out: str) -> str:
    return " ".join("python" if c == sys.executable else c.replace(out, "<temp>") for c in cmd)


def checkpoint_accuracies(run_dir: Path) -> list[dict]:
    """Test accuracy (fp32) of every checkpoint of a finished run, oldest first."""
    import torch
    from safetensors.torch import load_file

    from tandem.config import load_config
    from tandem.runtime.preprocess import preprocess
    from tandem.train.loop import load_splits
    from tandem.train.models import create_model

    cfg = load_config(run_dir / "config.yaml")
    splits = load_splits(cfg)
    x = torch.from_numpy(preprocess(splits.test.pixels, cfg.data.mean, cfg.data.std))
    y = torch.from_numpy(splits.test.labels)
    memory_format = torch.channels_last if cfg.model.name != "mlp" else torch.contiguous_format
    model = create_model(cfg.model.name, cfg.data.channels, cfg.data.image_size, len(splits.train.classes),
                         cfg.model.width, cfg.model.dropout).to(memory_format=memory_format).eval()
    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        with torch.no_grad():
            correct = sum(int((model(x[i:i + 512].contiguous(memory_format=memory_format)).argmax(1)
                               == y[i:i + 512]).sum()) for i in range(0, len(y), 512))
        found.append({"step": json.loads((path / "state.json").read_text())["step"], "checkpoint": path.name,
                      "test_accuracy": correct / len(y)})
    return found


def run_train(cmd: list[str], out: str, env: dict, evaluate: bool) -> dict:
    """Run one `tandem train`; its results.json, metrics.jsonl and (evaluate) every checkpoint's test accuracy."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_dir = Path(out)
    results = json.loads((run_dir / "results.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # tandem's own account of the layout (for a pipeline: where it cut the model, each stage's share of FLOPs)
    layout = next((line.removeprefix("model: ") for line in proc.stdout.splitlines() if line.startswith("model: ")), "")
    found = {"results": {k: v for k, v in results.items() if k not in ("confusion", "classes")},
             "epochs_logged": metrics, "command_seconds": wall, "layout": layout}
    if evaluate:
        found["checkpoints"] = checkpoint_accuracies(run_dir)
    return found


def time_to(run: dict, accuracy: float) -> tuple[float | None, int | None]:
    """(loop seconds, epoch) at the first epoch whose checkpoint reaches `accuracy` on the test split."""
    clock = {m["step"]: m for m in run["epochs_logged"]}
    for ck in run["checkpoints"]:
        if ck["test_accuracy"] >= accuracy and ck["step"] in clock:
            return clock[ck["step"]]["train_seconds"], clock[ck["step"]]["epoch"]
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--epochs", type=int, default=22, help="epochs per run (tandem's default 22; 1 for a smoke run)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, from {','.join(STRATEGIES)} (one process always runs, as the reference)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        parser.error(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STRATEGIES)}")

    jobs = [("one process", None, [], True)] + [(s, s, STRATEGIES[s], True) for s in chosen]
    if "pipeline" in chosen:
        jobs += [(f"pipeline, batch {b}, {m} micro-batches, {BUBBLE_STEPS} steps", "pipeline",
                  ["parallel.schedule=1f1b", f"parallel.microbatches={m}", f"batch_size={b}",
                   f"max_steps={BUBBLE_STEPS}"], False) for b, m in BUBBLE_SWEEP]
    threads = {False: torch_threads(environment(False)), True: torch_threads(environment(True))}
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before the runs: other work shares the "
              "cores, and a process of several torch threads slows down far more than the 1-thread ones (its "
              "threads wait for each other at every op); run this on a quiet machine", file=sys.stderr)
    runs: dict[str, dict] = {}
    for i, (name, strategy, overrides, evaluate) in enumerate(jobs):
        # The short bubble runs need enough epochs for their 40 steps (16 steps an epoch at batch 512).
        epochs = args.epochs if evaluate else 3
        with tempfile.TemporaryDirectory(prefix="tandem-parallel-") as out:
            cmd = command(strategy, overrides, out, epochs)
            print(f"run {i + 1}/{len(jobs)}: {shown(cmd, out)}", file=sys.stderr, flush=True)
            runs[name] = {"command": shown(cmd, out), "processes": 1 if strategy is None else PROCESSES,
                          "threads_per_process": threads[strategy is not None],
                          **run_train(cmd, out, environment(strategy is not None), evaluate)}

    ref = runs["one process"]
    ref_speed, ref_acc = ref["results"]["images_per_second"], ref["results"]["test_accuracy"]
    rows, targets = [], []
    for name, run in runs.items():
        res, par = run["results"], run["results"]["parallel"]
        speed, acc = res["images_per_second"], res["test_accuracy"]
        comm = par["comm_bytes"] / res["steps"] / par["processes"] if "comm_bytes" in par else "-"
        bubble = "-"
        if "bubble_measured" in par:
            measured, formula = par["bubble_measured"], par["bubble_formula"]
            off = abs(measured - formula) / formula
            run["bubble_vs_formula"] = off
            bubble = f"{measured:.3f} / {formula:.3f} ({(measured - formula) / formula:+.0%})"
            label = "pipeline, batch 128, 4 micro-batches" if run is runs.get("pipeline") else name
            targets.append(Target(f"{label}: bubble |measured - formula| / formula", 100 * off, 10,
                                  higher_is_better=False, unit=" %"))
        if "checkpoints" not in run:  # a short bubble run: throughput and bubble only
            rows.append([name, f"{run['processes']} x {run['threads_per_process']}", speed, "-", "-", "-", "-", "-",
                         comm, bubble])
            continue
        seconds, epoch = time_to(run, TARGET_ACCURACY)
        run["time_to_98"] = {"train_seconds": seconds, "epoch": epoch}
        best = next((c for c in run["checkpoints"] if Path(c["checkpoint"]).name == Path(res["checkpoint"]).name), None)
        if best is not None and abs(best["test_accuracy"] - acc) > 1e-9:
            print(f"warning: {name}: this script's fp32 evaluation of {best['checkpoint']} gives "
                  f"{best['test_accuracy']:.4f}, results.json {acc:.4f}", file=sys.stderr)
        if len(run["checkpoints"]) != len(run["epochs_logged"]):
            print(f"warning: {name}: {len(run['checkpoints'])} checkpoints kept for {len(run['epochs_logged'])} "
                  "epochs; time to 98% may be late", file=sys.stderr)
        diff_pp = 100 * (acc - ref_acc)
        rows.append([name, f"{run['processes']} x {run['threads_per_process']}", speed, speed / ref_speed,
                     seconds if seconds is not None else "not reached", epoch if epoch is not None else "-",
                     acc, "-" if run is ref else diff_pp, comm, bubble])
        if name == "ddp":
            targets.insert(0, Target("ddp images/s vs one process", speed / ref_speed, 0.9, higher_is_better=True,
                                     unit="x"))
        if run is not ref:
            targets.append(Target(f"{name}: |test accuracy - one process|", abs(diff_pp), 0.5, higher_is_better=False,
                                  unit=" pp"))
    headers = ["run", "processes x threads", "images/s", "vs 1 process", f"to {TARGET_ACCURACY:.0%} test acc (s)",
               "at epoch", "test accuracy", "vs 1 process (pp)", "comm bytes/step/process",
               "bubble measured / formula"]
    details = {"epochs": args.epochs, "processes": PROCESSES, "threads": {"one process": threads[False],
               "per torchrun process": threads[True]}, "runs": runs}
    passed = report(f"tandem train: {', '.join(chosen)} on {PROCESSES} processes x {threads[True]} thread vs one "
                    f"process x {threads[False]} threads, {args.epochs} epochs of the default cnn",
                    headers, rows, targets, args.json, details)
    if not args.json:
        print("\ncommands (out_dir=<temp>, a temporary folder removed afterwards):")
        for name, run in runs.items():
            print(f"  {name}: {run['command']}")
        for name, run in runs.items():
            if run["results"]["parallel"].get("strategy") == "pipeline" and "stage 0" in run["layout"]:
                print(f"\n{name}: {run['layout'][run['layout'].index('stage 0'):]}")
        print(f"\nimages/s: the loop's clock (training steps only); time to {TARGET_ACCURACY:.0%}: the loop's clock at the "
              "first epoch whose checkpoint reaches it on the test split (fp32); comm bytes: all processes' / steps / processes")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run (and `make bench`)


if __name__ == "__main__":
    main()

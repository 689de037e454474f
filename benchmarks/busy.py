"""Training and inference speed beside other work: today's thread settings against tandem's thread policy.

    python benchmarks/busy.py [--reps 3] [--loads 0 1 2 4] [--json]
    python benchmarks/busy.py --reps 1 --loads 0 2 --quick     # a check of the script itself

For each load (0 = a quiet machine, then 1, 2 and 4 busy processes: `while True: pass` loops this script starts
and stops itself), in one run, alternating the two settings rep by rep:

- training: `tandem train` with the demo's config (the default cnn on the embedded animals) for a fixed number of
  steps; its own images/s (the training clock, without start-up and evaluation).
  today    OMP_NUM_THREADS = torch's own default for this process, OpenMP's default wait (what every tandem
           process did before tandem.threads)
  policy   nothing set: tandem.threads chooses at start and revises while it trains
- a `tandem predict` of a folder of PNGs (images/s over the command's wall time, start-up included):
  today    --threads = ONNX Runtime's own default (one per physical core), no spinning
  policy   nothing set: the same function's choice for ONNX Runtime (the cores this process may use)
  1 thread --threads 1: what a busy-based choice would give it, to see whether that would pay

A last row starts 2 busy processes 2 s into training (the learner beside a server that gets busy), at most 2 reps.

Targets: beside 2 busy processes the policy trains at >= 0.4x its quiet figure; on a quiet machine at >= 0.97x
of today's. The medians of the reps count; the table prints every ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import Target, report

TANDEM = [sys.executable, "-m", "tandem"]
BUSY = "while True: pass"
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TANDEM_THREADS_SET", "MKL_NUM_THREADS")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, **extra}


def torch_default_threads() -> int:
    """What torch picks in a process where nothing is set: today's training setting."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=clean_env(),
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def physical_cores() -> int:
    """ONNX Runtime's default intra-op threads: one per physical core this process may run on."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


class Busy:
    """n CPU-bound processes, started and stopped by this script."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
        time.sleep(0.5 if n else 0)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def train(env: dict, steps: int, out: Path, busy_after: float | None = None) -> dict:
    command = [*TANDEM, "train", f"max_steps={steps}", f"out_dir={out}", "overwrite=true", "progress=false", "--json"]
    if busy_after is None:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    else:  # the busy processes start once training is under way
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("model: ") and "parameters" in line:  # training starts next
                break
        time.sleep(busy_after)
        busy = Busy(2)
        stdout, rest = proc.communicate()
        busy.stop()
        stderr, code = "".join(lines) + rest, proc.returncode
    if code != 0:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {code}):\n{stderr[-2000:]}")
    result = json.loads(stdout)
    return {"images_per_second": result["images_per_second"], "threads": result["threads"]}


def predict(env: dict, bundle: Path, folder: Path, n: int, threads: int | None) -> float:
    command = [*TANDEM, "predict", str(bundle), str(folder), "--json", *(["--threads", str(threads)] if threads else [])]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or proc.stdout.count("\n") != n:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return n / seconds


def setup(work: Path, images: int) -> tuple[Path, Path]:
    """A bundle (a short run of the demo's config, exported) and a folder of PNGs from the embedded animals."""
    import numpy as np
    from PIL import Image

    from tandem.data import load_dataset

    run, bundle, folder = work / "run", work / "bundle", work / "images"
    for command in ([*TANDEM, "train", "max_steps=60", f"out_dir={run}", "progress=false"],
                    [*TANDEM, "export", str(run), "--out", str(bundle)]):
        proc = subprocess.run(command, env=clean_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed:\n{proc.stderr[-2000:]}")
    x = load_dataset("animals", 28, 1).pixels
    folder.mkdir()
    for i in range(images):
        Image.fromarray(np.asarray(x[i % len(x)]).squeeze(-1)).save(folder / f"{i:05d}.png")
    return bundle, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per setting and load, alternated (default 3)")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 4], help="busy processes (default 0 1 2 4)")
    parser.add_argument("--images", type=int, default=3000, help="PNGs in the folder `tandem predict` classifies")
    parser.add_argument("--quick", action="store_true", help="fewer steps: checks the script, not the targets")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet_steps, busy_steps = (30, 15) if args.quick else (200, 80)
    today_train, today_ort = torch_default_threads(), physical_cores()
    rows, details = [], {"today": {"torch_threads": today_train, "onnxruntime_threads": today_ort}, "loads": {}}
    with tempfile.TemporaryDirectory(prefix="tandem-busy-") as tmp:
        work = Path(tmp)
        bundle, folder = setup(work, args.images)
        scenarios = [(load, None) for load in args.loads] + [(2, 2.0)]
        for load, busy_after in scenarios:
            name = f"{load}" if busy_after is None else f"{load}, from mid-run"
            busy = Busy(0 if busy_after is not None else load)
            try:
                runs = {"today": [], "policy": []}
                chosen, changes = [], 0
                steps = quiet_steps if load == 0 else (busy_steps if busy_after is None else 5 * busy_steps)
                for _ in range(args.reps if busy_after is None else min(args.reps, 2)):
                    for setting in ("today", "policy"):
                        env = clean_env(OMP_NUM_THREADS=str(today_train)) if setting == "today" else clean_env()
                        result = train(env, steps, work / "out", busy_after)
                        runs[setting].append(result["images_per_second"])
                        if setting == "policy":
                            chosen.append(result["threads"]["threads"] if not result["threads"].get("changes")
                                          else result["threads"]["changes"][0]["threads"])
                            changes += len(result["threads"].get("changes", []))
                served = {"today": [], "policy": [], "one": []}
                if busy_after is None:
                    for _ in range(args.reps):
                        served["today"].append(predict(clean_env(), bundle, folder, args.images, today_ort))
                        served["policy"].append(predict(clean_env(), bundle, folder, args.images, None))
                        served["one"].append(predict(clean_env(), bundle, folder, args.images, 1))
            finally:
                busy.stop()
            med = {k: statistics.median(v) for k, v in runs.items()}
            pmed = {k: statistics.median(v) if v else None for k, v in served.items()}
            details["loads"][name] = {"train": runs, "predict": served, "policy_threads": chosen,
                                      "policy_changes": changes}
            rows.append([name, med["today"], med["policy"], med["policy"] / med["today"], "/".join(map(str, chosen)),
                         pmed["today"] or "-", pmed["policy"] or "-", pmed["one"] or "-"])
            print(f"busy {name}: train today {med['today']:,.0f}, policy {med['policy']:,.0f} img/s", file=sys.stderr)
    quiet = next((r for r in rows if r[0] == "0"), None)
    for row in rows:
        row.insert(4, row[2] / quiet[2] if quiet else "-")
        row.append(row[7] / quiet[7] if quiet and row[7] != "-" else "-")  # predict, policy / its quiet figure
    targets = []
    if quiet:
        targets.append(Target("quiet machine: policy / today (training)", quiet[3], 0.97, True))
        two = next((r for r in rows if r[0] == "2"), None)
        if two:
            targets.append(Target("beside 2 busy: policy / its quiet figure (training)", two[4], 0.4, True))
    report("training and predict beside busy processes: today's threads vs tandem.threads",
           ["busy processes", "train today img/s", "train policy img/s", "policy/today", "policy/quiet",
            "policy threads", "predict today img/s", "predict policy img/s", "predict 1 thread img/s",
            "predict policy/quiet"],
           rows, targets, args.json, details)


if __name__ == "__main__":
    main()

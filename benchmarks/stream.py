"""Streamed image folders against the in-memory path, side by side in one run: memory and throughput.

    python benchmarks/stream.py [--small 5000] [--big 20000] [--steps 30] [--rounds 2] [--workers 2] [--json]

Folders of RGB 64x64 PNGs (10 classes; a smooth colour field with grain, about 9 KB each) are made once
in benchmarks/.stream/ and kept. Every measurement runs in a fresh process started in its own session;
this process samples, 10 times a second, every process of that session (the measured process, its
forkserver and its DataLoader workers) and keeps the peak of their summed PSS (proportional set size:
pages shared by several processes, such as torch's, count once in all). The measured process also
reports its own peak RSS (VmHWM) and its workers' (read just before they stop), summed: an upper bound.
The digest and decode caches live in benchmarks/.stream/cache and are emptied at the start of a run;
a set-up process per folder fills them (timed: the streamed path's one pass over the folder).

(a) Memory: one epoch of the train split, batches of 128 in a seeded order, streamed with --workers
    DataLoader workers (tandem.train.loader.StreamedBatches), on the small and the big folder; the same
    through the in-memory path (InMemoryBatches) for comparison. Streamed, big/small should be ~1 (flat).
(b) Throughput on the big folder: the loader alone (one epoch, images/s), and a training-like loop:
    forward + backward + SGD step of tandem.train.models.create_model('cnn', 3, 64, 10) in channels_last,
    fp32, torch.set_num_threads(1) in the training process, so that the workers compete with training
    as they would. --steps timed steps after 3 untimed ones (the workers' start), alternating streamed
    and in-memory processes for --rounds rounds; the table shows medians.

Targets: streamed peak memory big/small <= 1.25; training throughput streamed/in-memory >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from targets import Target, report

STREAM_DIR = Path(__file__).resolve().parent / ".stream"  # kept between runs (benchmarks/.gitignore)
GENERATOR_VERSION = 1
SIZE, CLASSES, BATCH = 64, 10, 128

# The measured child: argv = mode, folder, workers, steps. Prints one JSON line.
CHILD = r"""
import json, os, sys, time
import numpy as np
mode, folder, workers, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
BATCH = 128

def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024

def main():
    import torch
    from tandem.config import DataConfig
    from tandem.data import load_dataset, split_dataset
    from tandem.data.stream import load_split_files
    from tandem.train.loader import InMemoryBatches, StreamedBatches

    out = {"mode": mode}
    t0 = time.perf_counter()
    if mode == "setup":
        cfg = DataConfig(source=folder, image_size=64, channels=3)
        files = load_split_files(cfg, seed=0)
        out["digest_s"] = time.perf_counter() - t0
        out["describe"] = files.train.describe_decode()
        t1 = time.perf_counter()
        load_dataset(folder, 64, 3)
        out["decode_s"] = time.perf_counter() - t1
        out["main_hwm"] = vm_hwm("self")
        print(json.dumps(out), flush=True)
        return
    streamed = mode.startswith("stream")
    torch.set_num_threads(1)  # the training process's threads; the workers set theirs to 1 too
    if streamed:
        train = load_split_files(DataConfig(source=folder, image_size=64, channels=3), seed=0).train
        source = StreamedBatches(train, 0.5, 0.5, "cpu", workers, BATCH)
    else:
        train = split_dataset(load_dataset(folder, 64, 3), 0.1, 0.1, seed=0).train
        source = InMemoryBatches(train, 0.5, 0.5, "cpu")
    out["images"] = len(source)
    out["load_s"] = time.perf_counter() - t0
    order = list(torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).split(BATCH))
    if mode.endswith("epoch"):
        t1 = time.perf_counter()
        first, seen = None, 0
        for x, y in source.batches(order):
            seen += len(y)
            first = first or time.perf_counter() - t1
        out["first_batch_s"], out["epoch_s"] = first, time.perf_counter() - t1
        out["images_per_s"] = seen / out["epoch_s"]
        out["steady_images_per_s"] = (seen - len(order[0])) / (out["epoch_s"] - first)
    else:
        import torch.nn.functional as F
        from tandem.train.models import create_model

        torch.manual_seed(0)
        model = create_model("cnn", 3, 64, 10).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        warmup = 3
        times, cpu = [], 0.0
        t_last = time.perf_counter()
        for step, (x, y) in enumerate(source.batches(order[:warmup + steps])):
            if step == warmup:
                cpu = time.process_time()
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            times.append(now - t_last)
            t_last = now
        out["images_per_s"] = BATCH * steps / sum(times[warmup:])
        out["main_cpu_ms_per_image"] = (time.process_time() - cpu) / (BATCH * steps) * 1e3
        out["first_steps_s"] = sum(times[:warmup])
    out["main_hwm"] = vm_hwm("self")
    iterator = getattr(getattr(source, "_loader", None), "_iterator", None)
    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    out["workers_hwm"] = sum(vm_hwm(pid) for pid in pids)
    out["workers_cpu_s"] = sum(cpu_s(pid) for pid in pids)  # the whole run: start, prefetch, batches
    print(json.dumps(out), flush=True)
    source.close()

if __name__ == "__main__":
    main()
"""


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the folders -------------------------------------------------------------------------------------------


def _write_images(job: tuple[str, int, int]) -> None:
    """Images [start, stop) of a folder: seeded per image, so every run makes the same files."""
    from PIL import Image

    folder, start, stop = job
    for i in range(start, stop):
        rng = np.random.default_rng([2026, i])
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIZE, SIZE),
                                                                                      Image.Resampling.BILINEAR)
        pixels = np.asarray(field, np.int16) + rng.integers(-6, 7, (SIZE, SIZE, 3), dtype=np.int16)
        path = Path(folder) / f"class{i % CLASSES}" / f"{i:06d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_folder(n: int) -> Path:
    """benchmarks/.stream/v1-<n>/class<k>/<i>.png, made once (in a temporary folder, then renamed)."""
    folder = STREAM_DIR / f"v{GENERATOR_VERSION}-{n}"
    if folder.is_dir():
        return folder
    tmp = STREAM_DIR / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    for k in range(CLASSES):
        (tmp / f"class{k}").mkdir(parents=True)
    log(f"making {n} PNGs in {folder} (once) ...")
    t0 = time.perf_counter()
    step = 500
    jobs = [(str(tmp), i, min(n, i + step)) for i in range(0, n, step)]
    with multiprocessing.get_context("forkserver").Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_images, jobs)
    tmp.rename(folder)
    log(f"  made in {time.perf_counter() - t0:.1f} s")
    return folder


# --- measuring a fresh process and everything it starts ----------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
                pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def measure(mode: str, folder: Path, workers: int, steps: int, env: dict) -> dict:
    """Run the child in its own session; sample its whole process tree's PSS until it exits."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(folder), str(workers), str(steps)],
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    peak = {"pss": 0, "processes": 0}

    def sample() -> None:
        while proc.poll() is None:
            pids = _session_pids(proc.pid)
            total = sum(_pss(pid) for pid in pids)
            if total > peak["pss"]:
                peak["pss"], peak["processes"] = total, len(pids)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    line = out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode != 0 or not line:
        raise SystemExit(f"the benchmark child ({mode} {folder.name}) failed (exit {proc.returncode})")
    result = json.loads(line)
    return {**result, "peak_pss": peak["pss"], "peak_processes": peak["processes"]}


def mb(value: float) -> float:
    return value / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--small", type=int, default=5000, help="images in the small folder")
    parser.add_argument("--big", type=int, default=20000, help="images in the big folder")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streamed path")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="streamed / in-memory training processes each")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    folders = {"small": make_folder(args.small), "big": make_folder(args.big)}
    cache = STREAM_DIR / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TANDEM_CACHE_DIR": str(cache)}
    results: dict[str, dict] = {}
    for name, folder in folders.items():
        log(f"set-up {name}: hashing (the streamed path's one pass) and decoding (the in-memory cache) ...")
        results[f"setup-{name}"] = measure("setup", folder, args.workers, 0, env)
    for name, folder in folders.items():
        for mode in ("stream-epoch", "memory-epoch"):
            log(f"{mode} {name} ...")
            results[f"{mode}-{name}"] = measure(mode, folder, args.workers, 0, env)
    train: dict[str, list[dict]] = {"stream": [], "memory": []}
    for r in range(args.rounds):
        for side in ("stream", "memory"):
            log(f"{side}-train big, round {r + 1} ...")
            train[side].append(measure(f"{side}-train", folders["big"], args.workers, args.steps, env))

    def median(side: str, key: str) -> float:
        return statistics.median(t[key] for t in train[side])

    s_small, s_big = results["stream-epoch-small"], results["stream-epoch-big"]
    m_small, m_big = results["memory-epoch-small"], results["memory-epoch-big"]
    flat = s_big["peak_pss"] / s_small["peak_pss"]
    train_ratio = median("stream", "images_per_s") / median("memory", "images_per_s")
    # The workers decode the warm-up and the timed steps (the list holds no more), start-up included.
    workers_ms = statistics.median(t["workers_cpu_s"] / (BATCH * (args.steps + 3)) * 1e3
                                   for t in train["stream"])
    cpu_ratio = median("memory", "main_cpu_ms_per_image") / (median("stream", "main_cpu_ms_per_image") + workers_ms)
    rows = [
        [f"peak memory, one epoch, {args.small} files (MB, PSS of all processes)", mb(s_small["peak_pss"]),
         mb(m_small["peak_pss"]), s_small["peak_pss"] / m_small["peak_pss"]],
        [f"peak memory, one epoch, {args.big} files (MB)", mb(s_big["peak_pss"]), mb(m_big["peak_pss"]),
         s_big["peak_pss"] / m_big["peak_pss"]],
        ["  big / small", flat, m_big["peak_pss"] / m_small["peak_pss"], ""],
        [f"  peak RSS, main + workers' peaks summed, {args.big} files (MB)",
         mb(s_big["main_hwm"] + s_big["workers_hwm"]), mb(m_big["main_hwm"]), ""],
        [f"loader alone, one epoch of {s_big['images']} images (images/s)", s_big["images_per_s"],
         m_big["images_per_s"], s_big["images_per_s"] / m_big["images_per_s"]],
        ["  after the first batch (images/s)", s_big["steady_images_per_s"], m_big["steady_images_per_s"],
         s_big["steady_images_per_s"] / m_big["steady_images_per_s"]],
        ["  first batch, workers starting (s)", s_big["first_batch_s"], m_big["first_batch_s"], ""],
        [f"training-like loop, cnn fp32, 1 thread (images/s, median of {args.rounds})",
         median("stream", "images_per_s"), median("memory", "images_per_s"), train_ratio],
        ["  training process CPU per image (ms)", median("stream", "main_cpu_ms_per_image"),
         median("memory", "main_cpu_ms_per_image"), ""],
        ["  workers' CPU per image decoded (ms, their start included)", workers_ms, 0.0, ""],
        ["  CPU-bound ratio (no spare core: all CPU per image)", "", "", cpu_ratio],
        ["  first 3 steps, workers starting (s)", median("stream", "first_steps_s"), median("memory", "first_steps_s"), ""],
        [f"start: split ready, {args.big} files (s)", s_big["load_s"], m_big["load_s"], ""],
        [f"one pass over {args.big} files, cold (s): hash / decode+cache", results["setup-big"]["digest_s"],
         results["setup-big"]["decode_s"], ""],
    ]
    targets = [Target("streamed peak memory big/small", round(flat, 3), 1.25, higher_is_better=False),
               Target("training throughput streamed/in-memory", round(train_ratio, 3), 0.9, higher_is_better=True)]
    details = {"folders": {k: str(v) for k, v in folders.items()}, "workers": args.workers, "batch": BATCH,
               "results": results, "train": train}
    report(f"streamed folders ({args.workers} workers) vs in memory: {args.small} and {args.big} RGB 64x64 PNGs",
           ["measure", "streamed", "in memory", "ratio"], rows, targets, args.json, details)


if __name__ == "__main__":
    main()

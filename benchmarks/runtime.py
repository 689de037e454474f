"""The bundle in the torch-free runtime (ONNX Runtime) against the same model in PyTorch eager, in one run.

    python benchmarks/runtime.py                         # trains a 5-step run and exports it first
    python benchmarks/runtime.py --bundle tandem-demo/bundle [--reps 300] [--starts 5] [--json]

In this process, on the same float32 input, in alternating blocks of calls: `session.run` against torch's forward
(eval, inference mode, torch's default threads, ONNX Runtime's default threads), at batch 1 (median
latency) and batch 256 (throughput). The targets take torch as a user runs it by default (NCHW); torch
in channels_last (the layout tandem trains in, the input's conversion included) is timed in the same
blocks and shown with its own ratio: at batch 256 it is about twice as fast as NCHW here, and both it
and ONNX Runtime then run near the CPU's fp32 peak. The full Predictor path (uint8 pixels -> preprocess -> ONNX) is
shown for information. In fresh processes, alternating: peak RSS and process start -> first
prediction of 256 images, for a runtime process and, for reference, a torch process.

Targets: batch-1 latency runtime/torch <= 0.5; batch-256 throughput runtime/torch >= 1.8;
runtime peak RSS <= 150 MB; runtime start -> first prediction <= 0.6 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from targets import Target, report

# Both children print one JSON line: seconds spent importing, seconds from their first line to the
# first prediction, peak RSS, and whether torch got imported. Peak RSS is VmHWM (Linux), not ru_maxrss:
# a child forked from this torch-laden parent starts ru_maxrss at the parent's RSS (both read 355 MB).
CHILD_START = "import time; t0 = time.perf_counter()\nimport json, sys\nimport numpy as np\n"
CHILD_END = """
print(json.dumps({"import_s": t_import - t0, "first_prediction_s": time.perf_counter() - t0,
                  "rss_mb": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024 / 1e6,
                  "torch_imported": "torch" in sys.modules}), flush=True)
"""
RUNTIME_CHILD = CHILD_START + """
from tandem.runtime import Predictor
t_import = time.perf_counter()
predictor = Predictor.load(sys.argv[1])
size, channels = predictor.image_size, predictor.channels
pixels = np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]), size, size, channels), dtype=np.uint8)
predictor.logits(pixels)
""" + CHILD_END
TORCH_CHILD = CHILD_START + """
import torch
from safetensors.torch import load_file
from tandem.bundle import read_manifest
from tandem.config import TrainConfig
from tandem.train.models import build_model
from tandem.runtime.preprocess import preprocess
t_import = time.perf_counter()
manifest = read_manifest(sys.argv[1])
cfg = TrainConfig.model_validate(manifest["config"])
model = build_model(cfg, len(manifest["labels"]), load_file(f"{sys.argv[1]}/weights.safetensors"))
size, channels = cfg.data.image_size, cfg.data.channels
pixels = np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]), size, size, channels), dtype=np.uint8)
with torch.inference_mode():
    model(torch.from_numpy(preprocess(pixels, cfg.data.mean, cfg.data.std))).numpy()
""" + CHILD_END


def make_bundle(folder: Path) -> Path:
    """A 5-step run exported to a bundle: accuracy does not matter for speed."""
    print("no --bundle given: training a 5-step run and exporting it ...", file=sys.stderr)
    tandem = [sys.executable, "-m", "tandem"]
    subprocess.run([*tandem, "train", "epochs=1", "max_steps=5", "progress=false", f"out_dir={folder / 'run'}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*tandem, "export", str(folder / "run"), "--out", str(folder / "bundle")],
                   check=True, stdout=subprocess.DEVNULL)
    return folder / "bundle"


def fresh_process(code: str, bundle: Path, batch: int) -> dict:
    """Run a child; `start_s` is spawn -> its result line, seen from here (interpreter start-up included)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(bundle), str(batch)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    start_s = time.perf_counter() - t0
    if proc.wait() != 0 or not line:
        raise SystemExit(f"the benchmark child process failed (exit {proc.returncode})")
    return {**json.loads(line), "start_s": start_s}


def alternating(*fns, reps: int, warmup: int, rounds: int = 5, pause: float = 1.0) -> list[float]:
    """Median seconds per call of each function, run in alternating blocks so that drift hits all alike.

    Blocks, not single calls: after a call each library's idle threads spin for a while, which on a
    few cores steals the other's time (torch's batch-1 latency looked 20x worse called alternately).
    A pause before each block lets the other library's threads go to sleep first."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            time.sleep(pause)
            for i in range(warmup + reps // rounds):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: train a 5-step run and export it)")
    parser.add_argument("--reps", type=int, default=300, help="timed batch-1 calls per side; batch 256 gets a tenth")
    parser.add_argument("--starts", type=int, default=5, help="fresh processes per side for RSS and start-up")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        run(args, args.bundle or make_bundle(Path(tmp)))


def run(args, bundle: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from tandem.config import TrainConfig
    from tandem.train.models import build_model
    from tandem.runtime import Predictor
    from tandem.runtime.preprocess import preprocess

    predictor = Predictor.load(bundle)
    cfg = TrainConfig.model_validate(predictor.manifest["config"])
    model = build_model(cfg, len(predictor.labels), load_file(str(bundle / "weights.safetensors")))
    shape = (256, predictor.image_size, predictor.image_size, predictor.channels)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x = preprocess(pixels, predictor.mean, predictor.std)
    session, name = predictor.session, predictor.input_name
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # the layout training uses

    speed = {}
    with torch.inference_mode():
        for batch, reps in ((1, args.reps), (256, max(10, args.reps // 10))):
            xb = x[:batch]
            warmup = max(2, reps // 20)
            ort_s, nchw_s, nhwc_s = alternating(
                lambda: session.run(None, {name: xb})[0],
                lambda: model(torch.from_numpy(xb)).numpy(),
                lambda: model_cl(torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)).numpy(),
                reps=reps, warmup=warmup)
            # The targets compare with eager as a user runs it (NCHW, the layout model and input come in);
            # channels_last, which tandem's training uses, is shown beside it with its own ratio.
            speed[batch] = (ort_s, nchw_s)
            speed[f"channels_last_{batch}"] = nhwc_s
            # For information: what a user's call costs, uint8 pixels in.
            speed[f"predictor_{batch}"], = alternating(lambda: predictor.logits(pixels[:batch]), reps=reps, warmup=warmup)

    children: dict[str, list[dict]] = {"runtime": [], "torch": []}
    for _ in range(args.starts):  # alternate, so that drift in the machine's load hits both alike
        children["runtime"].append(fresh_process(RUNTIME_CHILD, bundle, 256))
        children["torch"].append(fresh_process(TORCH_CHILD, bundle, 256))
    proc = {side: {key: statistics.median(c[key] for c in runs) for key in ("start_s", "import_s", "rss_mb")}
            for side, runs in children.items()}
    torch_free = not any(c["torch_imported"] for c in children["runtime"])

    (rt1, pt1), (rt256, pt256) = speed[1], speed[256]
    latency_ratio, throughput_ratio = rt1 / pt1, pt256 / rt256
    rt, pt = proc["runtime"], proc["torch"]
    rows = [
        ["batch-1 latency, median (ms)", rt1 * 1e3, pt1 * 1e3, latency_ratio],
        ["batch-256 throughput (images/s)", 256 / rt256, 256 / pt256, throughput_ratio],
        ["  torch channels_last, batch-1 latency (ms)", "", speed["channels_last_1"] * 1e3, rt1 / speed["channels_last_1"]],
        ["  torch channels_last, batch-256 throughput (images/s)", "", 256 / speed["channels_last_256"],
         speed["channels_last_256"] / rt256],
        ["  full Predictor path, batch 1 (ms)", speed["predictor_1"] * 1e3, "", ""],
        ["  full Predictor path, batch 256 (images/s)", 256 / speed["predictor_256"], "", ""],
        ["start -> first prediction, fresh process (s)", rt["start_s"], pt["start_s"], rt["start_s"] / pt["start_s"]],
        ["  of which imports (s)", rt["import_s"], pt["import_s"], rt["import_s"] / pt["import_s"]],
        ["peak RSS, fresh process (MB)", rt["rss_mb"], pt["rss_mb"], rt["rss_mb"] / pt["rss_mb"]],
        ["imports torch", "no" if torch_free else "YES", "yes", ""],
    ]
    targets = [
        Target("batch-1 latency runtime/torch", latency_ratio, 0.5, higher_is_better=False),
        Target("batch-256 throughput runtime/torch", throughput_ratio, 1.8, higher_is_better=True),
        Target("runtime peak RSS", rt["rss_mb"], 150, higher_is_better=False, unit=" MB"),
        Target("runtime start -> first prediction", rt["start_s"], 0.6, higher_is_better=False, unit=" s"),
        Target("runtime process imports torch", float(not torch_free), 0, higher_is_better=False),
    ]
    details = {"bundle": str(bundle), "torch_threads": torch.get_num_threads(), "onnxruntime_threads": "default",
               "reps": args.reps, "processes": children}
    passed = report(f"tandem runtime (ONNX Runtime) vs PyTorch eager, bundle {bundle}",
           ["measure", "runtime", "torch", "runtime/torch"], rows, targets, args.json, details)
    if not args.json:
        print(f"\nmedians; torch {torch.__version__} with {torch.get_num_threads()} threads, ONNX Runtime with its "
              f"default threads; {args.starts} fresh processes per side, {args.reps} batch-1 calls per side")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run (and `make bench`)


if __name__ == "__main__":
    main()

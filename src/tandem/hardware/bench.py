"""MLPerf-style benchmarks of a bundle on this machine, torch-free: `tandem bench BUNDLE [--json]`.

    tandem bench bundles/animals/1                        # a table: fp32, and int8 where the bundle has it
    tandem bench bundles/animals/1 --json --threads 2     # the same as JSON (schema below)

    report = run_bench("bundles/animals/1", precisions=["fp32", "int8"], threads=None)

Scenarios, after MLPerf Inference's (a query is one image, random pixels through the bundle's preprocessing,
so the model is timed as the runtime runs it: its own session settings, hashes verified on load):

- single-stream: one query at a time, back to back, at batch 1, for at most `seconds` or `queries` per
  precision; latency percentiles p50 / p90 / p99 (MLPerf reports p90);
- offline: images per second at each of `batches`, each timed in `rounds` rounds, with one stream (a batch at
  a time on every thread) and with one stream per core (that many batches at once, one thread each:
  tandem.runtime.Predictor's `streams`); the best batch and stream count counts;
- cold start: a fresh process, from its start to its first prediction (interpreter, imports, hash
  checks, session, one image), median of `starts` processes;
- peak RSS: the peak resident memory (VmHWM) of that fresh process once it has also run a batch of 256.

Precisions (and, in the offline scenario, batch sizes) are timed in alternated rounds so that the other
work of a busy machine hits each alike. Every figure runs on the CPU, and also on ONNX Runtime's CUDA
provider where that is installed (`onnxruntime-gpu`); where it is not, the report says "not available".

JSON schema (`"schema": "tandem.bench/1"`; new keys may be added, these keep their meaning and type):

    schema str, bundle str, name str|null, version int|null, seconds float (the bench's own run time)
    machine   {cpu str, cores int, python str, onnxruntime str, platform str}
    settings  {threads int|null (null: ONNX Runtime's default), seconds float, queries int,
               batches [int], streams [int], rounds int, starts int}
    providers {provider name: "available" | "not available"}
    results   [{precision "fp32"|"int8", provider str, model_file str, model_bytes int,
                single_stream {queries int, seconds float, p50_ms float, p90_ms float, p99_ms float, mean_ms float},
                offline {best_batch int, best_streams int, images_per_second float,
                         by_batch [{batch int, streams int, images_per_second float}]},
                cold_start_s float|null, peak_rss_mb float|null}]      (null: --starts 0)
    not_run   [{precision str, provider str, reason str}]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tandem.hardware.timing import alternated_seconds_per_call, cpu_name
from tandem.threads import choose

SCHEMA = "tandem.bench/1"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DEFAULTS = {"seconds": 2.0, "queries": 2000, "batches": (16, 64, 256), "rounds": 3, "starts": 3}
RSS_BATCH = 256

# A fresh process: the first line when the first prediction is out (the parent times spawn -> that line),
# the second with the peak RSS after a batch of RSS_BATCH. VmHWM, not ru_maxrss: a forked child can start
# ru_maxrss at its parent's RSS.
CHILD = """
import json, sys
import numpy as np
from tandem.runtime import Predictor
bundle, precision, threads, provider, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
predictor = Predictor.load(bundle, precision=precision, threads=threads or None, providers=[provider])
shape = (predictor.image_size, predictor.image_size, predictor.channels)
predictor.logits(np.zeros((1, *shape), np.uint8))
print("first", flush=True)
predictor.logits(np.zeros((batch, *shape), np.uint8))
def peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}), flush=True)
"""


def single_stream(runs: list[Callable[[int], object]], seconds: float, queries: int, rounds: int) -> list[dict]:
    """Batch-1 latency of each run(i) (query i), alternated in `rounds` blocks, bounded by seconds and queries."""
    latencies: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        n = queries // rounds + (r < queries % rounds)  # `queries` in all
        for run, out in zip(runs, latencies):
            if not n:
                continue
            for i in range(3):  # warm-up: first calls allocate
                run(i)
            deadline = time.perf_counter() + seconds / rounds
            for i in range(n):
                start = time.perf_counter()
                run(i)
                end = time.perf_counter()
                out.append(end - start)
                if end >= deadline:
                    break
    results = []
    for times in latencies:
        ms = np.array(times) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        results.append({"queries": len(times), "seconds": float(sum(times)), "p50_ms": float(p50),
                        "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean())})
    return results


def offline(runs: list[dict[int, Callable[[int], object]]], batches: list[int], rounds: int,
            progress: Callable[[str], None]) -> list[dict]:
    """Images per second of each run[streams](batch) at each batch size and stream count (alternated rounds:
    every precision and stream count in turn); the best batch and stream count counts."""
    by_batch: list[list[dict]] = [[] for _ in runs]
    for batch in batches:
        progress(f"offline scenario, batch {batch}")
        calls = [(i, streams, lambda fn=fn, batch=batch: fn(batch)) for i, run in enumerate(runs) for streams, fn in run.items()]
        seconds = alternated_seconds_per_call([call for _, _, call in calls], rounds=rounds)
        for (i, streams, _), s in zip(calls, seconds):
            by_batch[i].append({"batch": batch, "streams": streams, "images_per_second": batch / s})
    results = []
    for rows in by_batch:
        best = max(rows, key=lambda row: row["images_per_second"])
        results.append({"best_batch": best["batch"], "best_streams": best["streams"],
                        "images_per_second": best["images_per_second"], "by_batch": rows})
    return results


def stream_counts(threads: int | None) -> list[int]:
    """The offline scenario's stream counts: one, and one per thread (per core when threads is not set)."""
    return sorted({1, threads or choose("onnxruntime").threads})


def cold_start(bundle: Path, precision: str, threads: int | None, provider: str) -> dict:
    """One fresh process: seconds from its spawn to its first prediction, and its peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(bundle), precision, str(threads or 0), provider,
                             str(RSS_BATCH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    seconds = time.perf_counter() - start
    last = proc.stdout.readline()
    _, err = proc.communicate()
    if proc.returncode != 0 or first.strip() != "first" or not last:
        lines = err.strip().splitlines()
        raise RuntimeError(f"the cold-start process failed ({lines[-1] if lines else f'exit {proc.returncode}'})")
    return {"seconds": seconds, **json.loads(last)}


def available_providers() -> dict[str, str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return {name: "available" if name in have else "not available" for name in (CPU, CUDA)}


def run_bench(bundle: str | Path, precisions: list[str] | None = None, threads: int | None = None,
              seconds: float = DEFAULTS["seconds"], queries: int = DEFAULTS["queries"],
              batches: tuple[int, ...] | list[int] = DEFAULTS["batches"], rounds: int = DEFAULTS["rounds"],
              starts: int = DEFAULTS["starts"], progress: Callable[[str], None] = lambda message: None) -> dict:
    """Every scenario for each precision (default: every one the bundle has) on each available provider."""
    import onnxruntime as ort

    from tandem.bundle import read_manifest
    from tandem.errors import UserError
    from tandem.runtime.predictor import MODEL_FILES, Predictor, bundle_precisions, choose_precision
    from tandem.runtime.preprocess import preprocess

    began, bundle = time.perf_counter(), Path(bundle)
    if not (seconds > 0 and queries >= 1 and rounds >= 1 and starts >= 0 and batches
            and all(isinstance(b, int) and b >= 1 for b in batches)):
        raise UserError("bench needs seconds > 0, queries >= 1, rounds >= 1, starts >= 0 and batch sizes >= 1")
    manifest = read_manifest(bundle, verify=False)
    if precisions is None:
        precisions = bundle_precisions(manifest)
    precisions = [choose_precision(manifest, p, bundle) for p in precisions]  # a UserError for int8 it lacks
    if not precisions:
        raise UserError(f"bundle {bundle} lists no model file to benchmark; re-export the bundle")
    providers = available_providers()
    report: dict = {
        "schema": SCHEMA, "bundle": str(bundle), "name": manifest.get("name"), "version": manifest.get("version"),
        "seconds": 0.0,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "platform": platform.platform()},
        "settings": {"threads": threads, "seconds": seconds, "queries": queries, "batches": list(batches),
                     "streams": stream_counts(threads), "rounds": rounds, "starts": starts},
        "providers": providers, "results": [], "not_run": [],
    }
    for provider in (CPU, CUDA):
        if providers[provider] != "available":
            report["not_run"] += [{"precision": p, "provider": provider, "reason": "not available in this ONNX "
                                   "Runtime (install onnxruntime-gpu on a machine with a CUDA GPU)"} for p in precisions]
            continue
        progress(f"{provider}: loading {', '.join(precisions)} (hashes verified)")
        predictors = [Predictor.load(bundle, precision=p, threads=threads, providers=[provider]) for p in precisions]
        if provider != CPU and predictors[0].session.get_providers()[0] != provider:
            report["not_run"] += [{"precision": p, "provider": provider, "reason": "installed, but "
                                   "ONNX Runtime could not use it (CUDA or cuDNN libraries missing?)"} for p in precisions]
            continue
        first = predictors[0]
        pixels = np.random.default_rng(0).integers(
            0, 256, (max(max(batches), 64), first.image_size, first.image_size, first.channels), dtype=np.uint8)
        x = preprocess(pixels, first.mean, first.std)
        runs_1 = [lambda i, s=p.session, n=p.input_name, x=x: s.run(None, {n: x[i % 64:i % 64 + 1]}) for p in predictors]
        # Offline: the model on preprocessed batches, one at a time, or cut into one piece per stream run at once
        # (each stream a Predictor with streams=n: threads // n ONNX Runtime threads, its own session).
        runs_b = []
        for p, predictor in zip(precisions, predictors):
            runs_b.append({1: lambda b, s=predictor.session, n=predictor.input_name: s.run(None, {n: x[:b]})})
            for n in stream_counts(threads)[1:]:
                many = Predictor.load(bundle, verify=False, precision=p, threads=threads, providers=[provider], streams=n)
                runs_b[-1][n] = lambda b, m=many: m.run_inputs(x[:b])
        progress(f"{provider}: single-stream scenario (at most {seconds:g} s or {queries} queries per precision)")
        streams = single_stream(runs_1, seconds, queries, rounds)
        offlines = offline(runs_b, list(batches), rounds, lambda text, provider=provider: progress(f"{provider}: {text}"))
        children: list[list[dict]] = [[] for _ in precisions]
        for n in range(starts):  # alternated, like the rest
            for precision, out in zip(precisions, children):
                progress(f"{provider}: cold start {n + 1}/{starts}, {precision}, in a fresh process")
                try:
                    out.append(cold_start(bundle, precision, threads, provider))
                except RuntimeError as err:
                    raise UserError(f"bench: {err}") from None
        for precision, predictor, stream, off, kids in zip(precisions, predictors, streams, offlines, children):
            name = MODEL_FILES[precision]
            report["results"].append({
                "precision": precision, "provider": provider, "model_file": name,
                "model_bytes": manifest["files"][name]["bytes"], "single_stream": stream, "offline": off,
                "cold_start_s": statistics.median(k["seconds"] for k in kids) if kids else None,
                "peak_rss_mb": statistics.median(k["peak_rss_mb"] for k in kids) if kids else None,
            })
    report["seconds"] = time.perf_counter() - began
    return report


def format_report(report: dict) -> str:
    """The human table: one column per precision and provider, and int8/fp32 where both ran on one provider."""
    results = report["results"]
    short = {CPU: "CPU", CUDA: "CUDA"}
    headers = ["measure"] + [f"{r['precision']} {short.get(r['provider'], r['provider'])}" for r in results]
    pairs = []
    for provider in (CPU, CUDA):
        mine = {r["precision"]: i for i, r in enumerate(results) if r["provider"] == provider}
        if "fp32" in mine and "int8" in mine:
            pairs.append((short[provider], mine["int8"], mine["fp32"]))
            headers.append(f"int8/fp32 {short[provider]}")

    def row(label: str, get: Callable[[dict], float | int | None], fmt: str = "{:.3g}", ratio: bool = True) -> list[str]:
        values = [get(r) for r in results]
        cells = ["-" if v is None else fmt.format(v) for v in values]
        for _, i8, f32 in pairs:
            a, b = values[i8], values[f32]
            cells.append(f"{a / b:.2f}" if ratio and a is not None and b else "")
        return [label, *cells]

    rows = [
        row("single-stream p50 latency (ms)", lambda r: r["single_stream"]["p50_ms"]),
        row("single-stream p90 latency (ms)", lambda r: r["single_stream"]["p90_ms"]),
        row("single-stream p99 latency (ms)", lambda r: r["single_stream"]["p99_ms"]),
        row("single-stream queries", lambda r: r["single_stream"]["queries"], "{:d}", ratio=False),
        row("offline throughput (images/s)", lambda r: r["offline"]["images_per_second"], "{:,.0f}"),
        row("offline best batch", lambda r: r["offline"]["best_batch"], "{:d}", ratio=False),
        row("offline best streams", lambda r: r["offline"]["best_streams"], "{:d}", ratio=False),
        row("cold start, fresh process (s)", lambda r: r["cold_start_s"]),
        row("peak RSS, fresh process (MB)", lambda r: r["peak_rss_mb"], "{:.0f}"),
        row("model file (kB)", lambda r: r["model_bytes"] / 1e3, "{:,.0f}"),
    ]
    m, s = report["machine"], report["settings"]
    threads = s["threads"] or "ONNX Runtime's default"
    lines = [f"tandem bench {report['bundle']} ({report['name']} v{report['version']})",
             f"{m['cpu']}, {m['cores']} cores, ONNX Runtime {m['onnxruntime']}, threads: {threads}", ""]
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    seen = set()
    for item in report["not_run"]:
        if item["provider"] not in seen:  # one line per provider: the reason is the same for each precision
            seen.add(item["provider"])
            lines.append(f"{item['provider']}: {item['reason']}")
    lines.append(f"single-stream: batch 1, up to {s['seconds']:g} s or {s['queries']} queries per precision; "
                 f"offline: best of batches {', '.join(map(str, s['batches']))} and streams "
                 f"{', '.join(map(str, s.get('streams', [1])))}; {s['rounds']} alternated rounds; "
                 f"cold start and RSS: median of {s['starts']} fresh processes; took {report['seconds']:.1f} s")
    return "\n".join(lines)

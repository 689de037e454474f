"""`tandem bench`: the JSON schema it documents (keys and types), the scenarios' invariants, fp32 and int8
side by side, progress on stderr, no torch, and one-line errors. Tiny bounds keep it fast; the figures
themselves are benchmarks/edge.py's business."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_tandem
from tandem.bundle import read_manifest, write_manifest
from tandem.errors import UserError
from tandem.hardware.bench import CPU, CUDA, SCHEMA, format_report, run_bench

FAST = {"seconds": 0.2, "queries": 40, "batches": [1, 8], "rounds": 2, "starts": 1}
FAST_ARGS = ["--seconds", "0.2", "--queries", "40", "--batches", "1,8", "--rounds", "2", "--starts", "1"]


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus a model.int8.onnx listed in its manifest (made here, without export's gates)."""
    from tandem.export.quantize import quantize

    bundle = tmp_path_factory.mktemp("bench") / "b"
    shutil.copytree(tiny_bundle, bundle)
    calibration = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    quantize(bundle / "model.onnx", bundle / "model.int8.onnx", calibration)
    manifest = read_manifest(bundle)
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")})
    return bundle


def _check_schema(report: dict, precisions: list[str]) -> None:
    """Every documented key, with its type (src/tandem/hardware/bench.py, the README)."""
    number = (int, float)
    assert report["schema"] == SCHEMA and isinstance(report["bundle"], str) and isinstance(report["seconds"], float)
    assert isinstance(report["name"], str) and isinstance(report["version"], int)
    machine = report["machine"]
    assert all(isinstance(machine[k], str) for k in ("cpu", "python", "onnxruntime", "platform"))
    assert isinstance(machine["cores"], int)
    settings = report["settings"]
    assert settings["threads"] is None or isinstance(settings["threads"], int)
    assert isinstance(settings["seconds"], number) and all(isinstance(b, int) for b in settings["batches"])
    assert all(isinstance(settings[k], int) for k in ("queries", "rounds", "starts"))
    assert settings["streams"][0] == 1 and all(isinstance(n, int) and n >= 1 for n in settings["streams"])
    assert set(report["providers"]) == {CPU, CUDA} and set(report["providers"].values()) <= {"available", "not available"}
    assert [r["precision"] for r in report["results"] if r["provider"] == CPU] == precisions
    for result in report["results"]:
        assert result["model_file"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}[result["precision"]]
        assert isinstance(result["model_bytes"], int) and result["model_bytes"] > 0
        stream = result["single_stream"]
        assert isinstance(stream["queries"], int) and 1 <= stream["queries"] <= settings["queries"]
        assert all(isinstance(stream[k], float) for k in ("seconds", "p50_ms", "p90_ms", "p99_ms", "mean_ms"))
        assert 0 < stream["p50_ms"] <= stream["p90_ms"] <= stream["p99_ms"]
        offline = result["offline"]
        # every batch with every stream count, batch by batch
        assert [(row["batch"], row["streams"]) for row in offline["by_batch"]] == \
            [(b, n) for b in settings["batches"] for n in settings["streams"]]
        best = max(offline["by_batch"], key=lambda row: row["images_per_second"])
        assert offline["best_batch"] == best["batch"] and offline["images_per_second"] == best["images_per_second"]
        assert offline["best_streams"] == best["streams"]
        assert all(isinstance(row["images_per_second"], float) for row in offline["by_batch"])
        for key in ("cold_start_s", "peak_rss_mb"):
            assert (result[key] is None) == (settings["starts"] == 0) and (result[key] is None or result[key] > 0)
    for item in report["not_run"]:
        assert set(item) == {"precision", "provider", "reason"} and all(isinstance(v, str) for v in item.values())
    if report["providers"][CUDA] == "not available":
        assert {(i["provider"], i["precision"]) for i in report["not_run"]} == {(CUDA, p) for p in precisions}
        assert "not available" in report["not_run"][0]["reason"]


def test_bench_reports_both_precisions_in_the_documented_schema(int8_bundle):
    messages: list[str] = []
    report = run_bench(int8_bundle, **FAST, progress=messages.append)
    _check_schema(json.loads(json.dumps(report)), ["fp32", "int8"])
    assert any("single-stream" in m for m in messages) and any("cold start" in m for m in messages)
    int8, fp32 = (next(r for r in report["results"] if r["precision"] == p) for p in ("int8", "fp32"))
    assert int8["model_bytes"] < fp32["model_bytes"]
    text = format_report(report)
    assert "single-stream p50 latency (ms)" in text and "int8/fp32 CPU" in text
    assert "CUDAExecutionProvider" in text


def test_bench_command_json_on_stdout_progress_on_stderr_and_no_torch(int8_bundle):
    probe = ("import sys\nfrom tandem.cli import main\n"
             f"code = main(['bench', {str(int8_bundle)!r}, '--json', '--precision', 'int8', *{FAST_ARGS!r}])\n"
             "assert code == 0 and 'torch' not in sys.modules, code\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _check_schema(report, ["int8"])
    assert "bench: " in proc.stderr


def test_bench_table_for_an_fp32_bundle(tiny_bundle):
    proc = run_tandem("bench", str(tiny_bundle), *FAST_ARGS[:-2], "--starts", "0", check=True)
    assert "fp32 CPU" in proc.stdout and "int8" not in proc.stdout.split("\n\n")[1]
    assert "offline throughput (images/s)" in proc.stdout and "bench: " in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--precision", "int8"], "has no int8 model"),
    (["--batches", "0,8"], "give batch sizes from 1 to 65536"),
    (["--batches", "16,10000000"], "give batch sizes from 1 to 65536"),  # would allocate tens of GB
    (["--seconds", "0"], "must be greater than 0"),
    (["--threads", "0"], "out of range"),
    (["--threads", "100000"], "out of range"),  # would start that many threads
])
def test_bench_mistakes_get_one_line(tiny_bundle, args, expected):
    proc = run_tandem("bench", str(tiny_bundle), *args)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bench_refuses_what_is_not_a_bundle(tmp_path):
    proc = run_tandem("bench", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: bundle") and proc.stderr.count("\n") == 1
    with pytest.raises(UserError, match="batch sizes >= 1"):
        run_bench(tmp_path, batches=[])

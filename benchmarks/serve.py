"""`tandem serve` under load on 127.0.0.1, against a naive FastAPI + PyTorch server, in one run.

    python benchmarks/serve.py                       # exports two small bundles first; about 8 minutes
    python benchmarks/serve.py --quick               # everything short: a check of the script (~2 minutes;
                                                     # its 20 s soak ends before the server's image cache
                                                     # has filled, so its RSS verdict means nothing)
    python benchmarks/serve.py --bundle BUNDLE [--resnet-bundle BUNDLE] [--duration 15] [--soak-seconds 300]
                               [--clients 64] [--scenarios a,b,c,d] [--json]

Load. Debian's `wrk` (C, one thread, epoll), started as its own process: `--clients` HTTP/1.1 keep-alive
connections, each sending its next request as soon as the previous answer arrives (closed loop).
Requests are built here, byte for byte, before the run (request line, headers, body), and a Lua
script hands them out in turn, so wrk does no per-request work beyond sending and reading. Images
are real: the embedded animals at the bundle's size, preprocessed the bundle's way, 64 of them in
rotation. Every figure comes with the CPU (in cores, from /proc) used by the server, by wrk itself,
and by everything else on the machine during the measurement: this machine has 2 cores, and
other processes running at the same time make the figures noisy, so each measured run first waits
(up to --quiet-wait seconds) for the rest of the machine to go idle. tandem serve's own view comes
from its /metrics: the mean batch size, and the mean time of a request split into its wait for a
batch, its batch's compute, and its wait for the prediction log's commit.

Servers. `python -m tandem serve REPO --port P --config CFG` (access_log off, the prediction store
in SQLite in a temporary folder, an admin token in TANDEM_ADMIN_TOKEN, inference open), and
benchmarks/serve_naive.py (FastAPI + PyTorch eager, one request per forward pass, JSON tensors,
uvicorn with one worker). Each server is measured alone: started, warmed up (a few seconds of the
same load, not counted), measured for --duration seconds, stopped.

Scenarios.
  a. The demo's model (the default cnn on 28x28 grey; a 5-step run is exported unless --bundle is
     given), one image per request. tandem serve with the binary tensor extension
     (Inference-Header-Content-Length, raw FP32, binary_data_output) against the naive server with
     JSON tensors. Before the load, one image is sent to both and their logits compared.
  b. A compute-heavy model: the resnet on 64x64 RGB (a 5-step run on the animals resized, exported
     here unless --resnet-bundle is given), binary protocol; tandem serve with dynamic batching (the
     default config) against tandem serve with `batching.enabled: false`.
  c. 20 version swaps under load: versions 2..21 (copies of the demo bundle) are written one at a time
     into the repository and loaded with POST /v2/repository/models/{m}/load (admin token), version
     policy latest, while the clients keep sending; afterwards the server must answer with version 21.
  d. Soak: the load of (a) on tandem serve for --soak-seconds; the server's resident memory (its
     process and any children) is read every second; after the first 20% (warm-up) it must stay
     within 10% (max/min).

Targets: (a) throughput tandem/naive >= 4, tandem p99 <= 50 ms, zero errors; (b) throughput with
batching / without >= 2; (c) zero failed requests, 20 swaps done; (d) RSS max/min after warm-up <= 1.10,
zero errors. An error is anything wrk counts: a connect, read or write error, a timeout (10 s), or a
status >= 400.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from targets import Target, report

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMAGES = 64  # distinct requests in rotation

WRK_LUA = r"""
-- Requests are whole HTTP requests written by benchmarks/serve.py: args = {folder, count}.
local reqs, i = {}, 0
function init(args)
  for k = 1, tonumber(args[2]) do
    local f = assert(io.open(args[1] .. "/" .. (k - 1) .. ".http", "rb"))
    reqs[k] = f:read("*a")
    f:close()
  end
  i = math.random(#reqs)
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\n{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc readings

def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total * 1024 / 1e6


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


# ---------------------------------------------------------------- requests

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_for(bundle: Path) -> np.ndarray:
    """IMAGES real animal images at the bundle's size and channels, preprocessed: float32 (N, C, H, W)."""
    from tandem.bundle import read_manifest
    from tandem.data.sources import load_animals
    from tandem.runtime.preprocess import preprocess

    pre = read_manifest(bundle, verify=False)["preprocessing"]
    data = load_animals(pre["image_size"], pre["channels"], pre.get("resize", "crop"))
    pick = np.random.default_rng(0).choice(len(data.pixels), IMAGES, replace=False)
    return np.ascontiguousarray(preprocess(data.pixels[pick], pre["mean"], pre["std"]), dtype="<f4")


def binary_body(x: np.ndarray, input_name: str) -> tuple[bytes, int]:
    """An OIP binary-extension infer body for one image: (body, JSON header length)."""
    header = json.dumps({"inputs": [{"name": input_name, "shape": [1, *x.shape], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return header + x.tobytes(), len(header)


def json_body(x: np.ndarray, input_name: str) -> bytes:
    return json.dumps({"inputs": [{"name": input_name, "shape": [1, *x.shape], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def http_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def write_requests(folder: Path, port: int, model: str, x: np.ndarray, binary: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(x):
        if binary:
            body, header_len = binary_body(image, "input")
            raw = http_request(port, f"/v2/models/{model}/infer", body,
                               {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_len)})
        else:
            raw = http_request(port, f"/v2/models/{model}/infer", json_body(image, "input"),
                               {"Content-Type": "application/json"})
        (folder / f"{k}.http").write_bytes(raw)
    return folder


def post(port: int, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def infer_binary(port: int, model: str, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """One binary infer: (logits, the response's JSON header)."""
    body, header_len = binary_body(image, "input")
    status, headers, raw = post(port, f"/v2/models/{model}/infer", body,
                                {"Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(header_len)})
    if status != 200:
        raise SystemExit(f"tandem serve answered {status} to a binary infer: {raw[:300]!r}")
    headers = {k.lower(): v for k, v in headers.items()}
    n = int(headers.get("inference-header-content-length", len(raw)))
    meta = json.loads(raw[:n])
    out = meta["outputs"][0]
    if "binary_data_size" in out.get("parameters", {}):
        logits = np.frombuffer(raw[n:n + out["parameters"]["binary_data_size"]], dtype="<f4")
    else:
        logits = np.asarray(out["data"], dtype=np.float32)
    return logits.reshape(out["shape"]), meta


def infer_json(port: int, model: str, image: np.ndarray) -> np.ndarray:
    status, _, raw = post(port, f"/v2/models/{model}/infer", json_body(image, "input"),
                          {"Content-Type": "application/json"})
    if status != 200:
        raise SystemExit(f"the naive server answered {status}: {raw[:300]!r}")
    out = json.loads(raw)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


# ---------------------------------------------------------------- servers

class Server:
    """A server process on a free port, ready when GET /v2/health/ready answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict, log_file: Path) -> None:
        self.name, self.port, self.log_file = name, port, log_file
        self._log = open(log_file, "wb")  # noqa: SIM115 - the server's output, closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.start_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n"
                                 + self.log_file.read_text()[-3000:])
            try:
                if get(self.port, "/v2/health/ready", timeout=2)[0] == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.name} was not ready within {timeout:.0f} s; its log: {self.log_file}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tandem_server(work: Path, repo: Path, name: str, batching: bool = True, admin_token: str = "") -> Server:
    port = free_port()
    store = work / f"{name}-store"
    store.mkdir(exist_ok=True)
    config = {"host": "127.0.0.1", "port": port, "access_log": "off",
              "store": {"url": f"sqlite:///{store / 'tandem-serve.sqlite'}"},
              "batching": {"enabled": batching}, "models": {}}
    for model in sorted(p.name for p in repo.iterdir() if p.is_dir()):
        config["models"][model] = {"versions": "latest"}
    cfg = work / f"{name}.yaml"
    cfg.write_text(json.dumps(config, indent=1))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_TOKEN", "TANDEM_ADMIN_TOKEN")}
    if admin_token:
        env["TANDEM_ADMIN_TOKEN"] = admin_token
    argv = [sys.executable, "-m", "tandem", "serve", str(repo), "--port", str(port), "--config", str(cfg)]
    return Server(f"tandem serve ({name})", argv, port, env, work / f"{name}.log")


def naive_server(work: Path, bundle: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(HERE / "serve_naive.py"), str(bundle), "--port", str(port)]
    return Server("naive server", argv, port, dict(os.environ), work / "naive.log")


# ---------------------------------------------------------------- load

@dataclass
class Load:
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    error_kinds: dict = field(default_factory=dict)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cores: float = 0.0
    wrk_cores: float = 0.0
    other_cores: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Wrk:
    """wrk in its own process against one server; `result()` waits for it (or stops it early with SIGINT)."""

    def __init__(self, server: Server, requests: Path, clients: int, seconds: float, script: Path) -> None:
        self.server = server
        argv = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
                f"http://127.0.0.1:{server.port}", "--", str(requests), str(IMAGES)]
        self.busy0, self.server0, self.t0 = machine_busy_seconds(), tree_cpu_seconds(server.proc.pid), time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # wrk stops, prints its summary and runs done()

    def result(self) -> Load:
        out = self.proc.stdout.read().decode()
        err = self.proc.stderr.read().decode()
        _, status, usage = os.wait4(self.proc.pid, 0)  # wrk's own CPU time, all its threads
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.t0
        server_cpu, busy = tree_cpu_seconds(self.server.proc.pid) - self.server0, machine_busy_seconds() - self.busy0
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise SystemExit(f"wrk failed (exit {self.proc.returncode}): {err.strip() or out.strip()}")
        r = json.loads(lines[-1])
        kinds = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
        wrk_cpu = usage.ru_utime + usage.ru_stime
        return Load(requests=r["requests"], seconds=r["duration_us"] / 1e6, errors=sum(kinds.values()), error_kinds=kinds,
                    p50_ms=r["p50_us"] / 1e3, p90_ms=r["p90_us"] / 1e3, p99_ms=r["p99_us"] / 1e3, max_ms=r["max_us"] / 1e3,
                    server_cores=server_cpu / wall, wrk_cores=wrk_cpu / wall,
                    other_cores=max(0.0, (busy - server_cpu - wrk_cpu) / wall))


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (at most limit_s) until the machine's other work uses under `threshold` cores over a second:
    other processes on these 2 cores would take the servers' time. Returns the last reading."""
    deadline, busy = time.perf_counter() + limit_s, 0.0
    while True:
        b0 = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - b0
        if busy < threshold or time.perf_counter() > deadline:
            return busy


def measure(server: Server, requests: Path, args, script: Path, seconds: float | None = None) -> Load:
    """Warm up (not counted), wait for the machine to be quiet, then one measured run of wrk."""
    Wrk(server, requests, args.clients, args.warmup, script).result()
    wait_for_quiet(args.quiet_wait)
    return Wrk(server, requests, args.clients, seconds or args.duration, script).result()


def load_rows(scenario: str, what: str, a: Load, b: Load | None = None, ratio: bool = True) -> list[list]:
    """Rows for one or two measurements side by side."""
    def pair(f):
        if b is None:
            return [f(a), "", ""]
        return [f(a), f(b), f(a) / f(b) if ratio and f(b) else ""]

    return [
        [f"{scenario} {what}: throughput (req/s)", *pair(lambda l: l.rps)],
        ["    latency p50 (ms)", *pair(lambda l: l.p50_ms)],
        ["    latency p99 (ms)", *pair(lambda l: l.p99_ms)],
        ["    errors", *pair(lambda l: l.errors)[:2], ""],
        ["    CPU: server / wrk / others (cores)",
         *[f"{l.server_cores:.2f} / {l.wrk_cores:.2f} / {l.other_cores:.2f}" for l in ([a] if b is None else [a, b])],
         *([""] * (2 if b is None else 1))],
    ]


def server_means(port: int) -> dict[str, float]:
    """Means of the server's Prometheus histograms (family -> _sum/_count over all labels), e.g.
    tandem_batch_size, tandem_queue_seconds; empty when /metrics does not answer."""
    try:
        status, text = get(port, "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    sums: dict[str, list[float]] = {}
    for line in text.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        family = name.split("{")[0]
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            if family.endswith(suffix):
                sums.setdefault(family[:-len(suffix)], [0.0, 0.0])[slot] += float(value)
    return {family: s / n for family, (s, n) in sums.items() if n}


def batch_size(means: dict[str, float]) -> str:
    found = [v for k, v in means.items() if "batch" in k]
    return f"{found[0]:.1f}" if found else "?"


def latency_split(means: dict[str, float]) -> str:
    """Server-side mean ms of: the whole request, its queue wait, its batch's compute, the store commit."""
    parts = [means.get(f"tandem_{name}_seconds") for name in ("request", "queue", "compute", "store")]
    return " / ".join("?" if v is None else f"{v * 1e3:.1f}" for v in parts)


# ---------------------------------------------------------------- bundles

def export_small(work: Path, name: str, settings: list[str]) -> Path:
    """A 5-step run exported to a bundle: accuracy does not matter for speed."""
    tandem = [sys.executable, "-m", "tandem"]
    run, bundle = work / f"{name}-run", work / f"{name}-bundle"
    log(f"exporting a small {name} bundle ({' '.join(settings) or 'defaults'}) ...")
    for argv in ([*tandem, "train", *settings, "epochs=1", "max_steps=5", "progress=false", f"out_dir={run}"],
                 [*tandem, "export", str(run), "--out", str(bundle), "--name", name]):
        proc = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[2:4])} failed: {proc.stderr.strip()[-2000:]}")
    return bundle


def make_repo(work: Path, name: str, bundle: Path, model: str) -> Path:
    repo = work / name
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(bundle, repo / model / "1")
    return repo


def model_name(bundle: Path) -> str:
    from tandem.bundle import read_manifest

    return read_manifest(bundle, verify=False)["name"]


# ---------------------------------------------------------------- scenarios

def scenario_a(work: Path, bundle: Path, args, script: Path, rows, targets, details) -> None:
    model = model_name(bundle)
    x = images_for(bundle)
    repo = make_repo(work, "repo-a", bundle, model)
    log("a. naive server, JSON tensors ...")
    with naive_server(work, bundle) as naive:
        reference = infer_json(naive.port, model, x[0])
        req = write_requests(work / "req-a-json", naive.port, model, x, binary=False)
        naive_load = measure(naive, req, args, script)
    log(f"   {naive_load.rps:,.0f} req/s, p99 {naive_load.p99_ms:.1f} ms")
    log("a. tandem serve, binary tensors ...")
    with tandem_server(work, repo, "a") as server:
        logits, meta = infer_binary(server.port, model, x[0])
        req = write_requests(work / "req-a-bin", server.port, model, x, binary=True)
        load = measure(server, req, args, script)
        means = server_means(server.port)
        start_s = server.start_s
    log(f"   {load.rps:,.0f} req/s, p99 {load.p99_ms:.1f} ms")
    diff = float(np.abs(logits - reference).max())
    ids = meta.get("parameters", {}).get("prediction_ids", "")
    rows += load_rows("a. demo cnn 28x28,", "tandem (binary) vs naive (JSON)", load, naive_load)
    rows += [["    mean batch size (server's /metrics)", batch_size(means), "1", ""],
             ["    server's mean ms: request / queue / compute / store", latency_split(means), "", ""],
             ["    logits, max abs difference tandem vs torch", diff, "", ""],
             ["    start -> ready (s)", start_s, "", ""]]
    targets += [Target("a. throughput tandem/naive", load.rps / naive_load.rps, 4, higher_is_better=True),
                Target("a. tandem p99 latency", load.p99_ms, 50, higher_is_better=False, unit=" ms"),
                Target("a. tandem errors", float(load.errors), 0, higher_is_better=False),
                Target("a. tandem logits vs torch (max abs diff)", diff, 1e-3, higher_is_better=False)]
    details["a"] = {"tandem": vars(load), "naive": vars(naive_load), "prediction_ids_in_response": bool(ids),
                    "server_means": means}


def scenario_b(work: Path, bundle: Path, args, script: Path, rows, targets, details) -> None:
    model = model_name(bundle)
    x = images_for(bundle)
    repo = make_repo(work, "repo-b", bundle, model)
    loads, batches = {}, {}
    for batching in (True, False):
        label = "on" if batching else "off"
        log(f"b. tandem serve, resnet 64x64 RGB, batching {label} ...")
        with tandem_server(work, repo, f"b-{label}", batching=batching) as server:
            infer_binary(server.port, model, x[0])
            req = write_requests(work / f"req-b-{label}", server.port, model, x, binary=True)
            loads[label] = measure(server, req, args, script)
            batches[label] = server_means(server.port)
        log(f"   {loads[label].rps:,.0f} req/s, p99 {loads[label].p99_ms:.1f} ms")
    on, off = loads["on"], loads["off"]
    rows += load_rows("b. resnet 64x64 RGB,", "batching on vs off", on, off)
    rows += [["    mean batch size (server's /metrics)", batch_size(batches["on"]), batch_size(batches["off"]), ""],
             ["    server's mean ms: request / queue / compute / store", latency_split(batches["on"]),
              latency_split(batches["off"]), ""]]
    targets += [Target("b. throughput batching on/off", on.rps / off.rps, 2, higher_is_better=True),
                Target("b. errors (both)", float(on.errors + off.errors), 0, higher_is_better=False)]
    details["b"] = {"batching_on": vars(on), "batching_off": vars(off), "server_means": batches}


def scenario_c(work: Path, bundle: Path, args, script: Path, rows, targets, details) -> None:
    model = model_name(bundle)
    x = images_for(bundle)
    repo = make_repo(work, "repo-c", bundle, model)
    token = secrets.token_hex(16)
    swaps = args.swaps
    log(f"c. tandem serve, {swaps} version swaps under load ...")
    with tandem_server(work, repo, "c", admin_token=token) as server:
        infer_binary(server.port, model, x[0])
        req = write_requests(work / "req-c", server.port, model, x, binary=True)
        Wrk(server, req, args.clients, args.warmup, script).result()
        wait_for_quiet(args.quiet_wait)
        wrk = Wrk(server, req, args.clients, 3600, script)  # stopped once the swaps are done
        swap_ms, failed_swaps = [], []
        try:
            time.sleep(1.0)
            for version in range(2, swaps + 2):
                shutil.copytree(bundle, repo / model / str(version))
                t0 = time.perf_counter()
                status, _, body = post(server.port, f"/v2/repository/models/{model}/load", b"",
                                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                swap_ms.append((time.perf_counter() - t0) * 1e3)
                if status != 200:
                    failed_swaps.append(f"v{version}: {status} {body[:200]!r}")
                time.sleep(args.swap_gap)
            time.sleep(1.0)
        finally:
            wrk.stop()
        load = wrk.result()
        _, meta = infer_binary(server.port, model, x[0])
        final_version = str(meta.get("model_version", "?"))
    log(f"   {load.rps:,.0f} req/s during swaps, {load.errors} errors, now on version {final_version}")
    expected = str(swaps + 1)
    rows += load_rows("c. demo cnn,", f"{swaps} version swaps under load", load)
    rows += [["    swaps accepted (200)", f"{swaps - len(failed_swaps)}/{swaps}", "", ""],
             ["    swap call p50 / max (ms)", f"{statistics.median(swap_ms):.0f} / {max(swap_ms):.0f}", "", ""],
             ["    version answering afterwards", final_version, expected, ""]]
    targets += [Target("c. failed requests during swaps", float(load.errors), 0, higher_is_better=False),
                Target("c. swaps accepted and serving the last", float(swaps - len(failed_swaps)
                       if final_version == expected else 0), swaps, higher_is_better=True)]
    details["c"] = {"load": vars(load), "swap_ms": swap_ms, "failed_swaps": failed_swaps, "final_version": final_version}


def scenario_d(work: Path, bundle: Path, args, script: Path, rows, targets, details) -> None:
    model = model_name(bundle)
    x = images_for(bundle)
    repo = make_repo(work, "repo-d", bundle, model)
    log(f"d. tandem serve, soak for {args.soak_seconds:.0f} s ...")
    with tandem_server(work, repo, "d") as server:
        infer_binary(server.port, model, x[0])
        req = write_requests(work / "req-d", server.port, model, x, binary=True)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append(tree_rss_mb(server.proc.pid))

        wait_for_quiet(args.quiet_wait)
        rss_start = tree_rss_mb(server.proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Wrk(server, req, args.clients, args.soak_seconds, script).result()
        stop.set()
        sampler.join()
        means = server_means(server.port)
    after = samples[max(1, len(samples) // 5):] or samples
    lo, hi = min(after), max(after)
    log(f"   {load.rps:,.0f} req/s, RSS {lo:.0f}-{hi:.0f} MB after warm-up, {load.errors} errors")
    rows += load_rows("d. demo cnn,", f"soak {args.soak_seconds:.0f} s", load)
    rows += [["    server's mean ms: request / queue / compute / store", latency_split(means), "", ""],
             ["    RSS before load / end (MB)", f"{rss_start:.0f} / {samples[-1]:.0f}", "", ""],
             ["    RSS after warm-up min / max (MB)", f"{lo:.0f} / {hi:.0f}", "", hi / lo]]
    targets += [Target("d. RSS after warm-up max/min", hi / lo, 1.10, higher_is_better=False),
                Target("d. errors during soak", float(load.errors), 0, higher_is_better=False)]
    details["d"] = {"load": vars(load), "rss_mb": samples, "rss_start_mb": rss_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--bundle", type=Path, help="the demo's bundle (default: export a 5-step run of the default cnn)")
    parser.add_argument("--resnet-bundle", type=Path, help="a resnet bundle (default: export a 5-step resnet at 64x64 RGB)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent keep-alive connections")
    parser.add_argument("--duration", type=float, default=15, help="seconds per measured run (a, b)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before each measured run, not counted")
    parser.add_argument("--soak-seconds", type=float, default=300)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--swap-gap", type=float, default=0.5, help="seconds between two swaps")
    parser.add_argument("--scenarios", default="a,b,c,d", help="which scenarios to run, e.g. a,c")
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="before each measured run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--quick", action="store_true", help="short runs (4 s, soak 20 s): a check of the script")
    parser.add_argument("--workdir", type=Path, help="keep servers' logs, repositories and bundles here")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.soak_seconds, args.swap_gap, args.quiet_wait = 4, 1, 20, 0.2, 5
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives the servers with wrk: apt-get install wrk")
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir.resolve(), chosen)
    else:
        with tempfile.TemporaryDirectory(prefix="tandem-bench-serve-") as tmp:
            run(args, Path(tmp), chosen)


def run(args, work: Path, chosen: list[str]) -> None:
    script = work / "requests.lua"
    script.write_text(WRK_LUA)
    bundle = args.bundle.resolve() if args.bundle else None
    if bundle is None and {"a", "c", "d"} & set(chosen):
        bundle = export_small(work, "animals", [])
    rows: list[list] = []
    targets: list[Target] = []
    details: dict = {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                     "load_generator": "wrk -t1 (closed loop, keep-alive)", "bundle": str(bundle)}
    t0 = time.perf_counter()
    for name in chosen:
        if name == "b":
            resnet = args.resnet_bundle.resolve() if args.resnet_bundle else export_small(
                work, "resnet", ["model.name=resnet", "data.channels=3", "data.image_size=64"])
            details["resnet_bundle"] = str(resnet)
            scenario_b(work, resnet, args, script, rows, targets, details)
        else:
            {"a": scenario_a, "c": scenario_c, "d": scenario_d}[name](work, bundle, args, script, rows, targets, details)
    details["wall_s"] = time.perf_counter() - t0
    passed = report(f"tandem serve vs a naive FastAPI + PyTorch server, {args.clients} clients (wrk), 127.0.0.1",
                    ["measure", "tandem serve", "reference", "ratio"], rows, targets, args.json, details)
    if not args.json:
        print(f"\nreference: (a) the naive server, (b) tandem serve with batching off; {args.duration:g} s per "
              f"measured run after {args.warmup:g} s of warm-up; CPU in cores over the run (2 cores here)")
    if not passed:
        raise SystemExit(1)  # a missed target fails the run


if __name__ == "__main__":
    main()

"""How many threads a tandem process computes with, and how idle ones wait: one policy for torch and ONNX Runtime.

    policy = choose("torch", count=cfg.threads.count, wait=cfg.threads.wait)   # before torch is imported
    apply_to_torch(policy)                                                    # OMP_NUM_THREADS, OMP_WAIT_POLICY
    policy = choose("onnxruntime", count=args.threads)                        # a session's intra-op threads
    print(policy.describe())   # "2 threads (auto: 2 cores, 2 CPUs to run on, 0.0 of them busy ...), spin wait"
    watch = BusyWatch(policy); revised = watch.look()                         # while training: a new count or None

The cores a process may use are the fewest of: the CPUs it may run on (affinity: taskset, cpusets), its cgroup's
CPU quota (a container's --cpus), and, under torchrun, its share of them (LOCAL_WORLD_SIZE processes). For torch,
how busy those cores are is measured too (/proc/stat over 0.2 s, this process's own time taken off): OpenMP's
threads meet at the end of every operation, so a thread that waits for a core stalls the others, and beside other
work fewer threads that sleep while idle (OMP_WAIT_POLICY=PASSIVE) train several times faster than all cores
spinning (docs/training.md, "A busy machine"; benchmarks/busy.py); BusyWatch revises that choice every second
while a run trains. ONNX Runtime's threads never spin here, and the
runtime's throughput holds beside busy processes with one thread per core, so its choice is the budget alone.

Who wins: OMP_NUM_THREADS and OMP_WAIT_POLICY in the environment, then the config (threads.count, threads.wait; the
commands' --threads), then the automatic choice. Torch-free: the runtime and the server use it too.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping

from tandem.errors import UserError

Kind = Literal["torch", "onnxruntime"]
WAITS = ("spin", "passive")
SAMPLE_SECONDS = 0.2
MARK = "TANDEM_THREADS_SET"  # the variables apply_to_torch set (not the user's)
_applied: "ThreadPolicy | None" = None


@dataclass(frozen=True)
class CoreBudget:
    """The cores this process may use (a float: a cgroup quota may be 1.5 cores) and what limits them."""

    cores: float
    cpus: tuple[int, ...]
    limits: tuple[str, ...]

    @property
    def whole(self) -> int:
        """A thread or process per whole core, at least one (a quota of 1.5 cores gives 1)."""
        return max(1, math.floor(self.cores + 1e-9))


@dataclass(frozen=True)
class ThreadPolicy:
    kind: str
    threads: int
    wait: str            # spin: briefly spin, then sleep (OpenMP's default); passive: sleep at once
    source: str          # what chose threads: "auto", "config", or the environment variable
    cores: float         # the budget
    busy: float | None   # cores other work kept busy when chosen (None: not measured)
    reason: str

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason}), {self.wait} wait"

    def as_dict(self) -> dict:
        return asdict(self)


def core_budget(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> CoreBudget:
    """The cores this process may use: affinity, cgroup quota and torchrun's share, the least of them."""
    env = os.environ if env is None else env
    cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(range(os.cpu_count() or 1))
    cores = float(len(cpus))
    limits = [f"{len(cpus)} CPU{'s' if len(cpus) != 1 else ''} to run on"]
    quota = cgroup_quota(root)
    if quota is not None and quota < cores:
        cores = quota
        limits.append(f"cgroup CPU quota {quota:g} cores")
    local = _positive_int(env.get("LOCAL_WORLD_SIZE"))
    if local and local > 1:
        cores = cores / local
        limits.append(f"its share of {local} processes on this machine (torchrun)")
    return CoreBudget(cores, cpus, tuple(limits))


def cgroup_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota of this process's cgroup and its parents, in cores (v2 cpu.max or v1 cfs); None if unlimited."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: walk up from the process's group, the least quota wins
            base = root / "sys/fs/cgroup"
            for group in _up(path):
                parts = _read(base / group / "cpu.max").split()
                if len(parts) == 2 and parts[0] != "max":
                    quotas.append(int(parts[0]) / int(parts[1]))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in ("cpu,cpuacct", "cpu"):
                base = root / "sys/fs/cgroup" / mount
                for group in _up(path):
                    quota, period = _read(base / group / "cpu.cfs_quota_us"), _read(base / group / "cpu.cfs_period_us")
                    if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
                        quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _up(path: str) -> list[str]:
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def busy_cores(cpus: tuple[int, ...], seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of these CPUs other processes kept busy over `seconds` (this process's own time taken off);
    None where /proc/stat cannot be read."""
    before = _look(cpus)
    time.sleep(seconds)
    return _others_busy(before, _look(cpus))


def _look(cpus: tuple[int, ...]) -> tuple[float, list[tuple[int, int]] | None, float]:
    return time.monotonic(), _cpu_times(cpus), _own_seconds()


def _others_busy(before, after) -> float | None:
    """Cores kept busy between two looks, less this process's own share (its threads, spinning or not)."""
    (t0, ticks0, own0), (t1, ticks1, own1) = before, after
    if ticks0 is None or ticks1 is None or t1 <= t0:
        return None
    busy = sum(a[0] - b[0] for a, b in zip(ticks1, ticks0))
    total = sum(a[1] - b[1] for a, b in zip(ticks1, ticks0))
    if total <= 0:
        return None
    return max(0.0, busy / total * len(ticks1) - (own1 - own0) / (t1 - t0))


class BusyWatch:
    """An automatic choice revised while the process computes: every `every` seconds, how busy other work kept
    the cores since the last look; a new thread count when two looks in a row ask for the same one. The wait
    policy stays (OpenMP reads it once); with one thread it does not matter."""

    def __init__(self, policy: ThreadPolicy, every: float = 1.0, env: Mapping[str, str] | None = None) -> None:
        self.policy, self.every = policy, every
        self.budget = core_budget(env)
        self.mark = _look(self.budget.cpus)
        self.pending: int | None = None

    def look(self) -> ThreadPolicy | None:
        """The revised policy when the thread count should change now, else None (cheap between looks)."""
        if time.monotonic() - self.mark[0] < self.every:
            return None
        now = _look(self.budget.cpus)
        busy, self.mark = _others_busy(self.mark, now), now
        if busy is None:
            return None
        new = decide(self.policy.kind, self.budget, busy, "auto", self.policy.wait, env={})
        if new.threads == self.policy.threads or self.pending != new.threads:
            self.pending = None if new.threads == self.policy.threads else new.threads
            return None
        self.policy, self.pending = new, None
        return new


def _cpu_times(cpus: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """(busy ticks, all ticks) per CPU, from /proc/stat (idle and iowait are not busy; guest is in user)."""
    try:
        rows = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    out = []
    for row in rows:
        name, *fields = row.split()
        if name in wanted:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            out.append((sum(ticks) - ticks[3] - ticks[4], sum(ticks)))
    return out if len(out) == len(wanted) else None


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number > 0 else None


def decide(kind: Kind, budget: CoreBudget, busy: float | None, count: int | str = "auto", wait: str = "auto",
           env: Mapping[str, str] | None = None) -> ThreadPolicy:
    """The choice, from what was measured: pure, so each case is tested on its own."""
    env = user_environment(os.environ if env is None else env)
    whole = budget.whole
    env_threads = env.get("OMP_NUM_THREADS")
    if env_threads is not None and env_threads.strip():
        threads = _positive_int(env_threads.split(",")[0])
        if threads is None:
            raise UserError(f"OMP_NUM_THREADS={env_threads!r} is not a whole number of threads (1 or more); set it "
                            "to e.g. 1, or unset it to let tandem choose")
        source, reason = "OMP_NUM_THREADS", f"OMP_NUM_THREADS={threads}"
    elif count != "auto":
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise UserError(f"threads must be a whole number of at least 1 or 'auto' (got {count!r})")
        threads, source, reason = count, "config", "set in the config"
    elif busy is None:
        threads, source, reason = whole, "auto", f"auto: {_cores(budget.cores)}, {budget.limits[-1]}"
    else:
        free = budget.cores - busy
        threads = min(whole, max(1, math.floor(free + 0.5)))
        source = "auto"
        reason = f"auto: {_cores(budget.cores)}, {budget.limits[-1]}, {busy:.1f} of them busy with other work"
    env_wait = env.get("OMP_WAIT_POLICY", "").strip().lower()
    if env_wait:
        if env_wait not in ("active", "passive"):
            raise UserError(f"OMP_WAIT_POLICY={env_wait!r} is neither ACTIVE nor PASSIVE; set one or unset it")
        chosen_wait = "spin" if env_wait == "active" else "passive"
    elif wait != "auto":
        if wait not in WAITS:
            raise UserError(f"threads.wait must be auto, spin or passive (got {wait!r})")
        chosen_wait = wait
    elif kind == "onnxruntime":
        chosen_wait = "passive"  # its threads would take the cores from the processes decoding the next images
    else:  # spinning pays on idle cores (about 1.5x over passive here) and is ruinous on taken ones
        chosen_wait = "passive" if (busy is not None and busy >= 0.5) or threads > budget.cores + 1e-9 else "spin"
    return ThreadPolicy(kind, threads, chosen_wait, source, round(budget.cores, 3),
                        None if busy is None else round(busy, 2), reason)


def _cores(cores: float) -> str:
    return f"{cores:g} core{'s' if cores != 1 else ''}"


def choose(kind: Kind, count: int | str | None = "auto", wait: str = "auto", *, measure: bool | None = None,
           env: Mapping[str, str] | None = None) -> ThreadPolicy:
    """The policy for this process. measure: sample how busy the cores are (default: for torch, unless the
    environment or the config has fixed the count already)."""
    env = user_environment(os.environ if env is None else env)
    count = "auto" if count in (None, 0) else count
    budget = core_budget(env)
    fixed = bool(env.get("OMP_NUM_THREADS", "").strip()) or count != "auto"
    if measure is None:
        measure = kind == "torch" and not fixed
    busy = busy_cores(budget.cpus) if measure else None
    return decide(kind, budget, busy, count, wait, env)


def user_environment(env: Mapping[str, str]) -> dict[str, str]:
    """env without the thread variables tandem set itself (those named by TANDEM_THREADS_SET, where unchanged)."""
    out = dict(env)
    for item in out.pop(MARK, "").split(","):
        key, _, value = item.partition("=")
        if key and out.get(key) == value:
            del out[key]
    return out


def apply_to_torch(policy: ThreadPolicy) -> ThreadPolicy:
    """Make torch use the policy: OpenMP reads these variables when torch loads it, so call this before
    `import torch` (if torch is loaded already, the count still applies, the wait policy only from the next
    process). The variables reach the processes this one starts, as the environment does."""
    global _applied
    user = user_environment(os.environ)
    ours = {"OMP_NUM_THREADS": str(policy.threads)}
    if policy.wait == "passive":
        ours["OMP_WAIT_POLICY"] = "PASSIVE"
    elif "OMP_WAIT_POLICY" in os.environ and "OMP_WAIT_POLICY" not in user:
        os.environ.pop("OMP_WAIT_POLICY")  # spin: OpenMP's own default, a short spin before sleeping
    os.environ.update(ours)
    # What tandem set rather than the user is marked, so that a later choice (here, or in a process this one
    # starts) is not told the user set it. A variable the user set (and so won) stays theirs.
    os.environ[MARK] = ",".join(f"{k}={v}" for k, v in ours.items() if k not in user)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(policy.threads)
    _applied = policy
    return policy


def applied() -> ThreadPolicy | None:
    """The policy apply_to_torch set in this process, if any (what the training log line reports)."""
    return _applied

"""tandem.threads: the thread count and wait policy every torch and ONNX Runtime process of tandem starts with.

The choice is tested case by case from a given core budget, load and environment (decide is pure); the inputs it
reads (affinity, cgroup quotas, /proc/stat, torchrun's share) against real processes and files; and the
commands end to end: the run's log line and --json say what was chosen, and the environment wins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tandem import threads
from tandem.errors import UserError
from tandem.threads import BusyWatch, CoreBudget, busy_cores, cgroup_quota, choose, core_budget, decide

TWO = CoreBudget(2.0, (0, 1), ("2 CPUs to run on",))
EIGHT = CoreBudget(8.0, tuple(range(8)), ("8 CPUs to run on",))


def without_thread_vars() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.MARK)}


@pytest.mark.parametrize("budget, busy, want", [
    (TWO, 0.0, (2, "spin")),         # a quiet machine: every core, spinning briefly (what pays on idle cores)
    (TWO, 0.3, (2, "spin")),         # background noise is not other work
    (TWO, 1.0, (1, "passive")),      # one core taken: one thread, asleep when idle
    (TWO, 2.0, (1, "passive")),      # both taken: still one thread, never none
    (EIGHT, 3.2, (5, "passive")),    # the free cores
    (CoreBudget(1.5, (0, 1), ("cgroup CPU quota 1.5 cores",)), 0.0, (1, "spin")),  # a thread per whole core
    (TWO, None, (2, "spin")),        # not measured: the budget alone
])
def test_the_automatic_choice_follows_the_free_cores(budget, busy, want):
    policy = decide("torch", budget, busy, env={})
    assert (policy.threads, policy.wait) == want
    assert policy.source == "auto" and policy.cores == budget.cores
    assert budget.limits[-1] in policy.reason


def test_the_environment_wins_over_the_config_and_the_config_over_the_choice():
    assert decide("torch", TWO, 2.0, count=2, env={}).threads == 2  # the config: kept whatever the load
    assert decide("torch", TWO, 2.0, count=2, env={}).source == "config"
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    policy = decide("torch", TWO, 0.0, count=1, wait="passive", env=env)
    assert (policy.threads, policy.wait, policy.source) == (3, "spin", "OMP_NUM_THREADS")
    assert decide("torch", TWO, 0.0, wait="passive", env={}).wait == "passive"
    assert decide("torch", TWO, 0.0, env={"OMP_WAIT_POLICY": "passive"}).wait == "passive"
    assert decide("torch", TWO, 0.0, env={"OMP_NUM_THREADS": "4,2"}).threads == 4  # OpenMP's nested form
    # ONNX Runtime: the same count, and its threads never spin unless asked to.
    assert (decide("onnxruntime", TWO, 0.0, env={}).threads, decide("onnxruntime", TWO, 0.0, env={}).wait) == (2, "passive")
    assert decide("onnxruntime", TWO, None, count=1, env={"OMP_NUM_THREADS": "2"}).threads == 2


@pytest.mark.parametrize("env, message", [
    ({"OMP_NUM_THREADS": "many"}, r"OMP_NUM_THREADS='many' is not a whole number of threads \(1 or more\)"),
    ({"OMP_NUM_THREADS": "0"}, r"OMP_NUM_THREADS='0' is not a whole number of threads \(1 or more\)"),
    ({"OMP_WAIT_POLICY": "sometimes"}, "neither ACTIVE nor PASSIVE"),
])
def test_a_bad_environment_variable_is_one_clear_error(env, message):
    with pytest.raises(UserError, match=message):
        decide("torch", TWO, 0.0, env=env)


def test_the_variables_tandem_set_itself_are_not_taken_for_the_users(monkeypatch):
    import torch

    saved, before = dict(os.environ), torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", None)
    try:
        for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.MARK):
            os.environ.pop(key, None)
        policy = threads.apply_to_torch(decide("torch", TWO, 2.0, env={}))
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        assert torch.get_num_threads() == 1 and threads.applied() is policy  # torch is loaded here: set now
        assert choose("onnxruntime").source == "auto"  # not "OMP_NUM_THREADS": tandem set it, not the user
        os.environ["OMP_NUM_THREADS"] = "2"  # the user changes it afterwards: theirs again
        assert choose("onnxruntime").source == "OMP_NUM_THREADS"
        threads.apply_to_torch(choose("torch"))  # and applying the user's value leaves it the user's
        assert choose("onnxruntime").source == "OMP_NUM_THREADS" and torch.get_num_threads() == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(before)


def test_affinity_and_torchrun_share_the_budget():
    budget = core_budget({})
    assert budget.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert budget.cores <= len(budget.cpus)
    shared = core_budget({"LOCAL_WORLD_SIZE": "2"})
    assert shared.cores == pytest.approx(budget.cores / 2) and "torchrun" in shared.limits[-1]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_quotas_are_read_from_v2_and_v1(tmp_path):
    # v2: the least quota on the way up wins (a container's --cpus=1.5 is its group's cpu.max).
    v2 = write(tmp_path / "v2", {"proc/self/cgroup": "0::/pod/app\n", "sys/fs/cgroup/pod/app/cpu.max": "max 100000\n",
                                  "sys/fs/cgroup/pod/cpu.max": "150000 100000\n"})
    assert cgroup_quota(v2) == 1.5
    v1 = write(tmp_path / "v1", {"proc/self/cgroup": "5:memory:/x\n4:cpu,cpuacct:/job\n",
                                 "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "50000\n",
                                 "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(v1) == 0.5
    unlimited = write(tmp_path / "none", {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cgroup_quota(unlimited) is None
    assert cgroup_quota(tmp_path / "nothing-here") is None
    half = core_budget({}, root=v1)
    assert half.cores == min(0.5, len(half.cpus)) and "cgroup CPU quota 0.5 cores" in half.limits
    assert decide("torch", half, None, env={}).threads == 1


@pytest.fixture
def two_busy():
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    time.sleep(0.3)
    yield
    for proc in procs:
        proc.kill()
        proc.wait()


def test_busy_cores_sees_other_processes_and_not_this_one(two_busy):
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    assert busy_cores(cpus) >= min(2, len(cpus)) - 0.5
    if len(cpus) <= 2:
        assert choose("torch", env={}).threads == 1


def test_a_running_choice_is_revised_when_other_work_starts():
    policy = decide("torch", core_budget({}), 0.0, env={})
    watch = BusyWatch(policy, every=0.2, env={})
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(watch.budget.cpus))]
    try:
        revised = None
        deadline = time.monotonic() + 5
        while revised is None and time.monotonic() < deadline:
            time.sleep(0.05)
            revised = watch.look()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    if policy.threads == 1:
        assert revised is None  # one thread is already the least
    else:
        assert revised is not None and revised.threads < policy.threads and revised.wait == policy.wait


def train_json(tmp_path: Path, env: dict, *settings: str, prefix: tuple[str, ...] = ()) -> tuple[dict, str]:
    out = subprocess.run([*prefix, sys.executable, "-m", "tandem", "train", "max_steps=2", "batch_size=32",
                          f"out_dir={tmp_path / 'run'}", "overwrite=true", "progress=false", "--json", *settings],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["threads"], next(line for line in out.stderr.splitlines() if line.startswith("model: ") and "parameters" in line)


@pytest.mark.slow
def test_train_reports_the_policy_and_the_environment_wins(tmp_path):
    env = without_thread_vars()
    auto, line = train_json(tmp_path, env)
    assert auto["source"] == "auto" and auto["threads"] >= 1 and "changes" in auto
    assert f"{auto['threads']} thread" in line and "wait" in line
    fixed, line = train_json(tmp_path, env, "threads.count=1", "threads.wait=passive")
    assert (fixed["threads"], fixed["wait"], fixed["source"]) == (1, "passive", "config")
    assert "1 thread (set in the config), passive wait" in line
    wins, line = train_json(tmp_path, {**env, "OMP_NUM_THREADS": "1"}, "threads.count=2")
    assert (wins["threads"], wins["source"]) == (1, "OMP_NUM_THREADS") and "OMP_NUM_THREADS=1" in line


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_process_bound_to_one_cpu_trains_on_one_thread(tmp_path):
    report, line = train_json(tmp_path, without_thread_vars(), prefix=("taskset", "-c", "0"))
    assert (report["threads"], report["cores"], report["source"]) == (1, 1.0, "auto")
    assert "1 CPU to run on" in line


def test_the_runtime_takes_its_threads_from_the_same_policy(tiny_bundle, monkeypatch):
    from tandem.runtime import Predictor

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    predictor = Predictor.load(tiny_bundle, threads=2)
    assert predictor.threads.source == "OMP_NUM_THREADS"
    assert predictor.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    predictor = Predictor.load(tiny_bundle, threads=2)
    assert (predictor.threads.threads, predictor.threads.source, predictor.threads.wait) == (2, "config", "passive")
    assert predictor.session.get_session_options().intra_op_num_threads == 2
    assert predictor.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_train_called_from_python_takes_the_configs_count_and_otherwise_the_callers(small_npz, tmp_path, monkeypatch):
    import torch

    from tandem.config import TrainConfig
    from tandem.train.loop import train

    monkeypatch.setattr(threads, "_applied", None)  # no tandem command chose anything in this process
    before = torch.get_num_threads()
    base = {"data": {"source": str(small_npz)}, "model": {"width": 8}, "max_steps": 2, "batch_size": 32,
            "progress": False, "overwrite": True}
    try:
        fixed = train(TrainConfig.model_validate({**base, "out_dir": str(tmp_path / "a"), "threads": {"count": 1}}),
                      log=lambda *a, **k: None).metrics["threads"]
        assert (fixed["threads"], fixed["source"]) == (1, "config") and torch.get_num_threads() == 1
        torch.set_num_threads(before)
        caller = train(TrainConfig.model_validate({**base, "out_dir": str(tmp_path / "b")}),
                       log=lambda *a, **k: None).metrics["threads"]
        assert (caller["threads"], caller["source"]) == (before, "caller")
    finally:
        torch.set_num_threads(before)

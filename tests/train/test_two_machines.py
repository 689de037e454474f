"""Two machines for real, on one box: one `torchrun --nnodes 2` node in each of two network namespaces joined by a
veth pair, c10d rendezvous over that link, trains the same weights as the same job on one machine.

The node command line (see netns.py for why each flag is there):

    GLOO_SOCKET_IFNAME=<veth> ip netns exec <ns> python -m torch.distributed.run --nnodes 2 --nproc-per-node 1
        --rdzv-backend c10d --rdzv-endpoint <node 0 ip>:29400 --rdzv-id <id> --rdzv-conf is_host=1|0,join_timeout=120
        --local-addr <this node's ip> --max-restarts 0 -m tandem train ...
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.netns import (  # noqa: F401
    list_namespaces,
    namespace_pids,
    namespaces,
    report,
    run_ip,
    start,
    two_namespaces,
    wait_all,
)
from safetensors.torch import load_file

# Seconds each run (the one-machine reference, the two-node job) may take; then every process of it is killed.
# Output goes to files, not pipes: waiting on one node while the other fills a pipe would block it mid-collective.
TIMEOUT = 240
RDZV_PORT = 29400  # inside a fresh namespace every port is free
ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count everywhere: no summation-order differences from threads


def _train_args(npz: Path, out: Path) -> list[str]:
    return ["-m", "tandem", "train", f"data.source={npz}", "model.name=mlp", "model.width=4", "batch_size=64",
            "epochs=1", "max_steps=6", "augment.shift=0", "augment.hflip=false", "precision=fp32", "progress=false",
            "parallel.strategy=ddp", "parallel.timeout=60", f"out_dir={out}"]


def _final_weights(out: Path, jobs) -> dict:
    found = sorted((out / "checkpoints").glob("step-*/model.safetensors"))
    assert found, f"no checkpoint in {out}/checkpoints:\n{report(jobs)}"
    return load_file(str(found[-1]))  # step-NNNNNNNN: the names sort by step


def _assert_ran(jobs, ok: bool, what: str) -> None:
    assert ok, f"{what} did not finish within {TIMEOUT} s (killed):\n{report(jobs)}"
    assert all(j.proc.returncode == 0 for j in jobs), f"{what} failed:\n{report(jobs)}"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_over_a_veth_pair_train_what_one_machine_trains(namespaces, small_npz, tmp_path):  # noqa: F811
    net = namespaces
    reference_out, nodes_out = tmp_path / "one-machine", tmp_path / "two-machines"

    reference = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "--max-restarts", "0", *_train_args(small_npz, reference_out)], ENV, tmp_path / "one-machine",
                      label="one machine, 2 processes")
    _assert_ran([reference], wait_all([reference], TIMEOUT), "the one-machine run")

    run_id = f"tandem-{secrets.token_hex(4)}"
    nodes = []
    for i in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{net.ips[0]}:{RDZV_PORT}", "--rdzv-id", run_id,
               "--rdzv-conf", f"is_host={int(i == 0)},join_timeout=120", "--local-addr", net.ips[i],
               "--max-restarts", "0", *_train_args(small_npz, nodes_out)]
        nodes.append(net.popen(i, cmd, env={**ENV, "GLOO_SOCKET_IFNAME": net.ifnames[i]}, log=tmp_path / f"node{i}",
                              label=f"node {i}"))
    _assert_ran(nodes, wait_all(nodes, TIMEOUT), "the two-node job")

    one, two = _final_weights(reference_out, [reference]), _final_weights(nodes_out, nodes)
    # The gradients really crossed the veth pair: every step all-reduces them, so each end has received at least
    # half of them per step (a ring over 2 ranks), 6 steps.
    grads = sum(t.numel() * t.element_size() for t in two.values())
    received = [net.traffic(i)[0] for i in (0, 1)]
    print(f"bytes received over the veth pair: {received}, gradients per step: {grads}")
    assert min(received) >= 6 * grads // 2, f"only {received} bytes crossed the veth pair ({grads} bytes of gradients)"
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-6), \
            f"{name} differs by {(one[name] - two[name]).abs().max().item()}"


@pytest.mark.multiprocess
def test_namespaces_are_removed_when_the_test_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"), two_namespaces() as net:
        names, ifnames = net.names, net.ifnames
        assert set(names) <= set(list_namespaces())
        for i in (0, 1):  # something still running in each, as a failed job would leave it
            net.popen(i, [sys.executable, "-c", "import time; time.sleep(600)"], log=tmp_path / f"sleep{i}")
        deadline = time.monotonic() + 10
        while not all(namespace_pids(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(namespace_pids(n) for n in names)
        raise RuntimeError("the test failed")
    assert not set(names) & set(list_namespaces())
    links = run_ip("-o", "link", "show").stdout
    assert not any(i in links for i in ifnames), links
    assert all(job.proc.poll() is not None for job in net.jobs)

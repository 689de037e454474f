"""Two "machines" on one box: two network namespaces joined by a veth pair (iproute2's `ip netns`).

    from helpers.netns import two_namespaces, wait_all
    with two_namespaces() as net:                   # or the `namespaces` fixture (import it into the test module)
        a = net.popen(0, [sys.executable, ...], env={"GLOO_SOCKET_IFNAME": net.ifnames[0]}, log=tmp / "node0")
        b = net.popen(1, [...], env={...}, log=tmp / "node1")
        wait_all([a, b], timeout=240)               # kills every process of both on timeout
    # both namespaces and the veth pair are gone here, whatever happened inside

Each namespace holds only `lo` and its end of the veth pair, with an address on a /30 of 10.213.0.0/16 picked at
random per run (nothing outside the namespaces can see it, so it cannot clash with the host's networks, and a fixed
port inside a fresh namespace is always free). The names carry the pid of the test process and a random token, so
parallel runs do not clash; a namespace left behind by a test process that was SIGKILLed (its pid is gone) is
removed by the next run.

Cleanup always runs (exception, Ctrl-C, or SIGTERM, which is turned into KeyboardInterrupt while the namespaces
exist): every process still in either namespace is SIGKILLed (`ip netns pids`; torchrun starts its workers in
sessions of their own, so killing torchrun's process group is not enough), then the namespaces are deleted, which
deletes the veth pair with them. Every subprocess wait is bounded.

Skipped, with the failing command's own message, only where namespaces cannot be made: no `ip` command, not root,
or the kernel refuses (EPERM in a container, no veth support).

Pitfalls for torchrun inside `ip netns exec` (found with a two-node gloo all_reduce probe; see
test_two_machines.py for the command line that works):
  * `ip netns exec` changes the network namespace only: both "machines" keep this box's hostname, and /etc/hosts
    maps it to 127.0.0.1 (on Debian it is often 127.0.1.1), i.e. each namespace's own loopback.
  * c10d rendezvous decides whether this node hosts the rendezvous store by matching --rdzv-endpoint against the
    hostname's addresses. The veth address never matches, so no node hosts it and both wait for the connection
    timeout. Fix: `--rdzv-conf is_host=1` on node 0 (is_host=0 on node 1).
  * The node publishes socket.getfqdn() ("localhost" here) as its address, and the workers get it as MASTER_ADDR:
    node 1's worker then connects to its own loopback and init_process_group hangs until the timeout. Fix:
    `--local-addr <this node's veth IP>` on every node.
  * gloo picks its interface from the hostname too; GLOO_SOCKET_IFNAME=<the veth name> in each namespace makes it
    use the veth pair.
  * "[c10d] The hostname of the client socket cannot be retrieved. err=-3" on stderr is harmless (no reverse DNS
    for 10.213.x.y).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "tandem-netns"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-[01]$")
IP_TIMEOUT = 15  # seconds any one `ip` call may take


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class NetnsError(RuntimeError):
    pass


def list_namespaces() -> list[str]:
    """Names in `ip netns list` (its lines read `NAME` or `NAME (id: N)`)."""
    out = run_ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    proc = run_ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, a snapshot)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Job:
    """A process started in its own session, its stdout/stderr in files (no pipe can fill up and block it)."""

    proc: subprocess.Popen
    out: Path
    err: Path
    label: str

    def kill(self) -> None:
        """SIGKILL it, its process group and everything below it (torchrun's workers have sessions of their own)."""
        below = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _kill(below)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, chars: int = 3000) -> str:
        text = ""
        for path in (self.out, self.err):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        noise = ("frame #", "[W", "<omitting python frames>")  # c10d's C++ stack frames and its hostname warnings
        lines = [ln for ln in text.splitlines() if not ln.startswith(noise) or "Error" in ln]
        return "\n".join(lines)[-chars:]


def start(args: list[str], env: dict | None, log: Path, label: str | None = None) -> Job:
    """Popen `args` with os.environ + `env`, output to `log`.out / `log`.err, in a new session."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    out, err = log.with_name(log.name + ".out"), log.with_name(log.name + ".err")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                start_new_session=True)
    return Job(proc, out, err, label or log.name)


def wait_all(jobs: list[Job], timeout: float) -> bool:
    """Wait for every job within `timeout` s in all; on timeout kill them all and return False."""
    deadline = time.monotonic() + timeout
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for j in jobs:
                j.kill()
            return False
    return True


def report(jobs: list[Job], chars: int = 3000) -> str:
    """Exit codes and output tails, for an assertion message."""
    return "\n".join(f"--- {j.label}: exit {j.proc.returncode}\n{j.tail(chars)}" for j in jobs)


@dataclass
class Namespaces:
    names: tuple[str, str]
    ips: tuple[str, str]
    ifnames: tuple[str, str]
    prefix_len: int = 30
    jobs: list[Job] = field(default_factory=list)

    def popen(self, i: int, args: list[str], env: dict | None = None, log: Path | None = None,
              label: str | None = None) -> Job:
        """Start `args` in namespace `i` (`ip netns exec NS args...`); killed at the latest when the namespaces go."""
        if log is None:
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{self.names[i]}-{len(self.jobs)}"
        job = start(["ip", "netns", "exec", self.names[i], *args], env, log,
                    label=f"{label or 'process'} in {self.names[i]} ({self.ips[i]})")
        self.jobs.append(job)
        return job

    def traffic(self, i: int) -> tuple[int, int]:
        """(bytes received, bytes sent) so far on namespace `i`'s end of the veth pair."""
        stats = json.loads(run_ip("-n", self.names[i], "-s", "-j", "link", "show", "dev", self.ifnames[i]).stdout)[0]
        return stats["stats64"]["rx"]["bytes"], stats["stats64"]["tx"]["bytes"]


def _cleanup(names: list[str], ifnames: list[str], jobs: list[Job]) -> list[str]:
    """Kill everything in the namespaces, delete them; returns what could not be removed."""
    for job in jobs:
        if job.proc.poll() is None:
            job.kill()
    present = set(list_namespaces())
    for name in names:
        if name not in present:
            continue
        deadline = time.monotonic() + 10
        while (pids := namespace_pids(name)) and time.monotonic() < deadline:
            _kill(pids)
            time.sleep(0.05)
        run_ip("netns", "delete", name, check=False)
    root_links = run_ip("-o", "link", "show", check=False).stdout
    for ifname in ifnames:  # created inside the namespaces, so only an interrupted older `ip` leaves one here
        if re.search(rf"^\d+: {re.escape(ifname)}[@:]", root_links, re.MULTILINE):
            run_ip("link", "delete", ifname, check=False)
    problems = [f"namespace {n} still listed" for n in names if n in list_namespaces()]
    root_links = run_ip("-o", "link", "show", check=False).stdout
    problems += [f"link {i} still in the root namespace" for i in ifnames
                 if re.search(rf"^\d+: {re.escape(i)}[@:]", root_links, re.MULTILINE)]
    return problems


def _sweep_stale() -> None:
    """Remove namespaces of earlier test processes that died without cleaning up (their pid is gone)."""
    stale = [n for n in list_namespaces() if (m := _NAME.match(n)) and not _alive(int(m.group(1)))]
    if stale:
        _cleanup(stale, [], [])


def _check_tcp(net: Namespaces, port: int = 29399, timeout: float = 20) -> None:
    """A TCP connection from namespace 0 to a listener in namespace 1 (no `ping` on a bare Debian)."""
    listen = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); "
              f"s.bind(({net.ips[1]!r},{port})); s.listen(1); s.settimeout({timeout}); c,a=s.accept(); "
              "c.sendall(b'ok'); c.close()")
    connect = ("import socket,time\n"
               f"end=time.monotonic()+{timeout}\n"
               "while True:\n"
               f"    try: c=socket.create_connection(({net.ips[1]!r},{port}),timeout=1); break\n"
               "    except OSError:\n"
               "        if time.monotonic()>end: raise\n"
               "        time.sleep(0.05)\n"
               "c.settimeout(5); assert c.recv(2)==b'ok'; print('connected')\n")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    server = net.popen(1, [sys.executable, "-c", listen], log=tmp / f"{net.names[1]}-tcp-listen")
    client = net.popen(0, [sys.executable, "-c", connect], log=tmp / f"{net.names[0]}-tcp-connect")
    ok = wait_all([server, client], timeout + 10)
    try:
        if not ok or server.proc.returncode or client.proc.returncode:
            raise NetnsError(f"no TCP connection from {net.ips[0]} ({net.names[0]}) to {net.ips[1]}:{port} "
                             f"({net.names[1]}) over the veth pair:\n{report([server, client], 1500)}")
    finally:
        for job in (server, client):
            net.jobs.remove(job)
            for path in (job.out, job.err):
                path.unlink(missing_ok=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the namespaces exist, SIGTERM (CI cancelling the job) unwinds like Ctrl-C, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def two_namespaces() -> Iterator[Namespaces]:
    """Two namespaces joined by a veth pair, lo and the veth ends up, TCP checked; always removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be made: no `ip` command (Debian package iproute2)")
    token = secrets.token_hex(3)
    names = [f"{PREFIX}-{os.getpid()}-{token}-{i}" for i in (0, 1)]
    ifnames = [f"tv{os.getpid() % 100000}{token[:3]}{s}" for s in "ab"]  # <= 15 characters (IFNAMSIZ)
    third, base = secrets.randbelow(256), 4 * secrets.randbelow(64)
    ips = [f"10.213.{third}.{base + 1}", f"10.213.{third}.{base + 2}"]
    jobs: list[Job] = []
    with _sigterm_as_interrupt():
        _sweep_stale()
        problems: list[str] = []
        try:
            for step in (["netns", "add", names[0]], ["netns", "add", names[1]],
                         ["link", "add", ifnames[0], "netns", names[0], "type", "veth",
                          "peer", "name", ifnames[1], "netns", names[1]]):
                proc = run_ip(*step, check=False)
                if proc.returncode != 0:
                    skip_reason = (f"network namespaces cannot be made: `ip {' '.join(step)}` failed "
                                   f"({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
                    break
            else:
                skip_reason = None
            if skip_reason is not None:
                pytest.skip(skip_reason)
            for name, ifname, ip in zip(names, ifnames, ips):
                run_ip("-n", name, "addr", "add", f"{ip}/30", "dev", ifname)
                run_ip("-n", name, "link", "set", "lo", "up")
                run_ip("-n", name, "link", "set", ifname, "up")
            net = Namespaces((names[0], names[1]), (ips[0], ips[1]), (ifnames[0], ifnames[1]), 30, jobs)
            _check_tcp(net)
            yield net
        finally:
            problems = _cleanup(names, ifnames, jobs)
        if problems:
            raise NetnsError("cleanup left things behind: " + "; ".join(problems))


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    with two_namespaces() as net:
        yield net

"""Run the real server for a test: in a thread (uvicorn, same process) or as `tandem serve` in a subprocess.

    with running_server(repo, {"store": {"url": str(tmp_path / "db.sqlite")}}) as base:   # "http://127.0.0.1:PORT"
        urllib.request.urlopen(base + "/v2/health/ready")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_repo(root: Path, bundle: Path, name: str = "animals", versions: tuple[int, ...] = (1,)) -> Path:
    for version in versions:
        shutil.copytree(bundle, root / name / str(version))
    return root


@contextmanager
def running_server(repo: Path, config: dict | None = None, env: dict | None = None) -> Iterator[str]:
    """The app under uvicorn in a background thread; env: variables set while it is created (tokens)."""
    import uvicorn

    from tandem.serve.app import create_app
    from tandem.serve.config import ServeConfig

    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        app = create_app(repo, ServeConfig.model_validate({"access_log": "off", **(config or {})}), log=lambda m: None)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # uvicorn takes the bound socket: no race for a free port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start (see the captured log)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 30 s"


def request(url: str, body: bytes | dict | None = None, headers: dict | None = None,
            method: str | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """(status, headers, body) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


class ServeProcess:
    """`tandem serve` as users run it, in its own process (so a test can SIGKILL it)."""

    def __init__(self, repo: Path, config_file: Path, env: dict | None = None, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem", "serve", str(repo), "--port", str(self.port),
                                      "--config", str(config_file)], cwd=cwd, env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandem serve exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if request(self.base + "/v2/health/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("tandem serve did not become ready in 90 s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def stop(self) -> str:
        """SIGTERM, as a service manager stops it; returns what it wrote on stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err

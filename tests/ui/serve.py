"""A real `k2repro ui` server process for the UI tests: started on a free loopback port,
waited for, stopped by its pid. Shared by the API and the browser tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m k2repro ui --store S --port P [extra...]` in its own session."""

    def __init__(self, store: Path, *extra: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.host = host
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "k2repro", "ui", "--store", str(store), "--host", host, "--port", str(self.port),
             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.first_line = self.proc.stdout.readline()
        m = re.search(r"at (http://\S+)", self.first_line)
        assert m, (self.first_line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url_line = m.group(1)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read()
                time.sleep(0.1)
        raise AssertionError("the UI server did not start listening")

    def get(self, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.base + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        code, _, body = self.get(path, headers)
        return code, json.loads(body)

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.stderr.read()

"""Run `medtune serve` as a child process and wait for it: for the demo, benchmarks and tests.

    with serve_process(["--base-model", DIR, "--storage", STORAGE], log=Path("serve.log")) as server:
        OpenAI(base_url=server.url + "/v1", api_key="unused").models.list()

Picks a free loopback port unless `--port` is given, waits for the "ready" line, and on exit
sends SIGTERM (the server shuts its local Ray down) and waits for the process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError

READY = "medtune serve: ready"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT (no /v1)
    proc: subprocess.Popen
    log: Path


@contextmanager
def serve_process(args: list[str], *, log: Path, timeout: float = 300, env: dict | None = None) -> Iterator[ServerProcess]:
    args = list(args)
    if "--port" not in args:
        args += ["--port", str(free_port())]
    port = args[args.index("--port") + 1]
    exe = Path(sys.executable).parent / "medtune"
    cmd = [str(exe), "serve", *args] if exe.exists() else [sys.executable, "-m", "medtune", "serve", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None unsets
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=merged, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while READY not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise MedtuneError(f"medtune serve exited with status {proc.returncode} before it was ready; "
                                   f"last lines of {log}:\n{tail}")
            if time.monotonic() > deadline:
                raise MedtuneError(f"medtune serve not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

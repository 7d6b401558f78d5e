"""Shared by the tests that start `ensemble serve` as a real process."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cwd: Path, env: dict, port: int, *extra: str, timeout: float = 60) -> Iterator[str]:
    """`ensemble serve --port PORT` in ``cwd``, ready (healthz answers) until the block ends; its URL.
    The server's whole process group is stopped afterwards."""
    proc = subprocess.Popen([str(BIN / "ensemble"), "serve", "--port", str(port), *extra], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError(f"ensemble serve did not answer on {url} within {timeout:.0f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

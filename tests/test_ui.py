"""The MLflow UI as a user sees it: `ensemble ui` serves the store, headless Chromium loads the
experiment page, expands the parent run and shows its nested member runs. The screenshot is
saved as bench/mlflow_ui.png (a CI artifact)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ensemble_service.tracking import EnsembleTracker

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "bench" / "mlflow_ui.png"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1500,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> bytes:
    end = time.time() + timeout
    while time.time() < end:
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


class Page:
    """A minimal Chrome DevTools Protocol client (aiohttp's websocket; no browser download)."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(msg["error"])
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def wait_text(self, text: str, timeout: float = 60) -> str:
        end = time.time() + timeout
        body = ""
        while time.time() < end:
            body = await self.js("document.body ? document.body.innerText : ''") or ""
            if text in body:
                return body
            await asyncio.sleep(0.5)
        raise AssertionError(f"page never showed {text!r}; it showed: {body[:500]!r}")


@pytest.fixture
def store(tmp_path):
    """A parent run with three nested member runs, written the way `ensemble submit` writes them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = EnsembleTracker(uri, "ui-check")
    parent = t.start_parent("ensemble-ui-check", {"strategy": {"name": "independent", "members": 3}},
                            {"ensemble.strategy": "independent", "ensemble.data": "digits", "ensemble.model": "mlp"})
    for i in range(3):
        rid = t.start_member(i, f"member-{i}", {"seed": i, "architecture": "mlp"}, {})
        t.log_metrics(rid, {"test_acc": 0.9 + i / 100})
        t.end(rid)
    t.log_metrics(parent, {"ensemble_mean_test_acc": 0.95})
    t.end(parent)
    return uri, t.experiment_id


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_mlflow_ui_shows_the_parent_and_its_nested_member_runs(store, tmp_path):
    import aiohttp

    uri, experiment_id = store
    ui_port, debug_port = free_port(), free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    ui = subprocess.Popen([str(Path(sys.executable).parent / "ensemble"), "ui", "--port", str(ui_port),
                           "--tracking-uri", uri], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    browser = None
    try:
        assert wait_http(f"http://127.0.0.1:{ui_port}/health", 90).strip() == b"OK"
        browser = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--remote-debugging-port={debug_port}",
                                    f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = json.loads(wait_http(f"http://127.0.0.1:{debug_port}/json/list", 60))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

        async def drive() -> tuple[str, bytes]:
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=f"http://127.0.0.1:{ui_port}/#/experiments/{experiment_id}/runs")
                await page.wait_text("ensemble-ui-check")
                # the parent row's expander shows the nested member runs
                await page.js("""document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')
                                 .forEach(b => b.click())""")
                body = await page.wait_text("member-2")
                shot = await page.call("Page.captureScreenshot", format="png")
                return body, base64.b64decode(shot["data"])

        body, png = asyncio.run(drive())
        for name in ("ensemble-ui-check", "member-0", "member-1", "member-2"):
            assert name in body
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(png)
    finally:
        if browser is not None:
            browser.kill()
        os.killpg(ui.pid, 9)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_server_on_sigterm_and_sigint(store, sig):
    uri, _ = store
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "ensemble"), "ui", "--port", str(port),
                           "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = set()
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 90).strip() == b"OK"
        server = descendants(ui.pid)
        assert server
        ui.send_signal(sig)
        out, err = ui.communicate(timeout=30)
        assert ui.returncode == 0, err
        time.sleep(0.5)
        assert not [p for p in server if alive(p)]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        # start-up noise is gone: no Starlette deprecation warning, no MLflow security banner
        assert "Deprecat" not in err and "Security middleware" not in err, err
        assert "Registry store URI" not in out, out
    finally:
        if ui.poll() is None:
            ui.kill()
        for p in server:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass

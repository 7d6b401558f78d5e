"""`ensemble serve --ray --replicas 2` (issue 13): the same app on Ray Serve, on a private local Ray
cluster: the same routes and answers as the plain server (JSON and .npy), 4xx for bad bodies,
concurrent clients served by two replicas, and every Ray process gone after SIGTERM."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from test_api import _ensemble, _free_port, _inputs, store  # noqa: F401  (fixture)
from test_serving import close

pytestmark = pytest.mark.slow


def _session(sid: int) -> list:
    """(pid, command line) of every live process of session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, ProcessLookupError):
            continue
        if state != "Z":
            out.append((int(entry), cmd))
    return out


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_serve_on_ray_with_two_replicas(store, tmp_path):
    import httpx

    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "ensemble_service.cli", "serve", "--ray", "--replicas", "2",
                             "--port", str(port), "--tracking-uri", store["uri"], "--batch-wait-ms", "5"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200 and "serving ensembles" in log.read_text():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        replicas = [cmd for _, cmd in _session(proc.pid) if "ServeReplica" in cmd]
        assert len(replicas) == 2, _session(proc.pid)
        assert "2 Ray Serve replica(s)" in log.read_text()

        x, ens = store["x"], _ensemble(store["results"])
        with httpx.Client(base_url=base, timeout=60) as http:
            assert "alpha" in [e["name"] for e in http.get("/v1/ensembles").json()["ensembles"]]
            for method in ("mean", "vote", "weighted"):
                body = http.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(x), "method": method}).json()
                ref = ens.predict(x, method)
                assert body["labels"] == ref.labels.tolist() and body["model_version"] == "1"
                close(body["probabilities"], ref.probabilities)
                r = http.post("/v1/ensembles/alpha/predict", params={"method": method}, content=_npy(x.numpy()),
                              headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
                assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy", r.text
                close(np.load(io.BytesIO(r.content), allow_pickle=False), ref.probabilities)
            agg = http.post("/v1/aggregate", json={"predictions": [[0, 1], [1, 1]], "kind": "labels",
                                                   "num_classes": 2}).json()
            assert agg["labels"] == [0, 1]
            bad = _npy(x.numpy())[:-7]
            r = http.post("/v1/ensembles/alpha/predict", content=bad, headers={"content-type": "application/x-npy"})
            assert r.status_code == 422 and r.json()["field"] == "inputs" and "truncated" in r.json()["detail"]
            assert http.post("/v1/ensembles/nope/predict", json={"inputs": _inputs(x)}).status_code == 404

        # concurrent clients with different requests: every answer its own
        rows = [x[i:i + 1 + i % 3] for i in range(6)]
        results = {}

        def client(k):
            with httpx.Client(base_url=base, timeout=60) as h:
                for j in range(4):
                    i = (k + j) % len(rows)
                    r = h.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(rows[i])})
                    results[(k, j)] = (i, r.status_code, r.json())

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 32
        for i, status, body in results.values():
            assert status == 200, body
            ref = ens.predict(rows[i], "mean")
            assert body["labels"] == ref.labels.tolist()
            close(body["probabilities"], ref.probabilities)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        deadline = time.monotonic() + 30
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _session(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, log.read_text()[-3000:]
    assert left == [], left  # the private cluster's processes are gone
    # the user's lines and the replicas' request lines, not Ray's and Serve's own INFO chatter, nor the
    # failed-task warning serve.shutdown() made the raylet print on the way out
    text = log.read_text()
    for noise in ("Started a local Ray instance", "ServeController pid", "ProxyActor pid", "graceful_shutdown",
                  "Started Serve in namespace"):
        assert noise not in text, text[-3000:]
    # the access log stays on (--log-level info, the default), naming the route: Ray Serve's proxy
    # matches the app's route patterns (it fell back to the prefix, "POST / 200", while the app used a
    # path convertor of its own, unknown in the proxy's process)
    assert "POST /v1/ensembles/{name:path}/predict 200" in text and "GET /v1/ensembles 200" in text, text[-3000:]
    assert "POST / 200" not in text
    assert "\x1b[" not in text  # Ray's coloured line prefixes: not in a log file
    lines = text.splitlines()  # (the replicas' lines Ray forwards may come after "stopping")
    stop = lines.index("stopping: the replicas finish their requests, then the private Ray cluster stops")
    assert lines[-1] == "stopped" and stop < len(lines) - 1, text[-3000:]


def test_ray_options_need_ray():
    from typer.testing import CliRunner

    from ensemble_service.cli import app

    r = CliRunner().invoke(app, ["serve", "--replicas", "3"])
    assert r.exit_code == 2 and "go with --ray" in r.output

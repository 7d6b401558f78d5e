"""Benchmark of the prediction endpoint against a real uvicorn server on 127.0.0.1.

Registers a 5-member ensemble (the demo's MLP on digits-shaped inputs, 1x8x8 -> 10 classes;
untrained, seeded weights cost the same as trained ones) in a temporary SQLite MLflow store,
starts `ensemble serve` on a free loopback port in a subprocess, then measures, in one run:

1. endpoint_vs_inprocess at batch 1 and 64: seconds per request of POST
   /v1/ensembles/<name>/predict (method mean; one keep-alive client) over seconds per call of
   the same forward + aggregation in-process (serving.Ensemble.predict on a tensor); medians
   of >= 3 alternating runs;
2. endpoint_throughput: 32 concurrent clients (keep-alive connections on asyncio streams) each
   sending 40 batch-1 requests back to back: requests/s, errors, latency percentiles and the
   server's and client's CPU time per request; a_s is the wall time per request under that
   load, b_s the in-process call at batch 1.

Prints a table and writes bench/results_endpoint.json (or the path given as argv[1]), with the
machine's load average: other processes on the same cores move these numbers a lot.
Usage: [BENCH_THREADS=1] python bench/bench_endpoint.py [out.json]. Finishes in under 2 minutes on 2 cores.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import torch  # noqa: E402

from ensemble_service import registry, tracking  # noqa: E402
from ensemble_service.models import create_model  # noqa: E402
from ensemble_service.serving import Ensemble  # noqa: E402
from ensemble_service.artifact import member_blob  # noqa: E402

MEMBERS = 5
SHAPE, CLASSES = (1, 8, 8), 10
MODEL = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
         "depth": None, "width": None}
ROUNDS = 5                       # alternating runs per side (medians are taken)
CALLS = {1: 200, 64: 60}         # calls per run and batch size
CLIENTS, PER_CLIENT = 32, 40     # throughput: 32 clients x 40 requests
# torch intra-op threads, the same for the server (`ensemble serve --threads`) and the in-process side.
# On a 2-core machine the client and the server share the cores, and intra-op parallelism of tiny
# forwards only adds contention (OpenMP threads waiting for a busy core): 1 by default.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), -1 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return -1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(uri: str):
    blobs, info = [], []
    for i in range(MEMBERS):
        torch.manual_seed(i)
        opts = {k: v for k, v in MODEL.items() if k != "name"}
        blobs.append(member_blob(MODEL, SHAPE, CLASSES, create_model("mlp", SHAPE, CLASSES, **opts)))
        info.append({"index": i, "architecture": "mlp", "model": MODEL, "metrics": {"val_acc": 0.9 + 0.01 * i}})
    tr = tracking.EnsembleTracker(uri, "bench")
    parent = tr.start_parent("bench", {"bench": True}, {"ensemble.strategy": "independent"})
    tr.end(parent, "FINISHED")
    t0 = time.perf_counter()
    reg = registry.register_ensemble(uri, parent, "bench", blobs, info, "independent")
    return blobs, info, reg, time.perf_counter() - t0


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ensemble_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--tracking-uri", uri, "--no-access-log", "--log-level", "warning", "--threads", str(THREADS)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("server did not start within 60 s")


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def latency(client: httpx.Client, url: str, ens: Ensemble, batch: int) -> dict:
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
    body = {"inputs": x.reshape(batch, -1).tolist(), "method": "mean"}

    def endpoint():
        r = client.post(url, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

    def inprocess():
        ens.predict(x, "mean")

    # same answer both ways, then warm up
    r = client.post(url, json=body).json()
    assert r["probabilities"] == ens.predict(x, "mean").probabilities.tolist(), "endpoint != in-process"
    per_call(endpoint, 10)
    per_call(inprocess, 10)
    a, b = [], []
    for _ in range(ROUNDS):  # alternate so drift hits both sides alike
        a.append(per_call(endpoint, CALLS[batch]))
        b.append(per_call(inprocess, CALLS[batch]))
    a_s, b_s = statistics.median(a), statistics.median(b)
    return {"name": f"endpoint_vs_inprocess_batch{batch}", "a_s": a_s, "b_s": b_s, "ratio": a_s / b_s,
            "a": f"POST /v1/ensembles/<name>/predict, batch {batch}, {MEMBERS} members, loopback, keep-alive",
            "b": f"serving.Ensemble.predict in-process (same stacked forward + mean), batch {batch}",
            "runs": ROUNDS, "calls_per_run": CALLS[batch], "a_runs_s": a, "b_runs_s": b}


async def _throughput(port: int, path: str) -> dict:
    """32 clients, each its own keep-alive connection sending requests back to back.

    A minimal HTTP/1.1 client on asyncio streams (pre-encoded request, Content-Length framed
    answers): a general-purpose async client costs more CPU per request than the server does,
    and on 2 shared cores it would measure itself."""
    body = json.dumps({"inputs": torch.rand(1, 64, generator=torch.Generator().manual_seed(7)).tolist(),
                       "method": "mean"}).encode()
    request = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    lat, errors = [], 0

    async def call(reader, writer) -> bool:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        payload = await reader.readexactly(length)
        return head.startswith(b"HTTP/1.1 200") and payload.startswith(b"{")

    async def one_client(start: asyncio.Event):
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await call(reader, writer)  # warm the connection
            await start.wait()
            for _ in range(PER_CLIENT):
                t0 = time.perf_counter()
                try:
                    ok = await call(reader, writer)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += 0 if ok else 1
                if not ok:  # the connection state is unknown: open a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    start = asyncio.Event()
    tasks = [asyncio.create_task(one_client(start)) for _ in range(CLIENTS)]
    await asyncio.sleep(0.5)  # every client connected and warmed
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    n = CLIENTS * PER_CLIENT
    lat.sort()
    return {"requests": n, "errors": errors, "seconds": wall, "requests_per_s": n / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1]}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results_endpoint.json"
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        blobs, info, reg, reg_s = build(uri)
        ens = Ensemble.from_blobs(blobs, [dict(i, role="member") for i in info])
        port = free_port()
        proc = start_server(uri, port, Path(tmp) / "server.log")
        try:
            url = f"http://127.0.0.1:{port}/v1/ensembles/bench/predict"
            results = []
            with httpx.Client(timeout=60) as client:
                for batch in (1, 64):
                    results.append(latency(client, url, ens, batch))
            server_cpu0, client_cpu0 = cpu_seconds(proc.pid), time.process_time()
            tp = asyncio.run(_throughput(port, "/v1/ensembles/bench/predict"))
            tp["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(proc.pid) - server_cpu0) / tp["requests"]
            tp["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client_cpu0) / tp["requests"]
            b1 = per_call(lambda: ens.predict(torch.rand(1, *SHAPE), "mean"), 200)
            a_s = tp["seconds"] / tp["requests"]
            results.append({"name": "endpoint_throughput", "a_s": a_s, "b_s": b1, "ratio": a_s / b1,
                            "a": f"wall time per request, {CLIENTS} concurrent clients x {PER_CLIENT} batch-1 "
                                 f"requests on loopback", "b": "in-process Ensemble.predict, batch 1",
                            "clients": CLIENTS, **tp})
            results.append({"name": "registration", "seconds": reg_s, "members": MEMBERS,
                            "what": "registry.register_ensemble: save pyfunc model (explicit pip requirements), "
                                    "log artifacts, register version"})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    meta = {"torch": torch.__version__, "torch_threads": THREADS, "cpus": os.cpu_count(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]], "total_s": time.perf_counter() - t_start}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    print(f"{'benchmark':34s} {'a (s)':>11s} {'b (s)':>11s} {'a/b':>8s}  notes")
    for r in results:
        if "a_s" in r:
            note = (f"{r['requests_per_s']:.0f} req/s, {r['errors']} errors, p50 {r['p50_ms']:.1f} ms, "
                    f"p99 {r['p99_ms']:.1f} ms; CPU per request: server {r['server_cpu_ms_per_request']:.2f} ms, "
                    f"client {r['client_cpu_ms_per_request']:.2f} ms" if r["name"] == "endpoint_throughput" else
                    f"medians of {r['runs']} alternating runs x {r['calls_per_run']} calls")
            print(f"{r['name']:34s} {r['a_s']:11.6f} {r['b_s']:11.6f} {r['ratio']:8.1f}  {note}")
        else:
            print(f"{r['name']:34s} {r['seconds']:11.3f} {'':>11s} {'':>8s}  {r['members']} members")
    print(f"wrote {out} (total {meta['total_s']:.1f} s; torch threads {THREADS}; 1-min load average "
          f"{load_before:.1f} before, {meta['loadavg_1min_before_after'][1]:.1f} after)")


if __name__ == "__main__":
    main()

"""Benchmark of the prediction endpoint against real servers on 127.0.0.1 (issues 6 and 13).

Registers a 5-member ensemble (the demo's MLP on digits-shaped inputs, 1x8x8 -> 10 classes;
untrained, seeded weights cost the same as trained ones) in a temporary SQLite MLflow store,
starts `ensemble serve` three times on free loopback ports (batching on, the default; batching
off, `--no-batching`; and `--ray --replicas 2` on a private local Ray cluster), plus the floor
server (bench/floor_server.py), and measures, in one run:

1. endpoint_[npy_]vs_inprocess_batch{1,64}: seconds per request of POST
   /v1/ensembles/<name>/predict (method mean; one keep-alive connection, the request's bytes
   built once, the answer read by its Content-Length but not decoded) over seconds per call of
   the same forward + aggregation in-process (serving.Ensemble.predict on a tensor); medians of 5
   alternating runs. JSON: a JSON body and answer; npy: a .npy body (content-type
   application/x-npy) and a .npy answer (accept: application/x-npy). The client is a raw socket
   (RawClient), as the throughput clients are: http.client's own request building and header
   parsing took 0.15 ms of a 0.22 ms round trip to a bare uvicorn app here, time that is the
   client's, not the endpoint's. The same requests through http.client are reported beside it
   (a_httpclient_s, ratio_httpclient). endpoint_npy_floor_batch{1,64}: the same .npy requests, in
   the same alternating runs, against bench/floor_server.py (the same registered ensemble behind
   nothing but uvloop + httptools + the service's .npy codec, the forward run in the protocol's
   callback): what any Python server pays on this machine; the service's .npy entries carry
   floor_s and ratio_to_floor;
2. endpoint_throughput / endpoint_throughput_batched: 32 concurrent clients (keep-alive
   connections on asyncio streams) each sending 40 batch-1 JSON requests back to back, against
   the server without and with batching, alternately, 3 runs each: requests/s (median), errors,
   latency percentiles over all runs, server and client CPU per request. For _batched, b_s is the
   unbatched wall time per request of the same run, so ratio = 1 / speed-up (issue 13: <= 0.5);
   endpoint_throughput_batched_npy: the same clients with .npy bodies and answers;
3. endpoint_ray_serve: the same 32 JSON clients against `serve --ray --replicas 2`;
4. a profile of one batch-64 request (profile_json_batch64, profile_npy_batch64): the time of
   each stage measured on its own in this process (parse the body, the forward, encode the answer),
   the whole app called in-process through ASGI (routing, middleware, validation, the hop to the
   ensemble's thread), and over HTTP; the difference of the last two is uvicorn, the sockets and the
   client; plus the top functions of a cProfile of the in-process ASGI calls.

Prints a table and writes bench/results_endpoint.json (or the path given as argv[1]), with the
machine's load average: other processes on the same cores move these numbers a lot.
Usage: [BENCH_THREADS=1] [BENCH_NO_RAY=1] python bench/bench_endpoint.py [out.json].
About 2-3 minutes on 2 cores (the Ray cluster takes ~30 s to start).
"""
from __future__ import annotations

import asyncio
import cProfile
import http.client
import io
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ensemble_service import registry, tracking  # noqa: E402
from ensemble_service.models import create_model  # noqa: E402
from ensemble_service.serving import Ensemble  # noqa: E402
from ensemble_service.artifact import member_blob  # noqa: E402

MEMBERS = 5
SHAPE, CLASSES = (1, 8, 8), 10
MODEL = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
         "depth": None, "width": None}
ROUNDS = 9                       # alternating runs per side (medians are taken)
CALLS = {1: 200, 64: 60}         # calls per run and batch size
CLIENTS, PER_CLIENT = 32, 40     # throughput: 32 clients x 40 requests
TP_ROUNDS = 3                    # alternating throughput runs per server
NPY = "application/x-npy"
PATH = "/v1/ensembles/bench/predict"
# torch intra-op threads, the same for the server (`ensemble serve --threads`) and the in-process side.
# On a 2-core machine the client and the server share the cores, and intra-op parallelism of tiny
# forwards only adds contention (OpenMP threads waiting for a busy core): 1 by default.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children that ended (Linux /proc), -1 where unavailable."""
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


def start_server(uri: str, port: int, log: Path, *extra: str, timeout: float = 60) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ensemble_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--tracking-uri", uri, "--no-access-log", "--log-level", "warning", "--threads", str(THREADS), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200 and \
                    "serving ensembles" in log.read_text():
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"server did not start within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL of its whole session (a --ray server's private cluster included) if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: a light client, so the figure is the server's)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: bytes, headers: dict) -> tuple:
        self.conn.request("POST", path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())


class RawClient:
    """One keep-alive HTTP/1.1 connection on a plain socket: the request's bytes are sent as they
    are, the answer is read by its Content-Length (no header objects, no chunked decoding: the
    server answers with Content-Length)."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prepared: dict = {}

    def post(self, path: str, body: bytes, headers: dict) -> tuple:
        key = (path, id(body))
        req = self.prepared.get(key)
        if req is None:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            req = self.prepared[key] = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\n{head}"
                                        f"content-length: {len(body)}\r\n\r\n").encode() + body
        self.sock.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, content = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict((k.strip().lower().decode(), v.strip().decode())
                      for k, _, v in (line.partition(b":") for line in lines[1:]))
        length = int(fields.get("content-length", 0))
        while len(content) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            content += chunk
        return int(lines[0].split()[1]), content, fields


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def request(x: torch.Tensor, fmt: str) -> tuple:
    """(path, body, headers) of a predict request for x in the format fmt (json | npy)."""
    if fmt == "json":
        body = json.dumps({"inputs": x.reshape(len(x), -1).tolist(), "method": "mean"}).encode()
        return PATH, body, {"content-type": "application/json"}
    return PATH + "?method=mean", npy_bytes(x.numpy()), {"content-type": NPY, "accept": NPY}


def start_floor(uri: str, port: int, log: Path, timeout: float = 60) -> subprocess.Popen:
    """bench/floor_server.py on ``port``: the same ensemble behind nothing but uvloop + httptools."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "floor_server.py"), uri, "bench",
                             str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "BENCH_THREADS": str(THREADS)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"floor server exited: {log.read_text()[-2000:]}")
        if "ready" in log.read_text():
            return proc
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"floor server did not start within {timeout:.0f} s")


def latency(client: "RawClient", ens: Ensemble, batch: int, fmt: str, slow_client: Client,
            floor: "RawClient" = None) -> list:
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
    path, body, headers = request(x, fmt)

    def endpoint(via=client):
        status, content, _ = via.post(path, body, headers)
        if status != 200:
            raise RuntimeError(f"{status}: {content[:200]}")

    def inprocess():
        ens.predict(x, "mean")

    # the same answer both ways, then warm up
    status, content, _ = client.post(path, body, headers)
    expected = ens.predict(x, "mean").probabilities
    if fmt == "json":
        assert json.loads(content)["probabilities"] == expected.tolist(), "endpoint != in-process"
    else:
        assert np.array_equal(np.load(io.BytesIO(content), allow_pickle=False), expected.numpy()), "npy != in-process"
    slow = lambda: endpoint(slow_client)  # noqa: E731
    sides = [endpoint, inprocess, slow]
    if floor is not None:
        status, content, _ = floor.post(path, body, headers)
        assert status == 200 and np.array_equal(np.load(io.BytesIO(content), allow_pickle=False),
                                                expected.numpy()), "floor != in-process"
        sides.append(lambda: endpoint(floor))
    for fn in sides:
        per_call(fn, 10)
    runs = [[] for _ in sides]
    for _ in range(ROUNDS):  # alternate so drift hits every side alike
        for fn, times in zip(sides, runs):
            times.append(per_call(fn, CALLS[batch]))
    a, b, c = runs[:3]
    a_s, b_s, c_s = statistics.median(a), statistics.median(b), statistics.median(c)
    what = ("JSON body and answer" if fmt == "json" else
            ".npy body (content-type application/x-npy) and .npy answer (accept)")
    out = [{"name": f"endpoint_{'' if fmt == 'json' else 'npy_'}vs_inprocess_batch{batch}", "a_s": a_s, "b_s": b_s,
            "ratio": a_s / b_s, "format": fmt, "request_bytes": len(body),
            "a": f"POST /v1/ensembles/<name>/predict, batch {batch}, {MEMBERS} members, {what}, loopback, keep-alive",
            "b": f"serving.Ensemble.predict in-process (same stacked forward + mean), batch {batch}",
            "runs": ROUNDS, "calls_per_run": CALLS[batch], "a_runs_s": a, "b_runs_s": b,
            "client": "raw socket (RawClient)", "a_httpclient_s": c_s, "ratio_httpclient": c_s / b_s}]
    if floor is not None:
        f_s = statistics.median(runs[3])
        out[0].update(floor_s=f_s, ratio_to_floor=a_s / f_s)
        out.append({"name": f"endpoint_npy_floor_batch{batch}", "a_s": f_s, "b_s": b_s, "ratio": f_s / b_s,
                    "format": fmt, "a": f"bench/floor_server.py (uvloop + httptools + the forward, nothing else), "
                                        f"batch {batch}, the same .npy request, raw socket",
                    "b": "the same in-process forward", "runs": ROUNDS, "calls_per_run": CALLS[batch],
                    "a_runs_s": runs[3], "b_runs_s": b, "service_s": a_s, "service_over_floor": a_s / f_s})
    return out


async def _throughput(port: int, fmt: str) -> dict:
    """32 clients, each its own keep-alive connection sending batch-1 requests back to back.

    A minimal HTTP/1.1 client on asyncio streams (pre-encoded request, Content-Length framed
    answers): a general-purpose async client costs more CPU per request than the server does,
    and on 2 shared cores it would measure itself."""
    path, body, headers = request(torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(7)), fmt)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{head}content-length: {len(body)}\r\n\r\n").encode() + body
    lat, errors = [], 0
    ok_start = b"{" if fmt == "json" else b"\x93NUMPY"

    async def call(reader, writer) -> bool:
        writer.write(req)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        payload = await reader.readexactly(length)
        return head.startswith(b"HTTP/1.1 200") and payload.startswith(ok_start)

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
    return {"seconds": wall, "latencies": lat, "errors": errors}


def throughput(servers: dict, fmt: str = "json", rounds: int = TP_ROUNDS) -> dict:
    """Alternating runs against each server in ``servers`` (label -> (proc, port)); per label the
    median wall time per request, requests/s, errors and latency percentiles over all runs."""
    runs = {label: [] for label in servers}
    cpu = {label: [0.0, 0.0] for label in servers}
    for _ in range(rounds):
        for label, (proc, port) in servers.items():
            s0, c0 = cpu_seconds(proc.pid), time.process_time()
            runs[label].append(asyncio.run(_throughput(port, fmt)))
            cpu[label][0] += cpu_seconds(proc.pid) - s0
            cpu[label][1] += time.process_time() - c0
    out = {}
    n = CLIENTS * PER_CLIENT
    for label, rs in runs.items():
        lat = sorted(v for r in rs for v in r["latencies"])
        per_request = statistics.median(r["seconds"] / n for r in rs)
        out[label] = {"a_s": per_request, "requests_per_s": 1.0 / per_request, "requests": n * len(rs),
                      "errors": sum(r["errors"] for r in rs), "runs": len(rs),
                      "requests_per_s_runs": [n / r["seconds"] for r in rs],
                      "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1],
                      "server_cpu_ms_per_request": 1000 * cpu[label][0] / (n * len(rs)),
                      "client_cpu_ms_per_request": 1000 * cpu[label][1] / (n * len(rs))}
    return out


# --------------------------------------------------------------------------- profile of one request


async def _asgi_post(app, path: str, body: bytes, headers: dict) -> bytes:
    target, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": target, "raw_path": target.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in {**headers, "content-length": str(len(body))}.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    sent = False
    chunks = []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return b"".join(chunks)


def profile(uri: str, ens: Ensemble, http_s: dict) -> list:
    """Stage times of one batch-64 request (JSON and npy), each measured on its own in-process."""
    from ensemble_service.api import Settings, create_app
    from ensemble_service.api import codec

    app = create_app(uri, Settings())
    le = app.state.store.get("bench")
    x = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(64))
    out = []
    for fmt in ("json", "npy"):
        path, body, headers = request(x, fmt)
        if fmt == "json":
            def parse():
                return codec.json_array(codec.load_json(body)["inputs"], "inputs")
        else:
            def parse():
                return codec.read_npy(body, "inputs", 1024)
        arr = parse()
        pred = le.ensemble.predict(arr, "mean")
        labels = pred.labels.tolist()

        def encode():
            if fmt == "json":
                return codec.json_answer({"name": "bench", "model_version": "1", "method": "mean", "labels": labels,
                                          "probabilities": codec.as_float64(pred.probabilities),
                                          "agreement": codec.as_float64(pred.agreement)}).body
            return codec.npy_answer(pred.probabilities, labels, {"x-model-version": "1", "x-method": "mean"}).body

        async def asgi(n):
            for _ in range(n):
                await _asgi_post(app, path, body, headers)

        def forward():
            le.ensemble.predict(arr, "mean")

        asyncio.run(asgi(20))  # warm
        stages = {}
        for _ in range(3):
            for name, fn in (("parse", parse), ("forward", forward), ("encode", encode)):
                stages.setdefault(name, []).append(per_call(fn, 100))
            t0 = time.perf_counter()
            asyncio.run(asgi(100))
            stages.setdefault("asgi", []).append((time.perf_counter() - t0) / 100)
        s = {k: statistics.median(v) for k, v in stages.items()}
        http_total = http_s[fmt]
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(asgi(200))
        prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(12)
        top = [line for line in stream.getvalue().splitlines() if line.strip() and line.strip()[0].isdigit()][:12]
        out.append({"name": f"profile_{fmt}_batch64", "a_s": http_total, "b_s": s["forward"],
                    "ratio": http_total / s["forward"], "a": f"one batch-64 {fmt} request over HTTP",
                    "b": "its forward alone (Ensemble.predict on the parsed array)",
                    "http_s": http_total, "asgi_s": s["asgi"], "parse_s": s["parse"],
                    "forward_s": s["forward"], "encode_s": s["encode"],
                    "framework_s": s["asgi"] - s["parse"] - s["forward"] - s["encode"],
                    "transport_s": http_total - s["asgi"],
                    "what": "one batch-64 request: parse the body, the forward (Ensemble.predict), encode the "
                            "answer, each alone; asgi = the whole app in-process (framework = asgi - the three); "
                            "transport = HTTP - asgi (uvicorn, loopback sockets, the client)",
                    "cprofile_top_tottime": top})
    return out


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results_endpoint.json"
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    torch.set_num_threads(THREADS)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        blobs, info, reg, reg_s = build(uri)
        ens = Ensemble.from_blobs(blobs, [dict(i, role="member") for i in info])
        servers = {}
        try:
            port = free_port()
            servers["batched"] = (start_server(uri, port, Path(tmp) / "batched.log"), port)
            port = free_port()
            servers["unbatched"] = (start_server(uri, port, Path(tmp) / "unbatched.log", "--no-batching"), port)
            port = free_port()
            servers["floor"] = (start_floor(uri, port, Path(tmp) / "floor.log"), port)
            client, slow_client = RawClient(servers["batched"][1]), Client(servers["batched"][1])
            floor = RawClient(servers["floor"][1])
            for fmt in ("json", "npy"):
                for batch in (1, 64):
                    results.extend(latency(client, ens, batch, fmt, slow_client, floor if fmt == "npy" else None))
            stop_server(servers.pop("floor")[0])
            tp = throughput({"unbatched": servers["unbatched"], "batched": servers["batched"]})
            b1 = per_call(lambda: ens.predict(torch.rand(1, *SHAPE), "mean"), 200)
            un, ba = tp["unbatched"], tp["batched"]
            what = f"{CLIENTS} concurrent clients x {PER_CLIENT} batch-1 requests on loopback"
            results.append({"name": "endpoint_throughput", **un, "b_s": b1, "ratio": un["a_s"] / b1, "clients": CLIENTS,
                            "a": f"wall time per request, {what}, JSON, batching off (--no-batching)",
                            "b": "in-process Ensemble.predict, batch 1"})
            results.append({"name": "endpoint_throughput_batched", **ba, "b_s": un["a_s"], "ratio": ba["a_s"] / un["a_s"],
                            "speedup": un["a_s"] / ba["a_s"], "clients": CLIENTS,
                            "a": f"wall time per request, {what}, JSON, batching on (the default)",
                            "b": "the same without batching (endpoint_throughput), same run"})
            npy_tp = throughput({"batched": servers["batched"]}, "npy")["batched"]
            results.append({"name": "endpoint_throughput_batched_npy", **npy_tp, "b_s": un["a_s"],
                            "ratio": npy_tp["a_s"] / un["a_s"], "clients": CLIENTS,
                            "a": f"wall time per request, {what}, .npy bodies and answers, batching on",
                            "b": "JSON without batching (endpoint_throughput), same run"})
            for label in ("unbatched",):
                stop_server(servers.pop(label)[0])
            http_s = {r["format"]: r["a_s"] for r in results if r["name"].endswith("inprocess_batch64")}
            results.extend(profile(uri, ens, http_s))
            if not os.environ.get("BENCH_NO_RAY"):
                stop_server(servers.pop("batched")[0])  # the cores to Ray alone
                port = free_port()
                servers["ray"] = (start_server(uri, port, Path(tmp) / "ray.log", "--ray", "--replicas", "2",
                                               timeout=300), port)
                rs = throughput({"ray": servers["ray"]}, "json", rounds=1)["ray"]
                results.append({"name": "endpoint_ray_serve", **rs, "b_s": ba["a_s"], "ratio": rs["a_s"] / ba["a_s"],
                                "clients": CLIENTS, "replicas": 2,
                                "a": f"wall time per request, {what}, JSON, ensemble serve --ray --replicas 2 "
                                     f"(private local Ray cluster, serve.batch)",
                                "b": "the plain server with batching (endpoint_throughput_batched), same run",
                                "note": "server CPU counts the serve CLI process only, not the Ray actors"})
            results.append({"name": "registration", "seconds": reg_s, "members": MEMBERS,
                            "what": "registry.register_ensemble: save pyfunc model (explicit pip requirements), "
                                    "log artifacts, register version"})
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    meta = {"torch": torch.__version__, "torch_threads": THREADS, "cpus": os.cpu_count(),
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "total_s": time.perf_counter() - t_start}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    print(f"{'benchmark':36s} {'a (s)':>11s} {'b (s)':>11s} {'a/b':>8s}  notes")
    for r in results:
        if r["name"].startswith("profile_"):
            ms = {k: 1000 * r[k] for k in ("http_s", "asgi_s", "parse_s", "forward_s", "encode_s", "framework_s",
                                            "transport_s")}
            print(f"{r['name']:36s} HTTP {ms['http_s']:.3f} ms = transport {ms['transport_s']:.3f} + app "
                  f"{ms['asgi_s']:.3f} (parse {ms['parse_s']:.3f}, forward {ms['forward_s']:.3f}, encode "
                  f"{ms['encode_s']:.3f}, framework {ms['framework_s']:.3f})")
        elif "a_s" in r:
            if "requests_per_s" in r:
                note = (f"{r['requests_per_s']:.0f} req/s, {r['errors']} errors, p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms; CPU per request: server {r['server_cpu_ms_per_request']:.2f} ms, "
                        f"client {r['client_cpu_ms_per_request']:.2f} ms")
            elif "service_over_floor" in r:
                note = (f"same runs; the service ({1000 * r['service_s']:.3f} ms) is {r['service_over_floor']:.2f}x "
                        f"this floor")
            else:
                note = (f"medians of {r['runs']} alternating runs x {r['calls_per_run']} calls; through "
                        f"http.client {1000 * r['a_httpclient_s']:.3f} ms, ratio {r['ratio_httpclient']:.2f}")
            print(f"{r['name']:36s} {r['a_s']:11.6f} {r['b_s']:11.6f} {r['ratio']:8.2f}  {note}")
        else:
            print(f"{r['name']:36s} {r['seconds']:11.3f} {'':>11s} {'':>8s}  {r['members']} members")
    for r in results:
        if r["name"].startswith("profile_"):
            print(f"\n{r['name']}: cProfile of the in-process ASGI calls, top functions by own time")
            print("\n".join("  " + line for line in r["cprofile_top_tottime"]))
    print(f"wrote {out} (total {meta['total_s']:.1f} s; torch threads {THREADS}; load average "
          f"{' '.join(f'{v:.1f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.1f}' for v in meta['loadavg_after'])} after)")


if __name__ == "__main__":
    main()

"""What `ensemble submit` checks before Ray starts (preflight.py): the tracking store, the
cluster address and the embedded cluster's resources. Each problem is one line, found in
seconds (MLflow and Ray would retry for minutes), and nothing is created or started."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble_service import scheduler, tracking
from ensemble_service.cli import app

runner = CliRunner()
BIN = Path(sys.executable).parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def http_server():
    """A plain HTTP server (not MLflow, not Ray) answering 404 to everything."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


# -------------------------------------------------------------------- tracking store


def test_sqlite_store_that_can_be_created_passes_and_nothing_is_created(tmp_path):
    target = tmp_path / "new" / "deeper" / "mlflow.db"
    assert tracking.check_store(f"sqlite:///{target}", create=True) == ""
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:////proc/nope/x.db", "cannot create /proc/nope/x.db"),
    ("bogus://x", "unsupported tracking URI 'bogus://x'"),
])
def test_unusable_stores_are_named_in_one_line(uri, expected):
    t0 = time.perf_counter()
    problem = tracking.check_store(uri, create=True)
    assert expected in problem, problem
    assert "\n" not in problem and time.perf_counter() - t0 < 5


def test_sqlite_file_that_is_no_database(tmp_path):
    (tmp_path / "x.db").write_text("not a database")
    assert tracking.check_store(f"sqlite:///{tmp_path}/x.db", create=True) == f"{tmp_path}/x.db is not a SQLite database"


def test_sqlite_store_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert tracking.check_store(f"sqlite:///{tmp_path}/f/x.db", create=True) == f"tracking store: {tmp_path}/f is not a directory"


def test_reading_a_missing_store_is_an_error_not_a_new_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/nothing/here.db"
    problem = tracking.check_store(uri, create=False)
    assert problem.startswith(f"no MLflow tracking store at {tmp_path}/nothing/here.db")
    with pytest.raises(tracking.StoreNotFound):
        tracking.recent_parent_runs(uri)
    assert not (tmp_path / "nothing").exists()


def test_unreachable_tracking_server_fails_fast():
    port = closed_port()
    t0 = time.perf_counter()
    problem = tracking.check_store(f"http://127.0.0.1:{port}", create=True, timeout=3)
    assert problem.startswith(f"cannot reach the tracking server at http://127.0.0.1:{port}")
    assert "refused" in problem.lower() and time.perf_counter() - t0 < 3


def test_tracking_server_that_answers_passes(http_server):
    assert tracking.check_store(f"http://127.0.0.1:{http_server}", create=True) == ""  # a 404 still answers


def test_sql_store_needs_its_driver_and_its_server():
    port = closed_port()
    problem = tracking.check_store(f"postgresql://u:p@127.0.0.1:{port}/db", create=True, timeout=3)
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)
    except ImportError:
        assert "its database driver is not installed" in problem and "psycopg" in problem, problem
    else:
        assert problem.startswith(f"cannot reach the tracking database at 127.0.0.1:{port}"), problem


# -------------------------------------------------------------------- cluster address


def test_cluster_address_that_refuses():
    port = closed_port()
    t0 = time.perf_counter()
    problem = scheduler.check_address(f"127.0.0.1:{port}", timeout=3)
    assert problem.startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port}") and "refused" in problem.lower()
    assert time.perf_counter() - t0 < 3


def test_cluster_address_that_is_not_ray(http_server):
    problem = scheduler.check_address(f"127.0.0.1:{http_server}", timeout=3)
    assert problem == (f"127.0.0.1:{http_server} answers, but not as a Ray cluster: give its GCS address "
                       "(HOST:6379 by default), or http://HOST:8265 to submit through its Jobs API")


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:port"])
def test_cluster_address_that_is_malformed(address):
    assert "is not HOST:PORT, auto, ray://HOST:PORT" in scheduler.check_address(address)


@pytest.mark.slow
def test_cluster_address_of_a_running_cluster_passes(ray_cluster):
    import ray

    assert scheduler.check_address(ray.get_runtime_context().gcs_address, timeout=5) == ""


# -------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "sqlite:////proc/nope/x.db", "bogus://x",
                                 "postgresql://u:p@127.0.0.1:{port}/db"])
def test_submit_with_an_unusable_store_exits_2_before_anything_starts(uri, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    ray_was_up = ray.is_initialized()
    t0 = time.perf_counter()
    result = runner.invoke(app, ["submit", "data=synthetic", f"tracking.uri={uri.format(port=closed_port())}",
                                 f"cluster.storage={tmp_path}/ckpt"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert time.perf_counter() - t0 < 20
    assert ray.is_initialized() == ray_was_up
    assert list(tmp_path.iterdir()) == []


def ray_env(tmp: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("overrides, expected", [
    (["cluster.address=127.0.0.1:{port}"], "error: cannot reach the Ray cluster at 127.0.0.1:{port}"),
    # what the embedded cluster would have is known before it starts, and before data is generated
    (["cluster.gpus_per_member=0.25", "data=mnist1d", "model=cnn1d"],
     "error: no Ray node can run a member with cluster.cpus_per_member=1 and cluster.gpus_per_member=0.25 "
     "(nodes: {cpus} CPUs/0 GPUs)"),
])
def test_submit_problems_found_before_ray_starts_or_data_is_made(overrides, expected, tmp_path):
    port = closed_port()
    ray_tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # Ray's sockets need a short path
    env = dict(ray_env(ray_tmp), CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "ensemble"), "submit", *[o.format(port=port) for o in overrides],
                           f"tracking.uri=sqlite:///{tmp_path}/m.db",
                           *([f"data.root={tmp_path}/data"] if "data=mnist1d" in overrides else []),
                           f"cluster.storage={tmp_path}/ckpt"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    cpus = scheduler.embedded_resources(scheduler_cluster())["CPU"]
    assert proc.stderr.startswith(expected.format(port=port, cpus=f"{cpus:g}")), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout.strip() == ""
    assert time.perf_counter() - t0 < 60
    assert list(Path(ray_tmp).iterdir()) == []       # no Ray session was started
    assert list(tmp_path.iterdir()) == []            # no store, no checkpoints, no generated data set


def scheduler_cluster():
    from ensemble_service.config import ClusterConfig

    return ClusterConfig()

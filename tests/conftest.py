"""Shared fixtures: environment for offline runs, one local Ray cluster per session."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)  # the tests start their own clusters; never join one from the environment

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the whole test session (starting one costs ~7 s).

    It declares one logical GPU, so GPU scheduling (fractional gpus_per_member) is tested on
    this CPU-only machine: Ray assigns the GPU id, the worker finds no CUDA and trains on CPU.
    It is private (never a cluster `ray start` left on the machine), and shutting it down stops
    every process it started, the raylet's agents included."""
    import ray

    from ensemble_service import scheduler
    from ensemble_service.config import ClusterConfig

    resources = scheduler.connect(ClusterConfig(num_cpus=2, num_gpus=1))
    yield resources
    scheduler.shutdown()


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on loopback for the whole session."""
    from s3server import S3Server, executable

    if executable() is None:
        pytest.skip("moto_server is not installed: pip install -e '.[test]' installs it")
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """This test's own bucket on the session's S3 server, with the environment pointing at it."""
    import re

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    from s3server import Bucket

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-") + "-b"
    s3_server.create_bucket(name)
    return Bucket(s3_server, name)


@pytest.fixture(scope="module")
def ray_here():
    """A Ray cluster for streaming tests: the session's one if this process is already connected (a
    test that ran `ensemble submit` in-process may have stopped it), else a private one stopped
    afterwards. Ray Data must never start one on its own."""
    from ensemble_service import scheduler
    from ensemble_service.config import ClusterConfig

    started = not scheduler.is_connected()
    scheduler.connect(ClusterConfig(num_cpus=2, num_gpus=0))
    yield
    if started:
        scheduler.shutdown()

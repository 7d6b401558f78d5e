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

"""Environment defaults for every process that starts Ray or MLflow (light: imports nothing heavy)."""
from __future__ import annotations

import os


def service_env_defaults() -> None:
    """Set where the service starts Ray or MLflow (these machines have no internet): no usage
    stats or telemetry, and RAY_AUTH_MODE explicitly: token when a token is given, else disabled."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ.setdefault("RAY_AUTH_MODE", "token" if has_token else "disabled")

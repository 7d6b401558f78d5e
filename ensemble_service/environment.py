"""Environment defaults for every process that starts Ray or MLflow (light: imports nothing heavy)."""
from __future__ import annotations

import os
import sys


def service_env_defaults() -> None:
    """Set where the service starts Ray or MLflow (these machines have no internet): no usage
    stats or telemetry, RAY_AUTH_MODE explicitly (token when a token is given, else disabled), and
    no colour codes in the worker lines Ray forwards when stderr is not a terminal."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ.setdefault("RAY_AUTH_MODE", "token" if has_token else "disabled")
    try:
        to_terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        to_terminal = False
    if not to_terminal:  # the workers' lines Ray forwards: no colour codes in a log file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")

"""`ensemble serve --ray`: the same HTTP app on Ray Serve, in N replicas.

Each replica is a Ray actor that builds the app with :func:`ensemble_service.api.app.create_app`
(the same routes, limits, API keys and answers as ``ensemble serve``) and loads the registered
ensembles itself; Ray Serve's HTTP proxy spreads requests over the replicas. Concurrent predict
requests reaching one replica are stacked with ``serve.batch`` (up to ``max_batch_items`` rows,
waiting up to ``batch_wait_ms`` for a batch to fill) and run through the same
``batching.run_jobs`` as the plain server, on the replica's own forward thread.

:func:`run` starts a private Ray cluster (``address`` ``local``, the default; its logical CPUs are
at least the replicas' CPUs) or joins one (``auto``, ``HOST:6379``, ``ray://HOST:10001``), deploys
``replicas`` replicas with ``num_cpus``/``num_gpus`` each, and blocks until SIGINT or SIGTERM;
then it deletes the application, and a private cluster is stopped with every process it started.
On a joined cluster, Serve's HTTP proxy listens on the cluster's nodes at ``host:port``.

Ray is imported here, in ``scheduler`` and in ``jobs`` only (tests/test_imports.py).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

from ray import serve

from ensemble_service.api.batching import Job, run_jobs
from ensemble_service.api.store import Settings
from ensemble_service.serving import Ensemble

__all__ = ["APP_NAME", "ServeBatcher", "EnsembleDeployment", "run"]

APP_NAME = "ensembles"
MAX_ONGOING_REQUESTS = 256  # per replica: enough in flight for serve.batch to fill batches


class ServeBatcher:
    """One ensemble's forwards in a replica: requests batched by ``serve.batch`` (rows counted with
    ``batch_size_fn``), run by :func:`~ensemble_service.api.batching.run_jobs` on one thread."""

    def __init__(self, ensemble: Ensemble, name: str, settings: Settings):
        self.ensemble = ensemble
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ensemble-{name}")
        stack = settings.batching and ensemble.batchable
        options: Dict[str, Any] = (
            {"max_batch_size": max(1, settings.max_batch_items), "batch_wait_timeout_s": settings.batch_wait_ms / 1000.0,
             "batch_size_fn": lambda jobs: sum(j.rows for j in jobs)} if stack else
            {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})

        @serve.batch(**options)
        async def handle(jobs):
            return await asyncio.get_running_loop().run_in_executor(self.executor, run_jobs, self.ensemble, list(jobs))

        self._handle = handle
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def run(self, inputs: Any, options: Dict[str, Any]) -> Any:
        self._loop = asyncio.get_running_loop()
        outcome = await self._handle(Job(inputs, dict(options)))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit(self, inputs: Any, options: Dict[str, Any]) -> Future:
        """From another thread: the Prediction as a concurrent Future (runs on the replica's loop)."""
        if self._loop is None:
            raise RuntimeError("ServeBatcher.submit before any request: use run() on the replica's event loop")
        return asyncio.run_coroutine_threadsafe(self.run(inputs, options), self._loop)


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress()
class EnsembleDeployment:
    """A replica: the app of ``create_app(tracking_uri, settings)``, with serve.batch batching."""

    def __init__(self, tracking_uri: str, settings: Settings, threads: int = 0):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.tracking_uri, self.settings = tracking_uri, settings

    def __serve_build_asgi_app__(self):
        from ensemble_service.api.app import create_app

        return create_app(self.tracking_uri, self.settings, batcher_factory=ServeBatcher)


def run(tracking_uri: str, settings: Settings, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
        address: Optional[str] = None, num_cpus: float = 1.0, num_gpus: float = 0.0, threads: int = 0,
        log_level: str = "info", access_log: bool = True, ready: Optional[Callable[[Dict[str, Any]], None]] = None,
        stop: Optional[threading.Event] = None, stopping: Optional[Callable[[], None]] = None) -> None:
    """Deploy the app on Ray Serve and serve until SIGINT/SIGTERM (or ``stop`` is set).

    ``log_level`` and ``access_log`` go to Serve's logging config (its replicas log every request
    unless ``access_log`` is False). ``ready`` is called once every replica answers, with
    ``{"address", "replicas", "cluster"}``; ``stopping`` once a signal (or ``stop``) ends the serving."""
    from ensemble_service import scheduler

    address = None if address in (None, "", "local") else address
    need = max(1.0, replicas * num_cpus)
    cluster = SimpleNamespace(address=address, num_cpus=None if address else int(max(os.cpu_count() or 1, need + 0.999)),
                              num_gpus=None)
    stop = stop or threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    # Ray's and Serve's own INFO lines (cluster start, controller, proxy, deployment steps) are not
    # the user's: warnings only; the replicas log at ``log_level``, with an access line per request
    # unless ``access_log`` is False, as the plain server does
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        scheduler.connect(cluster)
        for s in previous:  # after ray.init, which installs its own SIGTERM handler
            signal.signal(s, lambda *_: stop.set())
        app_logging = {"log_level": log_level.upper(), "enable_access_log": bool(access_log)}
        serve.start(http_options={"host": host, "port": int(port)},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        deployment = EnsembleDeployment.options(
            num_replicas=int(replicas), ray_actor_options={"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)},
            # requests in flight per replica: enough for serve.batch to fill a batch of max_batch_items rows
            max_ongoing_requests=max(MAX_ONGOING_REQUESTS, settings.max_batch_items))
        serve.run(deployment.bind(tracking_uri, settings, int(threads)), name=APP_NAME, route_prefix="/",
                  blocking=False, logging_config=app_logging)
        if ready is not None:
            ready({"address": f"http://{host}:{port}", "replicas": int(replicas),
                   "cluster": address or "a private local Ray cluster"})
        while not stop.wait(0.5):
            pass
        if stopping is not None:
            stopping()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        try:  # the replicas drain their requests; a private cluster's Serve goes with the cluster (its
            # serve.shutdown() has the controller kill itself, and the raylet reports that as a failed task)
            serve.delete(APP_NAME)
        except Exception:
            pass
        scheduler.shutdown()

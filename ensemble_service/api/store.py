"""What the HTTP app serves from: its settings, the error type, and the ensemble cache.

:class:`EnsembleStore` reads registered ensembles from the MLflow store at ``tracking_uri``
(through ``ensemble_service.registry``) and keeps the loaded ones in memory: a version is
downloaded and rebuilt once; an alias (``name`` = ``name@latest``, ``name@champion``) is
re-resolved at most every ``alias_ttl_s`` seconds, so a moved alias is served from its new
version after that. The tracking store is only read: a store that does not exist is not created.

:class:`Settings` holds the serving limits (also from ``ENSEMBLE_SERVE_*`` environment variables).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from ensemble_service import names  # noqa: E402
from ensemble_service.api.batching import Batcher  # noqa: E402
from ensemble_service.serving import Ensemble, load_ensemble_dir  # noqa: E402

log = logging.getLogger("ensemble_service.api")

__all__ = ["Settings", "ApiError", "error_body", "EnsembleStore", "LoadedEnsemble"]


@dataclass
class Settings:
    """Serving limits and behaviour (env: ``ENSEMBLE_SERVE_<FIELD>``, e.g. ENSEMBLE_SERVE_MAX_BODY_BYTES)."""

    max_body_bytes: int = 8 * 1024 * 1024   # larger request bodies: 413, before parsing
    max_batch_items: int = 1024             # items per request (inputs / predictions' batch); rows per batched forward
    batching: bool = True                   # stack concurrent predict requests into one forward (api/batching.py)
    batch_wait_ms: float = 2.0              # under concurrent load, wait this long for more requests to stack
    inline_forward_ms: float = 2.0          # a lone request's forward expected to be this short runs on the event loop
    max_members: int = 64                   # members in /v1/aggregate
    max_classes: int = 10000                # classes in /v1/aggregate (and num_classes)
    body_timeout_s: float = 1.0             # a request body that stalls this long: 408, connection closed
    alias_ttl_s: float = 2.0                # re-resolve name@alias after this many seconds
    max_cached: int = 8                     # loaded ensemble versions kept in memory (LRU)
    device: str = "cpu"                     # cpu | cuda | auto
    preload: bool = False                   # load every ensemble's latest version at startup
    gc_freeze: bool = False                 # after startup, exempt what is loaded from GC scans (`ensemble serve`)
    # API keys clients send as `Authorization: Bearer <key>` (env ENSEMBLE_API_KEYS, comma-separated);
    # none: no authentication (see api/auth.py). Origins CORS allows; none: CORS off.
    api_keys: Tuple[str, ...] = field(default=(), repr=False)
    cors_origins: Tuple[str, ...] = ()

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        from ensemble_service.api.auth import split_list

        values: Dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get("ENSEMBLE_API_KEYS" if f.name == "api_keys" else f"ENSEMBLE_SERVE_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(f.default)
            values[f.name] = (raw.lower() in ("1", "true", "yes") if kind is bool else
                              split_list(raw) if kind is tuple else kind(raw))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def torch_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


class ApiError(Exception):
    """An answer other than 200: status, one-line message, the field at fault."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def error_body(message: str, field: Optional[str] = None, errors: Optional[List[Dict[str, str]]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"detail": f"{field}: {message}" if field and not message.startswith(field) else message}
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return body


# --------------------------------------------------------------------------- the cache


@dataclass
class LoadedEnsemble:
    """A loaded version. Its forwards run one at a time, in arrival order, on its own worker
    thread (torch already uses every core; a FIFO queue keeps tail latency fair under load),
    with concurrent requests stacked into one forward, and a lone short forward on the event loop
    (``batcher``, see ``api/batching.py``)."""

    name: str
    version: str
    info: Dict[str, Any]            # registry.resolve_ensemble's dict (aliases at load time)
    ensemble: Ensemble
    metrics: Dict[str, float]       # the parent run's ensemble metrics
    batcher: Any                    # batching.Batcher, or the Ray Serve deployment's serve.batch batcher

    def submit(self, inputs: Any, method: str = "mean", weights: Optional[List[float]] = None,
               return_members: bool = False, **options: Any) -> Future:
        """The Prediction for ``inputs`` (a Future); ``options`` are further ``Ensemble.predict``
        keyword arguments."""
        return self.batcher.submit(inputs, dict(method=method, weights=weights, return_members=return_members,
                                                **options))

    async def predict(self, inputs: Any, options: Dict[str, Any]) -> Any:
        """The Prediction for ``inputs``, awaited on the event loop."""
        run = getattr(self.batcher, "run", None) or getattr(self.batcher, "predict", None)
        if run is not None:  # a batcher with an asyncio side (batching.Batcher; Ray Serve's serve.batch)
            return await run(inputs, options)
        import asyncio

        return await asyncio.wrap_future(self.batcher.submit(inputs, options))

    # No explicit shutdown when a version leaves the cache: a request may still hold it. Its
    # worker thread exits after a while idle, and then nothing refers to it.


class EnsembleStore:
    """Registered ensembles loaded from MLflow once, kept (LRU) and re-resolved when aliases move."""

    def __init__(self, tracking_uri: Optional[str], settings: Settings, batcher_factory: Any = None):
        from ensemble_service import registry, tracking

        self.registry = registry
        self.tracking = tracking
        self.uri = tracking.resolve_uri(tracking_uri)
        self.settings = settings
        self._lock = threading.Lock()
        self._loading: Dict[Tuple[str, str], threading.Lock] = {}
        self._cache: "OrderedDict[Tuple[str, str], LoadedEnsemble]" = OrderedDict()
        self._refs: Dict[str, Tuple[float, Dict[str, Any]]] = {}
        self._refreshing: set = set()  # refs being looked up again right now
        self.loads = 0  # how many versions were downloaded and rebuilt (tests, /healthz)
        # (ensemble, name, settings) -> a batcher: batching.Batcher unless the Ray Serve deployment gives its own
        self.batcher_factory = batcher_factory or _thread_batcher

    def __len__(self) -> int:
        return len(self._cache)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self.registry.EnsembleNotFound as exc:
            raise ApiError(404, str(exc), "name") from None
        except self.tracking.TrackingError as exc:
            raise ApiError(503, f"tracking store unavailable: {exc}") from None
        except Exception as exc:  # the store itself failed (database gone, ...): not the client's fault
            log.exception("tracking store error")
            raise ApiError(503, f"tracking store unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def list(self) -> List[Dict[str, Any]]:
        return self._call(self.registry.list_registered_ensembles, self.uri)

    def _fresh(self, ref: str, hit: Optional[Tuple[float, Dict[str, Any]]]) -> bool:
        """Whether a cached resolution may answer now (call with the lock held): younger than the
        TTL, or older while another request is already looking ``ref`` up again (one lookup at a
        time per name: when the TTL runs out under load, the requests in flight do not all query
        the tracking store at once)."""
        ttl = self.settings.alias_ttl_s
        return hit is not None and (time.monotonic() - hit[0] < ttl or (ttl > 0 and ref in self._refreshing))

    def resolve(self, ref: str) -> Dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            hit = self._refs.get(ref)
            if self._fresh(ref, hit):
                return hit[1]
            self._refreshing.add(ref)
        try:
            info = self._call(self.registry.resolve_ensemble, self.uri, ref)
        finally:
            with self._lock:
                self._refreshing.discard(ref)
        with self._lock:
            self._refs[ref] = (now, info)
            if len(self._refs) > 1024:
                self._refs.pop(next(iter(self._refs)))
        return info

    def get(self, ref: str) -> LoadedEnsemble:
        info = self.resolve(ref)
        key = (info["name"], info["version"])
        with self._lock:
            loaded = self._cache.get(key)
            if loaded is not None and loaded.info.get("source") == info.get("source"):
                self._cache.move_to_end(key)
                return loaded
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                loaded = self._cache.get(key)
            if loaded is None or loaded.info.get("source") != info.get("source"):
                loaded = self._load(info)
                with self._lock:
                    self._cache[key] = loaded
                    self._cache.move_to_end(key)
                    while len(self._cache) > max(1, self.settings.max_cached):
                        self._cache.popitem(last=False)
        return loaded

    def peek(self, ref: str) -> Optional[LoadedEnsemble]:
        """The loaded ensemble for ``ref`` if resolving and loading would both be cache hits (no I/O)."""
        with self._lock:
            hit = self._refs.get(ref)
            if not self._fresh(ref, hit):
                return None
            loaded = self._cache.get((hit[1]["name"], hit[1]["version"]))
            if loaded is None or loaded.info.get("source") != hit[1].get("source"):
                return None
            self._cache.move_to_end((loaded.name, loaded.version))
            return loaded

    def _load(self, info: Dict[str, Any]) -> LoadedEnsemble:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ensemble-serve-") as tmp:
            local = self._call(self.registry.download_ensemble, self.uri, info, tmp)
            try:
                ensemble = load_ensemble_dir(local, device=self.settings.torch_device())
            except Exception as exc:  # a broken artifact, no CUDA for --device cuda, ...: the server's problem
                log.exception("cannot load %s version %s", info["name"], info["version"])
                raise ApiError(503, f"registered ensemble {info['name']} version {info['version']} "
                                    f"cannot be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        metrics = {}
        if info.get("run_id"):
            raw = self.registry.run_metrics(self.uri, info["run_id"])
            metrics = {k: float(v) for k, v in raw.items()
                       if (k in names.PARENT_METRICS or k in names.QUALITY_METRICS or k.startswith("ensemble_"))
                       and _finite(v)}
        self.loads += 1
        log.info("loaded ensemble %s version %s (%d members) in %.2f s", info["name"], info["version"],
                 ensemble.num_members, time.perf_counter() - t0)
        batcher = self.batcher_factory(ensemble, f"{info['name']}-v{info['version']}", self.settings)
        return LoadedEnsemble(info["name"], info["version"], info, ensemble, metrics, batcher)

    def preload(self) -> None:
        try:
            names = [e["name"] for e in self.list()]
        except ApiError as exc:
            log.warning("preload skipped: %s", exc.message)
            return
        for name in names[: self.settings.max_cached]:
            try:
                self.get(name)
            except ApiError as exc:
                log.warning("preload of %s failed: %s", name, exc.message)


def _thread_batcher(ensemble: Ensemble, name: str, settings: Settings) -> Batcher:
    return Batcher(ensemble, name, max_rows=settings.max_batch_items, wait_s=settings.batch_wait_ms / 1000.0,
                   enabled=settings.batching, inline_s=settings.inline_forward_ms / 1000.0)


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))

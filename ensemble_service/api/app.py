"""The FastAPI app factory: settings, the ensemble cache, limits and error handling.

``create_app(tracking_uri, settings)`` builds an app that reads registered ensembles from
the MLflow store at ``tracking_uri`` (through ``ensemble_service.tracking``) and keeps the
loaded ones in memory (:class:`EnsembleStore`): a version is downloaded and rebuilt once;
an alias (``name`` = ``name@latest``, ``name@champion``) is re-resolved at most every
``alias_ttl_s`` seconds, so a moved alias is served from its new version after that.

The tracking store is only read: a store that does not exist is not created (a SQLite URI
naming a missing file stays missing); the endpoints that read it answer 503 until it can be
read, and ``/healthz`` (liveness: always 200 while the process serves) reports it as
``"store": "unavailable"`` with the reason.

Limits (:class:`Settings`, also from ``ENSEMBLE_SERVE_*`` environment variables): a body
over ``max_body_bytes`` is answered 413 before it is parsed; a body that stops arriving for
``body_timeout_s`` (shorter than its Content-Length) is answered 408 and the connection
closed; more than ``max_members`` members, ``max_batch_items`` items or ``max_classes``
classes is a 422. Every 4xx body is ``{"detail": "<field>: <problem>", "field": "<field>"}``
(``path`` for an unknown route, ``http_method`` for a 405); a bad request never gets a 500.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from ensemble_service import aggregation  # noqa: E402
from ensemble_service.serving import Ensemble, ServingError, load_ensemble_dir  # noqa: E402

log = logging.getLogger("ensemble_service.api")

__all__ = ["Settings", "EnsembleStore", "LoadedEnsemble", "create_app", "ApiError"]


@dataclass
class Settings:
    """Serving limits and behaviour (env: ``ENSEMBLE_SERVE_<FIELD>``, e.g. ENSEMBLE_SERVE_MAX_BODY_BYTES)."""

    max_body_bytes: int = 8 * 1024 * 1024   # larger request bodies: 413, before parsing
    max_batch_items: int = 1024             # items per request (inputs / predictions' batch)
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
    thread (torch already uses every core; a FIFO queue keeps tail latency fair under load)."""

    name: str
    version: str
    info: Dict[str, Any]            # registry.resolve_ensemble's dict (aliases at load time)
    ensemble: Ensemble
    metrics: Dict[str, float]       # the parent run's ensemble metrics
    executor: ThreadPoolExecutor

    def submit(self, inputs: Any, method: str, weights: Optional[List[float]], return_members: bool) -> Future:
        return self.executor.submit(self.ensemble.predict, inputs, method, weights, return_members)

    def predict(self, inputs: Any, method: str, weights: Optional[List[float]], return_members: bool):
        return self.submit(inputs, method, weights, return_members).result()

    # No explicit shutdown when a version leaves the cache: a request may still hold it. Once
    # nothing refers to it, the executor is collected and its idle thread exits.


class EnsembleStore:
    """Registered ensembles loaded from MLflow once, kept (LRU) and re-resolved when aliases move."""

    def __init__(self, tracking_uri: Optional[str], settings: Settings):
        from ensemble_service import registry, tracking

        self.registry = registry
        self.tracking = tracking
        self.uri = tracking.resolve_uri(tracking_uri)
        self.settings = settings
        self._lock = threading.Lock()
        self._loading: Dict[Tuple[str, str], threading.Lock] = {}
        self._cache: "OrderedDict[Tuple[str, str], LoadedEnsemble]" = OrderedDict()
        self._refs: Dict[str, Tuple[float, Dict[str, Any]]] = {}
        self.loads = 0  # how many versions were downloaded and rebuilt (tests, /healthz)

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

    def resolve(self, ref: str) -> Dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            hit = self._refs.get(ref)
        if hit is not None and now - hit[0] < self.settings.alias_ttl_s:
            return hit[1]
        info = self._call(self.registry.resolve_ensemble, self.uri, ref)
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
            if hit is None or time.monotonic() - hit[0] >= self.settings.alias_ttl_s:
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
                       if (k in self.tracking.PARENT_METRICS or k.startswith("ensemble_")) and _finite(v)}
        self.loads += 1
        log.info("loaded ensemble %s version %s (%d members) in %.2f s", info["name"], info["version"],
                 ensemble.num_members, time.perf_counter() - t0)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ensemble-{info['name']}-v{info['version']}")
        return LoadedEnsemble(info["name"], info["version"], info, ensemble, metrics, executor)

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


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


# --------------------------------------------------------------------------- limits


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length before reading, else while reading.
    408 (and the connection closed) when no body bytes arrive for ``timeout_s`` seconds."""

    def __init__(self, app, max_bytes: int, timeout_s: Optional[float] = None):
        self.app, self.max_bytes = app, int(max_bytes)
        self.timeout_s = float(timeout_s) if timeout_s and timeout_s > 0 else None

    async def _reject(self, send, size: Optional[int], status: int = 413, message: Optional[str] = None) -> None:
        what = f"{size} bytes" if size is not None else f"over {self.max_bytes} bytes"
        message = message or f"request body is {what}; the limit is {self.max_bytes} (max_body_bytes)"
        body = json.dumps(error_body(message, "body")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = None
                if size is not None and size > self.max_bytes:
                    return await self._reject(send, size)
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:  # a stalled (or slow-loris) client: do not hold the connection
                expected = f" of {size}" if size is not None else ""
                return await self._reject(send, None, 408, f"request body stalled: no bytes for {self.timeout_s:g} s "
                                                           f"after {total}{expected} bytes (body_timeout_s)")
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._reject(send, None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# --------------------------------------------------------------------------- errors


def _loc_field(loc) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:] or parts[:1]
    return ".".join(parts) if parts else "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        items = []
        for e in exc.errors():
            field = _loc_field(e.get("loc", ()))
            if e.get("type") == "json_invalid":
                field = "body"
            items.append({"field": field, "message": str(e.get("msg", "invalid"))})
        first = items[0] if items else {"field": "body", "message": "invalid request"}
        return JSONResponse(error_body(first["message"], first["field"], items), status_code=422)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError):
        return JSONResponse(error_body(str(exc), exc.field or "body"), status_code=422)

    @app.exception_handler(aggregation.AggregationError)
    async def _aggregation(request: Request, exc: aggregation.AggregationError):
        return JSONResponse(error_body(str(exc), getattr(exc, "field", None) or "body"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400 and "parsing the body" in detail:  # not UTF-8 / not JSON at all
            return JSONResponse(error_body("could not be parsed as JSON", "body"), status_code=422)
        path = request.url.path
        if exc.status_code == 404 and detail == "Not Found":  # from routing: no such path
            body = error_body(f"no route {path} (the routes are listed at /docs)", "path")
        elif exc.status_code == 405:  # from routing: the path exists, with other methods (Allow)
            allow = (headers or {}).get("Allow")
            body = error_body(f"{request.method} is not allowed on {path}" + (f"; allowed: {allow}" if allow else ""),
                              "http_method")
        else:
            body = error_body(detail, "request") if exc.status_code < 500 else {"detail": detail}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: logged, answered without a traceback
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


# --------------------------------------------------------------------------- factory


def _document_bodies(app: FastAPI) -> None:
    """Predict reads its body itself (JSON or multipart image files); its JSON schema still belongs
    in the OpenAPI document."""
    from ensemble_service.api.schemas import PredictRequest

    build = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {})["PredictRequest"] = \
                PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(tracking_uri: Optional[str] = None, settings: Optional[Settings] = None) -> FastAPI:
    """The ensemble-serving app for the MLflow store at ``tracking_uri`` (default:
    MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from ensemble_service.api.routes import router

    settings = settings or Settings.from_env()
    store = EnsembleStore(tracking_uri, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(store.preload)
        if settings.gc_freeze:
            # torch, MLflow and the loaded members are long-lived: keeping them out of the cyclic
            # GC's full collections removes pauses that otherwise show up as tail latency.
            import gc

            gc.collect()
            gc.freeze()
        yield

    app = FastAPI(
        title="ensemble-service", version="0.1.0", lifespan=lifespan,
        description="Predictions of registered ensembles of PyTorch classifiers, combined by averaging or "
                    "voting, and a model-free endpoint that combines member predictions a client already has.",
    )
    app.state.store = store
    app.state.settings = settings
    app.include_router(router)
    _document_bodies(app)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    from ensemble_service.api import auth  # API keys and CORS, in front of the body limit

    auth.install(app, settings.api_keys, settings.cors_origins)
    return app

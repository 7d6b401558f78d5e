"""The FastAPI app factory: routes, limits, authentication and error handling.

``create_app(tracking_uri, settings)`` builds an app that serves the ensembles registered in
the MLflow store at ``tracking_uri`` from an :class:`~ensemble_service.api.store.EnsembleStore`.

The tracking store is only read: a store that does not exist is not created (a SQLite URI
naming a missing file stays missing); the endpoints that read it answer 503 until it can be
read, and ``/healthz`` (liveness: always 200 while the process serves) reports it as
``"store": "unavailable"`` with the reason.

Limits (:class:`Settings`, also from ``ENSEMBLE_SERVE_*`` environment variables): a body
over ``max_body_bytes`` is answered 413 before it is parsed; a body that stops arriving for
``body_timeout_s`` (shorter than its Content-Length) is answered 408 and the connection
closed; more than ``max_members`` members, ``max_batch_items`` items or ``max_classes``
classes is a 422, and so is a body that cannot be read (bad JSON, a ``.npy`` file that is not one,
is truncated or holds non-numbers: ``api/codec.py``). Every 4xx body is
``{"detail": "<problem>", "field": "<field>"}``, the detail starting with the field (``path`` for an unknown route,
``http_method`` for a 405); a bad request never gets a 500.

POST ``/v1/ensembles/{name}/predict`` goes from the body limit straight to its handler
(:class:`PredictFastPath`), past FastAPI's routing; its answers and errors are the routed ones.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Dict, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from ensemble_service import aggregation  # noqa: E402
from ensemble_service.api.codec import BodyError  # noqa: E402
from ensemble_service.api.store import ApiError, EnsembleStore, Settings, error_body  # noqa: E402
from ensemble_service.serving import ServingError  # noqa: E402

log = logging.getLogger("ensemble_service.api")

__all__ = ["Settings", "create_app"]


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
                message = await _within(receive(), self.timeout_s)
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


async def _within(awaitable, seconds: Optional[float]):
    """``await awaitable`` with a timeout (asyncio.TimeoutError): asyncio.timeout where there is one
    (Python 3.11+; no task per call, unlike wait_for, which every request body would pay)."""
    if seconds is None:
        return await awaitable
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class PredictFastPath:
    """POST /v1/ensembles/{name}/predict straight to its handler (``routes.predict``), without
    FastAPI's routing, dependency solving and inner middleware: on a small model these cost about as
    much as the forward. Errors go to the app's own exception handlers, so every answer, error or
    not, is the one the routed endpoint gives; anything else goes on to the app."""

    PREFIX, SUFFIX = "/v1/ensembles/", "/predict"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not (path.startswith(self.PREFIX) and path.endswith(self.SUFFIX)) or \
                len(path) <= len(self.PREFIX) + len(self.SUFFIX):
            return await self.app(scope, receive, send)
        from ensemble_service.api import routes

        request = Request(scope, receive)
        try:
            response = await routes.predict(request, path[len(self.PREFIX):-len(self.SUFFIX)])
        except Exception as exc:
            handlers = scope["app"].exception_handlers
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers and c is not Exception), None)
            if handler is None:
                raise  # a bug: the server's 500 handler logs it
            response = await handler(request, exc)
        await response(scope, receive, send)


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

    @app.exception_handler(BodyError)
    async def _body(request: Request, exc: BodyError):  # a body that cannot be read (api/codec.py)
        return JSONResponse(error_body(exc.message, exc.field), status_code=422)

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
    """Predict and aggregate read their bodies themselves (JSON, .npy, multipart image files); their
    JSON schemas still belong in the OpenAPI document."""
    from ensemble_service.api.schemas import AggregateRequest, PredictRequest

    build = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for model in (PredictRequest, AggregateRequest):
                schema.setdefault("components", {}).setdefault("schemas", {})[model.__name__] = \
                    model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(tracking_uri: Optional[str] = None, settings: Optional[Settings] = None,
               batcher_factory: Any = None) -> FastAPI:
    """The ensemble-serving app for the MLflow store at ``tracking_uri`` (default:
    MLFLOW_TRACKING_URI, else ./mlflow.db). ``batcher_factory(ensemble, name, settings)`` makes
    each loaded ensemble's batcher (default: ``api/batching.py``'s thread; Ray Serve passes its own)."""
    from ensemble_service.api.routes import router

    settings = settings or Settings.from_env()
    store = EnsembleStore(tracking_uri, settings, batcher_factory)

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
    app.add_middleware(PredictFastPath)  # inside the body limit and the API-key check (added later: outside)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    from ensemble_service.api import auth  # API keys and CORS, in front of the body limit

    auth.install(app, settings.api_keys, settings.cors_origins)
    return app

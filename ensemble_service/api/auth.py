"""API keys, CORS and the helpers that decide what is reachable from where.

With keys configured (``Settings.api_keys``: ``ensemble serve --api-key`` or ``ENSEMBLE_API_KEYS``,
comma-separated, several allowed so a key can be rotated without downtime), every request
must carry ``Authorization: Bearer <key>``; only the paths in :data:`OPEN_PATHS` answer
without one (``/healthz`` for health checks, and the API's own documentation, which holds
no data). A missing or wrong key is a 401 with one line,
``{"detail": "authorization: ...", "field": "authorization"}``, that says nothing about which
keys exist. The presented key is compared with every configured key in constant time (SHA-256
digests, ``hmac.compare_digest``, no early exit).

The check is a pure ASGI middleware that runs before the body limit, so a client without a
key cannot make the server read a body. CORS is off (no CORS headers at all) unless
``Settings.cors_origins`` names origins.

Nothing here imports torch, MLflow or the rest of the API: the CLI uses :func:`is_loopback`
and :func:`address_host` to decide when to refuse or warn.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

__all__ = ["OPEN_PATHS", "MIN_KEY_LENGTH", "ApiKeyMiddleware", "split_list", "check_keys", "check_origins",
           "install", "is_loopback", "address_host", "redact_uri"]

# answered without a key: the health check, and the API's documentation (no data, no model)
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
MIN_KEY_LENGTH = 16
KEY_HINT = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces (HTTP header token-safe)
_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def split_list(raw: Optional[str]) -> Tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: the form of ENSEMBLE_API_KEYS and ENSEMBLE_SERVE_CORS_ORIGINS."""
    return tuple(p.strip() for p in re.split(r"[,\s]+", raw or "") if p.strip())


def check_keys(keys: Sequence[str]) -> Optional[str]:
    """One line saying what is wrong with ``keys`` (never the key itself), or None."""
    for i, key in enumerate(keys, 1):
        which = f"API key {i} of {len(keys)}"
        if len(key) < MIN_KEY_LENGTH:
            return f"{which} has {len(key)} characters; use at least {MIN_KEY_LENGTH} ({KEY_HINT})"
        if not _KEY_CHARS.match(key) or "," in key:
            return f"{which} has a character other than printable ASCII (no spaces or commas) ({KEY_HINT})"
    return None


def check_origins(origins: Sequence[str]) -> Optional[str]:
    for origin in origins:
        if origin == "*":
            return "--cors-origin '*' is not accepted: name each origin, e.g. https://app.example.com"
        if not _ORIGIN.match(origin):
            return f"--cors-origin {origin!r} is not an origin (scheme://host[:port], no path)"
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyMiddleware:
    """401 unless the request's ``Authorization: Bearer <key>`` is one of ``keys`` (paths in
    ``open_paths`` excepted). Pure ASGI: nothing of the request is read before the check."""

    def __init__(self, app, keys: Sequence[str], open_paths: Iterable[str] = OPEN_PATHS):
        problem = check_keys(keys)
        if not keys or problem:
            raise ValueError(problem or "ApiKeyMiddleware needs at least one key")
        self.app = app
        self._digests = [_digest(k.encode()) for k in keys]
        self.open_paths = frozenset(open_paths)

    def authorized(self, header: Optional[bytes]) -> Tuple[bool, str]:
        if not header:
            return False, "missing API key: send 'Authorization: Bearer <key>'"
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False, "expected 'Authorization: Bearer <key>'"
        presented = _digest(token.strip())
        ok = False
        for d in self._digests:  # every key, no early exit: the time does not depend on which matched
            ok |= hmac.compare_digest(presented, d)
        return (True, "") if ok else (False, "invalid API key")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        ok, problem = self.authorized(header)
        if ok:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": f"authorization: {problem}", "field": "authorization"}).encode()
        challenge = b"Bearer" if header is None else b'Bearer error="invalid_token"'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})


def _document(app, open_paths: frozenset) -> None:
    """Declare the bearer key in the OpenAPI schema, so /docs has an Authorize button and
    every protected operation lists its 401."""
    build = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer",
            "description": "One of the server's API keys (ensemble serve --api-key / ENSEMBLE_API_KEYS)."}
        error = ({"$ref": "#/components/schemas/ErrorResponse"} if "ErrorResponse" in components.get("schemas", {})
                 else {"type": "object", "properties": {"detail": {"type": "string"}, "field": {"type": "string"}}})
        for path, operations in schema.get("paths", {}).items():
            if path in open_paths:
                continue
            for op in operations.values():
                op["security"] = [{"apiKey": []}]
                op.setdefault("responses", {}).setdefault("401", {
                    "description": "Missing or invalid API key",
                    "content": {"application/json": {"schema": error}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def install(app, api_keys: Sequence[str], cors_origins: Sequence[str]) -> None:
    """Add the API-key check (when keys are given) and CORS (when origins are given) to ``app``.
    Call it after the app's other middleware: what is added last runs first (CORS, then keys)."""
    if api_keys:
        problem = check_keys(api_keys)
        if problem:  # now, not when the middleware stack is first built
            raise ValueError(problem)
        app.add_middleware(ApiKeyMiddleware, keys=list(api_keys), open_paths=OPEN_PATHS)
        _document(app, OPEN_PATHS)
    if cors_origins:
        problem = check_origins(cors_origins)
        if problem:
            raise ValueError(problem)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)


# --------------------------------------------------------------------------- addresses


def is_loopback(host: Optional[str]) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1; False for anything else, names included
    (``0.0.0.0``/``::`` mean every interface)."""
    if not host:
        return False
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_host(address: Optional[str]) -> Optional[str]:
    """The host of a Ray address: ``http://h:8265``, ``ray://h:10001``, ``h:6379``, ``[::1]:6379``;
    None for ``auto``/``local``/empty (this machine's own cluster)."""
    if not address or address.strip().lower() in ("auto", "local"):
        return None
    text = address.strip()
    if "://" not in text:
        text = "tcp://" + text
    try:
        return urlsplit(text).hostname
    except ValueError:
        return None


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """``postgresql://user:secret@db/x`` -> ``postgresql://user:***@db/x``: URIs shown in logs and /healthz."""
    if not uri or "@" not in uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


"""HTTP routes: health, the registry's ensembles, predict, and model-free aggregation.

Handlers that read MLflow or compute are plain ``def`` (FastAPI runs them in its thread pool);
predict is ``async``: a cached ensemble is found without I/O, and its forward runs on the
ensemble's own worker thread, so neither blocks the event loop.
"""
from __future__ import annotations

import asyncio
import math
from typing import Any, Dict, List, Tuple

import torch
from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor

from ensemble_service import aggregation, names
from ensemble_service.api.store import ApiError, EnsembleStore, Settings
from ensemble_service.api.auth import redact_uri
from ensemble_service.api.schemas import (
    AggregateRequest, AggregateResponse, EnsembleInfo, EnsembleList, ErrorResponse, Health, PredictRequest,
    PredictResponse,
)
from ensemble_service.serving import ServingError

router = APIRouter()


class _EnsembleRefConvertor(PathConvertor):
    """``{name:ensemble_ref}``: a path (``name/versions/N`` has slashes) not ending in ``/predict``,
    so that GET .../predict is a 405 (the predict route only takes POST), not an ensemble's name."""

    regex = r"(?!.*/predict\Z).*"  # 'predict' alone is a name (an ensemble may be called that)


register_url_convertor("ensemble_ref", _EnsembleRefConvertor())

_ERR = {"model": ErrorResponse}
_NAME_DOC = ("`name` (its alias `latest`, i.e. the newest version), `name@alias` or `name/versions/N`.")
NamePath = Path(..., description=_NAME_DOC, examples=["ensembles"])


def _store(request: Request) -> EnsembleStore:
    return request.app.state.store


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _check_items(value: List[Any], field: str, limit: int, what: str = "items") -> None:
    if len(value) == 0:
        raise ApiError(422, "empty batch (no items)" if what == "items" else f"no {what}", field)
    if len(value) > limit:
        raise ApiError(422, f"{len(value)} {what} exceed the limit of {limit}", field)


def _tensor(value: Any, field: str) -> torch.Tensor:
    """Nested JSON numbers -> tensor (the same conversion aggregation.aggregate does on lists)."""
    try:
        t = torch.tensor(value)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "expected sequence of length" in msg or "inhomogeneous" in msg:
            raise ApiError(422, f"ragged nested lists: every row must have the same length ({msg})", field) from None
        raise ApiError(422, f"must be nested lists of numbers ({msg})", field) from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype == torch.int64):
        raise ApiError(422, f"must be numbers, got {str(t.dtype).replace('torch.', '')}", field)
    return t


def _method_used(method: str, weights: Any) -> str:
    """'mean' with weights is the weighted mean: the answer names it 'weighted'."""
    return "weighted" if method == "mean" and weights is not None else method


def _agg_field(message: str, default: str) -> str:
    head = message.split(" ", 1)[0]
    if head in ("weights", "num_classes", "method", "kind"):
        return head
    return default


# --------------------------------------------------------------------------- health / registry


@router.get("/healthz", response_model=Health, tags=["health"])
def healthz(request: Request) -> Dict[str, Any]:
    """Liveness: 200 while the process serves, whatever the tracking store's state (restarting the
    server would not bring a store back, and /v1/aggregate needs none). ``store`` says whether the
    store can be read now: ``ok``, or ``unavailable`` with ``store_detail`` saying why (a SQLite
    file that does not exist, a server that does not answer within 2 s); it is checked without
    creating anything. While it is unavailable, the endpoints that read it answer 503."""
    store = _store(request)
    problem = store.tracking.check_store(store.uri, create=False, timeout=2.0)
    return {"status": "ok", "tracking_uri": redact_uri(store.uri), "cached_ensembles": len(store),
            "store": "unavailable" if problem else "ok", "store_detail": problem or None}


@router.get("/v1/ensembles", response_model=EnsembleList, tags=["ensembles"], responses={503: _ERR})
def list_ensembles(request: Request) -> Dict[str, Any]:
    """Registered ensembles: names, versions and aliases."""
    out = []
    for e in _store(request).list():
        versions = []
        for v in e["versions"]:
            tags = v.get("tags") or {}
            members = tags.get(names.TAG_MEMBERS)
            versions.append({"version": v["version"], "aliases": v["aliases"], "run_id": v.get("run_id"),
                             "created": v.get("created", 0), "status": v.get("status"),
                             "strategy": tags.get(names.TAG_STRATEGY),
                             "members": int(members) if members and members.isdecimal() else None})
        out.append({"name": e["name"], "latest_version": e["latest_version"], "aliases": e["aliases"],
                    "versions": versions})
    return {"ensembles": out}


@router.get("/v1/ensembles/{name:ensemble_ref}", response_model=EnsembleInfo, response_model_exclude_none=True,
            tags=["ensembles"], responses={404: _ERR, 405: _ERR, 503: _ERR})
def ensemble_info(request: Request, name: str = NamePath) -> Dict[str, Any]:
    """One registered version: members, architectures, how they run, strategy, the parent run's metrics."""
    store = _store(request)
    le = store.get(name)
    ens, info = le.ensemble, store.resolve(name)  # current aliases (the loaded copy's are from load time)
    members = []
    for m in ens.members:
        d = {"index": m.index, "architecture": m.architecture, "role": m.role,
             "model": dict(m.record.get("model") or m.model_cfg),
             "metrics": {k: v for k, v in (m.record.get("metrics") or {}).items() if math.isfinite(v)}}
        if "sample_seed" in m.record:
            d["sample_seed"] = int(m.record["sample_seed"])
        members.append(d)
    return {"name": le.name, "version": le.version, "aliases": info.get("aliases", []),
            "run_id": info.get("run_id"), "created": info.get("created", 0),
            "strategy": ens.meta.get("strategy") or (info.get("tags") or {}).get(names.TAG_STRATEGY),
            "data": ens.meta.get("data") or None, "num_members": ens.num_members,
            "input_shape": list(ens.input_shape), "num_classes": ens.num_classes,
            "class_names": ens.class_names, "inputs": _inputs_doc(ens),
            "architectures": ens.architectures(), "members": members, "groups": ens.describe_groups(),
            "metrics": le.metrics, "methods": list(aggregation.METHODS)}


def _inputs_doc(ens) -> Dict[str, Any]:
    """What a client sends: the raw format (the ensemble preprocesses it) or model inputs."""
    p = ens.pipeline
    if p is None:
        return {"kind": "array", "shape": list(ens.input_shape), "preprocessing": "none"}
    out: Dict[str, Any] = {"kind": p.kind, "shape": list(p.raw_shape), "preprocessing": p.describe()}
    if p.columns is not None:
        out["columns"] = list(p.columns)
    if p.image is not None:
        out["image"] = dict(p.image)
    return out


# --------------------------------------------------------------------------- predict


_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Image files (PNG, JPEG, ...), for ensembles trained on an image folder."},
        "method": {"type": "string", "enum": list(aggregation.METHODS), "default": "mean"},
        "return_members": {"type": "boolean", "default": False}}}},
}}}


async def _predict_body(request: Request) -> Tuple[PredictRequest, Any]:
    """The request and its inputs: a JSON body, or multipart/form-data with image ``files`` (plus
    optional ``method`` / ``return_members`` fields)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "multipart/form-data":
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]) from None
        return body, body.inputs
    settings = _settings(request)
    try:
        form = await request.form(max_files=settings.max_batch_items + 1, max_fields=16)
    except Exception as exc:  # malformed multipart, too many parts
        raise ApiError(422, f"cannot be read as multipart/form-data ({str(exc).splitlines()[0] if str(exc) else exc!r})",
                       "body") from None
    unknown = sorted(set(form.keys()) - {"files", "method", "return_members"})
    if unknown:
        raise ApiError(422, f"unknown form field(s) {', '.join(unknown)}; send files, method, return_members",
                       unknown[0])
    files = [f for f in form.getlist("files") if hasattr(f, "read")]
    if not files:
        raise ApiError(422, "no image files (send them as the form field 'files')", "files")
    fields = {"inputs": [[0]], "method": form.get("method") or "mean",
              "return_members": str(form.get("return_members") or "false").lower() in ("1", "true", "yes", "on")}
    try:
        body = PredictRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]) from None
    return body, [await f.read() for f in files]


@router.post("/v1/ensembles/{name:path}/predict", response_model=PredictResponse, response_model_exclude_none=True,
             tags=["predict"], responses={404: _ERR, 413: _ERR, 422: _ERR, 503: _ERR}, openapi_extra=_PREDICT_BODY)
async def predict(request: Request, name: str = NamePath) -> Dict[str, Any]:
    """The ensemble's combined prediction for a batch of raw inputs (in the training data's format;
    the ensemble applies its own preprocessing), as JSON or, for image ensembles, image files."""
    body, inputs = await _predict_body(request)
    settings = _settings(request)
    files = bool(inputs) and isinstance(inputs[0], bytes)
    _check_items(inputs, "files" if files else "inputs", settings.max_batch_items)
    store = _store(request)
    le = store.peek(name) or await run_in_threadpool(store.get, name)  # MLflow reads off the event loop
    if body.weights is not None and len(body.weights) != le.ensemble.num_members:
        raise ApiError(422, f"{len(body.weights)} weights for {le.ensemble.num_members} members", "weights")
    if files and (le.ensemble.pipeline is None or le.ensemble.pipeline.kind != "image"):
        raise ApiError(422, "this ensemble was not trained on images: send its inputs as JSON", "files")
    method = _method_used(body.method, body.weights)
    if body.calibrated and le.ensemble.temperature is None:
        raise ApiError(422, "this ensemble has no fitted temperature (it was trained with calibration=none)",
                       "calibrated")
    try:  # the forward runs on the ensemble's own worker thread
        pred = await asyncio.wrap_future(le.submit(inputs, method, body.weights, body.return_members,
                                                   body.calibrated, body.return_uncertainty))
    except ServingError as exc:
        raise ApiError(422, str(exc), exc.field or "inputs") from None
    labels = pred.labels.tolist()
    out: Dict[str, Any] = {"name": le.name, "model_version": le.version, "method": method,
                           "labels": labels, "probabilities": pred.probabilities.tolist(),
                           "agreement": pred.agreement.tolist()}
    names = le.ensemble.class_names
    if names is not None:
        out["class_names"] = [names[i] for i in labels]
    if body.return_members:
        out["members"] = pred.member_probs.tolist()
    out["calibrated"] = pred.calibrated
    out.update({k: v.tolist() for k, v in (pred.uncertainty or {}).items()})
    # already plain JSON (finite floats): skip re-validating it against the response model
    return JSONResponse(out)


# --------------------------------------------------------------------------- aggregate


@router.post("/v1/aggregate", response_model=AggregateResponse, tags=["aggregate"],
             responses={413: _ERR, 422: _ERR})
def aggregate(request: Request, body: AggregateRequest) -> Dict[str, Any]:
    """Combine member predictions the client already has (no model involved)."""
    settings = _settings(request)
    preds = body.predictions
    _check_items(preds, "predictions", settings.max_members, "members")
    first = preds[0]
    if isinstance(first, list):
        if len(first) > settings.max_batch_items:
            raise ApiError(422, f"{len(first)} items exceed the limit of {settings.max_batch_items}", "predictions")
        if first and isinstance(first[0], list) and len(first[0]) > settings.max_classes:
            raise ApiError(422, f"{len(first[0])} classes exceed the limit of {settings.max_classes}", "predictions")
    if body.num_classes is not None and body.num_classes > settings.max_classes:
        raise ApiError(422, f"{body.num_classes} exceeds the limit of {settings.max_classes}", "num_classes")
    if body.weights is not None and len(body.weights) != len(preds):
        raise ApiError(422, f"{len(body.weights)} weights for {len(preds)} members", "weights")
    t = _tensor(preds, "predictions")
    if body.method is None:
        method = "vote" if body.kind == "labels" else "mean"
    else:  # labels have no mean: 'mean' stays an error there, with or without weights
        method = body.method if body.kind == "labels" else _method_used(body.method, body.weights)
    expected = 2 if body.kind == "labels" else 3
    if t.dim() != expected:
        shape = "members x batch" if expected == 2 else "members x batch x classes"
        raise ApiError(422, f"must be {expected}-D ({shape}) for kind {body.kind!r}, got shape {list(t.shape)}",
                       "predictions")
    if t.shape[1] == 0:
        raise ApiError(422, "empty batch (no items)", "predictions")
    try:
        res = aggregation.aggregate(t, method=method, kind=body.kind, weights=body.weights,
                                    num_classes=body.num_classes, with_uncertainty=body.return_uncertainty)
    except aggregation.AggregationError as exc:
        raise ApiError(422, str(exc), _agg_field(str(exc), "predictions")) from None
    return JSONResponse({"method": method, "kind": body.kind, "labels": res.labels.tolist(),
                         "probabilities": res.probabilities.tolist(), "agreement": res.agreement.tolist(),
                         **{k: v.tolist() for k, v in (res.uncertainty or {}).items()}})

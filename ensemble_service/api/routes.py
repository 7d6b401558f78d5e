"""HTTP routes: health, the registry's ensembles, predict, and model-free aggregation.

Handlers that read MLflow or compute are plain ``def`` (FastAPI runs them in its thread pool);
predict is ``async``: a cached ensemble is found without I/O, and its forward runs on the
ensemble's own worker thread (stacked with concurrent requests, ``api/batching.py``), so neither
blocks the event loop. Predict and aggregate read their bodies themselves (``api/codec.py``):
JSON parsed straight into NumPy, a ``.npy`` file (``content-type: application/x-npy``, the other
fields as query parameters), or for image ensembles multipart files; ``accept: application/x-npy``
gets the probabilities as a ``.npy`` file.
"""
from __future__ import annotations

import functools
import math
import typing
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ensemble_service import aggregation, names
from ensemble_service.api import codec
from ensemble_service.api.batching import predict_options
from ensemble_service.api.store import ApiError, EnsembleStore, Settings
from ensemble_service.api.auth import redact_uri
from ensemble_service.api.schemas import (
    AggregateRequest, AggregateResponse, EnsembleInfo, EnsembleList, ErrorResponse, Health, PredictRequest,
    PredictResponse,
)
from ensemble_service.serving import ServingError

router = APIRouter()


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


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A numeric array (JSON's or a .npy body's) -> the tensor aggregation.aggregate gets: floats as
    float32 (what torch.tensor makes of JSON numbers; beyond float32's range they become inf, which
    aggregation refuses: see :func:`_agg_error`), integers as int64."""
    if arr.dtype.kind == "f":
        with np.errstate(over="ignore"):
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))


def _agg_error(exc: aggregation.AggregationError, arr: np.ndarray) -> ApiError:
    """The 422 of a failed aggregation; "NaN or infinite" for predictions that were finite before
    float32 says what happened (checked only here, on the error path)."""
    message, field = str(exc), _agg_field(str(exc), "predictions")
    if field == "predictions" and "NaN or infinite" in message and arr.dtype.kind == "f" and \
            arr.dtype.itemsize > 4 and np.isfinite(arr).all():
        message = "predictions has values beyond float32's range (|x| > 3.4e38)"
    return ApiError(422, message, field)


def _validate(model, fields: Dict[str, Any], where: str = "body"):
    """The request's small fields, validated by its pydantic model (errors as FastAPI's 422)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": (where, *e.get("loc", ()))} for e in exc.errors()]) from None


def _query(request: Request, model) -> Dict[str, Any]:
    """A binary request's other fields, from its query parameters (typed after ``model``'s fields)."""
    lists, flags = _field_kinds(model)
    return codec.query_fields(request.query_params.multi_items(), lists=lists, flags=flags)


@functools.lru_cache(maxsize=None)
def _field_kinds(model) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(list fields, boolean fields) of a request model: how their query parameters are read."""
    lists = tuple(n for n, f in model.model_fields.items() if typing.get_origin(f.annotation) in (list, typing.Union)
                  and any(typing.get_origin(a) is list for a in (f.annotation, *typing.get_args(f.annotation))))
    flags = tuple(n for n, f in model.model_fields.items() if f.annotation in (bool, Optional[bool]))
    return lists, flags


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


def ensemble_info(request: Request, name: str = NamePath) -> Dict[str, Any]:
    """One registered version: members, architectures, how they run, strategy, the parent run's metrics."""
    if name.endswith("/predict"):  # the predict route's path, which takes POST only ('predict' alone is a name)
        raise HTTPException(405, headers={"Allow": "POST"})
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
        if m.record.get("weight") is not None:
            d["weight"] = float(m.record["weight"])
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

_NPY_BODY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
    codec.NPY: {**_NPY_BODY, "description": "inputs as one .npy file (numpy.save; numbers only, never "
                                            "unpickled); the other fields as query parameters"},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Image files (PNG, JPEG, ...), for ensembles trained on an image folder."},
        "method": {"type": "string", "enum": list(aggregation.METHODS), "default": "mean"},
        "return_members": {"type": "boolean", "default": False}}}},
}}}
_NPY_ANSWER = {"description": "With `accept: application/x-npy`: the probabilities, float32 [batch, classes], as "
                              "a .npy file; the labels in the `x-labels` header (comma-separated).",
               "content": {codec.NPY: _NPY_BODY}}
_PLACEHOLDER = [0]  # stands in for the array field while pydantic checks the others
_MISSING = object()


def _ctype(request: Request) -> str:
    return codec.media_type(request.headers.get("content-type"))


async def _array_body(request: Request, model, field: str, max_rows: int, row_what: str = "items"
                      ) -> Tuple[Any, Any]:
    """(the validated request, its array field) from a JSON or .npy body."""
    if _ctype(request) == codec.NPY:
        body = _validate(model, {**_query(request, model), field: _PLACEHOLDER}, "query")
        return body, codec.read_npy(await request.body(), field, max_rows, row_what=row_what)
    data = codec.load_json(await request.body())
    if not isinstance(data, dict):
        raise ApiError(422, f"must be a JSON object with {field!r} (got {codec._json_type(data)})", "body")
    raw = data.get(field, _MISSING)
    fields = {k: v for k, v in data.items() if k != field}
    if raw is not _MISSING:
        fields[field] = _PLACEHOLDER
    body = _validate(model, fields)
    if field == "inputs" and isinstance(raw, list) and codec.rows_of(raw):
        return body, raw  # a table's rows as {column: value} objects: the ensemble picks its columns
    return body, codec.json_array(raw, field)


async def _predict_body(request: Request) -> Tuple[PredictRequest, Any]:
    """The request and its inputs: a JSON body, a .npy body (fields as query parameters), or
    multipart/form-data with image ``files`` (plus optional ``method``, ``return_members``,
    ``calibrated`` and ``return_uncertainty`` fields)."""
    settings = _settings(request)
    if _ctype(request) != "multipart/form-data":
        return await _array_body(request, PredictRequest, "inputs", settings.max_batch_items)
    try:
        form = await request.form(max_files=settings.max_batch_items + 1, max_fields=16)
    except Exception as exc:  # malformed multipart, too many parts
        raise ApiError(422, f"cannot be read as multipart/form-data ({str(exc).splitlines()[0] if str(exc) else exc!r})",
                       "body") from None
    known = ("files", "method", "return_members", "calibrated", "return_uncertainty")
    unknown = sorted(set(form.keys()) - set(known))
    if unknown:
        raise ApiError(422, f"unknown form field(s) {', '.join(unknown)}; send {', '.join(known)}", unknown[0])
    files = [f for f in form.getlist("files") if hasattr(f, "read")]
    if not files:
        raise ApiError(422, "no image files (send them as the form field 'files')", "files")
    fields = {"inputs": [[0]], "method": form.get("method") or "mean",
              **codec.query_fields([(k, str(form.get(k))) for k in ("return_members", "calibrated", "return_uncertainty")
                                    if form.get(k) is not None],
                                   flags=("return_members", "calibrated", "return_uncertainty"))}
    body = _validate(PredictRequest, fields)
    return body, [await f.read() for f in files]


@router.post("/v1/ensembles/{name:path}/predict", response_model=PredictResponse, response_model_exclude_none=True,
             tags=["predict"], responses={200: _NPY_ANSWER, 404: _ERR, 406: _ERR, 413: _ERR, 422: _ERR, 503: _ERR},
             openapi_extra=_PREDICT_BODY)
async def predict(request: Request, name: str = NamePath) -> Any:
    """The ensemble's combined prediction for a batch of raw inputs (in the training data's format;
    the ensemble applies its own preprocessing): JSON, a .npy file (`content-type:
    application/x-npy`, the other fields as query parameters: `?method=vote&weights=1,0,2`), or
    for image ensembles image files. `accept: application/x-npy` answers the probabilities as a
    .npy file. Concurrent requests to one ensemble share a forward (the answers are the same)."""
    npy_answer = codec.wants_npy(request.headers.get("accept"))
    body, inputs = await _predict_body(request)
    settings = _settings(request)
    files = isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], bytes)
    _check_items(inputs, "files" if files else "inputs", settings.max_batch_items)
    for wanted in ("return_members", "return_uncertainty"):
        if npy_answer and getattr(body, wanted):
            raise ApiError(406, f"{wanted} needs a JSON answer: drop 'accept: application/x-npy'", "accept")
    store = _store(request)
    le = store.peek(name) or await run_in_threadpool(store.get, name)  # MLflow reads off the event loop
    if body.weights is not None and len(body.weights) != le.ensemble.num_members:
        raise ApiError(422, f"{len(body.weights)} weights for {le.ensemble.num_members} members", "weights")
    if files and (le.ensemble.pipeline is None or le.ensemble.pipeline.kind != "image"):
        raise ApiError(422, "this ensemble was not trained on images: send its inputs as JSON", "files")
    method = _method_used(body.method, body.weights if body.weights is not None else le.ensemble.stored_weights)
    if body.calibrated and le.ensemble.temperature is None:
        raise ApiError(422, "this ensemble has no fitted temperature (it was trained with calibration=none)",
                       "calibrated")
    options = predict_options({**body.model_dump(exclude={"inputs"}), "method": method})
    try:  # the forward runs on the ensemble's own worker thread, stacked with concurrent requests
        pred = await le.predict(inputs, options)
    except ServingError as exc:
        raise ApiError(422, str(exc), exc.field or "inputs") from None
    labels = pred.labels.tolist()
    if npy_answer:
        return codec.npy_answer(pred.probabilities, labels, {"x-model-version": le.version, "x-method": method})
    out: Dict[str, Any] = {"name": le.name, "model_version": le.version, "method": method,
                           "labels": labels, "probabilities": codec.as_float64(pred.probabilities),
                           "agreement": codec.as_float64(pred.agreement)}
    names = le.ensemble.class_names
    if names is not None:
        out["class_names"] = [names[i] for i in labels]
    if body.return_members:
        out["members"] = codec.as_float64(pred.member_probs)
    out["calibrated"] = pred.calibrated
    out.update({k: codec.as_float64(v) for k, v in (pred.uncertainty or {}).items()})
    # already plain JSON (finite floats): skip re-validating it against the response model
    return codec.json_answer(out)


# --------------------------------------------------------------------------- aggregate

# Registered after predict: for a path both match (``.../predict`` with a method neither takes), the
# first route whose path matches gives the 405's Allow header, and that must be predict's POST.
# A plain ``{name:path}`` (no custom convertor) so that Ray Serve's proxy, which matches the app's
# route patterns in a process of its own, names the route in its access lines.
router.get("/v1/ensembles/{name:path}", response_model=EnsembleInfo, response_model_exclude_none=True,
           tags=["ensembles"], responses={404: _ERR, 405: _ERR, 503: _ERR})(ensemble_info)

_AGGREGATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/AggregateRequest"}},
    codec.NPY: {**_NPY_BODY, "description": "predictions as one .npy file (numpy.save; numbers only, never "
                                            "unpickled); the other fields as query parameters"},
}}}
_THREADPOOL_ELEMENTS = 1 << 16  # larger aggregations run off the event loop


@router.post("/v1/aggregate", response_model=AggregateResponse, tags=["aggregate"],
             responses={200: _NPY_ANSWER, 413: _ERR, 422: _ERR}, openapi_extra=_AGGREGATE_BODY)
async def aggregate(request: Request) -> Any:
    """Combine member predictions the client already has (no model involved): JSON, or a .npy file
    (`content-type: application/x-npy`, the other fields as query parameters:
    `?kind=labels&num_classes=3`). `accept: application/x-npy` answers the probabilities as a .npy file."""
    settings = _settings(request)
    body, arr = await _array_body(request, AggregateRequest, "predictions", settings.max_members, "members")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ApiError(422, "no members", "predictions")
    if arr.shape[0] > settings.max_members:
        raise ApiError(422, f"{arr.shape[0]} members exceed the limit of {settings.max_members}", "predictions")
    if arr.ndim > 1 and arr.shape[1] > settings.max_batch_items:
        raise ApiError(422, f"{arr.shape[1]} items exceed the limit of {settings.max_batch_items}", "predictions")
    if arr.ndim > 2 and arr.shape[2] > settings.max_classes:
        raise ApiError(422, f"{arr.shape[2]} classes exceed the limit of {settings.max_classes}", "predictions")
    if body.num_classes is not None and body.num_classes > settings.max_classes:
        raise ApiError(422, f"{body.num_classes} exceeds the limit of {settings.max_classes}", "num_classes")
    if body.weights is not None and len(body.weights) != arr.shape[0]:
        raise ApiError(422, f"{len(body.weights)} weights for {arr.shape[0]} members", "weights")
    if body.method is None:
        method = "vote" if body.kind == "labels" else "mean"
    else:  # labels have no mean: 'mean' stays an error there, with or without weights
        method = body.method if body.kind == "labels" else _method_used(body.method, body.weights)
    expected = 2 if body.kind == "labels" else 3
    if arr.ndim != expected:
        shape = "members x batch" if expected == 2 else "members x batch x classes"
        raise ApiError(422, f"must be {expected}-D ({shape}) for kind {body.kind!r}, got shape {list(arr.shape)}",
                       "predictions")
    if arr.shape[1] == 0:
        raise ApiError(422, "empty batch (no items)", "predictions")
    t = _tensor(arr)

    def combine():
        return aggregation.aggregate(t, method=method, kind=body.kind, weights=body.weights,
                                     num_classes=body.num_classes, with_uncertainty=body.return_uncertainty)

    try:
        res = await run_in_threadpool(combine) if t.numel() > _THREADPOOL_ELEMENTS else combine()
    except aggregation.AggregationError as exc:
        raise _agg_error(exc, arr) from None
    labels = res.labels.tolist()
    if codec.wants_npy(request.headers.get("accept")):
        return codec.npy_answer(res.probabilities, labels, {"x-method": method, "x-kind": body.kind})
    return codec.json_answer({"method": method, "kind": body.kind, "labels": labels,
                              "probabilities": codec.as_float64(res.probabilities),
                              "agreement": codec.as_float64(res.agreement),
                              **{k: codec.as_float64(v) for k, v in (res.uncertainty or {}).items()}})

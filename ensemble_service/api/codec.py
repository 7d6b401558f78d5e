"""The API's transport: request bodies to NumPy arrays, answers to bytes. No torch, no FastAPI routes.

Two body formats carry the one large field of a request (predict's ``inputs``, /v1/aggregate's
``predictions``):

* **JSON** (``application/json``): parsed with orjson (the standard library's parser is the
  fallback for what orjson refuses but JSON allows, e.g. ``NaN`` tokens, so that they get the
  same field-naming 422 as before); the array is converted to NumPy in one call
  (:func:`json_array`), never element by element through pydantic. The small fields are
  validated by the route's pydantic model.
* **.npy** (``application/x-npy``, :data:`NPY`): the body is one NumPy array file; the small
  fields are query parameters. :func:`read_npy` checks the header before any data is read
  (magic, version 1.0/2.0, a numeric dtype: no object, string, structured or complex arrays,
  the batch size against the limit, and that the data length is exactly what the header says)
  and then copies the data out as that numeric dtype; nothing is ever unpickled (what
  ``numpy.load(allow_pickle=False)`` would read). A pickle, a truncated file, an object array, a
  wrong dtype or a bad header is a 422 naming the field.

Answers are JSON encoded with orjson (floats written exactly as Python's ``json`` writes them,
NumPy arrays without a detour through Python lists) or, when the request says
``Accept: application/x-npy``, the probabilities as a ``.npy`` file (float32 ``[batch, classes]``)
with the rest of the answer in headers (:func:`npy_answer`).
"""
from __future__ import annotations

import functools
import io
import json
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import orjson
from starlette.responses import Response

__all__ = ["NPY", "BodyError", "media_type", "wants_npy", "load_json", "json_array", "read_npy", "npy_bytes",
           "OrjsonResponse", "json_answer", "npy_answer", "query_fields"]

NPY = "application/x-npy"
_NUMERIC_KINDS = "iuf"  # signed and unsigned integers, floats (bool, complex, strings, objects: refused)
_MAX_HEADER = 10000     # numpy's own default for max_header_size


class BodyError(ValueError):
    """A request body that cannot be used: one line, the field at fault (a 422)."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.message, self.field = message, field


# --------------------------------------------------------------------------- content types


def media_type(content_type: Optional[str]) -> str:
    """``"application/x-npy; charset=..."`` -> ``"application/x-npy"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def wants_npy(accept: Optional[str]) -> bool:
    """Whether an ``Accept`` header asks for a .npy answer: it names application/x-npy (without
    ``q=0``) and does not prefer JSON to it."""
    if not accept or NPY not in accept.lower():
        return False
    quality: Dict[str, float] = {}
    for part in accept.lower().split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        quality[kind] = max(q, quality.get(kind, 0.0))
    npy = quality.get(NPY, 0.0)
    return npy > 0 and npy >= quality.get("application/json", 0.0)


# --------------------------------------------------------------------------- JSON


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``. orjson first; where it refuses (NaN/Infinity tokens, numbers
    beyond float64), the standard library, whose values the routes then reject with a 422 naming
    the field (e.g. "inputs contain NaN or infinite values")."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BodyError("could not be parsed as JSON", "body") from None


def json_array(value: Any, field: str) -> np.ndarray:
    """Nested JSON lists of numbers -> a NumPy array (int64 when every value is an integer, else
    float64), in one conversion. Ragged lists, strings, nulls, objects and booleans are a
    :class:`BodyError` naming ``field``."""
    if not isinstance(value, list):
        raise BodyError(f"must be an array (nested lists of numbers), got {_json_type(value)}", field)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        msg = _first(exc)
        if "inhomogeneous" in msg or "sequence" in msg:
            raise BodyError(f"is ragged: every row must have the same length ({msg})", field) from None
        raise BodyError(f"must be nested lists of numbers ({msg})", field) from None
    if arr.dtype.kind not in _NUMERIC_KINDS:
        what = {"b": "booleans", "U": "strings", "O": "mixed values, nulls or numbers out of range"}.get(
            arr.dtype.kind, str(arr.dtype))
        raise BodyError(f"must be nested lists of numbers, got {what}", field)
    return arr


def _json_type(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# --------------------------------------------------------------------------- .npy


def read_npy(body: bytes, field: str, max_rows: Optional[int] = None, row_axis: int = 0,
             row_what: str = "items") -> np.ndarray:
    """The numeric array in the .npy file ``body``, checked before its data is read.

    ``max_rows`` bounds ``shape[row_axis]`` (the batch); the header's shape and dtype must account
    for exactly the bytes that follow it. Raises :class:`BodyError` (naming ``field``) for anything
    else: not a .npy file (a pickle, JSON, garbage), an unsupported version, a malformed header, an
    object / string / structured / complex / boolean dtype, a truncated or over-long file.

    The header is parsed by NumPy's own reader (``numpy.lib.format``; parsed headers are cached,
    a client sends the same one again and again); the data is then copied out of the body as that
    numeric dtype (``numpy.frombuffer``), which cannot unpickle anything: what ``numpy.load(...,
    allow_pickle=False)`` reads, without its second parse of the header."""
    if not body:
        raise BodyError("is empty: send a .npy file (numpy.save) as the body", field)
    if body[:6] != np.lib.format.MAGIC_PREFIX:
        raise BodyError("is not a .npy file (no \\x93NUMPY magic); send numpy.save's output with "
                        f"content-type {NPY}", field)
    if len(body) < 10:
        raise BodyError("has a malformed .npy header (the body ends inside it)", field)
    version = tuple(body[6:8])
    size = 2 if version == (1, 0) else 4
    if version not in ((1, 0), (2, 0)):
        raise BodyError(f"is a .npy file of version {'.'.join(map(str, version)) or '?'}; versions 1.0 and 2.0 "
                        "are read", field)
    start = 8 + size
    header_len = int.from_bytes(body[8:start], "little")
    if len(body) < start + header_len or header_len > _MAX_HEADER:
        raise BodyError("has a malformed .npy header (truncated or over 10000 bytes)", field)
    shape, fortran, dtype = _header(bytes(body[:start + header_len]), field)
    if len(shape) <= row_axis:
        raise BodyError(f"has shape {list(shape)}; expected at least {row_axis + 1} dimension(s)", field)
    if max_rows is not None and shape[row_axis] > max_rows:
        raise BodyError(f"{shape[row_axis]} {row_what} exceed the limit of {max_rows}", field)
    count = math.prod(shape)
    expected, have = count * dtype.itemsize, len(body) - start - header_len
    if have != expected:
        what = "truncated" if have < expected else "longer than its header says"
        raise BodyError(f"is {what}: shape {list(shape)} of {dtype} needs {expected} data bytes, the body has "
                        f"{have}", field)
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=start + header_len)
    return arr.reshape(shape, order="F" if fortran else "C").copy(order="C")  # writable, C order


@functools.lru_cache(maxsize=256)
def _header(raw: bytes, field: str) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header (magic included), checked: a numeric dtype."""
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp, max_header_size=_MAX_HEADER)
    except Exception as exc:  # a header that is not a dict literal, bad descr, bad shape ...
        raise BodyError(f"has a malformed .npy header ({_first(exc)})", field) from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise BodyError(f"holds {_dtype_name(dtype)} values; only arrays of numbers are read (never objects)",
                        field)
    if dtype.kind not in _NUMERIC_KINDS:
        raise BodyError(f"holds {_dtype_name(dtype)} values; send integers or floats", field)
    return tuple(int(s) for s in shape), bool(fortran), dtype


def _dtype_name(dtype: np.dtype) -> str:
    return "object" if dtype.hasobject else ("structured" if dtype.fields is not None else str(dtype))


def npy_bytes(arr: np.ndarray) -> bytes:
    """``numpy.save``'s bytes for a numeric array (its header built once per dtype and shape)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays are not written")
    return _npy_header(arr.dtype.str, arr.shape) + arr.tobytes()


@functools.lru_cache(maxsize=256)
def _npy_header(descr: str, shape: Tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# --------------------------------------------------------------------------- answers


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # torch tensors and NumPy scalars that orjson does not take natively
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class OrjsonResponse(Response):
    """JSON via orjson. Float arrays are written as float64 (the exact value of each float32, as
    ``json.dumps(tensor.tolist())`` wrote them), so answers read back as the same numbers."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def json_answer(content: Mapping[str, Any], status_code: int = 200, headers: Optional[Mapping[str, str]] = None
                ) -> OrjsonResponse:
    return OrjsonResponse(content, status_code=status_code, headers=headers)


def as_float64(arr: Any) -> np.ndarray:
    """A float array as float64 NumPy (exact), for :class:`OrjsonResponse`."""
    a = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
    return np.ascontiguousarray(a, dtype=np.float64)


def npy_answer(probabilities: Any, labels: Sequence[int], headers: Mapping[str, str]) -> Response:
    """A .npy answer: float32 ``[batch, classes]`` probabilities in the body; the labels (which
    differ from the argmax only for tied votes) in ``x-labels`` and the rest in ``headers``."""
    arr = probabilities.numpy() if hasattr(probabilities, "numpy") else np.asarray(probabilities)
    out = {"x-labels": ",".join(map(str, labels)), **headers}
    return Response(npy_bytes(arr.astype(np.float32, copy=False)), media_type=NPY, headers=out)


# --------------------------------------------------------------------------- query parameters


def query_fields(items: Iterable[Tuple[str, str]], lists: Sequence[str] = ("weights",),
                 flags: Sequence[str] = ()) -> Dict[str, Any]:
    """Query parameters -> a dict for the route's pydantic model: ``lists`` may repeat or be
    comma-separated (``weights=1,0,2`` or ``weights=1&weights=0&weights=2``) and become lists of
    numbers; ``flags`` are booleans (true/false, 1/0, yes/no); numbers are read as numbers.
    Anything unparsable is kept as the string, for the model to reject naming the field."""
    out: Dict[str, Any] = {}
    for key, raw in items:
        if key in lists:
            values = out.setdefault(key, [])
            values.extend(_number(v.strip()) for v in raw.split(",") if v.strip())
        elif key in flags:
            low = raw.strip().lower()
            out[key] = {"1": True, "true": True, "yes": True, "on": True,
                        "0": False, "false": False, "no": False, "off": False}.get(low, raw)
        elif key in out:
            raise BodyError("is given twice", key)
        else:
            out[key] = _number(raw) if _looks_numeric(raw) else raw
    return out


def _looks_numeric(raw: str) -> bool:
    s = raw.strip().lstrip("+-")
    return bool(s) and (s[0].isdigit() or s[0] == ".")


def _number(raw: str) -> Any:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return raw
    return value if math.isfinite(value) else raw  # 'nan', 'inf': the model says "not a valid number"


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def rows_of(value: List[Any]) -> bool:
    """Whether a JSON ``inputs`` list holds table rows as ``{column: value}`` objects."""
    return bool(value) and isinstance(value[0], dict)

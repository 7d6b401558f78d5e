"""Binary bodies (issue 13): `.npy` requests (content-type application/x-npy, the other fields as query
parameters) and answers (accept: application/x-npy) on predict and /v1/aggregate, equal to the JSON
path's; every bad binary body a 4xx naming the field, never a 500, never unpickled."""
from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest

from ensemble_service import aggregation
from ensemble_service.api import Settings, create_app
from ensemble_service.api import codec
from test_api import _inputs, client, store  # noqa: F401  (fixtures)
from test_api import TestClient

NPY = {"content-type": "application/x-npy"}
PREDICT = "/v1/ensembles/alpha/versions/1/predict"


def npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def load(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def _json(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize("method", aggregation.METHODS)
def test_npy_predict_equals_json_predict(client, store, method):
    x = store["x"].numpy()  # float32 [6, 1, 8, 8]
    ref = _json(client, PREDICT, {"inputs": _inputs(store["x"]), "method": method})
    for arr in (x, x.reshape(len(x), -1), x.astype(np.float64)):  # shaped, flattened, another float dtype
        r = client.post(PREDICT, content=npy(arr), params={"method": method}, headers=NPY)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == ref  # the same numbers, to the last bit


def test_npy_integer_inputs_equal_json_integers(client):
    x = np.arange(2 * 64, dtype=np.uint8).reshape(2, 64) % 17  # digits-like raw values
    ref = _json(client, PREDICT, {"inputs": x.tolist()})
    for dtype in (np.uint8, np.int16, np.int64, np.float32):
        r = client.post(PREDICT, content=npy(x.astype(dtype)), headers=NPY)
        assert r.status_code == 200 and r.json() == ref, (dtype, r.text)


def test_npy_predict_query_fields(client, store):
    x = store["x"].numpy()
    ref = _json(client, PREDICT, {"inputs": _inputs(store["x"]), "method": "vote", "weights": [1, 0, 2],
                                  "return_members": True})
    for query in ("method=vote&weights=1,0,2&return_members=true",
                  "method=vote&weights=1&weights=0&weights=2&return_members=1"):
        r = client.post(f"{PREDICT}?{query}", content=npy(x), headers=NPY)
        assert r.status_code == 200, r.text
        assert r.json() == ref
    assert ref["method"] == "vote" and len(ref["members"]) == 3


def test_npy_answer(client, store):
    x = store["x"].numpy()
    for method in ("mean", "vote"):
        ref = _json(client, PREDICT, {"inputs": _inputs(store["x"]), "method": method})
        for body, headers in ((npy(x), {**NPY, "accept": "application/x-npy"}),          # binary both ways
                              (json.dumps({"inputs": _inputs(store["x"]), "method": method}).encode(),
                               {"content-type": "application/json", "accept": "application/x-npy"})):
            r = client.post(PREDICT, content=body, params={"method": method} if body[:1] != b"{" else None,
                            headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/x-npy"
            probs = load(r.content)
            assert probs.dtype == np.float32 and probs.shape == (len(x), 3)
            np.testing.assert_array_equal(probs, np.asarray(ref["probabilities"], dtype=np.float32))
            assert [int(v) for v in r.headers["x-labels"].split(",")] == ref["labels"]
            assert (r.headers["x-model-version"], r.headers["x-method"]) == ("1", method)


def test_accept_header_negotiation():
    assert codec.wants_npy("application/x-npy")
    assert codec.wants_npy("application/json;q=0.5, application/x-npy")
    assert not codec.wants_npy("application/json, application/x-npy;q=0.5")
    assert not codec.wants_npy("application/x-npy;q=0")
    assert not codec.wants_npy("*/*") and not codec.wants_npy(None)


def test_npy_answer_with_members_is_406(client, store):
    r = client.post(PREDICT, params={"return_members": "true"}, content=npy(store["x"].numpy()),
                    headers={**NPY, "accept": "application/x-npy"})
    assert r.status_code == 406 and r.json()["field"] == "accept"


# --------------------------------------------------------------------------- aggregate


def test_npy_aggregate_equals_json(client):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 7, 5)).astype(np.float32) * 2
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    labels = rng.integers(0, 3, size=(4, 9))
    cases = [(p, {"kind": "probs", "method": "vote"}), (z, {"kind": "logits", "method": "logit_mean"}),
             (z, {"kind": "logits", "weights": [1, 2, 3, 4]}), (labels, {"kind": "labels", "num_classes": 3})]
    for arr, fields in cases:
        ref = _json(client, "/v1/aggregate", {"predictions": arr.tolist(), **fields})
        params = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in fields.items()}
        r = client.post("/v1/aggregate", content=npy(arr), params=params, headers=NPY)
        assert r.status_code == 200, r.text
        assert r.json() == ref
        r = client.post("/v1/aggregate", content=npy(arr), params=params, headers={**NPY, "accept": "application/x-npy"})
        assert r.status_code == 200 and r.headers["x-method"] == ref["method"] and r.headers["x-kind"] == fields["kind"]
        np.testing.assert_array_equal(load(r.content), np.asarray(ref["probabilities"], dtype=np.float32))


# --------------------------------------------------------------------------- bad binary bodies


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/nonexistent/x')}",))


def _truncated() -> bytes:
    return npy(np.zeros((2, 64), np.float32))[:-5]


def _v3() -> bytes:
    raw = bytearray(npy(np.zeros((1, 64), np.float32)))
    raw[6:8] = b"\x03\x00"  # version 3.0 (a 4-byte header length follows in real v3 files)
    return bytes(raw)


GOOD = np.full((1, 64), 0.5, np.float32)
BAD_BODIES = [
    # (name, body, query, field, fragment)
    ("bool", npy(np.ones((1, 64), bool)), "", "inputs", "bool"),
    ("complex", npy(np.ones((1, 64), np.complex64)), "", "inputs", "complex64"),
    ("strings", npy(np.array([["a"] * 64])), "", "inputs", "<U1"),
    ("structured", npy(np.zeros((1, 64), dtype=[("a", "f4"), ("b", "i4")])), "", "inputs", "structured"),
    ("object array", npy(np.array([[1.0, "x"]], dtype=object), allow_pickle=True), "", "inputs", "object"),
    ("object array of Evil", npy(np.array([Evil()], dtype=object), allow_pickle=True), "", "inputs", "object"),
    ("pickle", pickle.dumps(Evil()), "", "inputs", "not a .npy file"),
    ("pickle of an array", pickle.dumps(GOOD), "", "inputs", "not a .npy file"),
    ("json", json.dumps({"inputs": GOOD.tolist()}).encode(), "", "inputs", "not a .npy file"),
    ("empty", b"", "", "inputs", "empty"),
    ("magic only", b"\x93NUMPY", "", "inputs", "malformed"),
    ("truncated", _truncated(), "", "inputs", "truncated"),
    ("too long", npy(GOOD) + b"\x00" * 8, "", "inputs", "longer than its header"),
    ("bad header", b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4'}  \n", "", "inputs", "malformed"),
    ("version 3", _v3(), "", "inputs", "version 3.0"),
    ("wrong shape", npy(np.zeros((2, 5), np.float32)), "", "inputs", "shape [2, 5]"),
    ("wrong rank", npy(np.zeros((1, 1, 64), np.float32)), "", "inputs", "shape [1, 1, 64]"),
    ("scalar", npy(np.float32(1.0)), "", "inputs", "dimension"),
    ("empty batch", npy(np.zeros((0, 64), np.float32)), "", "inputs", "empty batch"),
    ("nan", npy(np.full((1, 64), np.nan, np.float32)), "", "inputs", "NaN"),
    ("float64 beyond float32", npy(np.full((1, 64), 1e300)), "", "inputs", "beyond float32's range"),
    ("unknown method", npy(GOOD), "method=median", "method", ""),
    ("unknown field", npy(GOOD), "extra=1", "extra", ""),
    ("nan weight", npy(GOOD), "weights=nan,1,1", "weights.0", ""),
    ("negative weight", npy(GOOD), "weights=1,-1,1", "weights", "non-negative"),
    ("weights count", npy(GOOD), "weights=1,1", "weights", "2 weights for 3 members"),
    ("bad flag", npy(GOOD), "return_members=maybe", "return_members", ""),
    ("repeated field", npy(GOOD), "method=mean&method=vote", "method", "twice"),
]


@pytest.mark.parametrize("name, body, query, field, fragment", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_npy_predict_bodies_are_422_naming_the_field(client, store, tmp_path, monkeypatch, name, body, query,
                                                         field, fragment):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    if "Evil" in name or name == "pickle":  # built with this test's marker path
        body = pickle.dumps(Evil()) if name == "pickle" else npy(np.array([Evil()], dtype=object), allow_pickle=True)
    r = client.post(f"{PREDICT}?{query}" if query else PREDICT, content=body, headers=NPY)
    assert r.status_code == 422, (name, r.status_code, r.text)
    err = r.json()
    assert err["field"] == field and err["detail"].startswith(field.split(".")[0]), err
    assert fragment in err["detail"], err
    assert not marker.exists()  # nothing was unpickled
    ok = client.post(PREDICT, content=npy(store["x"].numpy()), headers=NPY)  # the next request is served
    assert ok.status_code == 200


@pytest.mark.parametrize("arr, query, field, fragment", [
    (np.zeros((2, 3), np.float32), "kind=probs", "predictions", "3-D"),
    (np.array([[[0.5, 0.6]]], np.float32), "", "predictions", "sum"),
    (np.zeros((2, 3), bool), "kind=labels&num_classes=2", "predictions", "bool"),
    (np.array([[0, 5]]), "kind=labels&num_classes=3", "predictions", ""),
    (np.array([[0, 1]]), "kind=labels", "num_classes", ""),
    (np.full((1, 1, 2), 0.5, np.float32), "weights=1,2", "weights", "2 weights for 1 members"),
    (np.full((1, 1, 2), 0.5, np.float32), "kind=votes", "kind", ""),
    (np.full((65, 1, 2), 0.5, np.float32), "", "predictions", "65 members exceed the limit of 64"),
])
def test_bad_npy_aggregate_bodies_are_422(client, arr, query, field, fragment):
    r = client.post(f"/v1/aggregate?{query}", content=npy(arr), headers=NPY)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and fragment in r.json()["detail"], r.json()


def test_npy_limits(store):
    settings = Settings(max_batch_items=4, max_body_bytes=64 * 1024, alias_ttl_s=0)
    with TestClient(create_app(store["uri"], settings)) as c:
        r = c.post("/v1/ensembles/alpha/predict", content=npy(np.zeros((5, 64), np.float32)), headers=NPY)
        assert r.status_code == 422 and "5 items exceed the limit of 4" in r.json()["detail"]
        assert c.post("/v1/ensembles/alpha/predict", content=npy(np.zeros((4, 64), np.float32)),
                      headers=NPY).status_code == 200
        # over the body limit: 413 from Content-Length, before anything is parsed
        r = c.post("/v1/ensembles/alpha/predict", content=npy(np.zeros((300, 64), np.float32)), headers=NPY)
        assert r.status_code == 413 and r.json()["field"] == "body"
        # a header claiming a huge array: refused from the header, nothing allocated
        raw = npy(np.zeros((1, 64), np.float32)).replace(b"(1, 64)", b"(3, 64)")
        r = c.post("/v1/ensembles/alpha/predict", content=raw, headers=NPY)
        assert r.status_code == 422 and "truncated" in r.json()["detail"]


def test_read_npy_never_calls_pickle(monkeypatch):
    """The reader refuses object arrays from the header: pickle is never reached."""
    def boom(*a, **k):
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    with pytest.raises(codec.BodyError, match="object"):
        codec.read_npy(npy(np.array([1, "x"], dtype=object), allow_pickle=True), "inputs")
    np.testing.assert_array_equal(codec.read_npy(npy(GOOD), "inputs"), GOOD)


def test_json_arrays_are_parsed_without_per_element_validation():
    assert codec.json_array([[1, 2], [3, 4]], "x").dtype == np.int64
    assert codec.json_array([[1, 2.5]], "x").dtype == np.float64
    for bad, fragment in (([[1, 2], [3]], "ragged"), ([["a", 1]], "strings"), ([[None, 1]], "nulls"),
                          ([[True, False]], "booleans"), (5, "got a number"), ({"a": 1}, "got an object")):
        with pytest.raises(codec.BodyError, match=fragment):
            codec.json_array(bad, "x")
    assert codec.load_json(b'{"a": NaN}')["a"] != codec.load_json(b'{"a": NaN}')["a"]  # NaN kept, refused later
    with pytest.raises(codec.BodyError, match="could not be parsed as JSON"):
        codec.load_json(b"\x80\x04garbage")


def test_json_answers_write_floats_as_json_dumps_did(client, store):
    r = client.post(PREDICT, json={"inputs": _inputs(store["x"]), "return_members": True})
    body = json.loads(r.content)
    assert json.loads(json.dumps(body)) == body  # plain JSON numbers
    x32 = np.asarray(body["probabilities"], dtype=np.float32)
    assert np.asarray(x32, dtype=np.float64).tolist() == body["probabilities"]  # each is a float32's exact value


def test_the_predict_fast_path_answers_as_the_routed_endpoint(store):
    """PredictFastPath skips FastAPI's routing for POST .../predict: every answer (good, bad, unknown
    name, wrong method, bad binary body) must be byte for byte the routed endpoint's."""
    from ensemble_service.api.app import PredictFastPath

    fast = create_app(store["uri"], Settings(alias_ttl_s=60))
    routed = create_app(store["uri"], Settings(alias_ttl_s=60))
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not PredictFastPath]
    x = store["x"]
    cases = [
        ("POST", PREDICT, {"json": {"inputs": _inputs(x), "method": "vote", "return_members": True}}),
        ("POST", "/v1/ensembles/alpha/predict", {"content": npy(x.numpy()), "headers": NPY,
                                                 "params": {"weights": "1,2,3"}}),
        ("POST", PREDICT, {"content": npy(x.numpy()), "headers": {**NPY, "accept": "application/x-npy"}}),
        ("POST", PREDICT, {"content": npy(x.numpy())[:-3], "headers": NPY}),
        ("POST", PREDICT, {"json": {"inputs": _inputs(x), "method": "median"}}),
        ("POST", PREDICT, {"json": {"inputs": [[0.5] * 63]}}),
        ("POST", PREDICT, {"content": b"{", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/ensembles/nope/predict", {"json": {"inputs": _inputs(x)}}),
        ("POST", "/v1/ensembles//predict", {"json": {"inputs": _inputs(x)}}),
        ("GET", PREDICT, {}),
        ("POST", "/v1/aggregate", {"json": {"predictions": [[[0.5, 0.5]]]}}),
    ]
    with TestClient(fast) as a, TestClient(routed) as b:
        for method, path, kw in cases:
            ra, rb = a.request(method, path, **kw), b.request(method, path, **kw)
            assert (ra.status_code, ra.content) == (rb.status_code, rb.content), (path, kw.get("json"), ra.text)
            assert ra.headers.get("content-type") == rb.headers.get("content-type")


@pytest.mark.slow
def test_predict_command_sends_npy_files_as_binary(store, tmp_path, monkeypatch):
    """`ensemble predict NAME FILE.npy` sends the file as a .npy body (not JSON) and prints the labels."""
    import threading
    import time

    import uvicorn
    from typer.testing import CliRunner

    from ensemble_service.cli import app as cli
    from test_api import _free_port

    seen = []
    read = codec.read_npy
    monkeypatch.setattr(codec, "read_npy", lambda body, *a, **k: seen.append(len(body)) or read(body, *a, **k))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store["uri"], Settings(preload=True)), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        x = store["x"].numpy()
        np.save(tmp_path / "x.npy", np.asfortranarray(x.reshape(len(x), -1)))
        r = CliRunner().invoke(cli, ["predict", "alpha", str(tmp_path / "x.npy"), "--method", "vote",
                                     "--url", f"http://127.0.0.1:{port}", "--json"])
        assert r.exit_code == 0, r.output
        assert len(seen) == 1  # the body was a .npy file
        from test_api import _ensemble
        ref = _ensemble(store["results"]).predict(store["x"], "vote")
        assert json.loads(r.output)["labels"] == ref.labels.tolist() and json.loads(r.output)["method"] == "vote"
        np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
        r = CliRunner().invoke(cli, ["predict", "alpha", str(tmp_path / "bad.npy"), "--url", f"http://127.0.0.1:{port}"])
        assert r.exit_code == 2 and "422" in r.output and "inputs" in r.output
    finally:
        server.should_exit = True
        thread.join(10)


def test_npy_answers_are_numpy_save_bytes():
    for arr in (np.random.default_rng(0).random((3, 4)).astype(np.float32), np.arange(5), np.zeros((0, 2)),
                np.asfortranarray(np.ones((3, 2)))):
        assert codec.npy_bytes(arr) == npy(np.ascontiguousarray(arr))

"""The HTTP API: routes through FastAPI's test client, every bad request, a real uvicorn server,
the `ensemble predict` client, and a bounded schemathesis run against the OpenAPI schema."""
from __future__ import annotations

import json
import os
import pickle
import socket
import threading
import time

import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from ensemble_service import aggregation, registry, tracking
from ensemble_service.api import Settings, create_app
from ensemble_service.artifact import member_record
from ensemble_service.serving import Ensemble
from test_serving import blob_of, close, finished_parent, infos, loop_logits, synthetic_data, train_members

MLP = {"name": "mlp", "width": 16, "depth": 1}
PARENT_METRICS = {"ensemble_mean_test_acc": 0.8, "ensemble_vote_test_acc": 0.75, "disagreement": 0.2,
                  "wall_seconds": 3.0}


def _parent(uri: str) -> str:
    return finished_parent(uri, "api", PARENT_METRICS)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    uri = f"sqlite:///{tmp}/mlflow.db"
    results = train_members(tmp, [MLP, MLP, {"name": "lenet"}])
    registry.register_ensemble(uri, _parent(uri), "alpha", [r.weights for r in results], infos(results), "independent")
    mc = blob_of("mlp", 0, dropout=0.5)
    mc_info = [{"index": s, "architecture": "mlp", "extra": {"role": "mc_sample", "sample": s, "sample_seed": 10 + s}}
               for s in range(3)]
    registry.register_ensemble(uri, _parent(uri), "mc", [mc] * 3, mc_info, "mc_dropout")
    x = synthetic_data().x_test[:6]
    return {"uri": uri, "tmp": tmp, "results": results, "x": x}


@pytest.fixture(scope="module")
def client(store):
    app = create_app(store["uri"], Settings(alias_ttl_s=0.0))
    with TestClient(app) as c:
        yield c


def _inputs(x: torch.Tensor, flat: bool = True):
    return (x.reshape(len(x), -1) if flat else x).tolist()



def _ensemble(results) -> Ensemble:
    return Ensemble.from_blobs([r.weights for r in results], [member_record(**i) for i in infos(results)])


# --------------------------------------------------------------------------- routes


def test_healthz(client, store):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["tracking_uri"] == store["uri"]


def test_list_ensembles(client):
    r = client.get("/v1/ensembles")
    assert r.status_code == 200
    by_name = {e["name"]: e for e in r.json()["ensembles"]}
    assert {"alpha", "mc"} <= set(by_name)
    alpha = by_name["alpha"]
    assert alpha["aliases"]["latest"] == alpha["latest_version"]
    assert alpha["versions"][0]["members"] == 3 and alpha["versions"][0]["strategy"] == "independent"


def test_ensemble_info(client, store):
    r = client.get("/v1/ensembles/alpha/versions/1")
    assert r.status_code == 200
    info = r.json()
    assert info["name"] == "alpha" and info["version"] == "1" and info["strategy"] == "independent"
    assert info["num_members"] == 3 and info["num_classes"] == 3 and info["input_shape"] == [1, 8, 8]
    assert info["architectures"] == {"mlp": 2, "lenet": 1}
    assert [m["architecture"] for m in info["members"]] == ["mlp", "mlp", "lenet"]
    assert info["members"][0]["metrics"]["val_acc"] == store["results"][0].metrics["val_acc"]
    assert {"kind": "stacked", "architecture": "mlp", "members": [0, 1]} in info["groups"]
    assert info["metrics"] == {k: v for k, v in PARENT_METRICS.items() if k != "wall_seconds"}
    assert set(info["methods"]) == set(aggregation.METHODS)
    mc = client.get("/v1/ensembles/mc").json()
    assert mc["groups"] == [{"kind": "mc_dropout", "architecture": "mlp", "members": [0, 1, 2]}]
    assert [m["sample_seed"] for m in mc["members"]] == [10, 11, 12]


@pytest.mark.parametrize("method", aggregation.METHODS)
def test_predict_equals_library_and_in_process_ensemble(client, store, method):
    x, results = store["x"], store["results"]
    r = client.post("/v1/ensembles/alpha/versions/1/predict", json={"inputs": _inputs(x), "method": method})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1" and body["name"] == "alpha" and "members" not in body
    # the same code in-process (equal up to float32 rounding: BLAS may pick another kernel per call)
    pred = _ensemble(results).predict(x, method)
    assert body["labels"] == pred.labels.tolist()
    close(body["probabilities"], pred.probabilities)
    assert body["agreement"] == pred.agreement.tolist()
    # the library's aggregation over a plain loop of member forwards
    z = loop_logits([r.weights for r in results], x)
    w = aggregation.weights_from_accuracy([r.metrics["val_acc"] for r in results]) if method == "weighted" else None
    ref = aggregation.aggregate(z, method=method, kind="logits", weights=w)
    assert body["labels"] == ref.labels.tolist()
    np.testing.assert_allclose(body["probabilities"], ref.probabilities.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["agreement"], ref.agreement.numpy())


def test_predict_mean_equals_pyfunc(client, store):
    import mlflow.pyfunc

    x = store["x"]
    os.environ["MLFLOW_TRACKING_URI"] = store["uri"]
    try:
        model = mlflow.pyfunc.load_model("models:/alpha/1")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    body = client.post("/v1/ensembles/alpha/versions/1/predict", json={"inputs": _inputs(x, flat=False)}).json()
    close(body["probabilities"], model.predict(x.numpy()))


def test_predict_return_members_and_agreement(client, store):
    x = store["x"]
    body = client.post("/v1/ensembles/alpha/versions/1/predict",
                       json={"inputs": _inputs(x), "method": "vote", "return_members": True}).json()
    members = np.array(body["members"])
    assert members.shape == (3, len(x), 3)
    np.testing.assert_allclose(members.sum(-1), 1.0, rtol=1e-5)
    member_labels = members.argmax(-1)
    np.testing.assert_allclose(body["agreement"], (member_labels == np.array(body["labels"])).mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.array(body["probabilities"]).sum(-1), 1.0, rtol=1e-6)  # vote shares


def test_predict_with_explicit_weights(client, store):
    x = store["x"]
    body = client.post("/v1/ensembles/alpha/versions/1/predict",
                       json={"inputs": _inputs(x), "method": "mean", "weights": [1, 0, 2]}).json()
    ref = _ensemble(store["results"]).predict(x, "mean", weights=[1, 0, 2])
    close(body["probabilities"], ref.probabilities)


def test_predict_member_logits_whose_mean_overflows_float32(store):
    # two identical members whose logits lie in (F32_MAX / 2, F32_MAX): finite each, but their float32
    # sum overflows; every method must still answer 200 with finite numbers (logit_mean used to 500)
    from ensemble_service.models import create_model
    from ensemble_service.artifact import member_blob

    torch.manual_seed(3)
    model = create_model("mlp", (1, 8, 8), 3, width=16, depth=1)
    with torch.no_grad():  # a gain of ~1e3 (not ~0.06): inputs within float32 reach logits near its limit
        [*model.modules()][-1].weight.mul_(1e4)
    uri, blob = store["uri"], member_blob({"name": "mlp", "width": 16, "depth": 1}, (1, 8, 8), 3, model)
    registry.register_ensemble(uri, _parent(uri), "twin", [blob, blob], [{"index": i} for i in range(2)],
                               "independent")
    x0 = store["x"][:2]
    scale = 0.75 * F32_MAX / float(loop_logits([blob], x0).max())  # the largest positive logit -> 0.75 max
    x = x0 * scale
    z = loop_logits([blob], x)[0]
    assert F32_MAX / 2 < float(z.max()) < F32_MAX and bool(torch.isfinite(z).all()) and bool(torch.isfinite(x).all())
    assert float(torch.stack([z, z]).sum(0).max()) == float("inf")  # the float32 sum overflows
    with TestClient(create_app(uri, Settings())) as c:
        for method in aggregation.METHODS:
            for weights in (None, [1, 3]):
                r = c.post("/v1/ensembles/twin/predict", json={"inputs": _inputs(x), "method": method,
                                                               "weights": weights, "return_members": True})
                assert r.status_code == 200, (method, weights, r.text)
                out = _strict_json(r)
                assert out["labels"] == z.argmax(-1).tolist() and out["agreement"] == [1.0] * len(x)
                np.testing.assert_allclose(np.sum(out["probabilities"], -1), 1.0, rtol=1e-6)
                if method == "logit_mean":  # the mean of two equal logits is those logits
                    np.testing.assert_allclose(out["probabilities"], torch.softmax(z.double(), -1).numpy(),
                                               atol=1e-7)


def test_a_weighted_ensemble_answers_with_its_own_weights(store):
    # a selection (ensemble select) registers its pick shares as weights: every method uses them
    uri, results = store["uri"], store["results"]
    own = [0.5, 0.0, 0.5]
    registry.register_ensemble(uri, _parent(uri), "picked", [r.weights for r in results],
                               [{**i, "weight": w} for i, w in zip(infos(results), own)], "selection")
    x = store["x"]
    with TestClient(create_app(uri, Settings())) as c:
        info = c.get("/v1/ensembles/picked").json()
        assert [m["weight"] for m in info["members"]] == own
        r = c.post("/v1/ensembles/picked/predict", json={"inputs": _inputs(x)})
        assert r.status_code == 200 and r.json()["method"] == "weighted"
        close(r.json()["probabilities"], _ensemble(results).predict(x, "mean", weights=own).probabilities)
        r = c.post("/v1/ensembles/picked/predict", json={"inputs": _inputs(x), "method": "vote"})
        close(r.json()["probabilities"], _ensemble(results).predict(x, "vote", weights=own).probabilities)
        r = c.post("/v1/ensembles/picked/predict", json={"inputs": _inputs(x), "weights": [1, 1, 1]})
        close(r.json()["probabilities"], _ensemble(results).predict(x, "mean").probabilities)
    with pytest.raises(tracking.TrackingError, match="a weight for every member or for none"):
        registry.register_ensemble(uri, _parent(uri), "half", [r.weights for r in results[:2]],
                                   [{**infos(results)[0], "weight": 1.0}, infos(results)[1]], "selection")


def test_mc_dropout_ensemble_is_deterministic_over_http(client, store):
    inputs = _inputs(store["x"])
    a = client.post("/v1/ensembles/mc/predict", json={"inputs": inputs, "return_members": True}).json()
    b = client.post("/v1/ensembles/mc/predict", json={"inputs": inputs, "return_members": True}).json()
    assert a["labels"] == b["labels"]  # the same seeded dropout masks on every request
    close(a["members"], b["members"])
    close(a["probabilities"], b["probabilities"])
    assert not np.allclose(a["members"][0], a["members"][1])  # but different masks per member


def test_name_forms_and_alias_moves(store):
    uri = store["uri"]
    app = create_app(uri, Settings(alias_ttl_s=0.0))
    with TestClient(app) as c:
        inputs = _inputs(store["x"])
        registry.register_ensemble(uri, _parent(uri), "beta", [blob_of("mlp", s) for s in range(2)],
                                   [{"index": i} for i in range(2)], "independent")
        assert c.post("/v1/ensembles/beta/predict", json={"inputs": inputs}).json()["model_version"] == "1"
        assert c.post("/v1/ensembles/beta@latest/predict", json={"inputs": inputs}).json()["model_version"] == "1"
        loads = app.state.store.loads
        for _ in range(3):  # cached: no reload
            c.post("/v1/ensembles/beta/predict", json={"inputs": inputs})
        assert app.state.store.loads == loads
        registry.register_ensemble(uri, _parent(uri), "beta", [blob_of("mlp", s) for s in range(5, 9)],
                                   [{"index": i} for i in range(4)], "independent")
        moved = c.post("/v1/ensembles/beta/predict", json={"inputs": inputs, "return_members": True}).json()
        assert moved["model_version"] == "2" and len(moved["members"]) == 4
        assert c.post("/v1/ensembles/beta/versions/1/predict", json={"inputs": inputs}).json()["model_version"] == "1"
        tracking.client_for(uri).set_registered_model_alias("beta", "champion", "1")
        assert c.post("/v1/ensembles/beta@champion/predict", json={"inputs": inputs}).json()["model_version"] == "1"
        tracking.client_for(uri).set_registered_model_alias("beta", "champion", "2")
        assert c.post("/v1/ensembles/beta@champion/predict", json={"inputs": inputs}).json()["model_version"] == "2"
        assert c.get("/v1/ensembles/beta@champion").json()["aliases"] == ["champion", "latest"]
        assert app.state.store.loads == loads + 1  # each version loaded once


def test_alias_resolution_is_cached_for_the_ttl(store, monkeypatch):
    app = create_app(store["uri"], Settings(alias_ttl_s=3600))
    with TestClient(app) as c:
        assert c.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(store["x"])}).status_code == 200
        calls = []
        original = registry.resolve_ensemble
        monkeypatch.setattr(registry, "resolve_ensemble", lambda *a: calls.append(a) or original(*a))
        assert c.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(store["x"])}).status_code == 200
        assert calls == []
        assert c.post("/v1/ensembles/alpha@latest/predict", json={"inputs": _inputs(store["x"])}).status_code == 200
        assert len(calls) == 1  # another spelling is resolved once, then served from the cache


def test_an_expired_alias_is_looked_up_once_under_load(store, monkeypatch):
    """When the TTL runs out while many requests are in flight, one of them looks the name up again;
    the others are answered from the previous resolution meanwhile (they used to all query the
    tracking store at once: 30% of a loaded server's time, and its p99)."""
    app = create_app(store["uri"], Settings(alias_ttl_s=0.2))
    st = app.state.store
    st.get("alpha")
    calls, release = [], threading.Event()
    original = registry.resolve_ensemble

    def slow(*a):
        calls.append(a)
        assert release.wait(10)
        return original(*a)

    monkeypatch.setattr(registry, "resolve_ensemble", slow)
    time.sleep(0.25)  # expired
    first = threading.Thread(target=st.resolve, args=("alpha",))
    first.start()
    while not calls:
        time.sleep(0.01)
    others = [st.get("alpha").version for _ in range(20)]  # while the lookup is in flight
    assert st.peek("alpha") is not None
    release.set()
    first.join(10)
    assert len(calls) == 1 and others == ["1"] * 20
    time.sleep(0.25)
    release.set()
    assert st.peek("alpha") is None  # expired again and nobody is looking it up: the next request does


# --------------------------------------------------------------------------- aggregate


def _agg(client, body):
    r = client.post("/v1/aggregate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("method", aggregation.METHODS)
@pytest.mark.parametrize("weighted", [False, True])
def test_aggregate_equals_library(client, kind, method, weighted):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, 5, generator=g) * 2
    preds = (z.softmax(-1) if kind == "probs" else z).tolist()
    weights = [0.1, 0.5, 0.2, 0.2] if weighted or method == "weighted" else None
    body = _agg(client, {"predictions": preds, "kind": kind, "method": method, "weights": weights})
    ref = aggregation.aggregate(preds, method=method, kind=kind, weights=weights)
    assert body["labels"] == ref.labels.tolist()
    assert body["probabilities"] == ref.probabilities.tolist()
    assert body["agreement"] == ref.agreement.tolist()
    assert (body["kind"], body["method"]) == (kind, "weighted" if method == "mean" and weights else method)


@pytest.mark.parametrize("method, weights", [("vote", None), ("weighted", [3, 1, 1, 1])])
def test_aggregate_labels_equals_library(client, method, weights):
    labels = [[0, 2, 1, 1], [2, 2, 0, 1], [1, 0, 0, 2], [1, 2, 0, 0]]
    body = _agg(client, {"predictions": labels, "kind": "labels", "method": method, "weights": weights,
                         "num_classes": 3})
    ref = aggregation.aggregate(labels, method=method, kind="labels", weights=weights, num_classes=3)
    assert body["labels"] == ref.labels.tolist()
    assert body["probabilities"] == ref.probabilities.tolist()
    assert body["agreement"] == ref.agreement.tolist()


def test_aggregate_vote_tie_rule(client):
    # two votes each for classes 0 and 1: the tied class with the higher mean probability (1) wins
    probs = [[[0.6, 0.4, 0.0]], [[0.51, 0.49, 0.0]], [[0.1, 0.9, 0.0]], [[0.2, 0.8, 0.0]]]
    body = _agg(client, {"predictions": probs, "kind": "probs", "method": "vote"})
    assert body["labels"] == [1] and body["probabilities"] == [[0.5, 0.5, 0.0]] and body["agreement"] == [0.5]
    # labels only: the lowest tied class wins
    body = _agg(client, {"predictions": [[2], [1], [1], [2]], "kind": "labels", "method": "vote", "num_classes": 3})
    assert body["labels"] == [1]


def _strict_json(r):
    """The answer's JSON, refusing NaN / Infinity (which Python's json would otherwise accept)."""
    def refuse(token):
        raise AssertionError(f"non-finite number {token} in {r.text[:200]}")
    return json.loads(r.text, parse_constant=refuse)


def test_aggregate_logits_whose_mean_overflows_float32(client):
    # issue #10: the float32 sum 3e38 + 3e38 is inf; the mean (3e38, 0) softmaxes to (1, 0)
    r = client.post("/v1/aggregate", json={"predictions": [[[3e38, 0]], [[3e38, 0]]], "kind": "logits",
                                           "method": "logit_mean"})
    assert r.status_code == 200, r.text
    assert _strict_json(r) == {"method": "logit_mean", "kind": "logits", "labels": [0],
                               "probabilities": [[1.0, 0.0]], "agreement": [1.0]}


F32_MAX = float(torch.finfo(torch.float32).max)
EXTREME_PREDICTIONS = {
    "probs": [[[1.0, 1e-45, 0.0]], [[1e-45, 1.0, 0.0]], [[0.0, 1e-38, 1.0]]],
    "logits": [[[3e38, -3e38, 0.0]], [[F32_MAX, -F32_MAX, 1e-45]], [[-3e38, 3e38, 3e38]]],
    "labels": [[0], [1], [2]],
}
EXTREME_WEIGHTS = [None, [1, 1, 1], [1e308, 1e308, 1e-300], [0, 0, 1e-300], [1e39, 3e39, 0]]


@pytest.mark.parametrize("kind", sorted(EXTREME_PREDICTIONS))
@pytest.mark.parametrize("method", aggregation.METHODS)
@pytest.mark.parametrize("weights", EXTREME_WEIGHTS, ids=[str(w) for w in EXTREME_WEIGHTS])
def test_aggregate_extreme_values_give_finite_answers(client, kind, method, weights):
    body = {"predictions": EXTREME_PREDICTIONS[kind], "kind": kind, "method": method, "weights": weights,
            "num_classes": 3}
    r = client.post("/v1/aggregate", json=body)
    if method in ("mean", "logit_mean") and kind == "labels":
        assert r.status_code == 422 and r.json()["field"] == "method", r.text  # labels have no probabilities
        return
    if method == "weighted" and weights is None:
        assert r.status_code == 422 and r.json()["field"] == "method", r.text
        return
    assert r.status_code == 200, r.text
    out = _strict_json(r)
    np.testing.assert_allclose(np.sum(out["probabilities"], -1), 1.0, rtol=1e-6)
    assert all(0.0 <= p <= 1.0 for row in out["probabilities"] for p in row)
    if weights == [0, 0, 1e-300]:  # only the last member counts
        assert out["labels"] == [1 if kind == "logits" else 2]  # 1: the lowest of its tied 3e38 logits


def test_aggregate_any_finite_numbers_give_200_or_422(client):
    """Hypothesis over every kind, method and weighting with finite JSON numbers of any size (float64's
    range, subnormals, float32's limit): a 200 with finite probabilities summing to 1, or a 422."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    number = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(
        [F32_MAX, -F32_MAX, 3e38, -3e38, 1.7e38, 1e-45, 1e-300, 0.0, 1.0]))

    @st.composite
    def requests(draw):
        kind = draw(st.sampled_from(["probs", "logits", "labels"]))
        m, b, c = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
        if kind == "labels":
            preds = draw(st.lists(st.lists(st.integers(0, c - 1), min_size=b, max_size=b), min_size=m, max_size=m))
        elif kind == "probs" and draw(st.booleans()):  # valid probabilities, some near 0 / 1
            raw = draw(st.lists(st.lists(st.lists(st.floats(0, 1), min_size=c, max_size=c), min_size=b, max_size=b),
                                min_size=m, max_size=m))
            preds = [[[v / sum(row) if sum(row) > 0 else 1 / c for v in row] for row in item] for item in raw]
        else:
            preds = draw(st.lists(st.lists(st.lists(number, min_size=c, max_size=c), min_size=b, max_size=b),
                                  min_size=m, max_size=m))
        body = {"predictions": preds, "kind": kind, "num_classes": c}
        method = draw(st.sampled_from([None, *aggregation.METHODS]))
        if method is not None:
            body["method"] = method
        if draw(st.booleans()):
            body["weights"] = draw(st.lists(st.one_of(st.floats(0, 1.7e308), st.just(1e-300)), min_size=m, max_size=m))
        return body

    @given(body=requests())
    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(body):
        r = client.post("/v1/aggregate", json=body)
        assert r.status_code in (200, 422), (body, r.status_code, r.text)
        if r.status_code == 200:
            out = _strict_json(r)
            np.testing.assert_allclose(np.sum(out["probabilities"], -1), 1.0, rtol=1e-5)
        else:
            assert r.json()["field"] in ("predictions", "weights", "method", "num_classes"), r.text

    check()


def test_huge_weights_keep_their_ratios(client):
    # finite JSON weights beyond float32's range used to be rounded to inf and rejected as "infinite"
    probs = [[[0.6, 0.4]], [[0.2, 0.8]]]
    body = _agg(client, {"predictions": probs, "method": "weighted", "weights": [1e39, 3e39]})
    np.testing.assert_allclose(body["probabilities"], [[0.25 * 0.6 + 0.75 * 0.2, 0.25 * 0.4 + 0.75 * 0.8]],
                               rtol=1e-6)


def test_mean_with_weights_is_answered_as_weighted(client, store):
    # issue #10: 'mean' with weights computes the weighted mean; the answer says so
    probs = [[[0.6, 0.4]], [[0.2, 0.8]]]
    body = _agg(client, {"predictions": probs, "method": "mean", "weights": [1, 3]})
    assert body["method"] == "weighted"
    np.testing.assert_allclose(body["probabilities"], [[0.3, 0.7]], rtol=1e-6)  # .25*.6+.75*.2, .25*.4+.75*.8
    assert _agg(client, {"predictions": probs, "method": "mean"})["method"] == "mean"
    assert _agg(client, {"predictions": probs, "method": "vote", "weights": [1, 3]})["method"] == "vote"
    x = store["x"]
    r = client.post("/v1/ensembles/alpha/versions/1/predict",
                    json={"inputs": _inputs(x), "method": "mean", "weights": [1, 0, 2]})
    assert r.status_code == 200 and r.json()["method"] == "weighted"
    ref = _ensemble(store["results"]).predict(x, "weighted", weights=[1, 0, 2])
    close(r.json()["probabilities"], ref.probabilities)
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("AggregateRequest", "PredictRequest"):
        assert "answered as 'weighted'" in schema[model]["properties"]["weights"]["description"]


def test_labels_without_a_method_are_voted(client):
    # issue #10: kind 'labels' without a method used to default to 'mean', which labels cannot do
    labels = [[0, 2, 1], [0, 1, 1], [2, 1, 0]]
    body = _agg(client, {"predictions": labels, "kind": "labels", "num_classes": 3})
    ref = aggregation.aggregate(labels, method="vote", kind="labels", num_classes=3)
    assert body["method"] == "vote" and body["labels"] == ref.labels.tolist() == [0, 1, 1]
    assert body["probabilities"] == ref.probabilities.tolist()
    assert _agg(client, {"predictions": [[[0.7, 0.3]]]})["method"] == "mean"  # probs: still 'mean'
    method = client.get("/openapi.json").json()["components"]["schemas"]["AggregateRequest"]["properties"]["method"]
    assert "'vote' for kind 'labels'" in method["description"]


# --------------------------------------------------------------------------- bad requests

GOOD_X = [[0.5] * 64]
BAD = [
    # (path, body, status, field)
    ("/v1/ensembles/nope/predict", {"inputs": GOOD_X}, 404, "name"),
    ("/v1/ensembles/alpha/versions/99/predict", {"inputs": GOOD_X}, 404, "name"),
    ("/v1/ensembles/alpha@nope/predict", {"inputs": GOOD_X}, 404, "name"),
    ("/v1/ensembles/alpha/versions/x/predict", {"inputs": GOOD_X}, 404, "name"),
    ("/v1/ensembles/alpha/predict", {"inputs": [[0.5] * 63]}, 422, "inputs"),             # wrong shape
    ("/v1/ensembles/alpha/predict", {"inputs": [[[0.5] * 64]]}, 422, "inputs"),           # wrong rank
    ("/v1/ensembles/alpha/predict", {"inputs": [[0.5] * 64, [0.5] * 10]}, 422, "inputs"),  # ragged
    ("/v1/ensembles/alpha/predict", {"inputs": [[0.5] * 63 + ["x"]]}, 422, "inputs"),
    ("/v1/ensembles/alpha/predict", {"inputs": [[0.5] * 63 + [None]]}, 422, "inputs"),
    ("/v1/ensembles/alpha/predict", {"inputs": [[True] * 64]}, 422, "inputs"),
    ("/v1/ensembles/alpha/predict", {"inputs": [[1e300] * 64]}, 422, "inputs"),           # inf in float32
    ("/v1/ensembles/alpha/predict", {"inputs": []}, 422, "inputs"),                       # empty batch
    ("/v1/ensembles/alpha/predict", {"inputs": 5}, 422, "inputs"),
    ("/v1/ensembles/alpha/predict", {}, 422, "inputs"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "method": "median"}, 422, "method"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "weights": [1, -1, 1]}, 422, "weights"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "weights": [1, 1]}, 422, "weights"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "weights": [0, 0, 0]}, 422, "weights"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "weights": ["1", 1, 1]}, 422, "weights.0"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "return_members": "yes"}, 422, "return_members"),
    ("/v1/ensembles/alpha/predict", {"inputs": GOOD_X, "extra": 1}, 422, "extra"),
    ("/v1/ensembles/alpha/predict", [GOOD_X], 422, "body"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.6]]]}, 422, "predictions"),              # sum != 1
    ("/v1/aggregate", {"predictions": [[[1.5, -0.5]]]}, 422, "predictions"),             # outside [0, 1]
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]], [[1.0]]]}, 422, "predictions"),      # ragged
    ("/v1/aggregate", {"predictions": [[0.5, 0.5]]}, 422, "predictions"),                 # 2-D probs
    ("/v1/aggregate", {"predictions": [[[[0.5, 0.5]]]]}, 422, "predictions"),             # 4-D
    ("/v1/aggregate", {"predictions": [[[0, 1]]], "kind": "labels", "num_classes": 2}, 422, "predictions"),
    ("/v1/aggregate", {"predictions": [[]], "kind": "logits"}, 422, "predictions"),       # empty batch
    ("/v1/aggregate", {"predictions": [[[1e39, 0.0]]], "kind": "logits"}, 422, "predictions"),  # beyond float32
    ("/v1/aggregate", {"predictions": [[], []], "kind": "labels", "num_classes": 2, "method": "vote"}, 422, "predictions"),
    ("/v1/aggregate", {"predictions": []}, 422, "predictions"),                           # no members
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "weights": [-1]}, 422, "weights"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "weights": [1, 2]}, 422, "weights"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "method": "weighted"}, 422, "method"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "method": "max"}, 422, "method"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "kind": "votes"}, 422, "kind"),
    ("/v1/aggregate", {"predictions": [[0, 1]], "kind": "labels", "method": "vote"}, 422, "num_classes"),
    ("/v1/aggregate", {"predictions": [[0, 5]], "kind": "labels", "method": "vote", "num_classes": 3}, 422, "predictions"),
    ("/v1/aggregate", {"predictions": [[0, 0.5]], "kind": "labels", "method": "vote", "num_classes": 3}, 422, "predictions"),
    ("/v1/aggregate", {"predictions": [[0, 1]], "kind": "labels", "method": "mean", "num_classes": 3}, 422, "method"),
    ("/v1/aggregate", {"predictions": [[0, 1]], "kind": "labels", "method": "vote", "num_classes": 0}, 422, "num_classes"),
    ("/v1/aggregate", {"predictions": [[0, 1]], "kind": "labels", "method": "vote", "num_classes": 10 ** 12}, 422, "num_classes"),
    ("/v1/aggregate", {"predictions": [[[0.5, 0.5]]], "num_classes": 3}, 422, "num_classes"),
    ("/v1/aggregate", {"predictions": [[[10 ** 39, 1]]], "kind": "logits"}, 422, "predictions"),     # > float32
]


@pytest.mark.parametrize("path, body, status, field", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_4xx_naming_the_field(client, store, path, body, status, field):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field, err
    assert isinstance(err["detail"], str) and err["detail"].startswith(field.split(".")[0]), err
    # a bad request never affects the next one
    ok = client.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(store["x"])})
    assert ok.status_code == 200


def test_big_json_integers_are_numbers(client):
    # an integer beyond int64 is the number it writes: 10**30 is the logit 1e30 (within float32)
    a = client.post("/v1/aggregate", json={"predictions": [[[10 ** 30, 1]]], "kind": "logits"})
    b = client.post("/v1/aggregate", json={"predictions": [[[1e30, 1]]], "kind": "logits"})
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    assert a.json()["labels"] == [0] and a.json()["probabilities"] == [[1.0, 0.0]]


def test_nan_and_infinity_in_json(client):
    for token in ("NaN", "Infinity", "-Infinity"):
        body = '{"predictions": [[[%s, 0.5]]], "kind": "logits"}' % token
        r = client.post("/v1/aggregate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "predictions" and "NaN" in r.json()["detail"]
        body = '{"inputs": [[%s%s]]}' % (token, ", 0.5" * 63)
        r = client.post("/v1/ensembles/alpha/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "inputs"
        r = client.post("/v1/aggregate", content='{"predictions": [[[0.5, 0.5]]], "weights": [%s]}' % token,
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "weights"


def test_unknown_ensemble_info_is_404(client):
    for ref in ("nope", "alpha/versions/42", "alpha@nope"):
        r = client.get(f"/v1/ensembles/{ref}")
        assert r.status_code == 404 and r.json()["field"] == "name"


def test_version_numbers_beyond_the_store_are_404(client):
    # issue #10: a version past SQLite's integer range used to answer 503 (the store "failed")
    for ref in ("alpha/versions/99999999999999999999999", "alpha/versions/2147483648", "alpha/versions/²",
                "alpha/versions/١"):
        for r in (client.get(f"/v1/ensembles/{ref}"), client.post(f"/v1/ensembles/{ref}/predict", json={"inputs": GOOD_X})):
            assert r.status_code == 404, (ref, r.text)
            assert r.json()["field"] == "name" and r.json()["detail"].startswith("name: ")
    assert client.get("/v1/ensembles/alpha/versions/0001").json()["version"] == "1"


def test_wrong_http_method_is_405_with_allow(client):
    # issue #10: GET .../predict used to be read as an ensemble named 'alpha/predict' (404)
    for method, path, allow in (("GET", "/v1/ensembles/alpha/predict", "POST"),
                                ("PUT", "/v1/ensembles/alpha/versions/1/predict", "POST"),
                                ("DELETE", "/v1/aggregate", "POST"), ("GET", "/v1/aggregate", "POST"),
                                ("POST", "/v1/ensembles/alpha", "GET"), ("POST", "/healthz", "GET")):
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allow
        assert r.json() == {"detail": f"http_method: {method} is not allowed on {path}; allowed: {allow}",
                            "field": "http_method"}
    assert client.get("/v1/ensembles/alpha").status_code == 200
    r = client.get("/v1/ensembles/predict")  # an ensemble may be called 'predict'; none is here
    assert r.status_code == 404 and r.json()["detail"] == "name: no registered ensemble 'predict'", r.text


def test_unknown_route_is_404_with_detail_and_field(client):
    for method, path in (("GET", "/nope"), ("POST", "/v2/aggregate"), ("GET", "/v1/ensemble/alpha")):
        r = client.request(method, path)
        assert r.status_code == 404, r.text
        assert r.json() == {"detail": f"path: no route {path} (the routes are listed at /docs)", "field": "path"}


def test_request_bodies_are_never_unpickled(client, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for path in ("/v1/aggregate", "/v1/ensembles/alpha/predict"):
        for ctype in ("application/json", "application/octet-stream", "application/python-pickle"):
            r = client.post(path, content=pickle.dumps(Evil()), headers={"content-type": ctype})
            assert 400 <= r.status_code < 500
    assert not marker.exists()


def test_invalid_json_is_422(client):
    r = client.post("/v1/aggregate", content=b'{"predictions": [[[0.5, 0.5]]', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"


def test_limits_are_configurable(store):
    settings = Settings(max_batch_items=4, max_members=3, max_classes=5, max_body_bytes=4000, alias_ttl_s=0)
    with TestClient(create_app(store["uri"], settings)) as c:
        r = c.post("/v1/ensembles/alpha/predict", json={"inputs": [[0.5] * 64] * 5})
        assert r.status_code == 422 and r.json()["field"] == "inputs" and "limit of 4" in r.json()["detail"]
        assert c.post("/v1/ensembles/alpha/predict", json={"inputs": [[0.5] * 64] * 4}).status_code == 200
        r = c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]]] * 4})
        assert r.status_code == 422 and "4 members exceed the limit of 3" in r.json()["detail"]
        r = c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]] * 5]})
        assert r.status_code == 422 and "5 items" in r.json()["detail"]
        r = c.post("/v1/aggregate", json={"predictions": [[[1 / 6] * 6]]})
        assert r.status_code == 422 and "6 classes" in r.json()["detail"]
        # body over the limit: 413, answered from Content-Length before the body is read or parsed
        big = json.dumps({"inputs": [[0.5] * 64] * 40})
        r = c.post("/v1/ensembles/alpha/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body" and "max_body_bytes" in r.json()["detail"]
        r = c.post("/v1/aggregate", content=b"\x80garbage" * 1000, headers={"content-type": "application/json"})
        assert r.status_code == 413

        def chunks():  # no Content-Length: counted while reading
            for _ in range(40):
                yield b" " * 200

        r = c.post("/v1/aggregate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]]]}).status_code == 200


def test_tracking_store_down_is_503_not_500(tmp_path):
    broken = tmp_path / "not-a-dir"
    broken.write_text("x")
    with TestClient(create_app(f"sqlite:///{broken}/mlflow.db", Settings())) as c:
        assert c.get("/healthz").status_code == 200
        for r in (c.get("/v1/ensembles"), c.get("/v1/ensembles/alpha"),
                  c.post("/v1/ensembles/alpha/predict", json={"inputs": GOOD_X})):
            assert r.status_code == 503, r.text
            assert "tracking store unavailable" in r.json()["detail"]
        assert c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]]]}).status_code == 200


def test_missing_store_is_503_and_never_created(tmp_path):
    """A SQLite URI naming a file that does not exist: the server stays up (liveness), says the
    store is unavailable, answers 503 where it would read it, and creates nothing."""
    uri = f"sqlite:///{tmp_path}/nonexistent/dir/mlflow.db"
    with TestClient(create_app(uri, Settings(preload=True))) as c:
        health = c.get("/healthz")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["store"] == "unavailable"
        assert body["store_detail"].startswith(f"no MLflow tracking store at {tmp_path}/nonexistent/dir/mlflow.db")
        for r in (c.get("/v1/ensembles"), c.get("/v1/ensembles/alpha"),
                  c.post("/v1/ensembles/alpha/predict", json={"inputs": GOOD_X})):
            assert r.status_code == 503, r.text
            assert r.json()["detail"].startswith("tracking store unavailable: no MLflow tracking store at ")
        assert c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]]]}).status_code == 200
    assert list(tmp_path.iterdir()) == []


def test_healthz_reports_a_readable_store(client):
    assert client.get("/healthz").json()["store"] == "ok"


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("ENSEMBLE_SERVE_MAX_BODY_BYTES", "123")
    monkeypatch.setenv("ENSEMBLE_SERVE_PRELOAD", "true")
    monkeypatch.setenv("ENSEMBLE_SERVE_BODY_TIMEOUT_S", "0.5")
    s = Settings.from_env(max_members=7)
    assert (s.max_body_bytes, s.preload, s.max_members, s.body_timeout_s) == (123, True, 7, 0.5)


def test_preload_loads_latest_versions(store):
    app = create_app(store["uri"], Settings(preload=True))
    with TestClient(app):
        assert app.state.store.loads >= 2


# --------------------------------------------------------------------------- the CLI client


def test_predict_command_input_errors(tmp_path):
    from typer.testing import CliRunner

    from ensemble_service.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "missing.npy")])
    assert r.exit_code == 2 and "no such file" in r.output
    (tmp_path / "x.txt").write_text("1")
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and "use .npy, .json, .csv or image files" in r.output
    np.save(tmp_path / "obj.npy", np.array(["a"], dtype=object), allow_pickle=True)
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "obj.npy")])
    assert r.exit_code == 2 and "cannot read" in r.output  # object arrays are never unpickled
    (tmp_path / "garbage.npy").write_bytes(b"not an array at all" * 10)
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "garbage.npy")])
    assert r.exit_code == 2 and r.output.strip() == (f"error: {tmp_path / 'garbage.npy'} is not a .npy file (it does "
                                                     "not start with the header numpy.save writes)"), r.output
    np.save(tmp_path / "x.npy", np.zeros((1, 64)))
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "x.npy"), "--url", f"http://127.0.0.1:{_free_port()}"])
    assert r.exit_code == 1 and "cannot reach" in r.output


def test_serve_command_builds_the_app_and_runs_uvicorn(store, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from ensemble_service.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: seen.update(app=application, **kw))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.update(threads=n))
    r = CliRunner().invoke(app, ["serve", "--port", "8123", "--tracking-uri", store["uri"], "--no-preload",
                                 "--max-batch-items", "7", "--threads", "1", "--no-access-log", "--no-batching",
                                 "--batch-wait-ms", "5"])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"], seen["access_log"], seen["threads"]) == ("127.0.0.1", 8123, False, 1)
    settings = seen["app"].state.settings
    assert (settings.max_batch_items, settings.preload, settings.gc_freeze) == (7, False, True)
    assert (settings.batching, settings.batch_wait_ms) == (False, 5.0)
    assert seen["app"].state.store.uri == store["uri"]
    r = CliRunner().invoke(app, ["serve", "--device", "tpu"])
    assert r.exit_code == 2 and "unknown device" in r.output


# --------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(store):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store["uri"], Settings(preload=True)), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_real_uvicorn_server_and_predict_command(live_server, store, tmp_path):
    import httpx
    from typer.testing import CliRunner

    from ensemble_service.cli import app

    x = store["x"]
    with httpx.Client(base_url=live_server, timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        assert "alpha" in [e["name"] for e in http.get("/v1/ensembles").json()["ensembles"]]
        assert http.get("/v1/ensembles/alpha").json()["num_members"] == 3
        body = http.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(x), "method": "vote"}).json()
        assert body["labels"] == _ensemble(store["results"]).predict(x, "vote").labels.tolist()
        agg = http.post("/v1/aggregate", json={"predictions": [[0, 1], [1, 1]], "kind": "labels",
                                               "method": "vote", "num_classes": 2}).json()
        assert agg["labels"] == [0, 1]
        r = http.post("/v1/ensembles/alpha/predict", content=b"x" * (9 * 1024 * 1024),
                      headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.post("/v1/ensembles/nope/predict", json={"inputs": GOOD_X}).status_code == 404
        # concurrent clients
        results = []

        def worker():
            with httpx.Client(base_url=live_server, timeout=30) as h:
                results.extend(h.post("/v1/ensembles/alpha/predict", json={"inputs": _inputs(x)}).status_code
                               for _ in range(5))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 40

    runner = CliRunner()
    np.save(tmp_path / "x.npy", x.numpy())
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "x.npy"), "--method", "vote", "--url", live_server])
    assert r.exit_code == 0, r.output
    assert [int(v) for v in r.output.split()] == body["labels"]
    (tmp_path / "x.json").write_text(json.dumps({"inputs": _inputs(x), "method": "mean"}))
    r = runner.invoke(app, ["predict", "alpha/versions/1", str(tmp_path / "x.json"), "--url", live_server, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["model_version"] == "1"
    r = runner.invoke(app, ["predict", "nope", str(tmp_path / "x.npy"), "--url", live_server])
    assert r.exit_code == 2 and "404" in r.output
    np.save(tmp_path / "bad.npy", np.zeros((2, 5)))
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "bad.npy"), "--url", live_server])
    assert r.exit_code == 2 and "422" in r.output and "inputs" in r.output

    # more rows than one request takes: sent in chunks, the answers joined in order
    assert len(x) >= 5
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "x.npy"), "--method", "vote", "--url", live_server,
                            "--batch-rows", "2"])
    assert r.exit_code == 0, r.output
    assert [int(v) for v in r.output.split()] == body["labels"]
    (tmp_path / "m.json").write_text(json.dumps({"inputs": _inputs(x), "return_members": True}))
    whole = runner.invoke(app, ["predict", "alpha", str(tmp_path / "m.json"), "--url", live_server, "--json"])
    parts = runner.invoke(app, ["predict", "alpha", str(tmp_path / "m.json"), "--url", live_server, "--json",
                                "--batch-rows", "2"])
    assert whole.exit_code == 0 and parts.exit_code == 0, parts.output
    whole, parts = json.loads(whole.output), json.loads(parts.output)
    assert parts["labels"] == whole["labels"] and len(parts["labels"]) == len(x)
    assert np.allclose(parts["probabilities"], whole["probabilities"], atol=1e-6)
    assert np.asarray(parts["members"]).shape == np.asarray(whole["members"]).shape
    assert np.allclose(parts["members"], whole["members"], atol=1e-6)
    # a bad chunk names its rows
    np.save(tmp_path / "half_bad.npy", np.concatenate([x.numpy().reshape(len(x), -1)[:2],
                                                      np.full((2, 64), np.nan, np.float32)]))
    r = runner.invoke(app, ["predict", "alpha", str(tmp_path / "half_bad.npy"), "--url", live_server,
                            "--batch-rows", "2"])
    assert r.exit_code == 2 and "422 (rows 2-3)" in r.output, r.output


def _raw_request(url: str, head: bytes, body: bytes, pause: float = 0.0, rest: bytes = b"") -> tuple:
    """Send ``head`` + ``body`` on a raw socket, optionally ``rest`` after ``pause`` seconds; then
    (status line, seconds from the last byte sent to the answer, whether the server closed)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        if pause:
            time.sleep(pause)
            sock.sendall(rest)
        t0 = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - t0
        closed = False
        sock.settimeout(5)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except socket.timeout:
            pass
    return data.split(b"\r\n", 1)[0].decode(), elapsed, closed, data


@pytest.mark.slow
def test_stalled_request_body_is_answered_408_fast(live_server):
    # issue #10: a body shorter than its Content-Length held the connection for 15 s or more
    body = json.dumps({"predictions": [[[0.5, 0.5]]]}).encode()
    head = (b"POST /v1/aggregate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body) + 100))
    status, elapsed, closed, data = _raw_request(live_server, head, body)
    assert status == "HTTP/1.1 408 Request Timeout", data
    assert elapsed < 3.0 and closed, (elapsed, closed)
    err = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert err["field"] == "body" and err["detail"].startswith("body: ")
    # nothing at all after the headers: the same
    status, elapsed, closed, _ = _raw_request(live_server, head, b"")
    assert status.endswith("408 Request Timeout") and elapsed < 3.0 and closed
    # a client that pauses briefly mid-body is served
    head_ok = head.replace(b"%d" % (len(body) + 100), b"%d" % len(body))
    status, _, _, data = _raw_request(live_server, head_ok, body[:10], pause=0.3, rest=body[10:])
    assert status == "HTTP/1.1 200 OK", data


# --------------------------------------------------------------------------- schemathesis

FUZZ_EXAMPLES = 75  # per operation and generation mode (simple operations have fewer distinct cases)


@pytest.mark.slow
def test_openapi_schema_fuzz(store):
    """A bounded schemathesis run (positive and negative data) against the app's OpenAPI schema:
    no 5xx, documented status codes and content types, responses that match their schemas,
    and schema-invalid requests rejected."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance, negative_data_rejection, not_a_server_error, response_schema_conformance,
        status_code_conformance,
    )

    app = create_app(store["uri"], Settings(alias_ttl_s=60))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("GET", "/healthz"), ("GET", "/v1/ensembles"), ("GET", "/v1/ensembles/{name}"),
        ("POST", "/v1/ensembles/{name}/predict"), ("POST", "/v1/aggregate")}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses = []
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                extra = [negative_data_rejection] if mode == schemathesis.GenerationMode.NEGATIVE else []
                response = case.call_and_validate(checks=checks + extra)
                statuses.append(response.status_code)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /healthz, GET /v1/ensembles)
                assert mode == schemathesis.GenerationMode.NEGATIVE
    print("fuzz statuses", {s: statuses.count(s) for s in set(statuses)})
    assert statuses and max(statuses) < 500
    assert 200 in statuses and 422 in statuses


@pytest.mark.parametrize("path,body", [
    ("/v1/ensembles/alpha/predict", {"inputs": [[1e300] * 64]}),
    ("/v1/aggregate", {"predictions": [[[1e39, 0.0]]], "kind": "logits"}),
])
def test_finite_numbers_beyond_float32_are_called_that_not_infinite(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert "beyond float32's range" in r.json()["detail"], r.json()

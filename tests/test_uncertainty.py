"""Calibration and uncertainty: hand-computed entropies and temperatures, the ranking metrics, the
parent run's metrics, the registered temperature in serving and pyfunc, and the HTTP fields."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from ensemble_service import aggregation, metrics, names, registry
from ensemble_service.api import Settings, create_app
from ensemble_service.artifact import member_record
from ensemble_service.serving import Ensemble, ServingError
from test_serving import finished_parent, infos, synthetic_data, train_members

LN2 = math.log(2)
MLP = {"name": "mlp", "width": 16, "depth": 1}


def H(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


# --------------------------------------------------------------------------- per-item uncertainty


def test_two_opposite_certain_members_entropy_ln2_expected_0_mi_ln2():
    u = aggregation.uncertainty([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert u["entropy"].tolist() == pytest.approx([LN2])
    assert u["expected_entropy"].tolist() == pytest.approx([0.0])
    assert u["mutual_information"].tolist() == pytest.approx([LN2])


def test_identical_members_have_no_mutual_information():
    p = [[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]
    u = aggregation.uncertainty([p, p, p])
    assert u["entropy"].tolist() == pytest.approx([H(0.25, 0.75), LN2, 0.0])
    assert u["expected_entropy"].tolist() == pytest.approx([H(0.25, 0.75), LN2, 0.0])
    assert u["mutual_information"].tolist() == [0.0, 0.0, 0.0]


def test_weights_weigh_the_mean_and_the_expected_entropy():
    # weights 3:1 -> mean [0.75, 0.25]; expected entropy 3/4 * H(0.5, 0.5) + 1/4 * 0
    u = aggregation.uncertainty([[[0.5, 0.5]], [[0.0, 1.0]]], weights=[3, 1])
    m = [0.75 * 0.5 + 0.25 * 0.0, 0.75 * 0.5 + 0.25 * 1.0]
    assert u["entropy"].tolist() == pytest.approx([H(*m)])
    assert u["expected_entropy"].tolist() == pytest.approx([0.75 * LN2])
    assert u["mutual_information"].tolist() == pytest.approx([H(*m) - 0.75 * LN2])


def test_aggregate_answers_uncertainty_for_probs_logits_and_votes():
    res = aggregation.aggregate([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]], method="vote", with_uncertainty=True)
    m = [2 / 3, 1 / 3]
    assert res.uncertainty["entropy"].tolist() == pytest.approx([H(*m)])
    assert res.uncertainty["mutual_information"].tolist() == pytest.approx([H(*m)])
    assert res.uncertainty["vote_share"].tolist() == pytest.approx([2 / 3])
    z = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])
    logit = aggregation.aggregate(z, kind="logits", with_uncertainty=True).uncertainty
    ref = aggregation.uncertainty(z.softmax(-1))
    assert logit["entropy"].tolist() == pytest.approx([LN2]) and "vote_share" not in logit
    assert logit["expected_entropy"].tolist() == pytest.approx(ref["expected_entropy"].tolist())
    labels = aggregation.aggregate([[0, 1], [0, 0], [1, 1]], kind="labels", method="vote", num_classes=2,
                                   with_uncertainty=True).uncertainty
    assert labels == {"vote_share": pytest.approx(torch.tensor([2 / 3, 2 / 3]))}
    assert aggregation.aggregate([[[0.5, 0.5]]]).uncertainty is None


# --------------------------------------------------------------------------- temperature scaling


def test_temperature_of_an_over_confident_case_by_hand():
    # every item predicted [0.99, 0.01]; the label is 0 for 3 items in 4. The best calibrated answer is
    # [0.75, 0.25]: 0.99^(1/T) / 0.01^(1/T) = 3, so T = ln 99 / ln 3, and the NLL falls to H(0.75, 0.25)
    probs = torch.tensor([[0.99, 0.01]] * 8)
    y = torch.tensor([0, 0, 0, 1] * 2)
    T = metrics.fit_temperature(probs, y)
    assert T == pytest.approx(math.log(99) / math.log(3), rel=1e-4)
    scaled = aggregation.temperature_scale(probs, T)
    assert scaled[0].tolist() == pytest.approx([0.75, 0.25], abs=1e-4)  # float32 inputs
    before, after = metrics.nll(probs, y), metrics.nll(scaled, y)
    assert before == pytest.approx(-(0.75 * math.log(0.99) + 0.25 * math.log(0.01)))
    assert after == pytest.approx(H(0.75, 0.25), abs=1e-5) and after < before


def test_temperature_scaling_never_raises_the_nll_it_is_fitted_on():
    g = torch.Generator().manual_seed(0)
    cases = []
    for sharpen in (0.3, 1.0, 3.0):          # under-confident, calibrated, over-confident
        z = torch.randn(400, 5, generator=g) * 2
        y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
        cases.append(((z * sharpen).softmax(-1), y))
    cases.append((torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0, 0, 0, 0])))   # perfect: T stays where it is
    cases.append((torch.tensor([[0.5, 0.5]] * 4), torch.tensor([0, 1, 0, 1])))   # no temperature changes it
    for probs, y in cases:
        T = metrics.fit_temperature(probs, y)
        assert metrics.nll(aggregation.temperature_scale(probs, T), y) <= metrics.nll(probs, y) + 1e-12
    assert metrics.fit_temperature(*cases[2]) == pytest.approx(3.0, rel=0.2)       # over-confident: T > 1
    assert metrics.fit_temperature(*cases[0]) < 1.0                                # under-confident: T < 1
    assert metrics.fit_temperature(*cases[4]) == 1.0


def test_temperature_scale_keeps_the_argmax_and_t_1_is_the_identity():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert torch.allclose(aggregation.temperature_scale(p, 1.0), p)
    for T in (0.5, 2.0, 10.0):
        s = aggregation.temperature_scale(p, T)
        assert s.argmax(-1).tolist() == [0, 2] and torch.allclose(s.sum(-1), torch.ones(2))
    assert aggregation.temperature_scale([[0.9, 0.1]], 2.0).tolist()[0] == pytest.approx([0.75, 0.25])
    with pytest.raises(aggregation.AggregationError, match="temperature must be a positive number"):
        aggregation.temperature_scale(p, 0.0)


# --------------------------------------------------------------------------- ranking metrics


def test_auroc_by_hand():
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auroc([0.2, 0.2, 0.2], [0, 1, 1]) == pytest.approx(0.5)        # ties count one half
    assert metrics.auroc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(metrics.auroc([0.1, 0.2], [0, 0]))


def test_selective_risk_by_hand():
    # kept from the lowest score: right, right, right, wrong -> risks 0, 0, 0, 1/4
    assert metrics.selective_risk([0.1, 0.2, 0.3, 0.4], [True, True, True, False]) == pytest.approx((1 / 16, 0.75))
    # the error ranked first: risks 1, 1/2, 1/3, 1/4; 90% of 4 items keeps all 4
    aurc, acc = metrics.selective_risk([0.4, 0.3, 0.2, 0.1], [True, True, True, False])
    assert aurc == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) and acc == pytest.approx(0.75)
    # all tied: the expected error rate at every coverage is 1/4
    assert metrics.selective_risk([0.0] * 4, [True, True, True, False]) == pytest.approx((0.25, 0.75))
    # 10 items, 90% coverage keeps 9: the most uncertain (wrong) one is dropped
    s, ok = list(range(10)), [True] * 9 + [False]
    assert metrics.selective_risk(s, ok, 0.9)[1] == 1.0


def test_uncertainty_metrics_rank_disagreement_and_ood():
    # two members that agree (and are right) on items 0-2 and disagree on item 3 (where the mean is wrong)
    a = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.9, 0.1]])
    b = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 0])   # item 3: mean [0.45, 0.55], wrong
    ood = torch.stack([torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)])
    m = metrics.uncertainty_metrics(torch.stack([a, b]), y, ood)
    assert m["misclassification_auroc_mi"] == 1.0 and m["misclassification_auroc_entropy"] == 1.0
    assert m["selective_acc_at_90_mi"] == 0.75 and m["aurc_mi"] == pytest.approx(1 / 16)
    assert m["ood_auroc_mi"] == 1.0          # every OOD item: MI ln 2, above every test item's
    assert m["mean_mi"] == pytest.approx((H(0.45, 0.55) - 0.5 * H(0.9, 0.1)) / 4)


# --------------------------------------------------------------------------- serving and pyfunc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unc")
    return tmp, train_members(tmp, [MLP, MLP, {"name": "lenet"}])


def _ens(results, temperature=None):
    meta = {} if temperature is None else {"temperature": temperature}
    return Ensemble.from_blobs([r.weights for r in results], [member_record(**i) for i in infos(results)], meta)


def test_serving_applies_the_stored_temperature_to_soft_methods_only(trained):
    _, results = trained
    x = synthetic_data().x_test[:5]
    raw, cal = _ens(results), _ens(results, temperature=2.5)
    for method in ("mean", "weighted", "logit_mean"):
        p_raw, p_cal = raw.predict(x, method), cal.predict(x, method)
        assert not p_raw.calibrated and p_cal.calibrated
        assert torch.allclose(p_cal.probabilities, aggregation.temperature_scale(p_raw.probabilities, 2.5))
        assert p_cal.labels.tolist() == p_raw.labels.tolist()
        assert torch.equal(cal.predict(x, method, calibrated=False).probabilities, p_raw.probabilities)
    vote = cal.predict(x, "vote")
    assert not vote.calibrated and torch.equal(vote.probabilities, raw.predict(x, "vote").probabilities)
    with pytest.raises(ServingError, match="no fitted temperature") as exc:
        raw.predict(x, "mean", calibrated=True)
    assert exc.value.field == "calibrated"


def test_serving_uncertainty_is_the_members_decomposition(trained):
    _, results = trained
    x = synthetic_data().x_test[:5]
    ens = _ens(results, temperature=2.0)
    pred = ens.predict(x, "vote", return_uncertainty=True, return_members=True)
    ref = aggregation.uncertainty(pred.member_probs)
    for key in aggregation.UNCERTAINTY:
        assert torch.allclose(pred.uncertainty[key], ref[key])
    assert torch.allclose(pred.uncertainty["entropy"], pred.uncertainty["expected_entropy"]
                          + pred.uncertainty["mutual_information"], atol=1e-6)
    assert torch.allclose(pred.uncertainty["vote_share"], pred.agreement)
    assert ens.predict(x, "mean").uncertainty is None


def test_registered_temperature_reaches_pyfunc(trained):
    import mlflow.pyfunc

    tmp, results = trained
    uri = f"sqlite:///{tmp}/mlflow.db"
    registry.register_ensemble(uri, finished_parent(uri, "unc", {}), "cal", [r.weights for r in results],
                               infos(results), "independent", temperature=3.0)
    x = synthetic_data().x_test[:4]
    raw = _ens(results).predict(x, "mean").probabilities
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        model = mlflow.pyfunc.load_model("models:/cal/1")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    np.testing.assert_allclose(model.predict(x.numpy()), aggregation.temperature_scale(raw, 3.0).numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict(x.numpy(), params={"calibrated": False}), raw.numpy(), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client(trained):
    tmp, results = trained
    uri = f"sqlite:///{tmp}/api.db"
    registry.register_ensemble(uri, finished_parent(uri, "api", {}), "hot", [r.weights for r in results],
                               infos(results), "independent", temperature=2.0)
    registry.register_ensemble(uri, finished_parent(uri, "api", {}), "plain", [r.weights for r in results],
                               infos(results), "independent")
    with TestClient(create_app(uri, Settings(alias_ttl_s=0.0))) as c:
        yield c


def test_aggregate_return_uncertainty_by_hand(client):
    r = client.post("/v1/aggregate", json={"predictions": [[[1, 0]], [[0, 1]]], "return_uncertainty": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["entropy"] == pytest.approx([LN2]) and body["expected_entropy"] == [0.0]
    assert body["mutual_information"] == pytest.approx([LN2])
    same = client.post("/v1/aggregate", json={"predictions": [[[0.2, 0.8]], [[0.2, 0.8]]], "kind": "probs",
                                              "return_uncertainty": True}).json()
    assert same["mutual_information"] == [0.0] and same["entropy"] == pytest.approx([H(0.2, 0.8)])
    logits = client.post("/v1/aggregate", json={"predictions": [[[0, 0], [3, 1]]], "kind": "logits",
                                                "return_uncertainty": True}).json()
    assert logits["entropy"][0] == pytest.approx(LN2) and len(logits["entropy"]) == 2
    plain = client.post("/v1/aggregate", json={"predictions": [[[1, 0]], [[0, 1]]]}).json()
    assert "entropy" not in plain


def test_predict_calibrated_and_uncertainty_fields(client):
    x = synthetic_data().x_test[:3].reshape(3, -1).tolist()
    hot = client.post("/v1/ensembles/hot/predict", json={"inputs": x, "return_uncertainty": True})
    assert hot.status_code == 200, hot.text
    body = hot.json()
    assert body["calibrated"] is True and len(body["entropy"]) == 3
    for e, a, mi in zip(body["entropy"], body["expected_entropy"], body["mutual_information"]):
        assert e == pytest.approx(a + mi, abs=1e-6) and mi >= 0
    raw = client.post("/v1/ensembles/hot/predict", json={"inputs": x, "calibrated": False}).json()
    assert raw["calibrated"] is False and "entropy" not in raw
    np.testing.assert_allclose(body["probabilities"],
                               aggregation.temperature_scale(torch.tensor(raw["probabilities"]), 2.0).numpy(),
                               rtol=1e-5, atol=1e-6)
    plain = client.post("/v1/ensembles/plain/predict", json={"inputs": x}).json()
    assert plain["calibrated"] is False
    np.testing.assert_allclose(plain["probabilities"], raw["probabilities"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path,body,field", [
    ("/v1/aggregate", {"predictions": [[[1, 0]]], "return_uncertainty": "yes"}, "return_uncertainty"),
    ("/v1/aggregate", {"predictions": [[[1, 0]]], "return_uncertainty": 1}, "return_uncertainty"),
    ("/v1/ensembles/hot/predict", {"inputs": [[0.0] * 64], "return_uncertainty": "yes"}, "return_uncertainty"),
    ("/v1/ensembles/hot/predict", {"inputs": [[0.0] * 64], "calibrated": "true"}, "calibrated"),
    ("/v1/ensembles/plain/predict", {"inputs": [[0.0] * 64], "calibrated": True}, "calibrated"),
])
def test_bad_uncertainty_and_calibration_values_are_422(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and "\n" not in r.json()["detail"]


# --------------------------------------------------------------------------- the parent run


@pytest.mark.parametrize("calibration", ["temperature", "none"])
def test_parent_run_carries_calibration_and_uncertainty_and_the_model_its_temperature(tmp_path, calibration):
    from ensemble_service import artifact, registry, runner
    from test_runner import InProcess, config, runs

    result = runner.submit(config(tmp_path, "strategy.members=3", f"calibration={calibration}"), scheduler=InProcess())
    client, parents, _ = runs(tmp_path)
    m = parents[0].data.metrics
    for key in (names.ENSEMBLE_MEAN_TEST_ENTROPY, names.ENSEMBLE_MEAN_TEST_MI, names.AURC_ENTROPY, names.AURC_MI,
                names.SELECTIVE_ACC_90_ENTROPY, names.SELECTIVE_ACC_90_MI, names.OOD_AUROC_ENTROPY,
                names.OOD_AUROC_MI):
        assert key in m and math.isfinite(m[key]), key
    assert 0.0 <= m[names.OOD_AUROC_MI] <= 1.0 and m[names.ENSEMBLE_MEAN_TEST_MI] >= 0
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = registry.download_ensemble(uri, registry.resolve_ensemble(uri, "runner"), str(tmp_path / "dl"))
    manifest = artifact.read_manifest(path)
    if calibration == "none":
        assert names.ENSEMBLE_TEMPERATURE not in m and "temperature" not in manifest
        return
    assert manifest["temperature"] == pytest.approx(m[names.ENSEMBLE_TEMPERATURE])
    assert result.ensemble[names.ENSEMBLE_TEMPERATURE] == m[names.ENSEMBLE_TEMPERATURE]
    # the temperature is the one fitted on the members' logged validation predictions
    val = torch.stack([torch.as_tensor(np.load(client.download_artifacts(r.info.run_id, names.VAL_PROBS,
                                                                          str(tmp_path / f"v{i}"))))
                       for i, r in enumerate(runs(tmp_path)[2])])
    data = synthetic_data_of(tmp_path)
    assert m[names.ENSEMBLE_TEMPERATURE] == pytest.approx(metrics.fit_temperature(val.mean(0), data.y_val), rel=1e-6)
    assert m[names.ENSEMBLE_CALIBRATED_TEST_NLL] == pytest.approx(
        metrics.nll(aggregation.temperature_scale(result_probs(client, parents[0], tmp_path), m[names.ENSEMBLE_TEMPERATURE]),
                    data.y_test), rel=1e-5)


def synthetic_data_of(tmp_path):
    from ensemble_service.runner import load_data
    from test_runner import config

    return load_data(config(tmp_path, "strategy.members=3"))


def result_probs(client, parent, tmp_path):
    return torch.as_tensor(np.load(client.download_artifacts(parent.info.run_id, names.ENSEMBLE_TEST_PROBS,
                                                             str(tmp_path / "ens"))))

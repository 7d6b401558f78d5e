"""Registering ensembles in the MLflow Model Registry and loading them back (pyfunc, API helpers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_service import registry, tracking
from ensemble_service.artifact import member_record
from ensemble_service.serving import Ensemble
from test_serving import blob_of, close, finished_parent, infos, synthetic_data, train_members

MLP = {"name": "mlp", "width": 16, "depth": 1}


def _parent(uri: str, experiment: str = "ens", metrics=None) -> str:
    return finished_parent(uri, experiment, metrics or {"ensemble_mean_test_acc": 0.75, "disagreement": 0.1})


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    results = train_members(tmp, [MLP, MLP, {"name": "lenet"}])
    parent = _parent(uri)
    reg = registry.register_ensemble(uri, parent, "ens", [r.weights for r in results], infos(results), "independent")
    return {"uri": uri, "tmp": tmp, "results": results, "parent": parent, "reg": reg}


def test_register_creates_a_version_with_alias_latest(registered):
    uri, reg = registered["uri"], registered["reg"]
    assert reg.name == "ens" and reg.version == "1" and reg.run_id == registered["parent"]
    client = tracking.client_for(uri)
    assert str(client.get_model_version_by_alias("ens", "latest").version) == "1"
    mv = client.get_model_version("ens", "1")
    assert mv.run_id == registered["parent"]
    assert mv.tags["ensemble.members"] == "3" and mv.tags["ensemble.strategy"] == "independent"
    assert json.loads(mv.tags["ensemble.architectures"]) == {"mlp": 2, "lenet": 1}
    run = client.get_run(registered["parent"])
    assert run.data.tags["ensemble.registered_model"] == "ens"
    assert run.data.tags["ensemble.model_version"] == "1"
    assert run.info.status == "FINISHED"


def test_model_is_logged_with_explicit_requirements(registered):
    src = registered["reg"].location
    root = Path(src[len("file://"):])
    reqs = (root / "requirements.txt").read_text().split()
    assert any(r.startswith("mlflow==") for r in reqs)
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("numpy==") for r in reqs)
    assert len(reqs) == 3
    manifest = json.loads((root / "artifacts" / "ensemble" / "manifest.json").read_text())
    assert manifest["num_members"] == 3 and manifest["strategy"] == "independent"
    assert [m["architecture"] for m in manifest["members"]] == ["mlp", "mlp", "lenet"]
    assert manifest["members"][0]["metrics"]["val_acc"] == registered["results"][0].metrics["val_acc"]
    assert (root / "code" / "ensemble_service" / "serving.py").is_file()
    assert not list(root.rglob("*.pkl"))  # logged from code: nothing to unpickle on load


def test_pyfunc_predict_returns_mean_probabilities(registered):
    import mlflow.pyfunc
    import pandas as pd

    os.environ["MLFLOW_TRACKING_URI"] = registered["uri"]
    try:
        model = mlflow.pyfunc.load_model("models:/ens@latest")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    results = registered["results"]
    x = synthetic_data().x_test[:7]
    ens = Ensemble.from_blobs([r.weights for r in results], [member_record(**i) for i in infos(results)])
    expected = ens.predict(x, "mean").probabilities.numpy()
    got = model.predict(x.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (7, 3) and got.dtype == np.float32
    close(got, expected)
    close(model.predict(pd.DataFrame(x.reshape(7, -1).numpy())), expected)
    close(model.predict(x.reshape(7, -1).numpy()), expected)
    # the mean of the members' own test probabilities
    ref = torch.stack([r.test_logits[:7] for r in results]).softmax(-1).mean(0)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
    vote = model.predict(x.numpy(), params={"method": "vote"})
    close(vote, ens.predict(x, "vote").probabilities.numpy())


def test_pyfunc_loads_in_a_plain_python_process(registered, tmp_path):
    x = synthetic_data().x_test[:5].numpy()
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/ens@latest')\n"
        "p = m.predict(np.load(sys.argv[1]))\n"
        "np.save(sys.argv[2], p)\n"
        "import ensemble_service; print(ensemble_service.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(MLFLOW_TRACKING_URI=registered["uri"], MLFLOW_DISABLE_TELEMETRY="true")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the package came from the model's own code copy, not from this checkout
    assert "/code/ensemble_service/" in out.stdout
    results = registered["results"]
    ens = Ensemble.from_blobs([r.weights for r in results], [member_record(**i) for i in infos(results)])
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), ens.predict(x, "mean").probabilities.numpy(),
                               rtol=1e-6, atol=1e-7)


def test_second_registration_moves_latest_and_lists(registered):
    uri = registered["uri"]
    b1 = [blob_of("mlp", s) for s in range(2)]
    r1 = registry.register_ensemble(uri, _parent(uri), "demo", b1,
                                    [{"index": i, "architecture": "mlp"} for i in range(2)], "independent")
    assert registry.resolve_ensemble(uri, "demo")["version"] == "1"
    b2 = [blob_of("mlp", s) for s in range(2, 5)]
    r2 = registry.register_ensemble(uri, _parent(uri), "demo", b2,
                                    [{"index": i, "architecture": "mlp"} for i in range(3)], "independent",
                                    description="second")
    assert (r1.version, r2.version) == ("1", "2")
    latest = registry.resolve_ensemble(uri, "demo@latest")
    assert latest["version"] == "2" and "latest" in latest["aliases"]
    assert registry.resolve_ensemble(uri, "demo")["version"] == "2"
    v1 = registry.resolve_ensemble(uri, "demo/versions/1")
    assert v1["version"] == "1" and v1["aliases"] == []
    tracking.client_for(uri).set_registered_model_alias("demo", "champion", "1")
    assert registry.resolve_ensemble(uri, "demo@champion")["version"] == "1"
    listed = [e for e in registry.list_registered_ensembles(uri) if e["name"] == "demo"]
    assert listed[0]["aliases"] == {"champion": "1", "latest": "2"}
    assert [v["version"] for v in listed[0]["versions"]] == ["1", "2"]
    assert listed[0]["versions"][0]["aliases"] == ["champion"]
    # a custom alias set by register_ensemble is moved like any alias
    r3 = registry.register_ensemble(uri, _parent(uri), "demo", b1, [{"index": i} for i in range(2)], "independent",
                                    alias="champion")
    assert registry.resolve_ensemble(uri, "demo@champion")["version"] == r3.version == "3"
    with tempfile_dir() as d:
        local = registry.download_ensemble(uri, registry.resolve_ensemble(uri, "demo/versions/2"), d)
        assert json.loads((local / "manifest.json").read_text())["num_members"] == 3


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory()


@pytest.mark.parametrize("ref", ["nope", "ens@nope", "ens/versions/99", "ens/versions/0", "ens/versions/x",
                                 "ens@bad alias", "", "a/b", "@x"])
def test_unknown_refs_raise_not_found(registered, ref):
    with pytest.raises(registry.EnsembleNotFound):
        registry.resolve_ensemble(registered["uri"], ref)


def test_models_without_the_ensemble_tag_are_not_ensembles(registered):
    client = tracking.client_for(registered["uri"])
    client.create_registered_model("someone-elses-model")
    assert "someone-elses-model" not in [e["name"] for e in registry.list_registered_ensembles(registered["uri"])]
    with pytest.raises(registry.EnsembleNotFound):
        registry.resolve_ensemble(registered["uri"], "someone-elses-model")


def test_parse_ensemble_ref():
    assert registry.parse_ensemble_ref("a") == ("a", "latest", None)
    assert registry.parse_ensemble_ref("a@prod") == ("a", "prod", None)
    assert registry.parse_ensemble_ref("a/versions/3") == ("a", None, "3")


def test_mc_dropout_members_register_and_predict(registered):
    uri = registered["uri"]
    blob = blob_of("mlp", 0, dropout=0.5)
    info = [{"index": s, "architecture": "mlp", "model": {"name": "mlp"}, "metrics": {"val_acc": 0.5},
             "extra": {"role": "mc_sample", "sample": s, "mc_seed": 100}} for s in range(3)]
    reg = registry.register_ensemble(uri, _parent(uri), "mc", [blob] * 3, info, "mc_dropout")
    root = Path(reg.location[len("file://"):]) / "artifacts" / "ensemble"
    assert len(list((root / "members").iterdir())) == 1
    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        model = mlflow.pyfunc.load_model("models:/mc/1")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype("float32")
    records = [member_record(**i) for i in info]
    expected = Ensemble.from_blobs([blob] * 3, records).predict(x).probabilities.numpy()
    close(model.predict(x), expected)
    close(model.predict(x), expected)  # seeded: the same answer every time


def test_register_rejects_bad_input(registered):
    uri = registered["uri"]
    parent = _parent(uri)
    with pytest.raises(tracking.TrackingError):
        registry.register_ensemble(uri, parent, "bad", [blob_of("mlp", 0)], [], "independent")
    with pytest.raises(tracking.TrackingError):
        registry.register_ensemble(uri, parent, " ", [blob_of("mlp", 0)], [{}], "independent")
    with pytest.raises(ValueError):
        registry.register_ensemble(uri, parent, "bad", [b"junk"], [{}], "independent")
    assert "bad" not in [e["name"] for e in registry.list_registered_ensembles(uri)]


def test_the_version_is_a_logged_model_of_the_parent_run(registered):
    uri, reg, parent = registered["uri"], registered["reg"], registered["parent"]
    client = tracking.client_for(uri)
    [output] = client.get_run(parent).outputs.model_outputs      # the UI's Models column
    model = client.get_logged_model(output.model_id)
    assert (reg.model_id, reg.source, reg.location) == (model.model_id, f"models:/{model.model_id}", model.artifact_location)
    assert model.source_run_id == parent and str(model.status) == "READY"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "ens", "version": 1}]
    mv = client.get_model_version("ens", "1")
    assert mv.source == reg.source and client.get_model_version_download_uri("ens", "1") == model.artifact_location
    assert mv.description == (f"Ensemble of 3 members (`independent`: 2 x mlp, 1 x lenet) trained on synthetic; "
                              f"parent run `{parent}`. "
                              "Test accuracy 0.7500 (mean of the members' probabilities).")
    assert mv.tags["ensemble_mean_test_acc"] == "0.7500" and "ensemble_mean_test_nll" not in mv.tags


def test_registering_leaves_the_process_tracking_uri_as_it_was(registered, monkeypatch):
    import mlflow

    uri = registered["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nowhere/else.db")
    before = mlflow.get_tracking_uri()
    results = registered["results"]
    reg = registry.register_ensemble(uri, _parent(uri), "uri", [r.weights for r in results], infos(results), "independent")
    assert reg.version == "1"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////nowhere/else.db" and mlflow.get_tracking_uri() == before

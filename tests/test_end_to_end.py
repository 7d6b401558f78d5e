"""`ensemble submit` end to end on the session's local Ray cluster, checked through MlflowClient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ensemble_service import aggregation
from ensemble_service.cli import app
from ensemble_service import names

pytestmark = pytest.mark.slow
runner = CliRunner()

PARENT_METRICS = names.PARENT_METRICS


def load_array(run_id: str, path: str, uri: str):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return np.load(MlflowClient(uri).download_artifacts(run_id, path, tmp), allow_pickle=False)


ROOTED = ("data=mnist1d", "data=mnist", "data=fashion_mnist", "data=cifar10")  # the sources with a data.root


def submit(tmp_path, *overrides):
    root = [f"data.root={tmp_path}/data"] if any(o in ROOTED for o in overrides) else []
    return runner.invoke(app, [
        "submit", *overrides, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=e2e",
        f"cluster.storage={tmp_path}/ckpt", *root,
    ])


def runs_of(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("ensemble.kind") == "parent"]
    members = [r for r in runs if r.data.tags.get("ensemble.kind") == "member"]
    return client, parents, members


def test_submit_three_members_tracks_parent_members_and_ensemble_metrics(ray_cluster, tmp_path):
    result = submit(tmp_path, "data=digits", "model=mlp", "strategy.members=3", "trainer.epochs=3")
    assert result.exit_code == 0, result.output
    assert "parent run:" in result.output and "tracking URI: sqlite:///" in result.output
    assert "vote (majority)" in result.output

    client, parents, members = runs_of(tmp_path)
    assert len(parents) == 1 and len(members) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ensemble.strategy"] == "independent"
    assert parent.data.tags["ensemble.data"] == "digits" and parent.data.tags["ensemble.model"] == "mlp"
    # the digits x mlp recipe chose the optimizer (conf/recipe/digits_mlp.yaml)
    assert parent.data.params["strategy.members"] == "3" and parent.data.params["optimizer._target_"] == "torch.optim.SGD"
    for key in PARENT_METRICS:
        assert key in parent.data.metrics, key
    assert parent.info.run_id in result.output

    members.sort(key=lambda r: int(r.data.tags["ensemble.member_index"]))
    assert [r.data.tags["ensemble.member_index"] for r in members] == ["0", "1", "2"]
    for i, m in enumerate(members):
        assert m.info.status == "FINISHED"
        assert m.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert m.data.params["seed"] == str(i) and m.data.params["architecture"] == "mlp"
        for key in ("test_acc", "test_nll", "train_loss", "val_acc"):
            assert key in m.data.metrics
        history = client.get_metric_history(m.info.run_id, "train_loss")
        assert sorted(h.step for h in history) == [1, 2, 3]
        assert len(client.get_metric_history(m.info.run_id, "val_acc")) == 3
        arts = {a.path for a in client.list_artifacts(m.info.run_id, "checkpoint")}
        assert "checkpoint/member.pt" in arts

    # the parent's ensemble metrics equal the aggregation recomputed from the logged predictions
    labels = torch.as_tensor(load_array(parent.info.run_id, "predictions/test_labels.npy",
                                        f"sqlite:///{tmp_path}/mlflow.db"))
    probs = torch.stack([torch.as_tensor(load_array(m.info.run_id, "predictions/test_probs.npy",
                                                    f"sqlite:///{tmp_path}/mlflow.db")) for m in members])
    assert probs.shape[:2] == (3, len(labels))
    mean = probs.mean(0)
    pm = parent.data.metrics
    assert pm["ensemble_mean_test_acc"] == pytest.approx((mean.argmax(-1) == labels).double().mean().item(), abs=1e-9)
    assert pm["ensemble_mean_test_nll"] == pytest.approx(
        -mean[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item(), rel=1e-5)
    vote_labels, _ = aggregation.vote(probs)
    assert pm["ensemble_vote_test_acc"] == pytest.approx((vote_labels == labels).double().mean().item(), abs=1e-9)
    member_accs = [(p.argmax(-1) == labels).double().mean().item() for p in probs]
    assert pm["best_member_test_acc"] == pytest.approx(max(member_accs), abs=1e-9)
    assert pm["mean_member_test_acc"] == pytest.approx(float(np.mean(member_accs)), abs=1e-9)
    for m, acc in zip(members, member_accs):
        assert m.data.metrics["test_acc"] == pytest.approx(acc, abs=1e-9)
    oracle = (probs.argmax(-1) == labels).any(0).double().mean().item()
    assert pm["oracle_test_acc"] == pytest.approx(oracle, abs=1e-9)
    preds = probs.argmax(-1)
    pairs = [(preds[a] != preds[b]).double().mean().item() for a in range(3) for b in range(a + 1, 3)]
    assert pm["disagreement"] == pytest.approx(float(np.mean(pairs)), abs=1e-9)

    listing = runner.invoke(app, ["runs", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert listing.exit_code == 0 and parent.info.run_id in listing.output


def test_mixed_architectures_and_bagging(ray_cluster, tmp_path):
    result = submit(tmp_path, "data=synthetic", "strategy.members=2", "strategy.bagging=true", "trainer.epochs=2",
                    "strategy.models=[{name:mlp,depth:1,width:16},{name:lenet,batchnorm:true}]")
    assert result.exit_code == 0, result.output
    _, parents, members = runs_of(tmp_path)
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["ensemble.model"] == "lenet+mlp"
    archs = {r.data.tags["ensemble.member_index"]: r.data.params["architecture"] for r in members}
    assert archs == {"0": "mlp", "1": "lenet"}
    assert all(r.data.params["bagging"] == "True" for r in members)


def test_a_failing_member_fails_the_ensemble_and_leaves_nothing_running(ray_cluster, tmp_path):
    result = submit(tmp_path, "data=synthetic", "strategy.members=2", "trainer.epochs=2", "optimizer=sgd",
                    "optimizer.lr=1e12", "optimizer.momentum=0")
    assert result.exit_code == 1, result.output
    assert "training loss became" in result.output
    _, parents, members = runs_of(tmp_path)
    assert parents[0].info.status == "FAILED"
    assert {m.info.status for m in members} == {"FAILED"}
    assert all("training loss became" in m.data.tags.get("ensemble.error", "") for m in members)


def test_packed_members_are_tracked_like_independent_ones(ray_cluster, tmp_path):
    result = submit(tmp_path, "data=synthetic", "model=mlp", "model.depth=1", "model.width=16", "strategy.members=5",
                    "trainer.epochs=2", "cluster.pack=2", "strategy.bagging=true")
    assert result.exit_code == 0, result.output
    assert "members 0, 1 packed" in result.output
    client, parents, members = runs_of(tmp_path)
    assert parents[0].info.status == "FINISHED" and len(members) == 5
    assert all(m.info.status == "FINISHED" for m in members)
    for m in members:
        history = sorted(client.get_metric_history(m.info.run_id, "train_loss"), key=lambda h: h.step)
        assert [h.step for h in history] == [1, 2]
        assert "test_acc" in m.data.metrics and m.data.params["seed"] == m.data.tags["ensemble.member_index"]
    # each packed member logs its own series, not the pack's average: bagging makes them differ
    losses = {m.data.tags["ensemble.member_index"]: client.get_metric_history(m.info.run_id, "train_loss")[0].value
              for m in members}
    assert losses["0"] != losses["1"] and losses["2"] != losses["3"]

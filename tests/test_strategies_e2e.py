"""Every strategy through `ensemble submit` on the session's Ray cluster, checked in MLflow."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ensemble_service.cli import app

slow = pytest.mark.slow
runner = CliRunner()

COMMON = ["data=synthetic", "model=mlp", "model.depth=1", "model.width=16", "trainer.batch_size=32"]


def submit(tmp_path, *overrides):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(app, ["submit", *COMMON, *overrides, f"tracking.uri={uri}", "tracking.experiment=s",
                                 f"cluster.storage={tmp_path}/ckpt"])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("s")
    runs = client.search_runs([exp.experiment_id], max_results=200) if exp else []
    parents = [r for r in runs if r.data.tags.get("ensemble.kind") == "parent"]
    members = sorted((r for r in runs if r.data.tags.get("ensemble.kind") == "member"),
                     key=lambda r: int(r.data.tags["ensemble.member_index"]))
    return result, client, parents, members


def check_curves_and_plots(client, parent, n):
    curve = client.get_metric_history(parent.info.run_id, "ensemble_mean_test_acc_at_k")
    assert sorted(m.step for m in curve) == list(range(1, n + 1))
    assert len(client.get_metric_history(parent.info.run_id, "ensemble_mean_test_nll_at_k")) == n
    by_step = {m.step: m.value for m in curve}
    assert by_step[n] == pytest.approx(parent.data.metrics["ensemble_mean_test_acc"], abs=1e-9)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/accuracy_vs_size.png", "plots/reliability.png"}
    for path in plots:
        blob = client.download_artifacts(parent.info.run_id, path)
        with open(blob, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@slow
def test_snapshot_yields_T_times_M_member_runs_with_tags(ray_cluster, tmp_path):
    result, client, parents, members = submit(
        tmp_path, "strategy=snapshot", "strategy.cycles=3", "strategy.trajectories=2", "trainer.epochs=3",
        "optimizer=sgd", "optimizer.lr=0.05")
    assert result.exit_code == 0, result.output
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["ensemble.members"] == "6"
    assert len(members) == 6 and all(m.info.status == "FINISHED" for m in members)
    tags = [(m.data.tags["ensemble.member_index"], m.data.tags["ensemble.trajectory"], m.data.tags["ensemble.cycle"])
            for m in members]
    assert tags == [("0", "0", "1"), ("1", "0", "2"), ("2", "0", "3"), ("3", "1", "1"), ("4", "1", "2"), ("5", "1", "3")]
    for m in members:
        cycle = int(m.data.tags["ensemble.cycle"])
        # a snapshot's epoch series stops where it was taken: cycle c of 3 over 3 epochs -> epoch c
        assert sorted(h.step for h in client.get_metric_history(m.info.run_id, "train_loss")) == list(range(1, cycle + 1))
        assert "test_nll" in m.data.metrics
        assert "checkpoint/member.pt" in {a.path for a in client.list_artifacts(m.info.run_id, "checkpoint")}
    check_curves_and_plots(client, parents[0], 6)


@slow
def test_snapshot_use_last(ray_cluster, tmp_path):
    result, _, _, members = submit(tmp_path, "strategy=snapshot", "strategy.cycles=3", "strategy.use_last=2",
                                   "trainer.epochs=3")
    assert result.exit_code == 0, result.output
    assert [m.data.tags["ensemble.cycle"] for m in members] == ["2", "3"]


@slow
@pytest.mark.parametrize("overrides,roles", [
    (["strategy=swa", "trainer.epochs=4", "strategy.swa_start=2", "model.batchnorm=true"], ["swa", "last"]),
    (["strategy=fge", "trainer.epochs=5", "strategy.cycles=2", "strategy.cycle_epochs=2"], ["fge", "fge"]),
    (["strategy=heads", "strategy.heads=3", "trainer.epochs=2"], ["head"] * 3),
    (["strategy=mc_dropout", "model.dropout=0.3", "strategy.samples=4", "trainer.epochs=2"], ["mc_sample"] * 4),
])
@slow
def test_each_trajectory_strategy_runs_and_is_tracked(ray_cluster, tmp_path, overrides, roles):
    result, client, parents, members = submit(tmp_path, *overrides)
    assert result.exit_code == 0, result.output
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ensemble.strategy"] == overrides[0].split("=")[1]
    assert [m.data.tags["ensemble.role"] for m in members] == roles
    assert all(m.info.status == "FINISHED" for m in members)
    for key in ("ensemble_mean_test_acc", "ensemble_mean_test_nll", "disagreement", "oracle_test_acc"):
        assert key in parent.data.metrics
    check_curves_and_plots(client, parent, len(roles))
    if overrides[0] == "strategy=fge":  # members collected at mid-cycle: pre-train 1 epoch, cycles of 2 -> epochs 2, 4
        assert [m.data.tags["ensemble.collected_epoch"] for m in members] == ["2", "4"]


BAD = [
    (["strategy=snapshot", "strategy.cycles=3", "trainer.epochs=10"], "multiple of strategy.cycles"),
    (["strategy=snapshot", "strategy.use_last=9"], "strategy.use_last must be between 1"),
    (["strategy=snapshot", "strategy.bagging=true", "trainer.epochs=5"],
     "unknown config key 'strategy.bagging' for strategy=snapshot (a key of strategy=independent)"),
    (["strategy=snapshot", "strategy.heads=3"], "unknown config key 'strategy.heads' for strategy=snapshot"),
    (["strategy=snapshot", "strategy.members=3", "strategy.cycles=2"], "strategy.members=3 and strategy.cycles=2 disagree"),
    (["strategy=swa", "trainer.epochs=4"], "averages 1 iterate"),
    (["strategy=swa", "strategy.trajectories=3"], "averages parameters over one trajectory only"),
    (["strategy=swa", "trainer.epochs=5", "strategy.swa_start=5"], "strategy.swa_start must be in [0"),
    (["strategy=swa", "strategy.swa_lr=0"], "strategy.swa_lr must be > 0"),
    (["strategy=fge", "trainer.epochs=4"], "to leave epochs for pre-training"),
    (["strategy=fge", "strategy.cycle_epochs=3", "trainer.epochs=20"], "must be an even number"),
    (["strategy=fge", "strategy.lr1=0.001", "strategy.lr2=0.01", "trainer.epochs=20"], "lr1 > strategy.lr2 > 0"),
    (["strategy=heads", "strategy.heads=0"], "strategy.heads must be at least 1"),
    (["strategy=mc_dropout"], "strategy=mc_dropout needs a model with dropout"),
    (["strategy=mc_dropout", "model.dropout=0.2", "strategy.samples=0"], "strategy.samples must be at least 1"),
    (["strategy=heads", "strategy.models=[{name:mlp}]"],
     "unknown config key 'strategy.models' for strategy=heads (a key of strategy=independent)"),
    (["strategy=heads", "model._target_=torch.nn.Flatten"], "model"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_strategy_configs_exit_2_and_create_no_run(tmp_path, overrides, needle):
    result = runner.invoke(app, ["submit", *overrides, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists()

"""Ensembles built from tracked runs, driven in-process (no Ray): grow, select, distill; their bad input."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from ensemble_service import distill, grow, hyperensemble, lineage, metrics, names, runner
from ensemble_service.cli import app
from ensemble_service.config import ConfigError, load_config
from ensemble_service.registry import EnsembleNotFound, download_ensemble, resolve_ensemble
from ensemble_service.scheduler import TaskFailure
from workers.member import train_member
from workers.state import MemberError
from workers.student import distillation_loss, train_student
from workers.trajectory import train_trajectory

slow = pytest.mark.slow   # these train (in-process, tiny): end-to-end through MLflow and the registry

SMALL = ["data=synthetic", "model=mlp", "model.depth=1", "model.width=16", "trainer.epochs=2",
         "trainer.batch_size=16", "trainer.device=cpu"]


class InProcess:
    """The scheduler's calls, with the workers run one after another in this process."""

    def connect(self, cluster):
        return {"CPU": 1.0, "GPU": 0.0}

    def node_resources(self):
        return [{"CPU": 1.0, "GPU": 0.0}]

    def run_tasks(self, specs, data, cluster, *, on_event, on_result, on_failure, on_tick):
        results, failures = [], []
        for spec in specs:
            train = {"member": train_member, "student": train_student, "trajectory": train_trajectory}[spec.kind]
            try:
                out = train(spec, data, report=on_event)
                out = out if isinstance(out, list) else [out]
            except MemberError as exc:
                failures.append(TaskFailure(spec.index, [spec.index], str(exc)))
                on_failure(failures[-1])
                continue
            results.extend(out)
            on_result(spec, out)
            on_tick()
        return results, failures


def submit(tmp_path, experiment, *overrides, small=SMALL):
    cfg = load_config([*small, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cluster.storage={tmp_path}/ck",
                       f"tracking.experiment={experiment}", *overrides])
    return runner.submit(cfg, scheduler=InProcess())


def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def array(client, run_id, path, tmp_path):
    return np.load(client.download_artifacts(run_id, path, str(tmp_path)), allow_pickle=False)


def manifest(tmp_path, ref):
    local = download_ensemble(uri(tmp_path), resolve_ensemble(uri(tmp_path), ref), str(tmp_path / ref.replace("/", "_")))
    return json.loads((local / "manifest.json").read_text()), local


def all_runs(tmp_path):
    client = MlflowClient(uri(tmp_path))
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


# --------------------------------------------------------------------------- grow


@slow
def test_grow_by_two_reuses_the_three_members_and_registers_version_two(tmp_path):
    first = submit(tmp_path, "grow", "strategy.members=3")
    assert first.model_version == "grow/versions/1"
    result = grow.grow("grow", 2, ["model=lenet"], uri(tmp_path), scheduler=InProcess())
    assert result.model_version == "grow/versions/2"
    client = MlflowClient(uri(tmp_path))
    parent = client.get_run(result.parent_run_id)
    rows = json.loads(open(client.download_artifacts(parent.info.run_id, names.MEMBER_TABLE_JSON, str(tmp_path))).read())
    old_ids = [r["run_id"] for r in first.members]
    assert [r["member"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["run_id"] for r in rows[:3]] == old_ids                        # the first three are the old runs
    assert parent.data.tags[names.TAG_GROWN_FROM] == first.parent_run_id
    assert parent.data.tags[names.TAG_GROWN_FROM_VERSION] == "grow/versions/1"
    assert parent.data.tags[names.TAG_REUSED_MEMBERS] == ",".join(old_ids)
    assert parent.data.tags[names.TAG_MEMBERS] == "5"
    new = [client.get_run(r["run_id"]) for r in rows[3:]]
    assert [m.data.tags["mlflow.parentRunId"] for m in new] == [parent.info.run_id] * 2
    assert [m.data.params["seed"] for m in new] == ["3", "4"]                # seeds continue after the members
    assert [r["architecture"] for r in rows] == ["mlp", "mlp", "mlp", "lenet", "lenet"]
    assert not client.search_runs([parent.info.experiment_id], "attributes.status != 'FINISHED'")
    # the registered version 2: 5 members, the first 3 the same checkpoint bytes as version 1's
    v1, _ = manifest(tmp_path, "grow/versions/1")
    v2, local = manifest(tmp_path, "grow/versions/2")
    assert v2["num_members"] == 5
    assert [m["sha256"] for m in v2["members"][:3]] == [m["sha256"] for m in v1["members"]]
    for m, run_id in zip(v2["members"][:3], old_ids):
        blob = open(client.download_artifacts(run_id, names.MEMBER_CHECKPOINT, str(tmp_path / run_id)), "rb").read()
        assert (local / m["file"]).read_bytes() == blob and hashlib.sha256(blob).hexdigest() == m["sha256"]
    # the parent's metrics are the aggregation of the 5 members' logged predictions
    y = torch.as_tensor(array(client, parent.info.run_id, names.TEST_LABELS, tmp_path))
    probs = torch.stack([torch.as_tensor(array(client, r["run_id"], names.TEST_PROBS, tmp_path / r["run_id"]))
                         for r in rows])
    m = metrics.ensemble_metrics(probs, y)
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC] == pytest.approx(m["mean_acc"], abs=1e-12)
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_NLL] == pytest.approx(m["mean_nll"], abs=1e-9)
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ECE] == pytest.approx(m["mean_ece"], abs=1e-9)
    assert parent.data.metrics[names.MEMBERS_FINISHED] == 5
    curve = {h.step: h.value for h in client.get_metric_history(parent.info.run_id, names.SIZE_CURVE_NLL)}
    assert sorted(curve) == [1, 2, 3, 4, 5]
    assert curve[3] == pytest.approx(first.ensemble[names.ENSEMBLE_MEAN_TEST_NLL], abs=1e-9)   # the old ensemble
    assert curve[5] == pytest.approx(m["mean_nll"], abs=1e-9)


@slow
def test_growing_twice_keeps_every_earlier_member(tmp_path):
    submit(tmp_path, "twice", "strategy.members=2")
    grow.grow("twice", 1, [], uri(tmp_path), scheduler=InProcess())
    third = grow.grow("twice", 1, [], uri(tmp_path), scheduler=InProcess())
    v2, _ = manifest(tmp_path, "twice/versions/2")
    v3, _ = manifest(tmp_path, "twice/versions/3")
    assert [m["sha256"] for m in v3["members"][:3]] == [m["sha256"] for m in v2["members"]]
    assert [r["seed"] for r in third.members] == [0, 1, 2, 3]


@slow
@pytest.mark.parametrize("args,message", [
    (("nope", 2, []), "no registered ensemble 'nope'"),
    (("bad", 0, []), "--members must be at least 1"),
    (("bad", 1, ["data.split_seed=1"]), "the data set differs from the one bad/versions/1 was trained on"),
    (("bad", 1, ["strategy.members=9"]), "grow keeps the ensemble's strategy"),
    (("nope", 1, ["2"]), "malformed override '2': no '='"),  # told before the store is read
    (("bad", 1, ["data=mnist1d"]), "data=mnist1d: grow trains the new members on the data set bad/versions/1 was trained on (data=synthetic)"),
    (("bad", 1, ["trainer.epochs=x"]), "bad value for trainer.epochs"),
    (("bad", 1, ["trainer.epochs=-3"]), "trainer.epochs must be at least 1, got -3"),
])
def test_grow_bad_input_is_one_line_and_leaves_no_run(tmp_path, args, message):
    submit(tmp_path, "bad", "strategy.members=1")
    before = len(all_runs(tmp_path))
    with pytest.raises((ConfigError, EnsembleNotFound), match=re.escape(message)):
        grow.grow(*args, uri=uri(tmp_path), scheduler=InProcess())
    assert len(all_runs(tmp_path)) == before


@slow
def test_only_independent_ensembles_grow(tmp_path):
    submit(tmp_path, "snap", "strategy=snapshot", "strategy.cycles=2", "optimizer=sgd", "tracking.register=true")
    with pytest.raises(ConfigError, match="snap/versions/1 is a strategy=snapshot ensemble; grow adds independent"):
        grow.prepare("snap", 1, [], uri(tmp_path))


@slow
def test_cli_grow_unknown_ensemble_is_exit_2_one_line(tmp_path):
    submit(tmp_path, "cli", "strategy.members=1")
    result = CliRunner().invoke(app, ["grow", "nope", "--members", "2", "--tracking-uri", uri(tmp_path)])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: no registered ensemble"), \
        result.output
    result = CliRunner().invoke(app, ["grow", "cli", "--members", "0", "--tracking-uri", uri(tmp_path)])
    assert result.exit_code == 2 and "--members must be at least 1" in result.output


# --------------------------------------------------------------------------- select


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """12 members from 3 ensembles of 3 architectures on one data set (and one on another split)."""
    tmp = tmp_path_factory.mktemp("pool")
    lenet = [o for o in SMALL if not o.startswith("model")] + ["model=lenet"]
    for model, small in (([], SMALL), ([], lenet), (["model.depth=0"], SMALL)):
        submit(tmp, "pool", "strategy.members=4", "tracking.register=false", "data.n_train=192", *model, small=small)
    submit(tmp, "other", "strategy.members=2", "tracking.register=false", "data.split_seed=3")
    return tmp


@slow
def test_selection_beats_the_best_member_and_the_pool_on_validation(pool, monkeypatch):
    res = hyperensemble.select(experiments=["pool"], size=12, metric="val_nll", uri=uri(pool))
    v = res.values
    assert res.pool_size == 12 and res.model_version == "pool-selected/versions/1"
    assert v[names.ENSEMBLE_MEAN_VAL_NLL] <= v[names.BEST_MEMBER_VAL_NLL] + 1e-12
    assert v[names.ENSEMBLE_MEAN_VAL_NLL] <= v[names.POOL_MEAN_VAL_NLL] + 1e-12
    client = MlflowClient(uri(pool))
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags[names.TAG_STRATEGY] == names.STRATEGY_SELECTION
    assert parent.data.metrics[names.ENSEMBLE_MEAN_VAL_NLL] == pytest.approx(v[names.ENSEMBLE_MEAN_VAL_NLL])
    # recomputed from the logged predictions: the count-weighted mean of the selected members
    y_val = torch.as_tensor(array(client, parent.info.run_id, names.VAL_LABELS, pool / "l"))
    y_test = torch.as_tensor(array(client, parent.info.run_id, names.TEST_LABELS, pool / "l"))
    w = torch.tensor([r["weight"] for r in res.members], dtype=torch.float64)
    assert sum(r["picks"] for r in res.members) == parent.data.metrics[names.SELECTION_PICKS]
    assert w.sum().item() == pytest.approx(1.0)
    val = torch.stack([torch.as_tensor(array(client, r["run_id"], names.VAL_PROBS, pool / r["run_id"]))
                       for r in res.members]).double()
    test = torch.stack([torch.as_tensor(array(client, r["run_id"], names.TEST_PROBS, pool / r["run_id"]))
                        for r in res.members]).double()
    assert v[names.ENSEMBLE_MEAN_VAL_NLL] == pytest.approx(metrics.nll((w[:, None, None] * val).sum(0), y_val), abs=1e-5)
    sel_test = (w[:, None, None] * test).sum(0)
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_NLL] == pytest.approx(metrics.nll(sel_test, y_test), abs=1e-5)
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC] == pytest.approx(metrics.accuracy(sel_test, y_test))
    # the registered selection serves with its weights: the pyfunc's mean is the weighted mean
    import mlflow

    from ensemble_service.data import load

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri(pool))   # not mlflow.set_tracking_uri: it outlives the test
    model = mlflow.pyfunc.load_model("models:/pool-selected/1")
    x_test = load(load_config(SMALL + ["data.n_train=192"]).data).x_test.numpy()
    assert np.abs(model.predict(x_test) - sel_test.numpy()).max() < 1e-5
    man, _ = manifest(pool, "pool-selected/versions/1")
    assert [m["weight"] for m in man["members"]] == pytest.approx([r["weight"] for r in res.members])
    assert [m["run_id"] for m in man["members"]] == [r["run_id"] for r in res.members]


@slow
def test_select_by_runs_and_val_acc(pool):
    client = MlflowClient(uri(pool))
    parents = client.search_runs([client.get_experiment_by_name("pool").experiment_id],
                                 f"tags.`{names.TAG_KIND}` = 'parent' and tags.`{names.TAG_STRATEGY}` = 'independent'")
    res = hyperensemble.select(runs=[p.info.run_id for p in parents[:2]], size=3, metric="val_acc", uri=uri(pool),
                               model_name="two")
    assert res.pool_size == 8 and res.model_version == "two/versions/1"
    assert res.values[names.ENSEMBLE_MEAN_VAL_ACC] >= res.values[names.BEST_MEMBER_VAL_ACC]


@slow
@pytest.mark.parametrize("kwargs,message", [
    (dict(experiments=["pool", "other"], size=3), "the pool mixes data sets or splits"),
    (dict(experiments=["nope"], size=3), "no experiment 'nope'"),
    (dict(sweep="nope", size=3), "no finished ensemble has the sweep tag 'nope'"),
    (dict(experiments=["pool"], size=0), "--size must be at least 1"),
    (dict(experiments=["pool"], size=2, metric="brier"), "unknown --metric"),
    (dict(size=2), "give the pool"),
    (dict(runs=["0" * 32], size=2), "no run"),
])
def test_select_bad_input(pool, kwargs, message):
    before = len(all_runs(pool))
    with pytest.raises((ConfigError, LookupError), match=message):
        hyperensemble.select(uri=uri(pool), **kwargs)
    assert len(all_runs(pool)) == before


@slow
def test_select_an_empty_pool_is_exit_2(pool):
    MlflowClient(uri(pool)).create_experiment("empty")
    result = CliRunner().invoke(app, ["select", "--experiment", "empty", "--size", "3", "--tracking-uri", uri(pool)])
    assert result.exit_code == 2 and result.output.strip().startswith("error: the pool is empty"), result.output


# --------------------------------------------------------------------------- distill


def test_distillation_loss_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    q = torch.tensor([[0.5, 0.3, 0.2]])
    T, alpha = 2.0, 0.75
    s = torch.softmax(z / T, -1)[0]
    kl = sum(q[0, i] * (torch.log(q[0, i]) - torch.log(s[i])) for i in range(3))
    ce = -torch.log_softmax(z, -1)[0, 0]
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert distillation_loss(z, q, torch.tensor([0]), T, alpha).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(z, q, torch.tensor([0]), T, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)


@slow
def test_distill_trains_a_student_and_a_baseline_and_registers_the_student(tmp_path, monkeypatch):
    teacher = submit(tmp_path, "kd", "strategy.members=3", "data.n_train=192")
    res = distill.distill("kd", ["trainer.epochs=3"], uri(tmp_path), scheduler=InProcess(), temperature=2.0, alpha=0.5)
    assert res.model_version == "kd-distilled/versions/1"
    client = MlflowClient(uri(tmp_path))
    run = client.get_run(res.run_id)
    t = run.data.tags
    assert t[names.TAG_KIND] == names.KIND_STUDENT and t[names.TAG_ROLE] == names.ROLE_STUDENT
    assert t[names.TAG_DISTILLED_FROM] == teacher.parent_run_id and t[names.TAG_DISTILLED_FROM_VERSION] == "kd/versions/1"
    assert run.info.status == "FINISHED" and run.data.params["distill.temperature"] == "2.0"
    for key in (names.TEST_ACC, names.TEST_NLL, names.TEST_ECE, names.TEACHER_TEST_NLL, names.BASELINE_TEST_NLL,
                names.FORWARD_TIME_RATIO):
        assert key in run.data.metrics, key
    assert [h.step for h in client.get_metric_history(res.run_id, names.VAL_NLL)] == [1, 2, 3]
    # the teacher's figures are the ensemble's: the same members, the same test set
    assert run.data.metrics[names.TEACHER_TEST_NLL] == pytest.approx(teacher.ensemble[names.ENSEMBLE_MEAN_TEST_NLL],
                                                                     abs=1e-5)
    baseline = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.run_id}'")
    assert [b.data.tags[names.TAG_ROLE] for b in baseline] == [names.ROLE_BASELINE]
    assert baseline[0].data.metrics[names.TEST_NLL] == run.data.metrics[names.BASELINE_TEST_NLL]
    man, _ = manifest(tmp_path, "kd-distilled/versions/1")
    assert man["num_members"] == 1 and man["strategy"] == names.STRATEGY_DISTILLED
    # served like an ensemble of one: its predictions are the student's logged test probabilities
    import mlflow

    from ensemble_service.data import load

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri(tmp_path))
    x = load(load_config(SMALL + ["data.n_train=192"]).data).x_test.numpy()
    probs = array(client, res.run_id, names.TEST_PROBS, tmp_path)
    assert np.abs(mlflow.pyfunc.load_model("models:/kd-distilled/1").predict(x) - probs).max() < 1e-5


@slow
@pytest.mark.parametrize("args,kwargs,message", [
    (("nope",), {}, "no registered ensemble 'nope'"),
    (("kd2", ["data.split_seed=2"]), {}, "the data set differs"),
    (("kd2", ["strategy.members=2"]), {}, "a student is one model"),
    (("kd2",), {"temperature": 0}, "--temperature must be a positive number"),
    (("kd2",), {"alpha": 1.5}, "--alpha must be in"),
])
def test_distill_bad_input(tmp_path, args, kwargs, message):
    submit(tmp_path, "kd2", "strategy.members=1")
    before = len(all_runs(tmp_path))
    with pytest.raises((ConfigError, EnsembleNotFound), match=message):
        distill.distill(args[0], *args[1:], uri=uri(tmp_path), scheduler=InProcess(), **kwargs)
    assert len(all_runs(tmp_path)) == before


def test_data_digest_tells_splits_apart():
    from ensemble_service.data import load

    a = load(load_config(SMALL).data)
    b = load(load_config(SMALL + ["data.split_seed=1"]).data)
    assert lineage.data_digest(a) == lineage.data_digest(load(load_config(SMALL).data))
    assert lineage.data_digest(a) != lineage.data_digest(b)


def test_a_multirun_with_a_bad_combination_trains_nothing(tmp_path):
    import ray

    up = ray.is_initialized()
    res = CliRunner().invoke(app, ["submit", "--multirun", "model=mlp,nope", "optimizer.lr=0.1,0.2",
                                   f"tracking.uri={uri(tmp_path)}", "data=synthetic"])
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: model=nope optimizer.lr=0.1: unknown model 'nope'; choose one of:"), res.output
    assert not (tmp_path / "mlflow.db").exists() and ray.is_initialized() == up
    res = CliRunner().invoke(app, ["submit", "--multirun", "optimizer.lr=interval(0,1)", "data=synthetic"])
    assert res.exit_code == 2 and "continuous sweep" in res.output


@pytest.mark.parametrize("cmd", [["grow"], ["select"], ["distill"]])
def test_help_of_the_new_commands(cmd):
    res = CliRunner().invoke(app, cmd + ["--help"])
    assert res.exit_code == 0 and "Usage" in res.output

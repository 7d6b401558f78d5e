"""The runner's pipeline driven by a scheduler that runs the workers in this process (no Ray):
runs opened and closed, per-epoch metrics, failures, min_members, an interrupt, registration."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from ensemble_service import names, runner
from ensemble_service.config import load_config
from ensemble_service.scheduler import TaskFailure
from workers.member import train_member
from workers.packed import train_packed
from workers.state import MemberError
from workers.trajectory import train_trajectory

SMALL = ["data=synthetic", "model=mlp", "model.depth=1", "model.width=16", "trainer.epochs=2",
         "trainer.batch_size=16", "tracking.experiment=runner"]


class InProcess:
    """The scheduler's three calls, with the workers run one after another in this process.
    ``fail`` names task indices whose worker raises; ``interrupt_at`` a task before which Ctrl-C comes."""

    def __init__(self, fail=(), interrupt_at=None, lose_epoch=None):
        self.fail, self.interrupt_at, self.connected = set(fail), interrupt_at, False
        self.lose_epoch = lose_epoch  # this epoch's events never arrive (its worker died right after its checkpoint)

    def connect(self, cluster):
        self.connected = True
        return {"CPU": 1.0, "GPU": 0.0}

    def node_resources(self):
        return [{"CPU": 1.0, "GPU": 0.0}]

    def run_tasks(self, specs, data, cluster, *, on_event, on_result, on_failure, on_tick):
        results, failures = [], []
        for spec in specs:
            if spec.index == self.interrupt_at:
                raise KeyboardInterrupt()
            train = {"member": train_member, "trajectory": train_trajectory, "packed": train_packed}[spec.kind]
            try:
                if spec.index in self.fail:
                    raise MemberError(f"task {spec.index} broke on purpose")
                out = train(spec, data, report=lambda e: None if e["type"] == "epoch" and e["epoch"] == self.lose_epoch
                            else on_event(e))
            except MemberError as exc:
                members = list(getattr(spec, "member_indices", [spec.index]))
                failures.append(TaskFailure(spec.index, members, str(exc)))
                on_failure(failures[-1])
                continue
            out = out if isinstance(out, list) else [out]
            results.extend(out)
            on_result(spec, out)
            on_tick()
        return results, failures


def config(tmp_path, *overrides):
    return load_config([*SMALL, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cluster.storage={tmp_path}/ck",
                        *overrides])


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("runner").experiment_id], max_results=100)
    parents = [r for r in found if r.data.tags[names.TAG_KIND] == names.KIND_PARENT]
    members = sorted((r for r in found if r.data.tags[names.TAG_KIND] == names.KIND_MEMBER),
                     key=lambda r: int(r.data.tags[names.TAG_MEMBER_INDEX]))
    return client, parents, members


def test_the_pipeline_tracks_and_registers_without_ray(tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("the pipeline started Ray with an in-process scheduler")

    monkeypatch.setattr(ray, "init", no_ray)   # another test of the session may have a cluster connected
    sched = InProcess()
    result = runner.submit(config(tmp_path, "strategy.members=3"), scheduler=sched)
    assert sched.connected
    client, parents, members = runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"] and [m.info.status for m in members] == ["FINISHED"] * 3
    parent = parents[0]
    assert set(names.PARENT_METRICS) <= set(parent.data.metrics)
    assert parent.data.metrics[names.MEMBERS_FINISHED] == 3
    for m in members:
        assert [h.step for h in client.get_metric_history(m.info.run_id, names.TRAIN_LOSS)] == [1, 2]
        assert set(names.FINAL_METRICS) <= set(m.data.metrics)
    # the parent's accuracy is the mean aggregation of the members' logged test predictions
    labels = torch.as_tensor(load(client, parent.info.run_id, names.TEST_LABELS, tmp_path))
    probs = torch.stack([torch.as_tensor(load(client, m.info.run_id, names.TEST_PROBS, tmp_path)) for m in members])
    acc = (probs.mean(0).argmax(-1) == labels).double().mean().item()
    assert parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC] == pytest.approx(acc, abs=1e-12)
    assert result.model_version == "runner/versions/1" and result.parent_run_id == parent.info.run_id
    assert [r["member"] for r in result.members] == [0, 1, 2]
    # how it reads in the MLflow UI: the shared metric pair, descriptions, datasets, the saved view
    assert parent.data.metrics[names.TEST_ACC] == parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC]
    assert "registered as `runner/versions/1`" in parent.data.tags[names.MLFLOW_DESCRIPTION]
    ensemble_id = parent.data.tags[names.TAG_ID]
    view = client.get_experiment(parent.info.experiment_id).tags[names.MLFLOW_VIEW_PREFIX + ensemble_id]
    assert json.loads(view)["name"] == parent.info.run_name
    assert json.loads(json.loads(view)["state"])["searchFilter"] == f"tags.`ensemble.id` = '{ensemble_id}'"
    for m in members:
        assert m.data.tags[names.TAG_ID] == ensemble_id and m.data.tags[names.TAG_STRATEGY] == "independent"
        assert m.data.tags[names.MLFLOW_DESCRIPTION].startswith(f"Member {m.data.tags[names.TAG_MEMBER_INDEX]} of 3 ")
        assert [i.dataset.digest for i in m.inputs.dataset_inputs] == [i.dataset.digest for i in parent.inputs.dataset_inputs]
    assert len(parent.inputs.dataset_inputs) == 3


def test_bagged_members_say_they_trained_on_a_bootstrap_resample(tmp_path):
    runner.submit(config(tmp_path, "strategy.members=2", "strategy.bagging=true", "tracking.register=false"),
                  scheduler=InProcess())
    _, _, members = runs(tmp_path)
    for m in members:
        train = next(i for i in m.inputs.dataset_inputs if {t.key: t.value for t in i.tags}[names.MLFLOW_DATA_CONTEXT] == "train")
        assert {t.key: t.value for t in train.tags}[names.TAG_SAMPLING] == "bootstrap"
        assert "bootstrap resample" in m.data.tags[names.MLFLOW_DESCRIPTION]


def load(client, run_id, path, tmp_path):
    import numpy as np

    return np.load(client.download_artifacts(run_id, path, str(tmp_path)), allow_pickle=False)


def test_a_failed_task_fails_the_ensemble_and_closes_every_run(tmp_path):
    with pytest.raises(runner.EnsembleFailed, match="1 of 3 tasks failed .*broke on purpose"):
        runner.submit(config(tmp_path, "strategy.members=3"), scheduler=InProcess(fail={1}))
    _, parents, members = runs(tmp_path)
    assert parents[0].info.status == "FAILED"
    assert [m.info.status for m in members] == ["FINISHED", "FAILED", "FINISHED"]
    assert "broke on purpose" in members[1].data.tags[names.TAG_ERROR]


def test_min_members_lets_a_degraded_ensemble_finish(tmp_path):
    result = runner.submit(config(tmp_path, "strategy.members=3", "cluster.min_members=2",
                                  "tracking.register=false"), scheduler=InProcess(fail={2}))
    _, parents, members = runs(tmp_path)
    assert parents[0].info.status == "FINISHED" and "finished with 2 of 3 members" in result.degraded
    assert parents[0].data.tags[names.TAG_DEGRADED] == result.degraded and result.model_version == ""
    assert parents[0].data.metrics[names.MEMBERS_FINISHED] == 2


def test_an_interrupt_leaves_every_open_run_killed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        runner.submit(config(tmp_path, "strategy.members=3"), scheduler=InProcess(interrupt_at=1))
    _, parents, members = runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert [m.info.status for m in members] == ["FINISHED", "KILLED", "KILLED"]  # member 0 was done


def test_a_trajectory_logs_each_members_epochs_up_to_where_it_was_collected(tmp_path):
    runner.submit(config(tmp_path, "strategy=snapshot", "strategy.cycles=2", "trainer.epochs=4", "optimizer=sgd",
                         "tracking.register=false"), scheduler=InProcess())
    client, _, members = runs(tmp_path)
    steps = [[h.step for h in client.get_metric_history(m.info.run_id, names.TRAIN_LOSS)] for m in members]
    assert steps == [[1, 2], [1, 2, 3, 4]]
    assert [m.data.tags[names.TAG_COLLECTED_EPOCH] for m in members] == ["2", "4"]


def test_an_epoch_whose_event_was_lost_is_logged_from_the_members_history(tmp_path):
    """A worker killed after checkpointing epoch k but before epoch k's event reached the driver
    resumes at k + 1; the member's result carries the whole history, and epoch k is logged from it."""
    runner.submit(config(tmp_path, "strategy.members=2", "trainer.epochs=5", "tracking.register=false"),
                  scheduler=InProcess(lose_epoch=3))
    client, _, members = runs(tmp_path)
    for m in members:
        assert sorted(h.step for h in client.get_metric_history(m.info.run_id, names.TRAIN_LOSS)) == [1, 2, 3, 4, 5]

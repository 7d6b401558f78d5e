"""Cluster behaviour on the session's local Ray cluster: GPU packing, dead workers, min_members."""
from __future__ import annotations

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from ensemble_service.config import load_config
from ensemble_service.runner import EnsembleFailed, Observer, submit

pytestmark = pytest.mark.slow


def config(tmp_path, *overrides):
    return load_config(["data=synthetic", "model=mlp", "model.depth=1", "model.width=16",
                        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=c",
                        f"cluster.storage={tmp_path}/ckpt", *overrides])


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("c")
    found = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in found if r.data.tags["ensemble.kind"] == "parent"]
    members = sorted((r for r in found if r.data.tags["ensemble.kind"] == "member"),
                     key=lambda r: int(r.data.tags["ensemble.member_index"]))
    return client, parents, members


def max_concurrent(plan_results):
    points = sorted([(r["t_start"], 1) for r in plan_results] + [(r["t_end"], -1) for r in plan_results])
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("gpus_per_member,expected_max", [(0.25, 4), (1.0, 1)])
def test_fractional_gpus_pack_members_on_the_logical_gpu(ray_cluster, tmp_path, gpus_per_member, expected_max):
    assert ray_cluster.get("GPU") == 1
    cfg = config(tmp_path, "strategy.members=8", "trainer.epochs=20", "data.n_train=512",
                 "trainer.batch_size=16", "cluster.cpus_per_member=0.25", f"cluster.gpus_per_member={gpus_per_member}")
    import ensemble_service.scheduler as scheduler

    seen = []
    original = scheduler.run_tasks

    def spy(*args, **kwargs):
        results, failures = original(*args, **kwargs)
        seen.extend(r.extra for r in results)
        return results, failures

    scheduler.run_tasks = spy
    try:
        submit(cfg)
    finally:
        scheduler.run_tasks = original
    assert len(seen) == 8
    assert {tuple(e["gpu_ids"]) for e in seen} == {("0",)}          # every member got the one GPU
    concurrent = max_concurrent(seen)
    assert concurrent <= expected_max
    if expected_max > 1:
        assert concurrent >= 2                                       # packed: several at once on one GPU
    _, _, members = runs(tmp_path)
    assert {m.data.tags["ensemble.device"] for m in members} == {"cpu"}  # no CUDA here: CPU, as documented


class KillOnce(Observer):
    """SIGKILLs the worker process of member 0 once it has finished epoch 2."""

    def __init__(self):
        self.killed = None

    def event(self, e):
        if self.killed is None and e["type"] == "epoch" and e["task"] == 0 and e["epoch"] >= 2:
            self.killed = (e["pid"], e["epoch"])
            os.kill(e["pid"], signal.SIGKILL)


def test_a_killed_worker_resumes_from_its_checkpoint_and_its_run_is_not_duplicated(ray_cluster, tmp_path):
    cfg = config(tmp_path, "strategy.members=2", "trainer.epochs=8", "data.n_train=4000",
                 "data.input_shape=[1,16,16]", "trainer.batch_size=8", "cluster.max_retries=2")
    killer = KillOnce()
    result = submit(cfg, killer)
    assert killer.killed is not None
    client, parents, members = runs(tmp_path)
    assert parents[0].info.status == "FINISHED" and len(members) == 2       # one run per member
    m0 = members[0]
    assert m0.info.status == "FINISHED"
    assert m0.data.tags["ensemble.restarts"] == "1"
    resumed = int(m0.data.tags["ensemble.resumed_from_epoch"])
    assert 2 <= resumed < 8                                   # not from epoch 0: it lost at most one epoch
    steps = [h.step for h in client.get_metric_history(m0.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 9))                 # every epoch once, none duplicated
    assert members[1].data.tags["ensemble.restarts"] == "0"
    assert result.members[0]["restarts"] == 1


def test_min_members_lets_an_ensemble_finish_without_a_member_that_keeps_dying(ray_cluster, tmp_path):
    class KillAlways(Observer):
        """Kills member 0's worker as soon as it starts, every time (it never gets through 8 epochs)."""

        def event(self, e):
            if e["task"] == 0 and e["type"] == "start":
                os.kill(e["pid"], signal.SIGKILL)

    base = ["strategy.members=3", "trainer.epochs=8", "data.n_train=4000", "trainer.batch_size=8",
            "cluster.max_retries=1"]
    result = submit(config(tmp_path, *base, "cluster.min_members=2"), KillAlways())
    assert "finished with 2 of 3 members" in result.degraded
    _, parents, members = runs(tmp_path)
    assert parents[0].info.status == "FINISHED" and "ensemble.degraded" in parents[0].data.tags
    assert parents[0].data.metrics["members_finished"] == 2
    assert [m.info.status for m in members] == ["FAILED", "FINISHED", "FINISHED"]

    with pytest.raises(EnsembleFailed, match="1 of 3 tasks failed"):
        submit(config(tmp_path, *base), KillAlways())
    _, parents, members = runs(tmp_path)
    latest = max(parents, key=lambda r: r.info.start_time)
    assert latest.info.status == "FAILED"
    assert all(m.info.status != "RUNNING" for m in members)

"""ensemble_service.planning: resolved config -> plain, picklable task specs and member slots."""
from __future__ import annotations

import pickle

from ensemble_service.config import load_config
from ensemble_service.planning import PackedSpec, checkpoint_root, ensemble_id, pack_members, plan

SMALL = ["data=synthetic", "model=mlp", "model.depth=1", "model.width=8", "trainer.epochs=2"]


def test_independent_members_have_consecutive_seeds_and_their_own_checkpoints(tmp_path):
    p = plan(load_config([*SMALL, "strategy.members=3", "trainer.seed=10", f"cluster.storage={tmp_path}"]))
    assert [t.kind for t in p.tasks] == ["member"] * 3 and [t.seed for t in p.tasks] == [10, 11, 12]
    assert len({t.checkpoint_path for t in p.tasks}) == 3
    assert all(t.checkpoint_path.startswith(str(tmp_path)) for t in p.tasks)
    assert [s.index for s in p.slots] == [0, 1, 2] and {s.tags["ensemble.role"] for s in p.slots} == {"member"}
    assert pickle.loads(pickle.dumps(p.tasks)) == p.tasks  # plain values only: they travel to Ray workers


def test_mixed_members_cycle_their_models_and_settings():
    cfg = load_config([*SMALL, "strategy.members=4",
                       "strategy.models=[{name:mlp,width:4},{name:lenet,optimizer:sgd,trainer:{epochs:5}}]"])
    tasks = plan(cfg).tasks
    assert [t.architecture for t in tasks] == ["mlp", "lenet", "mlp", "lenet"]
    assert [t.epochs for t in tasks] == [2, 5, 2, 5]
    assert tasks[1].optimizer["_target_"] == "torch.optim.SGD" and tasks[0].optimizer["_target_"] == "torch.optim.Adam"


def test_packing_groups_members_that_share_model_optimizer_epochs_and_batch(tmp_path):
    cfg = load_config([*SMALL, "strategy.members=5", "cluster.pack=2",
                       "strategy.models=[{name:mlp},{name:mlp},{name:mlp,trainer:{epochs:3}}]"])
    tasks = plan(cfg).tasks
    packs = [t for t in tasks if isinstance(t, PackedSpec)]
    # members 0,1,3,4 share settings (entries 0 and 1 resolve to the same spec) -> packs of 2; member 2 alone
    assert [t.member_indices for t in packs] == [(0, 1), (3, 4)]
    assert [t.index for t in tasks if not isinstance(t, PackedSpec)] == [2]
    assert pack_members(plan(load_config([*SMALL, "strategy.members=3"])).tasks, 3, tmp_path)[0].member_indices == (0, 1, 2)


def test_trajectory_strategies_plan_one_task_per_trajectory_with_the_strategys_tags():
    cfg = load_config([*SMALL, "strategy=snapshot", "strategy.cycles=2", "strategy.trajectories=2", "optimizer=sgd"])
    p = plan(cfg)
    assert [t.kind for t in p.tasks] == ["trajectory"] * 2 and [t.member_indices for t in p.tasks] == [(0, 1), (2, 3)]
    assert [t.seed for t in p.tasks] == [0, 1] and p.tasks[0].params == {"cycles": 2, "use_last": None}
    assert [(s.task, s.tags["ensemble.cycle"], s.tags["ensemble.trajectory"]) for s in p.slots] == [
        (0, "1", "0"), (0, "2", "0"), (1, "1", "1"), (1, "2", "1")]


def test_ids_are_fresh_and_storage_falls_back_to_the_environment(tmp_path, monkeypatch):
    cfg = load_config(SMALL)
    assert ensemble_id(cfg) != ensemble_id(load_config([*SMALL, "trainer.seed=1"]))
    monkeypatch.setenv("ENSEMBLE_STORAGE", str(tmp_path / "env"))
    assert checkpoint_root(cfg) == str((tmp_path / "env").resolve())
    monkeypatch.delenv("ENSEMBLE_STORAGE")
    monkeypatch.chdir(tmp_path)
    assert checkpoint_root(cfg) == str((tmp_path / ".ensemble" / "checkpoints").resolve())

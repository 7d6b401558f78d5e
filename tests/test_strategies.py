"""The strategy registry: every strategy composes, plans and trains through the one trajectory loop,
and a new strategy is one class and one YAML file (the README's example, run as written)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from ensemble_service import strategies
from ensemble_service.config import conf_dir, load_config
from ensemble_service.data import load_dataset
from ensemble_service.planning import plan
from ensemble_service.strategies import STRATEGIES

README = Path(__file__).resolve().parent.parent / "README.md"
SMALL = ["data=synthetic", "model=mlp", "model.depth=1", "model.width=16", "trainer.batch_size=16"]
CASES = {
    "independent": (["strategy.members=2", "trainer.epochs=2"], 2),
    "snapshot": (["strategy.cycles=2", "trainer.epochs=2", "optimizer=sgd"], 2),
    "swa": (["trainer.epochs=3", "strategy.swa_start=1"], 2),
    "fge": (["strategy.cycles=1", "strategy.cycle_epochs=2", "trainer.epochs=3", "optimizer=sgd"], 1),
    "heads": (["strategy.heads=3", "trainer.epochs=2"], 3),
    "mc_dropout": (["strategy.samples=3", "model.dropout=0.3", "trainer.epochs=2"], 3),
}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=48, n_val=24, n_test=24)


def test_every_registered_strategy_has_a_conf_file_and_a_case_here():
    assert set(STRATEGIES.names()) == set(CASES)
    assert {p.stem for p in (conf_dir() / "strategy").glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_strategy_plans_and_trains_its_members_in_one_worker_call(name, tmp_path, data):
    from workers.member import train_member
    from workers.trajectory import train_trajectory

    overrides, members = CASES[name]
    cfg = load_config([*SMALL, f"strategy={name}", *overrides, f"cluster.storage={tmp_path}"])
    p = plan(cfg)
    assert len(p.slots) == members
    results = []
    for task in p.tasks:
        train = train_trajectory if task.kind == "trajectory" else train_member
        out = train(task, data)
        results += out if isinstance(out, list) else [out]
    assert sorted(r.index for r in results) == list(range(members))
    assert all(r.test_probs.shape == (24, 3) and torch.isfinite(r.test_probs).all() for r in results)
    roles = {p.slots[r.index].tags["ensemble.role"] for r in results}
    assert roles == {t["ensemble.role"] for t in STRATEGIES.get(name).member_tags(cfg.strategy)}


def test_a_new_strategy_is_one_class_and_one_yaml_file(tmp_path, monkeypatch, data):
    """The README's "Adding a strategy" example: its code and YAML, as written there."""
    from workers.trajectory import train_trajectory

    text = README.read_text()
    section = text[text.index("**Adding a strategy**"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    yaml_text = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    namespace = {}
    exec("from dataclasses import dataclass\n"
         "from ensemble_service.strategies import EpochPlan, Strategy, StrategyConfig, register_strategy\n" + code,
         namespace)
    try:
        conf = tmp_path / "conf"
        shutil.copytree(conf_dir(), conf)
        (conf / "strategy" / "last_epochs.yaml").write_text(yaml_text)
        monkeypatch.setenv("ENSEMBLE_CONF_DIR", str(conf))
        cfg = load_config([*SMALL, "strategy=last_epochs", "trainer.epochs=4", f"cluster.storage={tmp_path}"])
        assert cfg.strategy.epochs_kept == cfg.strategy.members == 3
        p = plan(cfg)
        assert len(p.slots) == 3 and [s.tags["ensemble.role"] for s in p.slots] == ["epoch"] * 3
        results = train_trajectory(p.tasks[0], data)
        assert [r.extra["epoch"] for r in results] == [2, 3, 4]
        with pytest.raises(Exception, match="strategy.heads"):
            load_config([*SMALL, "strategy=last_epochs", "strategy.heads=2"])
    finally:
        STRATEGIES.remove("last_epochs")
    assert "last_epochs" not in STRATEGIES and strategies.STRATEGIES is STRATEGIES

"""trainer.schedule / trainer.warmup_epochs: the per-iteration learning rate of plain members, solo and
packed, its checkpoint and resume, and its config checks."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ensemble_service.config import ConfigError, load_config
from ensemble_service.data import load_dataset
from ensemble_service.planning import MemberSpec, PackedSpec, plan
from ensemble_service.schedules import lr_factor
from workers.member import train_member
from workers.packed import train_packed
from workers.state import load_checkpoint

MLP = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
       "depth": 1, "width": 16}
SGD = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}


@pytest.fixture(scope="module")
def data():  # 96 training samples, batch 32: three steps per epoch
    return load_dataset("synthetic", n_train=96, n_val=48, n_test=48, num_classes=3, input_shape=[1, 8, 8])


def spec(tmp_path, name="m0", **kw) -> MemberSpec:
    base = dict(index=0, seed=5, model=MLP, optimizer=SGD, epochs=4, batch_size=32, bagging=False, device="cpu",
                checkpoint_path=str(tmp_path / f"{name}.ckpt"), schedule="cosine", warmup_epochs=1)
    base.update(kw)
    return MemberSpec(**base)


def test_the_factors_by_hand():
    # 10 iterations, 2 of warm-up: 1/2, 1, then the cosine over s = 1..8 of n = 8
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(3, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(7, 10, 2, "cosine") == pytest.approx(0.5)                  # s = 5: cos(pi/2) = 0
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))
    # step: x0.1 after half of the 8 post-warm-up iterations (s > 4), x0.01 after three quarters (s > 6)
    assert [lr_factor(t, 10, 2, "step") for t in range(3, 11)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert [lr_factor(t, 4, 0, "constant") for t in range(1, 5)] == [1.0] * 4
    with pytest.raises(ValueError):
        lr_factor(1, 4, 0, "linear")


def test_each_epoch_runs_at_the_scheduled_rate_and_the_scheduler_is_checkpointed(tmp_path, data):
    r = train_member(spec(tmp_path), data)
    # run_epoch reports the lr of each epoch's last step: iterations 3, 6, 9, 12 of 12 (3 of warm-up)
    want = [0.2 * lr_factor(t, 12, 3, "cosine") for t in (3, 6, 9, 12)]
    assert [h["lr"] for h in r.history] == pytest.approx(want)
    assert want[0] == pytest.approx(0.2) and want[-1] < 0.02
    ckpt = load_checkpoint(spec(tmp_path).checkpoint_path)
    assert set(ckpt["states"]) == {"model", "optimizer", "scheduler"}
    assert ckpt["states"]["scheduler"]["last_epoch"] == 12
    assert ckpt["identity"]["schedule"] == ["cosine", 1]
    # a constant rate without warm-up has no scheduler at all
    plain = train_member(spec(tmp_path, "plain", schedule="constant", warmup_epochs=0), data)
    assert [h["lr"] for h in plain.history] == [0.2] * 4
    assert not torch.allclose(plain.test_probs, r.test_probs)


class Stop(Exception):
    pass


def _die_after(epoch):
    def report(event):
        if event["type"] == "epoch" and event["epoch"] == epoch:
            raise Stop()
    return report


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_resume_with_a_schedule_equals_an_uninterrupted_run(tmp_path, data, schedule):
    whole = train_member(spec(tmp_path / "a", schedule=schedule), data)
    s = spec(tmp_path / "b", schedule=schedule)
    with pytest.raises(Stop):
        train_member(s, data, report=_die_after(2))
    resumed = train_member(s, data)
    assert resumed.resumed_from == 2
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in whole.history], rel=1e-12)
    assert torch.allclose(resumed.test_probs, whole.test_probs, atol=1e-6)


def test_packed_members_follow_the_same_schedule_as_solo_members_and_resume_exactly(tmp_path, data):
    ms = tuple(spec(tmp_path, f"p{i}", index=i, seed=5 + i) for i in range(2))
    packed = train_packed(PackedSpec(index=0, members=ms, checkpoint_path=str(tmp_path / "pack.ckpt")), data)
    for p, m in zip(packed, ms):
        solo = train_member(dataclasses.replace(m, checkpoint_path=str(tmp_path / f"solo{m.index}.ckpt")), data)
        assert [h["lr"] for h in p.history] == pytest.approx([h["lr"] for h in solo.history])
        assert torch.allclose(p.test_probs, solo.test_probs, atol=1e-4)

    ms_b = tuple(dataclasses.replace(m, checkpoint_path=str(tmp_path / f"b{m.index}.ckpt")) for m in ms)
    pspec = PackedSpec(index=0, members=ms_b, checkpoint_path=str(tmp_path / "pack_b.ckpt"))
    with pytest.raises(Stop):
        train_packed(pspec, data, report=_die_after(1))
    assert load_checkpoint(pspec.checkpoint_path)["states"]["scheduler"]["last_epoch"] == 3
    for r, w in zip(train_packed(pspec, data), packed):
        assert r.resumed_from == 1
        assert torch.allclose(r.test_probs, w.test_probs, atol=1e-6)


def test_config_carries_the_schedule_to_every_member_and_checks_it():
    cfg = load_config(["data=synthetic", "trainer.schedule=step", "trainer.warmup_epochs=2", "trainer.epochs=6",
                       "strategy.members=2", "cluster.pack=2"], check_files=False)
    specs = plan(cfg).tasks
    assert len(specs) == 1 and [(m.schedule, m.warmup_epochs) for m in specs[0].members] == [("step", 2)] * 2
    for overrides, needle in [
        (["trainer.schedule=linear"], "unknown trainer.schedule 'linear'; choose one of: constant, cosine, step"),
        (["trainer.warmup_epochs=-1"], "trainer.warmup_epochs must be >= 0"),
        (["trainer.warmup_epochs=3", "trainer.epochs=3"], "trainer.warmup_epochs (3) must be below trainer.epochs (3)"),
        (["strategy=snapshot", "trainer.schedule=cosine"], "apply to strategy=independent; strategy=snapshot sets"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(["data=synthetic", *overrides], check_files=False)
        assert needle in str(exc.value) and "\n" not in str(exc.value)

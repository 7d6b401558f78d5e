"""workers/state.py: the resume checkpoint every worker uses, the event schema, the loop's pieces."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from workers.state import (
    CHECKPOINT_FORMAT, Checkpoint, MemberError, Progress, collected_event, epoch_event, load_checkpoint, run_epoch,
    start_event, steps_per_epoch,
)


def test_a_checkpoint_restores_states_rng_and_progress_exactly(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(7)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    gen_draw = torch.randperm(10, generator=gen)
    ck = Checkpoint(str(tmp_path / "t.ckpt"), {"kind": "member", "member": 1}, torch.device("cpu"))
    progress = Progress(epoch=3, history=[{"epoch": 3}], train_seconds=1.5, extra={"collected": [1]})
    ck.save(progress, {"model": model, "optimizer": opt, "scheduler": sched}, {"order": gen})
    assert os.listdir(tmp_path) == ["t.ckpt"]  # written atomically: no temp file left
    expected = (torch.randperm(10, generator=gen), torch.rand(3))

    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    gen2 = torch.Generator().manual_seed(0)
    torch.manual_seed(99)
    resumed = Checkpoint(str(tmp_path / "t.ckpt"), {"kind": "member", "member": 1}, torch.device("cpu")).resume(
        {"model": model2, "optimizer": opt2, "scheduler": sched2}, {"order": gen2})
    assert (resumed.epoch, resumed.resumed_from, resumed.restarts) == (3, 3, 1)
    assert resumed.history == [{"epoch": 3}] and resumed.extra == {"collected": [1]} and resumed.train_seconds == 1.5
    assert torch.equal(model2.weight, model.weight) and opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.randperm(10, generator=gen2), expected[0]) and torch.equal(torch.rand(3), expected[1])
    assert load_checkpoint(str(tmp_path / "t.ckpt"))["format"] == CHECKPOINT_FORMAT
    assert not gen_draw.equal(expected[0])


def test_another_tasks_or_a_foreign_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "t.ckpt")
    Checkpoint(path, {"kind": "member", "member": 1}, "cpu").save(Progress(), {}, {})
    with pytest.raises(MemberError, match="belongs to another task"):
        Checkpoint(path, {"kind": "member", "member": 2}, "cpu").resume({}, {})
    torch.save({"format": 1, "identity": {}}, path)
    with pytest.raises(MemberError, match="unknown format"):
        Checkpoint(path, {}, "cpu").resume({}, {})
    (tmp_path / "t.ckpt").write_bytes(b"garbage")
    with pytest.raises(MemberError, match="cannot read checkpoint"):
        Checkpoint(path, {}, "cpu").resume({}, {})
    assert Checkpoint(str(tmp_path / "none.ckpt"), {}, "cpu").resume({}, {}) == Progress()


def test_every_event_has_the_one_schema():
    p = Progress(epoch=2, restarts=1, resumed_from=2)
    assert start_event(4, [4, 5], p, 10, "cpu") == {"type": "start", "task": 4, "members": [4, 5], "epoch": 2,
                                                   "epochs": 10, "resumed_from": 2, "restarts": 1, "device": "cpu"}
    e = epoch_event(4, 10, 1.5, {"epoch": 3, "train_loss": 0.5}, members={5: {"val_acc": 0.9}})
    assert e == {"type": "epoch", "task": 4, "epochs": 10, "seconds": 1.5, "epoch": 3, "train_loss": 0.5,
                 "members": {5: {"val_acc": 0.9}}}
    assert collected_event(4, 5, 3) == {"type": "collected", "task": 4, "member": 5, "epoch": 3}


def test_run_epoch_steps_the_scheduler_every_iteration_and_reports_the_last_steps_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    spec = SimpleNamespace(batch_size=4, index=0, optimizer={"lr": 1.0})
    loss, lr = run_epoch(spec, 0, model, opt, x, y, torch.arange(10), scheduler=sched)
    assert steps_per_epoch(10, 4, model) == 3 and lr == pytest.approx(1 / 3)  # steps at lr 1, 1/2, 1/3
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 4) and loss > 0
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert steps_per_epoch(9, 4, bn) == 2  # a trailing batch of one is skipped with BatchNorm

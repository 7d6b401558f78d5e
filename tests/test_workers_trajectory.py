"""The trajectory worker: snapshot, SWA, FGE, shared-backbone heads and MC dropout members."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.optim.swa_utils import update_bn

from ensemble_service.data import load_dataset
from ensemble_service.models import count_parameters, create_model
from ensemble_service.planning import TrajectorySpec
from ensemble_service.strategies import MultiHead, fge_lr, mc_dropout_logits, snapshot_lr
from workers.state import MemberError, forward_batches, load_checkpoint
from workers.trajectory import train_trajectory

torch.set_num_threads(1)

N_TRAIN, BATCH = 96, 16
STEPS = N_TRAIN // BATCH  # 6 optimizer steps per epoch
LR = 0.1
MLP = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
       "depth": 1, "width": 32}
SGD = {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **{"n_train": N_TRAIN, "n_val": 48, "n_test": 48, "num_classes": 3,
                                                "input_shape": [1, 8, 8]})


def tspec(tmp_path, strategy, params, members, *, epochs, model=None, **kw) -> TrajectorySpec:
    base = dict(index=1, strategy=strategy, seed=7, model=dict(model or MLP), optimizer=dict(SGD), epochs=epochs,
                batch_size=BATCH, params=params, member_indices=tuple(members), device="cpu",
                checkpoint_path=str(tmp_path / f"{strategy}.ckpt"))
    base.update(kw)
    return TrajectorySpec(**base)


def blob_model(member):
    blob = torch.load(io.BytesIO(member.weights), weights_only=True)
    model = create_model(blob["model"]["name"], tuple(blob["input_shape"]), blob["num_classes"],
                         **{k: v for k, v in blob["model"].items() if k != "name"})
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob


class Stop(Exception):
    pass


# --------------------------------------------------------------------------- schedules


def test_snapshot_lr_is_huang_eq2():
    # T=100, M=5: cycles of ceil(100/5)=20 iterations
    for start in (1, 21, 41, 61, 81):
        assert snapshot_lr(start, 100, 5, 0.2) == pytest.approx(0.2)           # cycle start: lr0
        assert snapshot_lr(start + 10, 100, 5, 0.2) == pytest.approx(0.1)      # middle: cos(pi/2)=0 -> lr0/2
        last = snapshot_lr(start + 19, 100, 5, 0.2)                             # end: lr0/2 (cos(19pi/20)+1)
        assert last == pytest.approx(0.1 * (math.cos(math.pi * 19 / 20) + 1)) and last < 0.0025
    # T=10, M=3: ceil(10/3)=4 iterations per cycle, the last cycle cut short
    assert [snapshot_lr(t, 10, 3, 1.0) for t in (1, 5, 9)] == pytest.approx([1.0, 1.0, 1.0])
    assert snapshot_lr(3, 10, 3, 1.0) == pytest.approx(0.5)
    assert snapshot_lr(4, 10, 3, 1.0) == pytest.approx((math.cos(3 * math.pi / 4) + 1) / 2)  # 0.1464
    assert snapshot_lr(10, 10, 3, 1.0) == pytest.approx((math.cos(math.pi / 4) + 1) / 2)     # 0.8536


def test_fge_lr_is_piecewise_linear_between_lr1_and_lr2():
    n, lr1, lr2 = 8, 0.05, 0.01
    assert fge_lr(4, n, lr1, lr2) == pytest.approx(lr2)                      # t = 1/2
    assert fge_lr(12, n, lr1, lr2) == pytest.approx(lr2)                     # middle of the second cycle
    assert fge_lr(8, n, lr1, lr2) == pytest.approx(lr1)                      # t = 1: cycle end = next start
    assert fge_lr(2, n, lr1, lr2) == pytest.approx(0.5 * lr1 + 0.5 * lr2)    # t = 1/4
    assert fge_lr(6, n, lr1, lr2) == pytest.approx(0.5 * lr2 + 0.5 * lr1)    # t = 3/4
    assert fge_lr(1, n, lr1, lr2) == pytest.approx(0.75 * lr1 + 0.25 * lr2)  # t = 1/8, just after lr1
    assert fge_lr(9, n, lr1, lr2) == fge_lr(1, n, lr1, lr2)


# --------------------------------------------------------------------------- snapshot


def test_snapshot_sets_the_lr_every_iteration_and_snapshots_each_cycle_end(tmp_path, data):
    lrs, events = [], []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        spec = tspec(tmp_path, "snapshot", {"cycles": 3, "use_last": None}, (3, 4, 5), epochs=3)
        members = train_trajectory(spec, data, report=events.append)
    finally:
        handle.remove()
    total = 3 * STEPS
    assert lrs == pytest.approx([snapshot_lr(t, total, 3, LR) for t in range(1, total + 1)])
    assert [lrs[c * STEPS] for c in range(3)] == pytest.approx([LR] * 3)  # each cycle's first step at lr0
    assert len(set(round(x, 12) for x in lrs[:STEPS])) == STEPS           # a new lr every iteration
    assert [m.index for m in members] == [3, 4, 5]
    assert [m.extra["cycle"] for m in members] == [1, 2, 3]
    assert [m.extra["epoch"] for m in members] == [1, 2, 3]
    assert {m.extra["role"] for m in members} == {"snapshot"} and {m.extra["trajectory"] for m in members} == {1}
    assert [len(m.history) for m in members] == [1, 2, 3]
    assert [h["lr"] for h in members[-1].history] == pytest.approx([lrs[STEPS - 1]] * 3)  # per-epoch lr: last step's
    assert not torch.allclose(members[0].test_probs, members[2].test_probs)
    assert events[0] == {"type": "start", "task": 1, "members": [3, 4, 5], "epoch": 0, "epochs": 3,
                         "resumed_from": 0, "restarts": 0, "device": "cpu"}
    assert [(e["type"], e.get("member"), e["epoch"]) for e in events[1:]] == [
        ("collected", 3, 1), ("epoch", None, 1), ("collected", 4, 2), ("epoch", None, 2),
        ("collected", 5, 3), ("epoch", None, 3)]
    for m in members:  # every member is a standalone model reproducing its predictions
        model, _ = blob_model(m)
        with torch.no_grad():
            assert torch.allclose(model(data.x_test).softmax(-1), m.test_probs, atol=1e-6)
        assert set(m.metrics) == {"val_acc", "val_nll", "test_acc", "test_nll", "test_brier", "test_ece"}


def test_snapshot_use_last_keeps_only_the_last_snapshots(tmp_path, data):
    spec = tspec(tmp_path, "snapshot", {"cycles": 3, "use_last": 2}, (8, 9), epochs=3)
    members = train_trajectory(spec, data)
    assert [(m.index, m.extra["cycle"], m.extra["epoch"]) for m in members] == [(8, 2, 2), (9, 3, 3)]
    assert len(load_checkpoint(spec.checkpoint_path)["extra"]["collected"]) == 2


def test_stopped_snapshot_trajectory_resumes_and_matches_an_uninterrupted_run(tmp_path, data):
    params = {"cycles": 2, "use_last": None}
    model = dict(MLP, batchnorm=True, dropout=0.2)
    whole = train_trajectory(tspec(tmp_path / "a", "snapshot", params, (0, 1), epochs=4, model=model), data)

    def die_after_2(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            raise Stop()

    spec = tspec(tmp_path / "b", "snapshot", params, (0, 1), epochs=4, model=model)
    with pytest.raises(Stop):
        train_trajectory(spec, data, report=die_after_2)
    ckpt = load_checkpoint(spec.checkpoint_path)
    assert ckpt["epoch"] == 2 and ckpt["states"]["scheduler"]["last_epoch"] == 2 * STEPS
    assert len(ckpt["extra"]["collected"]) == 1

    events = []
    resumed = train_trajectory(spec, data, report=events.append)
    assert events[0]["resumed_from"] == 2 and events[0]["restarts"] == 1 and events[0]["epoch"] == 2
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [3, 4]
    assert [e["member"] for e in events if e["type"] == "collected"] == [1]  # member 0 was reported before
    assert [(m.index, m.extra["epoch"]) for m in resumed] == [(0, 2), (1, 4)]
    for a, b in zip(whole, resumed):
        assert torch.allclose(a.test_probs, b.test_probs, atol=1e-6)
        assert [h["lr"] for h in a.history] == pytest.approx([h["lr"] for h in b.history])
    assert resumed[1].resumed_from == 2 and resumed[1].restarts == 1


# --------------------------------------------------------------------------- SWA


def test_swa_averages_the_iterates_and_recomputes_batchnorm_statistics(tmp_path, data):
    model_cfg = dict(MLP, batchnorm=True)
    spec = tspec(tmp_path, "swa", {"swa_start": 2, "swa_lr": 0.02}, (0, 1), epochs=4, model=model_cfg)
    iterates = {}

    def keep_iterate(event):  # the checkpoint written before each epoch report holds that epoch's iterate
        if event["type"] == "epoch":
            iterates[event["epoch"]] = load_checkpoint(spec.checkpoint_path)["states"]["model"]

    swa, last = train_trajectory(spec, data, report=keep_iterate)
    assert (swa.extra["role"], last.extra["role"]) == ("swa", "last") and swa.extra["n_averaged"] == 2
    # SWALR from swa_start: epochs 1-3 at optimizer.lr, then swa_lr after the first averaged epoch
    assert [h["lr"] for h in last.history] == pytest.approx([LR, LR, LR, 0.02])

    swa_model, _ = blob_model(swa)
    last_model, _ = blob_model(last)
    averaged = [iterates[3], iterates[4]]  # swa_start=2: averaged after epochs 3 and 4
    for name, p in swa_model.named_parameters():
        assert torch.allclose(p, torch.stack([it[name] for it in averaged]).mean(0), atol=1e-6), name
    assert torch.equal(last_model.state_dict()["features.1.weight"], iterates[4]["features.1.weight"])

    bn = "features.2"  # Flatten, Linear, BatchNorm1d, ReLU
    state = swa_model.state_dict()
    for stat in ("running_mean", "running_var"):
        key = f"{bn}.{stat}"
        assert not torch.allclose(state[key], iterates[4][key], atol=1e-4)
        assert not torch.allclose(state[key], (iterates[3][key] + iterates[4][key]) / 2, atol=1e-4)
    recomputed, _ = blob_model(swa)
    update_bn([data.x_train[i:i + BATCH] for i in range(0, N_TRAIN, BATCH)], recomputed)
    for stat in ("running_mean", "running_var"):
        key = f"{bn}.{stat}"
        assert torch.allclose(state[key], recomputed.state_dict()[key], atol=1e-5)
    ckpt = load_checkpoint(spec.checkpoint_path)
    assert int(ckpt["states"]["swa_model"]["n_averaged"]) == 2 and ckpt["states"]["swa_scheduler"]["_step_count"] == 3


def test_stopped_swa_trajectory_resumes_with_its_average(tmp_path, data):
    params = {"swa_start": 1, "swa_lr": 0.02, "anneal_epochs": 2}
    whole = train_trajectory(tspec(tmp_path / "a", "swa", params, (0, 1), epochs=4, model=dict(MLP, batchnorm=True)), data)

    def die_after_3(event):
        if event["type"] == "epoch" and event["epoch"] == 3:
            raise Stop()

    spec = tspec(tmp_path / "b", "swa", params, (0, 1), epochs=4, model=dict(MLP, batchnorm=True))
    with pytest.raises(Stop):
        train_trajectory(spec, data, report=die_after_3)
    resumed = train_trajectory(spec, data)
    for a, b in zip(whole, resumed):
        assert torch.allclose(a.test_probs, b.test_probs, atol=1e-6)
        assert [h["lr"] for h in a.history] == pytest.approx([h["lr"] for h in b.history])
    assert resumed[0].extra["n_averaged"] == 3


# --------------------------------------------------------------------------- FGE


def test_fge_collects_at_the_middle_of_each_cycle_where_lr_is_lr2(tmp_path, data):
    params = {"pretrain_epochs": 1, "cycles": 2, "cycle_epochs": 2, "lr1": 0.05, "lr2": 0.01}
    lrs = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        members = train_trajectory(tspec(tmp_path, "fge", params, (2, 3), epochs=5), data)
    finally:
        handle.remove()
    assert [(m.index, m.extra["cycle"], m.extra["epoch"], m.extra["role"]) for m in members] == [
        (2, 1, 2, "fge"), (3, 2, 4, "fge")]  # pretrain 1 + cycle_epochs/2 + k * cycle_epochs
    assert lrs[:STEPS] == pytest.approx([LR] * STEPS)  # pretraining at optimizer.lr
    assert lrs[STEPS:] == pytest.approx([fge_lr(i, 2 * STEPS, 0.05, 0.01) for i in range(1, 4 * STEPS + 1)])
    assert [members[0].history[-1]["lr"], members[1].history[-1]["lr"]] == pytest.approx([0.01, 0.01])
    assert [len(m.history) for m in members] == [2, 4]


# --------------------------------------------------------------------------- heads


def test_multihead_shares_one_backbone():
    base = create_model("mlp", (1, 8, 8), 3, depth=1, width=32, dropout=0.1)
    multi = MultiHead(base, 4, seed=0)
    head = count_parameters(base.classifier)
    assert count_parameters(multi) == count_parameters(base.features) + 4 * head
    assert multi.backbone is base.features and len(multi.heads) == 4
    assert multi(torch.zeros(5, 1, 8, 8)).shape == (5, 4, 3)
    weights = [h[-1].weight for h in multi.heads]
    assert not torch.allclose(weights[0], weights[1])
    again = MultiHead(create_model("mlp", (1, 8, 8), 3, depth=1, width=32, dropout=0.1), 4, seed=0)
    assert torch.equal(again.heads[2][-1].weight, weights[2])  # a head's init depends only on (seed, k)


def test_heads_trajectory_yields_one_standalone_member_per_head(tmp_path, data):
    spec = tspec(tmp_path, "heads", {"heads": 3}, (0, 1, 2), epochs=2, model=dict(MLP, batchnorm=True, dropout=0.1))
    members = train_trajectory(spec, data)
    assert [(m.index, m.extra["head"], m.extra["role"], m.extra["epoch"]) for m in members] == [
        (0, 0, "head", 2), (1, 1, "head", 2), (2, 2, "head", 2)]
    assert not torch.allclose(members[0].test_probs, members[1].test_probs)
    models = [blob_model(m)[0] for m in members]
    for m, model in zip(members, models):
        with torch.no_grad():
            assert torch.allclose(model(data.x_test).softmax(-1), m.test_probs, atol=1e-6)
    # one shared backbone: every member carries the same features, different classifiers
    assert torch.equal(models[0].features[1].weight, models[2].features[1].weight)
    assert not torch.equal(models[0].classifier[-1].weight, models[2].classifier[-1].weight)


# --------------------------------------------------------------------------- MC dropout


def test_mc_dropout_members_are_seeded_stochastic_passes(tmp_path, data):
    model_cfg = dict(MLP, batchnorm=True, dropout=0.3)
    first = train_trajectory(tspec(tmp_path / "a", "mc_dropout", {"samples": 3}, (0, 1, 2), epochs=2,
                                   model=model_cfg), data)
    second = train_trajectory(tspec(tmp_path / "b", "mc_dropout", {"samples": 3}, (0, 1, 2), epochs=2,
                                    model=model_cfg), data)
    assert [m.extra["sample"] for m in first] == [0, 1, 2] and {m.extra["role"] for m in first} == {"mc_sample"}
    assert not torch.allclose(first[0].test_probs, first[1].test_probs)
    for a, b in zip(first, second):
        assert torch.equal(a.test_probs, b.test_probs) and torch.equal(a.val_probs, b.val_probs)
    model, blob = blob_model(first[0])
    assert blob["mc_dropout"] == {"samples": 3, "seed": 7} and first[0].weights is first[2].weights
    # BatchNorm stays in eval mode: the plain eval pass is the members' centre, not a member
    with torch.no_grad():
        assert not torch.allclose(model(data.x_test).softmax(-1), first[0].test_probs)

    before = torch.get_rng_state()
    probs = mc_dropout_logits(model, data.x_test, 3, 7, lambda m, x: forward_batches(m, x, torch.device("cpu"))).softmax(-1)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    assert probs.shape == (3, 48, 3) and not model.training
    assert torch.allclose(probs[1], first[1].test_probs, atol=1e-6)


def test_mc_dropout_without_dropout_is_a_member_error(tmp_path, data):
    with pytest.raises(MemberError, match="dropout"):
        train_trajectory(tspec(tmp_path, "mc_dropout", {"samples": 2}, (0, 1), epochs=1), data)


# --------------------------------------------------------------------------- impossible specs


@pytest.mark.parametrize("strategy,params,members,epochs,match", [
    ("snapshot", {"cycles": 3}, (0, 1, 2), 4, "multiple of params.cycles"),
    ("snapshot", {"cycles": 2, "use_last": 3}, (0, 1, 2), 4, "use_last"),
    ("snapshot", {"cycles": 2}, (0,), 4, "member_indices has 1"),
    ("fge", {"pretrain_epochs": 1, "cycles": 2, "cycle_epochs": 2, "lr1": 0.05, "lr2": 0.01}, (0, 1), 6,
     "must equal pretrain_epochs"),
    ("fge", {"pretrain_epochs": 1, "cycles": 1, "cycle_epochs": 3, "lr1": 0.05, "lr2": 0.01}, (0,), 4, "even"),
    ("swa", {"swa_start": 4, "swa_lr": 0.01}, (0, 1), 4, "swa_start"),
    ("swa", {"swa_start": 1}, (0, 1), 4, "swa_lr is missing"),
    ("boosting", {}, (0,), 1, "unknown strategy"),
])
def test_impossible_specs_are_one_line_member_errors(tmp_path, data, strategy, params, members, epochs, match):
    with pytest.raises(MemberError, match=match) as err:
        train_trajectory(tspec(tmp_path, strategy, params, members, epochs=epochs), data)
    assert "\n" not in str(err.value)


def test_diverging_loss_is_a_member_error(tmp_path, data):
    spec = tspec(tmp_path, "snapshot", {"cycles": 1}, (0,), epochs=1,
                 optimizer={"name": "sgd", "lr": 1e12, "momentum": 0.0, "weight_decay": 0.0})
    with pytest.raises(MemberError, match="training loss became"):
        train_trajectory(spec, data)


def test_a_checkpoint_of_another_trajectory_is_refused(tmp_path, data):
    train_trajectory(tspec(tmp_path, "snapshot", {"cycles": 1}, (0,), epochs=1,
                           checkpoint_path=str(tmp_path / "t.ckpt")), data)
    with pytest.raises(MemberError, match="belongs to another task"):
        train_trajectory(tspec(tmp_path, "heads", {"heads": 1}, (0,), epochs=1,
                               checkpoint_path=str(tmp_path / "t.ckpt")), data)

"""Packed members (cluster.pack=K): K members as one stacked model equal the same members trained alone."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from ensemble_service.data import load_dataset
from ensemble_service.models import create_model
from ensemble_service.planning import MemberSpec, PackedSpec
from workers.member import train_member
from workers.state import MemberError, load_checkpoint
from workers.packed import train_packed

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}
ADAM = {"name": "adam", "lr": 0.01, "weight_decay": 1e-3}
MLP = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
       "depth": 2, "width": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n_train: int):
    return load_dataset("synthetic", **{"n_train": n_train, "n_val": 40, "n_test": 40, "num_classes": 3,
                                                "input_shape": [1, 8, 8]})


@pytest.fixture(scope="module")
def data():
    return synthetic(96)  # batch 20: four full batches and a trailing one of 16


def members(tmp_path, k=3, *, bagging=(False,), **kw):
    base = dict(epochs=2, batch_size=20, device="cpu", model=MLP, optimizer=SGD)
    base.update(kw)
    return tuple(MemberSpec(index=10 + i, seed=7 + 3 * i, bagging=bagging[i % len(bagging)],
                            checkpoint_path=str(tmp_path / f"m{i}.ckpt"), **base) for i in range(k))


def pack(tmp_path, ms, index=2):
    return PackedSpec(index=index, members=tuple(ms), checkpoint_path=str(tmp_path / "pack.ckpt"))


def train_alone(tmp_path, ms, data):
    return [train_member(dataclasses.replace(m, checkpoint_path=str(tmp_path / f"solo_{m.index}.ckpt")), data)
            for m in ms]


def state(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


def assert_same_weights(a: bytes, b: bytes, atol: float):
    sa, sb = state(a)["state_dict"], state(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name].double(), sb[name].double(), atol=atol, rtol=0), name


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("bagging", [False, True], ids=["plain", "bagging"])
def test_one_step_equals_the_member_trained_alone(tmp_path, optimizer, bagging):
    data = synthetic(20)  # n_train == batch_size: one epoch is one optimizer step
    ms = members(tmp_path, epochs=1, optimizer=optimizer, bagging=(bagging,))
    packed = train_packed(pack(tmp_path, ms), data)
    alone = train_alone(tmp_path, ms, data)
    assert [r.index for r in packed] == [m.index for m in ms]
    for p, s in zip(packed, alone):
        assert p.seed == s.seed and p.architecture == s.architecture == "mlp"
        assert_same_weights(p.weights, s.weights, atol=1e-5)
        assert p.history[0]["train_loss"] == pytest.approx(s.history[0]["train_loss"], rel=1e-5)
    # the members really differ from each other (own seeds / samples)
    assert not torch.allclose(packed[0].test_probs, packed[1].test_probs)


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
def test_two_epochs_with_a_partial_batch_match_solo_training(tmp_path, data, optimizer):
    ms = members(tmp_path, optimizer=optimizer, bagging=(False, True))
    packed = train_packed(pack(tmp_path, ms), data)
    for p, s in zip(packed, train_alone(tmp_path, ms, data)):
        assert torch.allclose(p.test_probs, s.test_probs, atol=1e-4)
        assert torch.allclose(p.val_probs, s.val_probs, atol=1e-4)
        assert [h["epoch"] for h in p.history] == [1, 2]
        for hp, hs in zip(p.history, s.history):
            assert hp["train_loss"] == pytest.approx(hs["train_loss"], rel=1e-4)
            assert hp["val_nll"] == pytest.approx(hs["val_nll"], rel=1e-4)
        assert p.metrics["test_acc"] == pytest.approx(s.metrics["test_acc"])
        assert_same_weights(p.weights, s.weights, atol=1e-4)


@pytest.mark.parametrize("model", [dict(MLP, batchnorm=True),
                                   {"name": "lenet", "batchnorm": True, "dropout": 0.0, "init": "kaiming",
                                    "activation": "relu", "depth": None, "width": None}], ids=["mlp", "lenet"])
def test_batchnorm_trains_packed_with_per_member_statistics(tmp_path, model):
    data = synthetic(41)  # batch 20: two full batches and a trailing batch of one, skipped with BatchNorm
    ms = members(tmp_path, k=2, model=model, bagging=(False, True))
    packed = train_packed(pack(tmp_path, ms), data)
    for p, s in zip(packed, train_alone(tmp_path, ms, data)):
        sp, ss = state(p.weights)["state_dict"], state(s.weights)["state_dict"]
        assert any(name.endswith("running_mean") for name in sp)
        assert int(sp[next(n for n in sp if n.endswith("num_batches_tracked"))]) == 4  # 2 epochs x 2 steps
        assert_same_weights(p.weights, s.weights, atol=1e-4)  # running mean / var included
        assert torch.allclose(p.test_probs, s.test_probs, atol=1e-4)


def test_dropout_draws_different_masks_per_member(tmp_path, data):
    ms = members(tmp_path, k=2, epochs=1, model=dict(MLP, dropout=0.5))
    ms = (ms[0], dataclasses.replace(ms[1], seed=ms[0].seed))  # same init and data order
    a, b = train_packed(pack(tmp_path, ms), data)
    assert not torch.allclose(a.test_probs, b.test_probs)


class Stop(Exception):
    pass


def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, data):
    kw = dict(epochs=3, model=dict(MLP, batchnorm=True, dropout=0.2), optimizer=ADAM, bagging=(True, False))
    whole = train_packed(pack(tmp_path / "a", members(tmp_path / "a", **kw)), data)

    def die_after_1(event):
        if event["type"] == "epoch" and event["epoch"] == 1:
            raise Stop()

    spec = pack(tmp_path / "b", members(tmp_path / "b", **kw))
    with pytest.raises(Stop):
        train_packed(spec, data, report=die_after_1)
    ckpt = load_checkpoint(spec.checkpoint_path)
    assert ckpt["epoch"] == 1 and ckpt["identity"]["kind"] == "packed"
    assert ckpt["identity"]["member_indices"] == [10, 11, 12]

    events = []
    resumed = train_packed(spec, data, report=events.append)
    assert events[0] == {"type": "start", "task": 2, "members": [10, 11, 12], "epoch": 1, "epochs": 3,
                         "resumed_from": 1, "restarts": 1, "device": "cpu"}
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [2, 3]
    assert [e["member"] for e in events if e["type"] == "collected"] == [10, 11, 12]
    for r, w in zip(resumed, whole):
        assert r.resumed_from == 1 and r.restarts == 1
        assert [h["epoch"] for h in r.history] == [1, 2, 3]
        assert torch.allclose(r.test_probs, w.test_probs, atol=1e-6)
        assert r.history[-1]["train_loss"] == pytest.approx(w.history[-1]["train_loss"], rel=1e-6)
        assert_same_weights(r.weights, w.weights, atol=1e-6)


def test_reports_and_results_look_like_train_member(tmp_path, data):
    ms = members(tmp_path, k=2)
    events = []
    results = train_packed(pack(tmp_path, ms), data, report=events.append)
    epochs = [e for e in events if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    last = epochs[-1]
    assert set(last["members"]) == {10, 11}
    assert last["val_acc"] == pytest.approx(sum(m["val_acc"] for m in last["members"].values()) / 2)
    assert last["train_loss"] == pytest.approx(sum(m["train_loss"] for m in last["members"].values()) / 2)
    for r in results:
        assert r.extra == {"packed": 2, "pack_task": 2}
        assert r.train_seconds == results[0].train_seconds > 0 and r.device == "cpu"
        assert r.history[-1] == {"epoch": 2, **last["members"][r.index]}
        assert set(r.metrics) == {"val_acc", "val_nll", "test_acc", "test_nll", "test_brier", "test_ece"}
        assert r.test_probs.shape == (40, 3) and r.test_logits.shape == (40, 3)


def test_each_weights_blob_loads_into_a_plain_model_and_reproduces_its_predictions(tmp_path, data):
    model = dict(MLP, batchnorm=True, dropout=0.1)
    results = train_packed(pack(tmp_path, members(tmp_path, model=model, epochs=1)), data)
    for r in results:
        blob = state(r.weights)
        assert blob["model"] == model and blob["input_shape"] == [1, 8, 8] and blob["num_classes"] == 3
        net = create_model(blob["model"]["name"], blob["input_shape"], blob["num_classes"],
                           **{k: v for k, v in blob["model"].items() if k != "name"})
        net.load_state_dict(blob["state_dict"])
        net.eval()
        with torch.no_grad():
            assert torch.allclose(net(data.x_test).softmax(-1), r.test_probs, atol=1e-6)


@pytest.mark.parametrize("change", [
    {"model": dict(MLP, width=16)}, {"optimizer": ADAM}, {"epochs": 3}, {"batch_size": 10},
], ids=["model", "optimizer", "epochs", "batch_size"])
def test_mismatched_members_are_refused(tmp_path, data, change):
    ms = members(tmp_path)
    ms = (ms[0], dataclasses.replace(ms[1], **change), ms[2])
    with pytest.raises(MemberError, match="packed members must share"):
        train_packed(pack(tmp_path, ms), data)


def test_empty_pack_and_foreign_checkpoint_are_refused(tmp_path, data):
    with pytest.raises(MemberError, match="no members"):
        train_packed(PackedSpec(index=0, members=(), checkpoint_path=str(tmp_path / "e.ckpt")), data)
    ms = members(tmp_path, k=2, epochs=1)
    train_packed(pack(tmp_path, ms), data)
    other = (ms[0], dataclasses.replace(ms[1], seed=99))
    with pytest.raises(MemberError, match="belongs to another task"):
        train_packed(pack(tmp_path, other), data)


def test_a_diverging_member_is_a_member_error_naming_it(tmp_path, data):
    ms = members(tmp_path, k=2, optimizer={"name": "sgd", "lr": 1e12, "momentum": 0.0, "weight_decay": 0.0})
    with pytest.raises(MemberError, match=r"member 10: training loss became"):
        train_packed(pack(tmp_path, ms), data)

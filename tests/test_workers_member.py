"""The member worker: trains, checkpoints each epoch, resumes after being stopped."""
from __future__ import annotations


import pytest
import torch

from ensemble_service.data import load_dataset
from ensemble_service.planning import MemberSpec
from workers.member import train_member
from workers.state import MemberError, load_checkpoint


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **{"n_train": 96, "n_val": 48, "n_test": 48, "num_classes": 3,
                                                "input_shape": [1, 8, 8]})


def spec_for(tmp_path, **kw) -> MemberSpec:
    base = dict(index=0, seed=3, epochs=4, batch_size=16, bagging=False, device="cpu",
                model={"name": "mlp", "batchnorm": True, "dropout": 0.1, "init": "default",
                       "activation": "relu", "depth": 1, "width": 32},
                optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
                checkpoint_path=str(tmp_path / "m0.ckpt"))
    base.update(kw)
    return MemberSpec(**base)


class Stop(Exception):
    pass


def test_trains_and_reports_each_epoch(tmp_path, data):
    events = []
    r = train_member(spec_for(tmp_path), data, report=events.append)
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2, 3, 4]
    assert r.history[-1]["epoch"] == 4 and r.resumed_from == 0 and r.restarts == 0
    assert r.test_probs.shape == (48, 3) and r.val_probs.shape == (48, 3)
    assert torch.allclose(r.test_probs.sum(-1), torch.ones(48), atol=1e-5)
    assert r.metrics["test_acc"] > 0.6  # the blobs are separable; chance is 1/3
    ckpt = load_checkpoint(spec_for(tmp_path).checkpoint_path)
    assert ckpt["epoch"] == 4 and ckpt["identity"]["model"]["name"] == "mlp" and len(ckpt["history"]) == 4
    assert set(ckpt["states"]) == {"model", "optimizer"} and set(ckpt["rng"]) == {"torch", "cuda", "order"}


def test_stopped_after_epoch_k_resumes_at_k_plus_1_and_matches_an_uninterrupted_run(tmp_path, data):
    whole = train_member(spec_for(tmp_path / "a"), data)

    def die_after_2(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            raise Stop()

    spec = spec_for(tmp_path / "b")
    with pytest.raises(Stop):
        train_member(spec, data, report=die_after_2)
    assert load_checkpoint(spec.checkpoint_path)["epoch"] == 2

    events = []
    resumed = train_member(spec, data, report=events.append)
    assert events[0]["type"] == "start" and events[0]["resumed_from"] == 2 and events[0]["restarts"] == 1
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [3, 4]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.resumed_from == 2 and resumed.restarts == 1
    # same seed, same batches, restored RNG and optimizer state: the same model
    assert torch.allclose(resumed.test_probs, whole.test_probs, atol=1e-6)
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-6)


def test_seeds_and_bagging_change_the_member(tmp_path, data):
    a = train_member(spec_for(tmp_path / "a", epochs=1), data)
    b = train_member(spec_for(tmp_path / "b", epochs=1, seed=4), data)
    c = train_member(spec_for(tmp_path / "c", epochs=1, bagging=True), data)
    assert not torch.allclose(a.test_probs, b.test_probs)
    assert not torch.allclose(a.test_probs, c.test_probs)


def test_diverging_loss_is_a_clear_member_error(tmp_path, data):
    spec = spec_for(tmp_path, optimizer={"name": "sgd", "lr": 1e12, "momentum": 0.0, "weight_decay": 0.0},
                    model={"name": "mlp", "depth": 1, "width": 32})
    with pytest.raises(MemberError, match="training loss became"):
        train_member(spec, data)


def test_a_foreign_checkpoint_is_refused_not_unpickled(tmp_path, data):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    spec = spec_for(tmp_path)
    with open(spec.checkpoint_path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(MemberError, match="cannot read checkpoint"):
        train_member(spec, data)

"""trainer.precision=bf16 and trainer.channels_last: what the training step really computes in
(checked inside the forward pass), and both through a whole member on CPU."""
from __future__ import annotations


import pytest
import torch

from ensemble_service.config import ConfigError, load_config
from ensemble_service.data import load_dataset
from ensemble_service.planning import MemberSpec, plan
from workers.member import train_member
from workers.state import prepare_model, run_epoch

LENET = {"name": "lenet", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=128, n_val=48, n_test=48, num_classes=3, input_shape=[3, 32, 32])


def spec(tmp_path, **kw):
    base = dict(index=0, seed=1, model=LENET, epochs=3, batch_size=32, bagging=False, device="cpu",
                optimizer={"name": "adam", "lr": 0.003, "weight_decay": 0.0}, checkpoint_path=str(tmp_path / "m.ckpt"))
    return MemberSpec(**{**base, **kw})


def seen_in_step(tmp_path, data, **kw):
    """(dtype of the first conv's output, whether its input was channels-last) during a training step."""
    from ensemble_service.models import build_model

    s = spec(tmp_path, **kw)
    model = prepare_model(build_model(LENET, (3, 32, 32), 3), s)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = {}
    conv.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype, cl=i[0].is_contiguous(
        memory_format=torch.channels_last) and not i[0].is_contiguous()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, _ = run_epoch(s, 0, model, opt, data.x_train, data.y_train, torch.arange(32))
    assert loss > 0
    return seen["dtype"], seen["cl"], conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_step_runs_in_the_precision_and_layout_asked_for(tmp_path, data):
    assert seen_in_step(tmp_path, data)[:2] == (torch.float32, False)
    assert seen_in_step(tmp_path, data, precision="bf16")[0] == torch.bfloat16
    dtype, channels_last, weights_cl = seen_in_step(tmp_path, data, channels_last=True)
    assert dtype == torch.float32 and channels_last and weights_cl


def test_a_bf16_member_trains_and_keeps_fp32_weights_and_predictions(tmp_path, data):
    fp32 = train_member(spec(tmp_path / "a"), data)
    bf16 = train_member(spec(tmp_path / "b", precision="bf16", channels_last=True), data)
    assert bf16.test_probs.dtype == torch.float32 and bf16.metrics["test_acc"] > 0.6   # chance is 1/3
    assert bf16.history[-1]["train_loss"] != fp32.history[-1]["train_loss"]          # it did compute in bf16
    assert abs(bf16.history[-1]["train_loss"] - fp32.history[-1]["train_loss"]) < 0.25


def test_config_carries_the_options_to_every_task(tmp_path):
    cfg = load_config(["data=synthetic", "strategy.members=2", "trainer.precision=bf16", "trainer.channels_last=true",
                       f"cluster.storage={tmp_path}"])
    assert {(t.precision, t.channels_last) for t in plan(cfg).tasks} == {("bf16", True)}
    cfg = load_config(["data=synthetic", "strategy=snapshot", "optimizer=sgd", "trainer.epochs=10",
                       "trainer.precision=bf16", f"cluster.storage={tmp_path}"])
    assert plan(cfg).tasks[0].precision == "bf16"
    with pytest.raises(ConfigError, match="unknown trainer.precision 'fp8'; choose one of: fp32, bf16"):
        load_config(["data=synthetic", "trainer.precision=fp8"])
    with pytest.raises(ConfigError, match="cluster.pack trains in fp32"):
        load_config(["data=synthetic", "cluster.pack=2", "trainer.precision=bf16"])

"""ensemble_service.optimizers: `_target_` optimizer specs, legacy names, elementwise ones for packing."""
from __future__ import annotations

import pytest
import torch

from ensemble_service.optimizers import (
    OptimizerError, build_optimizer, check_optimizer, elementwise, label, learning_rate, optimizer_spec,
)


def test_specs_build_any_torch_optimizer_and_map_the_legacy_names():
    p = [torch.nn.Parameter(torch.zeros(3))]
    rms = build_optimizer(p, {"_target_": "torch.optim.RMSprop", "lr": 0.01, "alpha": 0.9})
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["alpha"] == 0.9
    assert optimizer_spec({"name": "sgd", "lr": 0.1, "momentum": 0.5, "nesterov": False}) == {
        "_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.5, "nesterov": False, "_partial_": True}
    assert optimizer_spec({"name": "adam", "lr": 0.1, "momentum": 0.5})["_target_"] == "torch.optim.Adam"
    fused = build_optimizer(p, {"_target_": "torch.optim.SGD", "lr": 0.1}, fused=True)
    assert fused.defaults.get("fused") is True
    lbfgs = build_optimizer(p, {"_target_": "torch.optim.LBFGS", "lr": 1.0}, fused=True)  # no fused: not passed
    assert isinstance(lbfgs, torch.optim.LBFGS)
    assert label({"_target_": "torch.optim.AdamW"}) == "AdamW" and learning_rate({"lr": 3}) == 3.0


def test_elementwise_is_what_packing_needs():
    assert elementwise({"_target_": "torch.optim.sgd.SGD"}) and elementwise({"_target_": "torch.optim.AdamW"})
    assert not elementwise({"_target_": "torch.optim.LBFGS"}) and not elementwise({"_target_": "mypkg.Muon"})


@pytest.mark.parametrize("spec,message", [
    ({"_target_": "torch.optim.SGD", "lr": -1.0}, "optimizer.lr must be a positive number, got -1.0"),
    ({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": -2}, "raised ValueError: Invalid momentum value"),
    ({"_target_": "builtins.list"}, "returned a list, not a torch.optim.Optimizer"),
    ({"lr": 0.1}, "needs a _target_"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(OptimizerError) as err:
        check_optimizer(spec)
    assert message in str(err.value) and "\n" not in str(err.value)

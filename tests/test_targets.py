"""ensemble_service.targets: locating `_target_` paths and instantiating specs, with one-line errors."""
from __future__ import annotations

import pytest

from ensemble_service.targets import TargetError, instantiate, locate, parameter_names


def test_locate_names_the_part_that_is_missing(tmp_path, monkeypatch):
    import math

    assert locate("math.sqrt", "x") is math.sqrt and locate("torch.nn.Linear", "x").__name__ == "Linear"
    (tmp_path / "broken_user_module.py").write_text("import definitely_not_installed_pkg\n")
    (tmp_path / "raising_user_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "nosuchpkg.Net": "x=nosuchpkg.Net: no module named 'nosuchpkg' (run from the directory that holds it",
        "torch.nn.Nope": "x=torch.nn.Nope: torch.nn has no attribute 'Nope'",
        "broken_user_module.Net": "importing broken_user_module failed: No module named 'definitely_not_installed_pkg'",
        "raising_user_module.Net": "importing raising_user_module raised RuntimeError: boom at import",
        "not a path": "x=not a path is not a dotted import path",
    }
    for path, message in cases.items():
        with pytest.raises(TargetError) as err:
            locate(path, "x")
        assert message in str(err.value) and "\n" not in str(err.value)


def test_service_arguments_are_passed_only_when_named_and_keep_their_type():
    def takes_both(input_shape, num_classes, width=1):
        return (input_shape, num_classes, width)

    def takes_one(num_classes):
        return num_classes

    import builtins

    builtins._ensemble_test_takes_both, builtins._ensemble_test_takes_one = takes_both, takes_one
    try:
        out = instantiate({"_target_": "builtins._ensemble_test_takes_both", "width": 3}, "model",
                          input_shape=(1, 8, 8), num_classes=4)
        assert out == ((1, 8, 8), 4, 3) and isinstance(out[0], tuple)
        assert instantiate({"_target_": "builtins._ensemble_test_takes_one"}, "model", input_shape=(2,),
                           num_classes=5) == 5
        with pytest.raises(TargetError, match="model.num_classes is set by the service"):
            instantiate({"_target_": "builtins._ensemble_test_takes_one", "num_classes": 3}, "model", num_classes=5)
        with pytest.raises(TargetError, match=r"raised TypeError: .*unexpected keyword argument 'depth'"):
            instantiate({"_target_": "builtins._ensemble_test_takes_one", "depth": 2}, "model", num_classes=5)
    finally:
        del builtins._ensemble_test_takes_both, builtins._ensemble_test_takes_one
    assert parameter_names(takes_both) == {"input_shape", "num_classes", "width"}


def test_partial_specs_and_nested_targets():
    opt = instantiate({"_target_": "torch.optim.SGD", "lr": 0.5}, "optimizer", call=False)
    import torch

    sgd = opt([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.5
    seq = instantiate({"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "torch.nn.ReLU"}]}, "model")
    assert isinstance(seq[0], torch.nn.ReLU)

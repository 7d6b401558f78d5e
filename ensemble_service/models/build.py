"""Models as Hydra ``_target_`` specs: build, check on the driver, name.

A model spec is a plain dict ``{"_target_": ..., **arguments}``. The built-in models are specs
too (conf/model/*.yaml: ``_target_: ensemble_service.models.create_model`` and ``name``), so a
built-in and a user's ``model._target_=mypkg.nets.TinyNet`` go through the same
:func:`build_model`, which passes ``input_shape`` (a tuple, per sample) and ``num_classes`` when
the target's signature names them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import torch
from torch import nn

from ensemble_service.models.errors import ModelError
from ensemble_service.targets import TargetError, instantiate

BUILTIN_TARGET = "ensemble_service.models.create_model"
#: built-in models whose label carries their depth (vgg11, resnet18, ...)
_DEPTH_IN_LABEL = ("vgg", "resnet")


def model_spec(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """``spec`` as a plain dict with a ``_target_`` (a legacy ``{"name": ...}`` config means a built-in)."""
    out = dict(spec)
    if "_target_" not in out and "name" in out:
        out["_target_"] = BUILTIN_TARGET
    if "_target_" not in out:
        raise ModelError(f"a model config needs a _target_ (or the name of a built-in model), got {out!r}")
    if out.get("_partial_"):
        raise ModelError("a model config must not set _partial_: the service calls the target itself")
    out.pop("_partial_", None)
    return out


def is_builtin(spec: Mapping[str, Any]) -> bool:
    return spec.get("_target_", BUILTIN_TARGET if "name" in spec else None) == BUILTIN_TARGET


def architecture(spec: Mapping[str, Any]) -> str:
    """A short label: the built-in's name (with depth for vgg/resnet), else the target's last part."""
    if is_builtin(spec):
        name = str(spec.get("name", "?"))
        depth = spec.get("depth")
        return f"{name}{depth}" if depth and name in _DEPTH_IN_LABEL else name
    return str(spec["_target_"]).rsplit(".", 1)[-1]


def build_model(spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                where: str = "model") -> nn.Module:
    """Instantiate ``spec`` for per-sample ``input_shape`` and ``num_classes``; ModelError (one line)."""
    spec = model_spec(spec)
    try:
        model = instantiate(spec, where, input_shape=tuple(int(s) for s in input_shape),
                            num_classes=int(num_classes))
    except TargetError as exc:
        raise ModelError(str(exc)) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}._target_={spec['_target_']} returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def check_model(spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                where: str = "model") -> int:
    """Build ``spec`` once and run a batch of two zero inputs through it (eval mode): the output
    must be ``[2, num_classes]`` logits. Returns the parameter count; ModelError (one line)."""
    model = build_model(spec, input_shape, num_classes, where)
    shape = [2, *map(int, input_shape)]
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: a forward pass on a batch of shape {shape} (the data set's inputs) "
                         f"failed: {type(exc).__name__}: {msg}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, int(num_classes)):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{where}: the model returned {got} for a batch of shape {shape}; it must return "
                         f"logits of shape [batch, num_classes] = [2, {num_classes}]")
    if not out.is_floating_point():
        raise ModelError(f"{where}: the model returned {out.dtype} values; it must return float logits")
    return sum(p.numel() for p in model.parameters())


def feature_head_problem(model: nn.Module) -> str:
    """'' when ``model`` has the features/classifier/feature_dim contract the heads strategy needs."""
    missing = [a for a in ("features", "classifier") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing or not isinstance(getattr(model, "feature_dim", None), int):
        return ("it needs .features and .classifier submodules and an int .feature_dim with "
                "forward(x) == classifier(features(x))")
    return ""


def flat_dim(input_shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in input_shape)

"""Optimizers as Hydra ``_target_`` + ``_partial_: true`` specs (conf/optimizer/*.yaml).

Any ``torch.optim`` optimizer (or the user's own) and its arguments work from the command line,
e.g. ``optimizer=sgd optimizer.lr=0.1`` or ``optimizer._target_=torch.optim.RMSprop +optimizer.alpha=0.9``.
A spec is a plain dict; :func:`build_optimizer` calls its target with the parameters.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from ensemble_service.targets import TargetError, instantiate, locate, parameter_names

#: optimizers whose update is elementwise per parameter, so K members stacked into [K, ...]
#: tensors (cluster.pack) get exactly the K solo updates
ELEMENTWISE = {f"torch.optim.{n}" for n in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop",
                                            "Adagrad", "Adadelta", "ASGD", "Rprop")}
_LEGACY = {"sgd": ("torch.optim.SGD", ("lr", "momentum", "weight_decay", "nesterov")),
           "adam": ("torch.optim.Adam", ("lr", "weight_decay"))}


class OptimizerError(ValueError):
    """A bad optimizer spec; one line."""


def optimizer_spec(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """``spec`` as a plain ``_target_`` dict (a legacy ``{"name": "sgd", ...}`` maps to torch.optim)."""
    out = dict(spec)
    if "_target_" not in out and out.get("name") in _LEGACY:
        target, keys = _LEGACY[out["name"]]
        out = {"_target_": target, **{k: out[k] for k in keys if k in out}}
    if "_target_" not in out:
        raise OptimizerError(f"an optimizer config needs a _target_ such as torch.optim.SGD, got {out!r}")
    out["_partial_"] = True
    return out


def canonical_target(spec: Mapping[str, Any]) -> str:
    """The target's import path as torch spells it (``torch.optim.sgd.SGD`` -> ``torch.optim.SGD``)."""
    target = str(spec["_target_"])
    name = target.rsplit(".", 1)[-1]
    if target.startswith("torch.optim.") and getattr(torch.optim, name, None) is not None:
        return f"torch.optim.{name}"
    return target


def label(spec: Mapping[str, Any]) -> str:
    return str(optimizer_spec(spec)["_target_"]).rsplit(".", 1)[-1]


def learning_rate(spec: Mapping[str, Any]) -> Optional[float]:
    lr = spec.get("lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def elementwise(spec: Mapping[str, Any]) -> bool:
    return canonical_target(optimizer_spec(spec)) in ELEMENTWISE


def build_optimizer(params: Iterable[torch.Tensor], spec: Mapping[str, Any], where: str = "optimizer",
                    **impl: Any) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names over ``params``. ``impl`` (e.g. ``fused=True``) picks torch's
    implementation only, never the update rule, and is passed only where the optimizer takes it."""
    spec = optimizer_spec(spec)
    try:
        factory = instantiate(spec, where, call=False)
    except TargetError as exc:
        raise OptimizerError(str(exc)) from None
    names = parameter_names(locate(spec["_target_"], f"{where}._target_")) or set()
    extra = {k: v for k, v in impl.items() if k in names}
    try:
        opt = factory(params, **extra)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptimizerError(f"{where}._target_={spec['_target_']} raised {type(exc).__name__}: {msg}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise OptimizerError(f"{where}._target_={spec['_target_']} returned a {type(opt).__name__}, "
                             "not a torch.optim.Optimizer")
    return opt


def check_optimizer(spec: Mapping[str, Any], where: str = "optimizer") -> None:
    """Build the optimizer once over a dummy parameter (bad arguments fail here, in one line)."""
    lr = learning_rate(optimizer_spec(spec))
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise OptimizerError(f"{where}.lr must be a positive number, got {lr}")
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], spec, where)

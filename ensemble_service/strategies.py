"""Ensemble strategies: one small class per kind, in one registry (:data:`STRATEGIES`).

Each class declares everything about its kind of ensemble, and config, planning and the trajectory
worker ask it instead of branching on a name:

* ``Config``: its Hydra structured config (conf/strategy/<name>.yaml lists ``<name>_schema`` in its
  defaults), so a key of another strategy (``strategy=snapshot strategy.heads=3``) is an error;
* ``alias``: the key ``strategy.members`` stands for (snapshot's ``cycles``, heads' ``heads``, ...);
* :meth:`Strategy.validate`: the checks a config must pass (one-line ``ConfigError``);
* :meth:`Strategy.member_tags` and :meth:`Strategy.params`: what one trajectory yields (the tags of
  its members) and the plain parameters its Ray task gets;
* the worker side, pure torch: :meth:`Strategy.plan_epochs` (members, the epochs where members are
  collected), :meth:`Strategy.wrap` / :meth:`Strategy.loss` (heads), :meth:`Strategy.scheduler` (a
  torch LR scheduler stepped every iteration), :meth:`Strategy.extras` / :meth:`Strategy.after_epoch`
  (SWA's averaged model) and :meth:`Strategy.finish` (the members that exist only at the end).

``independent`` trains each member as its own task (``workers/member.py``, or packed); the other
five share the trajectory loop of ``workers/trajectory.py``. Adding a strategy is one class here
and one YAML file in conf/strategy/.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_service.catalog import Catalog
from ensemble_service.models import derive_seed, init_weights

#: most members one ensemble may have (tasks, MLflow runs and served members grow with it)
MAX_MEMBERS = 1024


class StrategyError(ValueError):
    """An impossible strategy setting; one line."""


@dataclass
class StrategyConfig:
    """Keys every strategy has."""
    name: str = "independent"
    members: int = 5


@dataclass(frozen=True)
class EpochPlan:
    """What a trajectory does, derived from its parameters and the steps per epoch."""
    members: int                                    # how many members it yields
    collect: Dict[int, Tuple[str, int]] = field(default_factory=dict)  # epoch (1-based) -> (role, cycle)


class Strategy:
    name: ClassVar[str]
    Config: ClassVar[Type[StrategyConfig]] = StrategyConfig
    alias: ClassVar[Optional[str]] = None     # the key strategy.members stands for
    trajectory: ClassVar[bool] = True
    description: ClassVar[str] = ""

    # -- config (driver) ---------------------------------------------------------------------
    def count(self, s: StrategyConfig) -> int:
        """Members per trajectory."""
        return int(getattr(s, self.alias)) if self.alias else int(s.members)

    def total(self, s: StrategyConfig) -> int:
        return self.count(s) * int(getattr(s, "trajectories", 1))

    def validate(self, s: StrategyConfig, epochs: int, optimizer: Dict[str, Any], model: Optional[nn.Module],
                 model_spec: Optional[Dict[str, Any]] = None) -> None:
        """Raise StrategyError for settings that cannot work; ``model`` (built from ``model_spec``) is
        None until the data set's input shape is known."""
        if getattr(s, "trajectories", 1) < 1:
            raise StrategyError(f"strategy.trajectories must be at least 1, got {s.trajectories}")

    def member_tags(self, s: StrategyConfig) -> List[Dict[str, str]]:
        """Tags of the members one trajectory yields, in order."""
        raise NotImplementedError

    def params(self, s: StrategyConfig, epochs: int) -> Dict[str, Any]:
        """The plain parameters the trajectory's task gets (``TrajectorySpec.params``)."""
        return {}

    # -- worker ------------------------------------------------------------------------------
    def plan_epochs(self, spec, steps_per_epoch: int) -> EpochPlan:
        raise NotImplementedError

    def wrap(self, model: nn.Module, spec) -> nn.Module:
        return model

    def loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb)

    def scheduler(self, optimizer: torch.optim.Optimizer, spec, steps_per_epoch: int):
        """A torch LR scheduler stepped after every optimizer step (None: the lr stays as set)."""
        return None

    def extras(self, model: nn.Module, optimizer: torch.optim.Optimizer, spec) -> Dict[str, Any]:
        """Extra stateful objects the checkpoint saves and restores with the model."""
        return {}

    def after_epoch(self, epoch: int, model: nn.Module, extras: Dict[str, Any], spec) -> None:
        """Called after each epoch's optimizer steps (``epoch`` is 0-based)."""

    def finish(self, run: "TrajectoryRun") -> List[Any]:
        """The members that exist only after the last epoch; snapshot-like strategies return the
        members collected during training (the default)."""
        probe = copy.deepcopy(run.model)
        out = []
        for pos, entry in enumerate(run.collected):
            probe.load_state_dict(entry["state"])
            out.append(run.evaluate(pos, probe, entry["epoch"], cycle=entry["cycle"], role=entry["role"]))
        return out


class TrajectoryRun:
    """What :meth:`Strategy.finish` works with (built by workers/trajectory.py): the spec, the trained
    model (and the plain ``base`` model it wraps), the strategy's extras, the members collected so far,
    and ``evaluate``/``result`` callbacks that turn a model or logits into a member result."""

    def __init__(self, spec, base: nn.Module, model: nn.Module, extras: Dict[str, Any], collected: List[Dict],
                 plan: EpochPlan, data, device, evaluate: Callable, result: Callable, predict: Callable,
                 predict_raw: Callable):
        self.spec, self.base, self.model, self.extras, self.collected = spec, base, model, extras, collected
        self.plan, self.data, self.device = plan, data, device
        # evaluate(pos, module, epoch, **extra): eval-mode val/test logits and weights of `module`
        # result(pos, val_logits, test_logits, weights, epoch, **extra): from given logits (weights: a
        #   module, or the bytes of run.blob)
        # predict(module, x): eval-mode logits; predict_raw(module, x): logits in the module's current mode
        self.evaluate, self.result, self.predict, self.predict_raw = evaluate, result, predict, predict_raw

    def blob(self, module: nn.Module, extra: Optional[Dict[str, Any]] = None) -> bytes:
        """The member checkpoint of ``module`` (see ensemble_service.artifact)."""
        from ensemble_service.artifact import member_blob

        return member_blob(self.spec.model, self.data.input_shape, self.data.num_classes, module, extra)


STRATEGIES: Catalog[Strategy] = Catalog("strategy", StrategyError)


def register_strategy(cls: Type[Strategy]) -> Type[Strategy]:
    STRATEGIES.add(cls.name, cls())
    return cls


def _param(spec, key: str, kind=int, minimum=None, optional: bool = False):
    """``spec.params[key]`` checked (a one-line StrategyError naming the trajectory)."""
    p = spec.params or {}
    where = f"trajectory {spec.index} ({spec.strategy})"
    if key not in p or p[key] is None:
        if optional:
            return None
        raise StrategyError(f"{where}: params.{key} is missing")
    value = p[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise StrategyError(f"{where}: params.{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise StrategyError(f"{where}: params.{key} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------- independent


@dataclass
class IndependentConfig(StrategyConfig):
    name: str = "independent"
    bagging: bool = False              # each member trains on a bootstrap resample of the training set
    # mixed members: member i uses models[i % len(models)]; empty = `model` for every member. An entry is a
    # model ({name: lenet, batchnorm: true} for a built-in, {_target_: mypkg.Net, ...} for the user's) and
    # may carry its own `optimizer` (a conf/optimizer name, a full _target_ spec, or keys merged over the
    # top-level optimizer) and `trainer: {epochs, batch_size}`.
    models: List[Any] = field(default_factory=list)


@register_strategy
class Independent(Strategy):
    name = "independent"
    Config = IndependentConfig
    trajectory = False
    description = "members trained independently (seed + i), optionally on bootstrap resamples or mixed models"

    def member_tags(self, s):
        return [{"ensemble.role": "member"}]


# --------------------------------------------------------------------------- snapshot


def snapshot_lr(t: int, total_iters: int, cycles: int, lr0: float) -> float:
    """Huang et al. 2017, eq. 2: ``lr0/2 * (cos(pi * ((t-1) mod ceil(T/M)) / ceil(T/M)) + 1)``.

    ``t`` is the 1-based iteration, ``total_iters`` = T, ``cycles`` = M.
    """
    if not (1 <= t and total_iters >= 1 and cycles >= 1):
        raise ValueError(f"snapshot_lr needs t >= 1, total_iters >= 1, cycles >= 1 (got {t}, {total_iters}, {cycles})")
    period = math.ceil(total_iters / cycles)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)


def per_iteration(optimizer: torch.optim.Optimizer, lr_at: Callable[[int], Optional[float]]):
    """A LambdaLR whose step ``i`` (0-based, before the (i+1)-th optimizer step) gives ``lr_at(i + 1)``
    (None: the optimizer's own lr)."""
    base = [g["lr"] for g in optimizer.param_groups]

    def factor(group: int):
        def f(i: int) -> float:
            lr = lr_at(i + 1)
            return 1.0 if lr is None else lr / base[group]
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g) for g in range(len(base))])


@dataclass
class SnapshotConfig(StrategyConfig):
    name: str = "snapshot"
    cycles: int = 5                   # M cosine cycles, a snapshot at each cycle's end (strategy.members is an alias)
    trajectories: int = 1             # T independent trajectories, one Ray task each: T * M members
    use_last: Optional[int] = None    # ensemble only the last m snapshots (null: all M)


@register_strategy
class Snapshot(Strategy):
    name = "snapshot"
    Config = SnapshotConfig
    alias = "cycles"
    description = "Huang et al. 2017: one SGD trajectory with a cyclic cosine lr, a snapshot at each cycle's end"

    def count(self, s):
        return int(s.use_last or s.cycles)

    def validate(self, s, epochs, optimizer, model, model_spec=None):
        super().validate(s, epochs, optimizer, model, model_spec)
        if s.cycles < 1:
            raise StrategyError(f"strategy.cycles must be at least 1, got {s.cycles}")
        if epochs % s.cycles:
            raise StrategyError(f"strategy=snapshot needs trainer.epochs ({epochs}) to be a multiple of "
                                f"strategy.cycles ({s.cycles}), so that every cycle ends with an epoch")
        if s.use_last is not None and not (1 <= s.use_last <= s.cycles):
            raise StrategyError(f"strategy.use_last must be between 1 and strategy.cycles ({s.cycles}), got {s.use_last}")
        if not isinstance(optimizer.get("lr"), (int, float)):
            raise StrategyError("strategy=snapshot needs optimizer.lr: every cosine cycle starts from it")

    def member_tags(self, s):
        first = s.cycles - (s.use_last or s.cycles) + 1
        return [{"ensemble.cycle": str(c), "ensemble.role": "snapshot"} for c in range(first, s.cycles + 1)]

    def params(self, s, epochs):
        return {"cycles": s.cycles, "use_last": s.use_last}

    def plan_epochs(self, spec, spe):
        where = f"trajectory {spec.index} ({spec.strategy})"
        M = _param(spec, "cycles", minimum=1)
        if spec.epochs % M:
            raise StrategyError(f"{where}: epochs ({spec.epochs}) must be a multiple of params.cycles ({M})")
        m = _param(spec, "use_last", minimum=1, optional=True) or M
        if m > M:
            raise StrategyError(f"{where}: params.use_last ({m}) exceeds params.cycles ({M})")
        per = spec.epochs // M
        return EpochPlan(members=m, collect={c * per: ("snapshot", c) for c in range(M - m + 1, M + 1)})

    def scheduler(self, optimizer, spec, spe):
        total, M, lr0 = spec.epochs * spe, int(spec.params["cycles"]), float(spec.optimizer["lr"])
        return per_iteration(optimizer, lambda t: snapshot_lr(t, total, M, lr0))


# --------------------------------------------------------------------------- SWA


@dataclass
class SwaConfig(StrategyConfig):
    name: str = "swa"
    members: int = 2                  # the averaged model and the last iterate
    swa_start: Optional[int] = None   # completed epochs before averaging (null: 75% of trainer.epochs)
    swa_lr: float = 0.01
    trajectories: int = 1             # must stay 1: parameters are never averaged across independent runs


def swa_start(s: SwaConfig, epochs: int) -> int:
    return int(0.75 * epochs) if s.swa_start is None else int(s.swa_start)


@register_strategy
class Swa(Strategy):
    name = "swa"
    Config = SwaConfig
    description = "Izmailov et al. 2018: weights averaged along one trajectory (torch.optim.swa_utils)"

    def count(self, s):
        return 2

    def validate(self, s, epochs, optimizer, model, model_spec=None):
        if s.trajectories != 1:
            raise StrategyError(
                f"strategy=swa averages parameters over one trajectory only; strategy.trajectories={s.trajectories} "
                "would average across independent runs, which does not work (their weights are not in one basin); "
                "use strategy=independent to combine independent runs by their predictions")
        if s.members != 2:
            raise StrategyError(f"strategy=swa yields 2 members (the averaged model and the last iterate); "
                                f"strategy.members={s.members} cannot be")
        start = swa_start(s, epochs)
        if not (0 <= start < epochs):
            raise StrategyError(f"strategy.swa_start must be in [0, trainer.epochs={epochs}), got {start}")
        if epochs - start < 2:
            raise StrategyError(f"strategy.swa_start={start} with trainer.epochs={epochs} averages {epochs - start} "
                                "iterate, so the average equals the last iterate; start averaging at least 2 epochs "
                                "before the end")
        if not s.swa_lr > 0:
            raise StrategyError(f"strategy.swa_lr must be > 0, got {s.swa_lr}")

    def member_tags(self, s):
        return [{"ensemble.role": "swa"}, {"ensemble.role": "last"}]

    def params(self, s, epochs):
        return {"swa_start": swa_start(s, epochs), "swa_lr": s.swa_lr}

    def plan_epochs(self, spec, spe):
        where = f"trajectory {spec.index} ({spec.strategy})"
        start = _param(spec, "swa_start", minimum=0)
        _param(spec, "swa_lr", kind=float, minimum=0.0)
        if start >= spec.epochs:
            raise StrategyError(f"{where}: params.swa_start ({start}) must be below epochs ({spec.epochs})")
        _param(spec, "anneal_epochs", minimum=0, optional=True)
        if (spec.params.get("anneal_strategy") or "cos") not in ("cos", "linear"):
            raise StrategyError(f"{where}: params.anneal_strategy must be 'cos' or 'linear'")
        return EpochPlan(members=2)

    def extras(self, model, optimizer, spec):
        from torch.optim.swa_utils import SWALR, AveragedModel

        p = spec.params
        return {"swa_model": AveragedModel(model),
                "swa_scheduler": SWALR(optimizer, swa_lr=float(p["swa_lr"]), anneal_epochs=int(p.get("anneal_epochs") or 1),
                                       anneal_strategy=p.get("anneal_strategy") or "cos")}

    def after_epoch(self, epoch, model, extras, spec):
        if epoch >= spec.params["swa_start"]:
            extras["swa_model"].update_parameters(model)
            extras["swa_scheduler"].step()

    def finish(self, run):
        from torch.optim.swa_utils import update_bn

        spec, swa_model = run.spec, run.extras["swa_model"]
        x = run.data.x_train.to(run.device)
        batches = [x[i:i + spec.batch_size] for i in range(0, len(x), spec.batch_size)]
        update_bn([b for b in batches if len(b) > 1], swa_model)
        return [run.evaluate(0, swa_model.module, spec.epochs, role="swa", n_averaged=int(swa_model.n_averaged)),
                run.evaluate(1, run.model, spec.epochs, role="last")]


# --------------------------------------------------------------------------- FGE


def fge_lr(i: int, cycle_iters: int, lr1: float, lr2: float) -> float:
    """Garipov et al. 2018: the piecewise-linear cyclic rate at the 1-based FGE iteration ``i``.

    With ``t = ((i-1) mod cycle_iters + 1) / cycle_iters`` in (0, 1]: ``(1-2t) lr1 + 2t lr2`` for
    t <= 1/2 and ``(2-2t) lr2 + (2t-1) lr1`` above; lr1 at the cycle's ends, lr2 at its middle.
    """
    if i < 1 or cycle_iters < 1:
        raise ValueError(f"fge_lr needs i >= 1 and cycle_iters >= 1 (got {i}, {cycle_iters})")
    t = ((i - 1) % cycle_iters + 1) / cycle_iters
    if t <= 0.5:
        return (1 - 2 * t) * lr1 + 2 * t * lr2
    return (2 - 2 * t) * lr2 + (2 * t - 1) * lr1


@dataclass
class FgeConfig(StrategyConfig):
    name: str = "fge"
    members: int = 4
    cycles: int = 4                   # members, one at each cycle's middle (strategy.members is an alias)
    cycle_epochs: int = 2             # even
    lr1: float = 0.05
    lr2: float = 0.0005
    trajectories: int = 1


@register_strategy
class Fge(Strategy):
    name = "fge"
    Config = FgeConfig
    alias = "cycles"
    description = "Garipov et al. 2018: pre-training, then cycles of a piecewise-linear lr; a member mid-cycle"

    def validate(self, s, epochs, optimizer, model, model_spec=None):
        super().validate(s, epochs, optimizer, model, model_spec)
        if s.cycles < 1:
            raise StrategyError(f"strategy.cycles must be at least 1, got {s.cycles}")
        if s.cycle_epochs < 2 or s.cycle_epochs % 2:
            raise StrategyError(f"strategy.cycle_epochs must be an even number >= 2 (a member is collected at "
                                f"mid-cycle), got {s.cycle_epochs}")
        if epochs <= s.cycles * s.cycle_epochs:
            raise StrategyError(f"strategy=fge needs trainer.epochs ({epochs}) > strategy.cycles * strategy.cycle_epochs "
                                f"({s.cycles * s.cycle_epochs}) to leave epochs for pre-training")
        if not (s.lr1 > s.lr2 > 0):
            raise StrategyError(f"strategy=fge needs strategy.lr1 > strategy.lr2 > 0, got lr1={s.lr1}, lr2={s.lr2}")

    def member_tags(self, s):
        return [{"ensemble.cycle": str(c), "ensemble.role": "fge"} for c in range(1, s.cycles + 1)]

    def params(self, s, epochs):
        return {"pretrain_epochs": epochs - s.cycles * s.cycle_epochs, "cycles": s.cycles,
                "cycle_epochs": s.cycle_epochs, "lr1": s.lr1, "lr2": s.lr2}

    def plan_epochs(self, spec, spe):
        where = f"trajectory {spec.index} ({spec.strategy})"
        P = _param(spec, "pretrain_epochs", minimum=0)
        K = _param(spec, "cycles", minimum=1)
        c = _param(spec, "cycle_epochs", minimum=2)
        _param(spec, "lr1", kind=float, minimum=0.0), _param(spec, "lr2", kind=float, minimum=0.0)
        if c % 2:
            raise StrategyError(f"{where}: params.cycle_epochs must be even, got {c}")
        if spec.epochs != P + K * c:
            raise StrategyError(f"{where}: epochs ({spec.epochs}) must equal pretrain_epochs + cycles * cycle_epochs "
                                f"({P} + {K} * {c} = {P + K * c})")
        return EpochPlan(members=K, collect={P + c // 2 + k * c: ("fge", k + 1) for k in range(K)})

    def scheduler(self, optimizer, spec, spe):
        p = spec.params
        first, cycle_iters = int(p["pretrain_epochs"]) * spe, int(p["cycle_epochs"]) * spe
        lr1, lr2 = float(p["lr1"]), float(p["lr2"])
        return per_iteration(optimizer, lambda t: fge_lr(t - first, cycle_iters, lr1, lr2) if t > first else None)


# --------------------------------------------------------------------------- heads


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


class MultiHead(nn.Module):
    """One shared backbone (``base.features``) and ``heads`` classifier heads.

    Each head is a copy of ``base.classifier`` re-initialized under its own seed
    (``derive_seed(seed, "head", k)``, PyTorch's default init followed by the model's ``init``).
    ``forward(x)`` returns the heads' logits stacked as ``[N, K, C]``.
    """

    def __init__(self, base: nn.Module, heads: int, seed: int):
        super().__init__()
        if heads < 1:
            raise ValueError(f"MultiHead needs at least one head, got {heads}")
        cfg = getattr(base, "model_config", {})
        self.backbone = base.features
        self.feature_dim = int(base.feature_dim)
        self.heads = nn.ModuleList()
        for k in range(heads):
            head = copy.deepcopy(base.classifier)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "head", k))
                _reset_parameters(head)
                init_weights(head, cfg.get("init", "default"), cfg.get("activation", "relu"))
            self.heads.append(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return torch.stack([head(features) for head in self.heads], dim=1)

    def member(self, k: int, base: nn.Module) -> nn.Module:
        """A standalone copy of ``base`` whose features are this backbone and whose classifier is head k."""
        model = copy.deepcopy(base)
        model.features.load_state_dict(self.backbone.state_dict())
        model.classifier.load_state_dict(self.heads[k].state_dict())
        return model


@dataclass
class HeadsConfig(StrategyConfig):
    name: str = "heads"
    heads: int = 5                    # K classifier heads on one backbone (strategy.members is an alias)
    trajectories: int = 1


@register_strategy
class Heads(Strategy):
    name = "heads"
    Config = HeadsConfig
    alias = "heads"
    description = "one shared backbone, K classifier heads trained together (the handout's classification-layer ensembles)"

    def validate(self, s, epochs, optimizer, model, model_spec=None):
        from ensemble_service.models import feature_head_problem

        super().validate(s, epochs, optimizer, model, model_spec)
        if s.heads < 1:
            raise StrategyError(f"strategy.heads must be at least 1, got {s.heads}")
        problem = feature_head_problem(model) if model is not None else ""
        if problem:
            raise StrategyError(f"strategy=heads trains K classifier heads on one shared backbone; the model has no "
                                f"such split: {problem}")

    def member_tags(self, s):
        return [{"ensemble.head": str(k), "ensemble.role": "head"} for k in range(s.heads)]

    def params(self, s, epochs):
        return {"heads": s.heads}

    def plan_epochs(self, spec, spe):
        return EpochPlan(members=_param(spec, "heads", minimum=1))

    def wrap(self, model, spec):
        return MultiHead(model, _param(spec, "heads", minimum=1), spec.seed)

    def loss(self, model, xb, yb):
        logits = model(xb)  # [N, K, C]
        return torch.stack([F.cross_entropy(logits[:, k], yb) for k in range(logits.shape[1])]).mean()

    def finish(self, run):
        val_logits = run.predict(run.model, run.data.x_val)
        test_logits = run.predict(run.model, run.data.x_test)
        return [run.result(k, val_logits[:, k], test_logits[:, k], run.model.member(k, run.base), run.spec.epochs,
                           role="head", head=k) for k in range(len(run.model.heads))]


# --------------------------------------------------------------------------- MC dropout


def dropout_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, samples: int, seed: int, forward: Callable) -> torch.Tensor:
    """``[S, N, C]`` logits of S stochastic passes ``forward(model, x)``: Dropout modules in train
    mode, everything else (BatchNorm included) in eval mode; pass s is seeded by
    ``derive_seed(seed, "mc_dropout", s)``. The global RNG state and the model's modes are restored."""
    drop = dropout_modules(model)
    if not drop:
        raise StrategyError("mc_dropout needs a model with dropout (set model.dropout > 0)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    out = []
    try:
        with torch.random.fork_rng(devices=gpus):
            model.eval()
            for m in drop:
                m.train()
            for s in range(samples):
                torch.manual_seed(derive_seed(seed, "mc_dropout", s))
                out.append(forward(model, x))
    finally:
        model.train(was_training)
    return torch.stack(out)


@dataclass
class McDropoutConfig(StrategyConfig):
    name: str = "mc_dropout"
    members: int = 10
    samples: int = 10                 # S stochastic test-time passes (strategy.members is an alias)
    trajectories: int = 1


@register_strategy
class McDropout(Strategy):
    name = "mc_dropout"
    Config = McDropoutConfig
    alias = "samples"
    description = "one model trained with dropout; S stochastic test-time passes are the members"

    def validate(self, s, epochs, optimizer, model, model_spec=None):
        super().validate(s, epochs, optimizer, model, model_spec)
        if s.samples < 1:
            raise StrategyError(f"strategy.samples must be at least 1, got {s.samples}")
        if model is not None and not dropout_modules(model):
            from ensemble_service.models import is_builtin

            hint = (f"set model.dropout > 0 (got {model_spec.get('dropout')})" if model_spec and is_builtin(model_spec)
                    else "the model has no nn.Dropout module")
            raise StrategyError(f"strategy=mc_dropout needs a model with dropout: {hint}; its test-time passes "
                                "are the members")

    def member_tags(self, s):
        return [{"ensemble.sample": str(k), "ensemble.role": "mc_sample"} for k in range(s.samples)]

    def params(self, s, epochs):
        return {"samples": s.samples}

    def plan_epochs(self, spec, spe):
        return EpochPlan(members=_param(spec, "samples", minimum=1))

    def wrap(self, model, spec):
        if not dropout_modules(model):
            raise StrategyError(f"trajectory {spec.index}: mc_dropout needs a model with dropout (set model.dropout > 0)")
        return model

    def finish(self, run):
        spec, S = run.spec, run.plan.members
        val = mc_dropout_logits(run.model, run.data.x_val, S, spec.seed, run.predict_raw)
        test = mc_dropout_logits(run.model, run.data.x_test, S, spec.seed, run.predict_raw)
        weights = run.blob(run.model, {"mc_dropout": {"samples": S, "seed": spec.seed}})  # one blob, S members
        return [run.result(s, val[s], test[s], weights, spec.epochs, role="mc_sample", sample=s,
                           sample_seed=derive_seed(spec.seed, "mc_dropout", s)) for s in range(S)]

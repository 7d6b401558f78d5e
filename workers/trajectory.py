"""Train one trajectory that yields several ensemble members: snapshot, SWA, FGE, heads, MC dropout.

Like ``workers/member.py`` (whose helpers this reuses) it runs inside one Ray task but imports
no Ray or MLflow: the scheduler calls :func:`train_trajectory` with a ``planning.TrajectorySpec``,
the data, the CPU threads and device it was given, and a ``report`` callback.

All five strategies share one flat epoch loop (:func:`train_trajectory`); a strategy only
decides the model, the loss, the per-iteration learning rate, what happens after an epoch and
which members come out at the end:

``snapshot`` (Huang et al. 2017, "Snapshot Ensembles")
    ``spec.optimizer`` (SGD with its momentum / weight decay; Adam, if named, gets the same
    schedule) with the cyclic cosine learning rate of their eq. 2, :func:`snapshot_lr`, set
    before *every* optimizer step. ``epochs`` must be a multiple of ``params.cycles`` (M) so
    cycles end at epoch ends; the model is snapshotted at the end of each cycle. With
    ``params.use_last = m`` only the last m snapshots are members (and only those are kept).
``swa`` (Izmailov et al. 2018, ``torch.optim.swa_utils``)
    The constant ``optimizer.lr`` until ``params.swa_start`` (a count of completed epochs); from
    then on, after each epoch (0-based epoch index >= swa_start, i.e. epochs swa_start+1..E):
    ``AveragedModel.update_parameters`` then ``SWALR.step()`` - the PyTorch docs' pattern, so the
    epoch swa_start+1 still trains with optimizer.lr and the learning rate anneals (cosine,
    ``params.anneal_epochs``, default 1, optional ``params.anneal_strategy``) to
    ``params.swa_lr`` from the next epoch on. At the end ``update_bn`` recomputes the averaged
    model's BatchNorm statistics over the training inputs (stored order, batches of
    ``batch_size``, a trailing batch of one skipped). Members: the averaged model ("swa"), then
    the last iterate ("last").
``fge`` (Garipov et al. 2018, Fast Geometric Ensembling)
    ``params.pretrain_epochs`` with the constant ``optimizer.lr``, then ``params.cycles`` cycles
    of ``params.cycle_epochs`` (even) epochs with the per-iteration piecewise-linear
    :func:`fge_lr` between ``lr1`` and ``lr2``; a member is collected at the middle of each
    cycle, the epoch end where the learning rate is ``lr2``. ``epochs`` is not ignored: it must
    equal pretrain_epochs + cycles * cycle_epochs (a MemberError otherwise).
``heads`` (the handout's "only make classification layers ensembles")
    :class:`MultiHead`: one shared backbone (``model.features``) and K re-initialized copies of
    ``model.classifier``; the loss is the mean over heads of each head's cross-entropy on the
    same batch; one optimizer over everything. Member k is a standalone model (the backbone
    with head k as its classifier). The per-epoch validation record uses the heads' mean
    probabilities.
``mc_dropout`` (the handout's "dropout as an ensemble")
    One model trained normally (per-epoch validation with dropout off); member s is stochastic
    forward pass s with only the Dropout modules in train mode, seeded by
    ``derive_seed(spec.seed, "mc_dropout", s)`` (:func:`mc_dropout_probs`). Every member's
    ``weights`` is the same blob (the trained model plus ``"mc_dropout": {"samples": S, "seed":
    spec.seed}``); ``extra["sample"]`` / ``extra["sample_seed"]`` say which pass a member is.

Reports: ``{"type": "start", "task", "members", "epoch", "epochs", "resumed_from", "restarts",
"device"}`` once, then per epoch ``{"type": "collected", "task", "member", "epoch"}`` for each member
collected at that epoch followed by ``{"type": "epoch", "task", "epoch", "epochs", "train_loss",
"val_acc", "val_nll", "lr", "seconds"}`` (``lr`` = the learning rate of the epoch's last step).
Members that only exist at the end (swa, heads, mc_dropout) are reported "collected" once they are
built, after the last epoch. Snapshot/FGE members collected before a restart are not reported again.

Checkpoint (``spec.checkpoint_path``, atomic, after every epoch, ``torch.load(weights_only=True)``):
``format``, ``kind="trajectory"``, ``trajectory``, ``strategy``, ``seed``, ``model``,
``optimizer``, ``params``, ``member_indices``, ``input_shape``, ``num_classes``, ``epochs``,
``epoch`` (completed epochs), ``iteration`` (optimizer steps so far), ``model_state`` (a
MultiHead's for heads), ``optimizer_state``, ``rng_torch``, ``rng_order`` (and ``rng_cuda`` on a
GPU), ``history``, ``restarts``, ``train_seconds``, ``swa_state`` (the AveragedModel's state dict,
``n_averaged`` included, or None), ``swa_scheduler`` (SWALR's plain state, or None) and
``collected`` (one ``{"member", "role", "epoch", "cycle", "state"}`` per member collected so far).
A checkpoint found at start is resumed at the next epoch and gives the same members as an
uninterrupted run; one written by another strategy or member layout is refused.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ensemble_service.artifact import member_blob
from ensemble_service.data import DataBundle
from ensemble_service.models import derive_seed, init_weights
from workers.member import (
    CHECKPOINT_FORMAT, MemberError, MemberResult, Report, build_model, build_optimizer, forward_batches,
    load_checkpoint, predict_logits, resolve_device, result_metrics, run_epoch, save_checkpoint,
    steps_per_epoch, val_metrics,
)

STRATEGIES = ("snapshot", "swa", "fge", "heads", "mc_dropout")


# --------------------------------------------------------------------------- pure pieces


def snapshot_lr(t: int, total_iters: int, cycles: int, lr0: float) -> float:
    """Huang et al. 2017, eq. 2: ``lr0/2 * (cos(pi * ((t-1) mod ceil(T/M)) / ceil(T/M)) + 1)``.

    ``t`` is the 1-based iteration, ``total_iters`` = T, ``cycles`` = M.
    """
    if not (1 <= t and total_iters >= 1 and cycles >= 1):
        raise ValueError(f"snapshot_lr needs t >= 1, total_iters >= 1, cycles >= 1 (got {t}, {total_iters}, {cycles})")
    period = math.ceil(total_iters / cycles)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)


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


def _heads_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    logits = model(xb)  # [N, K, C]
    return torch.stack([F.cross_entropy(logits[:, k], yb) for k in range(logits.shape[1])]).mean()


# --------------------------------------------------------------------------- MC dropout


def _dropout_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, samples: int, seed: int,
                      device: torch.device) -> torch.Tensor:
    """``[S, N, C]`` logits of S stochastic passes: Dropout modules in train mode, everything else
    (BatchNorm included) in eval mode; pass s is seeded by ``derive_seed(seed, "mc_dropout", s)``.
    The global RNG state and the model's modes are restored afterwards."""
    drop = _dropout_modules(model)
    if not drop:
        raise MemberError("mc_dropout needs a model with dropout (set model.dropout > 0)")
    device = torch.device(device)
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
                out.append(forward_batches(model, x, device))
    finally:
        model.train(was_training)
    return torch.stack(out)


def mc_dropout_probs(model: nn.Module, x: torch.Tensor, samples: int, seed: int,
                     device: torch.device) -> torch.Tensor:
    """``[S, N, C]`` probabilities of :func:`mc_dropout_logits`."""
    return mc_dropout_logits(model, x, samples, seed, device).softmax(-1)


# --------------------------------------------------------------------------- spec checks


def _param(spec, key: str, kind=int, minimum=None, optional=False):
    p = spec.params or {}
    if key not in p or p[key] is None:
        if optional:
            return None
        raise MemberError(f"trajectory {spec.index} ({spec.strategy}): params.{key} is missing")
    value = p[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise MemberError(f"trajectory {spec.index} ({spec.strategy}): params.{key} must be "
                          f"{'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise MemberError(f"trajectory {spec.index} ({spec.strategy}): params.{key} must be >= {minimum}, got {value}")
    return value


@dataclass
class _Setup:
    """What a strategy decides before training (validated from the spec)."""
    members: int                                   # how many members it yields
    collect: Dict[int, Tuple[str, int]]            # epoch (1-based) -> (role, cycle) collected during training
    lr_at: Optional[Callable[[int], float]] = None  # 1-based global iteration -> lr (None: leave the lr alone)


def _setup(spec, spe: int) -> _Setup:
    """Validate ``spec.params`` for its strategy and derive the schedule and collection epochs."""
    where = f"trajectory {spec.index} ({spec.strategy})"
    if spec.strategy not in STRATEGIES:
        raise MemberError(f"trajectory {spec.index}: unknown strategy '{spec.strategy}'; "
                          f"choose one of: {', '.join(STRATEGIES)}")
    if spec.epochs < 1 or spec.batch_size < 1:
        raise MemberError(f"{where}: epochs and batch_size must be >= 1 (got {spec.epochs}, {spec.batch_size})")
    if spe < 1:
        raise MemberError(f"{where}: an epoch has no training step (batch_size 1 with BatchNorm?)")
    E = spec.epochs
    if spec.strategy == "snapshot":
        M = _param(spec, "cycles", minimum=1)
        if E % M:
            raise MemberError(f"{where}: epochs ({E}) must be a multiple of params.cycles ({M})")
        m = _param(spec, "use_last", minimum=1, optional=True) or M
        if m > M:
            raise MemberError(f"{where}: params.use_last ({m}) exceeds params.cycles ({M})")
        per = E // M
        total, lr0 = E * spe, float(spec.optimizer["lr"])
        return _Setup(members=m, collect={c * per: ("snapshot", c) for c in range(M - m + 1, M + 1)},
                      lr_at=lambda t: snapshot_lr(t, total, M, lr0))
    if spec.strategy == "swa":
        start = _param(spec, "swa_start", minimum=0)
        _param(spec, "swa_lr", kind=float, minimum=0.0)
        if start >= E:
            raise MemberError(f"{where}: params.swa_start ({start}) must be below epochs ({E})")
        _param(spec, "anneal_epochs", minimum=0, optional=True)
        if (spec.params.get("anneal_strategy") or "cos") not in ("cos", "linear"):
            raise MemberError(f"{where}: params.anneal_strategy must be 'cos' or 'linear'")
        return _Setup(members=2, collect={})
    if spec.strategy == "fge":
        P = _param(spec, "pretrain_epochs", minimum=0)
        K = _param(spec, "cycles", minimum=1)
        c = _param(spec, "cycle_epochs", minimum=2)
        lr1, lr2 = _param(spec, "lr1", kind=float, minimum=0.0), _param(spec, "lr2", kind=float, minimum=0.0)
        if c % 2:
            raise MemberError(f"{where}: params.cycle_epochs must be even, got {c}")
        if E != P + K * c:
            raise MemberError(f"{where}: epochs ({E}) must equal pretrain_epochs + cycles * cycle_epochs "
                              f"({P} + {K} * {c} = {P + K * c})")
        first, cycle_iters = P * spe, c * spe
        return _Setup(members=K, collect={P + c // 2 + k * c: ("fge", k + 1) for k in range(K)},
                      lr_at=lambda t: fge_lr(t - first, cycle_iters, lr1, lr2) if t > first else None)
    if spec.strategy == "heads":
        return _Setup(members=_param(spec, "heads", minimum=1), collect={})
    return _Setup(members=_param(spec, "samples", minimum=1), collect={})  # mc_dropout


# --------------------------------------------------------------------------- the worker


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _plain(state: Dict[str, Any]) -> Dict[str, Any]:
    """An LR scheduler's state dict without callables (older torch keeps anneal_func in it)."""
    return {k: v for k, v in state.items() if not callable(v)}


def train_trajectory(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                     report: Optional[Report] = None) -> List[MemberResult]:
    """Train (or resume) one trajectory described by a ``planning.TrajectorySpec``; its members in
    the order of ``spec.member_indices``."""
    torch.set_num_threads(max(1, int(num_threads)))
    device = resolve_device(spec.device, gpu_assigned)
    report = report or (lambda _event: None)
    t_idx, E = spec.index, spec.epochs

    torch.manual_seed(spec.seed)
    base = build_model(spec.model, data.input_shape, data.num_classes).to(device)
    if spec.strategy == "heads":
        model = MultiHead(base, _param(spec, "heads", minimum=1), spec.seed).to(device)
    else:
        model = base
    spe = steps_per_epoch(len(data.x_train), spec.batch_size, model)
    setup = _setup(spec, spe)
    if len(spec.member_indices) != setup.members:
        raise MemberError(f"trajectory {t_idx} ({spec.strategy}) yields {setup.members} members but "
                          f"member_indices has {len(spec.member_indices)}")
    if spec.strategy == "mc_dropout" and not _dropout_modules(model):
        raise MemberError(f"trajectory {t_idx}: mc_dropout needs a model with dropout (set model.dropout > 0)")
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    order = torch.Generator().manual_seed(spec.seed)
    swa_model = swa_sched = None
    if spec.strategy == "swa":
        p = spec.params
        swa_model = AveragedModel(model)
        swa_sched = SWALR(optimizer, swa_lr=float(p["swa_lr"]), anneal_epochs=int(p.get("anneal_epochs") or 1),
                          anneal_strategy=p.get("anneal_strategy") or "cos")
    loss_fn = _heads_loss if spec.strategy == "heads" else None
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)

    start_epoch, iteration, history, collected, restarts, seconds = 0, 0, [], [], 0, 0.0
    ckpt = load_checkpoint(spec.checkpoint_path)
    if ckpt is not None:
        if (ckpt.get("kind"), ckpt.get("strategy"), ckpt.get("member_indices")) != \
                ("trajectory", spec.strategy, list(spec.member_indices)):
            raise MemberError(f"checkpoint {spec.checkpoint_path} belongs to another trajectory")
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if swa_model is not None:
            swa_model.load_state_dict(ckpt["swa_state"])
            swa_sched.load_state_dict(ckpt["swa_scheduler"])
        torch.set_rng_state(ckpt["rng_torch"])
        order.set_state(ckpt["rng_order"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        start_epoch, iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        history, collected = list(ckpt["history"]), list(ckpt["collected"])
        restarts, seconds = int(ckpt["restarts"]) + 1, float(ckpt["train_seconds"])
    resumed_from = start_epoch
    report({"type": "start", "task": t_idx, "members": list(spec.member_indices), "epoch": start_epoch,
            "epochs": E, "resumed_from": resumed_from, "restarts": restarts, "device": str(device)})

    def before_step() -> None:
        nonlocal iteration
        iteration += 1
        lr = setup.lr_at(iteration) if setup.lr_at is not None else None
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr

    for epoch in range(start_epoch, E):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=order)
        train_loss = run_epoch(spec, epoch, model, optimizer, x_train, y_train, perm,
                               loss_fn=loss_fn, before_step=before_step)
        assert iteration == (epoch + 1) * spe, (iteration, epoch, spe)
        lr = float(optimizer.param_groups[0]["lr"])
        if swa_model is not None and epoch >= spec.params["swa_start"]:
            swa_model.update_parameters(model)
            swa_sched.step()
        val = val_metrics(spec, epoch, _val_probs(model, data.x_val, device), data.y_val)
        seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"], "val_nll": val["nll"], "lr": lr}
        history.append(record)
        new = []
        if epoch + 1 in setup.collect:
            role, cycle = setup.collect[epoch + 1]
            new.append({"member": int(spec.member_indices[len(collected)]), "role": role, "epoch": epoch + 1,
                        "cycle": cycle, "state": _cpu_state(model)})
            collected.extend(new)
        save_checkpoint(spec.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "kind": "trajectory", "trajectory": t_idx, "strategy": spec.strategy,
            "seed": spec.seed, "model": dict(spec.model), "optimizer": dict(spec.optimizer),
            "params": dict(spec.params or {}), "member_indices": list(spec.member_indices),
            "input_shape": list(data.input_shape), "num_classes": int(data.num_classes), "epochs": E,
            "epoch": epoch + 1, "iteration": iteration,
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "rng_torch": torch.get_rng_state(), "rng_order": order.get_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "restarts": restarts, "train_seconds": seconds,
            "swa_state": swa_model.state_dict() if swa_model is not None else None,
            "swa_scheduler": _plain(swa_sched.state_dict()) if swa_sched is not None else None,
            "collected": collected,
        })
        for entry in new:
            report({"type": "collected", "task": t_idx, "member": entry["member"], "epoch": entry["epoch"]})
        report({"type": "epoch", "task": t_idx, "epochs": E, "seconds": seconds, **record})

    common = dict(seed=spec.seed, architecture=spec.architecture, model=dict(spec.model),
                  resumed_from=resumed_from, restarts=restarts, train_seconds=seconds, device=str(device))
    blob = lambda m, extra=None: member_blob(spec.model, data.input_shape, data.num_classes, m, extra)  # noqa: E731

    def result(pos: int, val_logits, test_logits, weights: bytes, epoch: int, **extra) -> MemberResult:
        val_probs, test_probs = val_logits.softmax(-1), test_logits.softmax(-1)
        return MemberResult(
            index=int(spec.member_indices[pos]), history=[dict(h) for h in history[:epoch]],
            metrics=result_metrics(val_probs, data.y_val, test_probs, data.y_test),
            val_probs=val_probs, test_probs=test_probs, test_logits=test_logits, weights=weights,
            extra={"trajectory": t_idx, "epoch": epoch, **extra}, **common)

    def evaluated(pos: int, m: nn.Module, epoch: int, **extra) -> MemberResult:
        return result(pos, predict_logits(m, data.x_val, device), predict_logits(m, data.x_test, device),
                      blob(m), epoch, **extra)

    results: List[MemberResult] = []
    if spec.strategy in ("snapshot", "fge"):
        probe = copy.deepcopy(model)
        for pos, entry in enumerate(collected):
            probe.load_state_dict(entry["state"])
            results.append(evaluated(pos, probe, entry["epoch"], cycle=entry["cycle"], role=entry["role"]))
    elif spec.strategy == "swa":
        bn_batches = [x_train[i:i + spec.batch_size] for i in range(0, len(x_train), spec.batch_size)]
        update_bn([b for b in bn_batches if len(b) > 1], swa_model)
        results.append(evaluated(0, swa_model.module, E, role="swa", n_averaged=int(swa_model.n_averaged)))
        results.append(evaluated(1, model, E, role="last"))
    elif spec.strategy == "heads":
        val_logits, test_logits = predict_logits(model, data.x_val, device), predict_logits(model, data.x_test, device)
        for k in range(len(model.heads)):
            results.append(result(k, val_logits[:, k], test_logits[:, k], blob(model.member(k, base)), E,
                                  role="head", head=k))
    else:  # mc_dropout
        S = setup.members
        weights = blob(model, {"mc_dropout": {"samples": S, "seed": spec.seed}})
        val_logits = mc_dropout_logits(model, data.x_val, S, spec.seed, device)
        test_logits = mc_dropout_logits(model, data.x_test, S, spec.seed, device)
        for s in range(S):
            results.append(result(s, val_logits[s], test_logits[s], weights, E, role="mc_sample", sample=s,
                                  sample_seed=derive_seed(spec.seed, "mc_dropout", s)))
    if spec.strategy in ("swa", "heads", "mc_dropout"):  # these members only exist now
        for r in results:
            report({"type": "collected", "task": t_idx, "member": r.index, "epoch": E})
    return results


def _val_probs(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Validation probabilities; a MultiHead's are its heads' mean."""
    probs = predict_logits(model, x, device).softmax(-1)
    return probs.mean(1) if probs.dim() == 3 else probs

"""Train one trajectory that yields several ensemble members: snapshot, SWA, FGE, heads, MC dropout.

Runs inside one Ray task but imports no Ray or MLflow: the scheduler calls :func:`train_trajectory`
with a ``planning.TrajectorySpec``, the data, the CPU threads and device it was given, and a
``report`` callback. One flat epoch loop serves all five strategies; the strategy (from
``ensemble_service.strategies``) decides the model it trains (heads: a :class:`MultiHead`), the
loss, the per-iteration learning-rate scheduler (snapshot's cyclic cosine, FGE's piecewise-linear
cycles), what happens after an epoch (SWA's averaging), the epochs where members are collected
(snapshot, FGE) and the members that exist only at the end (SWA, heads, MC dropout).

Reports follow ``workers.state``'s schema; per epoch, ``collected`` events for the members collected
at that epoch precede the ``epoch`` event (whose ``lr`` is the learning rate of the epoch's last
step). Members that exist only at the end are reported ``collected`` after the last epoch; members
collected before a restart are not reported again.

Checkpoint: ``workers.state.Checkpoint`` with the model (a MultiHead's for heads), optimizer,
scheduler and the strategy's extras (SWA: the AveragedModel and SWALR), and, as ``extra``, the
members collected so far (``{"member", "role", "epoch", "cycle", "state"}``). One written by another
strategy or member layout is refused.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ensemble_service.artifact import member_blob
from ensemble_service.data import DataBundle
from ensemble_service.strategies import STRATEGIES, StrategyError, TrajectoryRun
from workers.state import (
    Checkpoint, MemberError, MemberResult, Report, Timer, build_model, build_optimizer, collected_event,
    epoch_event, evaluate, forward_batches, member_result, predict_logits, prepare_model, run_epoch, setup,
    start_event, steps_per_epoch, val_metrics,
)


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_trajectory(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                     report: Optional[Report] = None) -> List[MemberResult]:
    """Train (or resume) one trajectory described by a ``planning.TrajectorySpec``; its members in
    the order of ``spec.member_indices``."""
    device = setup(num_threads, spec.device, gpu_assigned)
    report = report or (lambda _event: None)
    try:
        strategy = STRATEGIES.get(spec.strategy)
        if not strategy.trajectory:
            raise StrategyError(f"strategy {spec.strategy!r} trains members, not trajectories")
        if spec.epochs < 1 or spec.batch_size < 1:
            raise StrategyError(f"trajectory {spec.index} ({spec.strategy}): epochs and batch_size must be >= 1 "
                                f"(got {spec.epochs}, {spec.batch_size})")
        torch.manual_seed(spec.seed)
        base = build_model(spec.model, data.input_shape, data.num_classes).to(device)
        model = prepare_model(strategy.wrap(base, spec).to(device), spec)
        spe = steps_per_epoch(len(data.x_train), spec.batch_size, model)
        if spe < 1:
            raise StrategyError(f"trajectory {spec.index} ({spec.strategy}): an epoch has no training step "
                                "(batch_size 1 with BatchNorm?)")
        plan = strategy.plan_epochs(spec, spe)
    except StrategyError as exc:
        raise MemberError(str(exc)) from None
    if len(spec.member_indices) != plan.members:
        raise MemberError(f"trajectory {spec.index} ({spec.strategy}) yields {plan.members} members but "
                          f"member_indices has {len(spec.member_indices)}")
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    scheduler = strategy.scheduler(optimizer, spec, spe)
    extras = strategy.extras(model, optimizer, spec)
    order = torch.Generator().manual_seed(spec.seed)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)

    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **extras}
    generators = {"order": order}
    identity = {"kind": "trajectory", "trajectory": spec.index, "strategy": spec.strategy, "seed": spec.seed,
                "member_indices": list(spec.member_indices), "model": dict(spec.model),
                "optimizer": dict(spec.optimizer), "params": dict(spec.params or {}), "epochs": spec.epochs}
    checkpoint = Checkpoint(spec.checkpoint_path, identity, device)
    progress = checkpoint.resume(states, generators)
    collected: List[Dict[str, Any]] = progress.extra.setdefault("collected", [])
    report(start_event(spec.index, spec.member_indices, progress, spec.epochs, device))

    for epoch in range(progress.epoch, spec.epochs):
        with Timer(progress):
            perm = torch.randperm(len(x_train), generator=order)
            train_loss, lr = run_epoch(spec, epoch, model, optimizer, x_train, y_train, perm, loss_fn=strategy.loss,
                                       scheduler=scheduler)
            strategy.after_epoch(epoch, model, extras, spec)
            val = val_metrics(spec, epoch, _val_probs(model, data.x_val, device), data.y_val)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"], "val_nll": val["nll"], "lr": lr}
        progress.history.append(record)
        progress.epoch = epoch + 1
        new = []
        if epoch + 1 in plan.collect:
            role, cycle = plan.collect[epoch + 1]
            new.append({"member": int(spec.member_indices[len(collected)]), "role": role, "epoch": epoch + 1,
                        "cycle": cycle, "state": _cpu_state(model)})
            collected.extend(new)
        checkpoint.save(progress, states, generators)
        for entry in new:
            report(collected_event(spec.index, entry["member"], entry["epoch"]))
        report(epoch_event(spec.index, spec.epochs, progress.train_seconds, record))

    def result(pos: int, val_logits, test_logits, weights, epoch: int, **extra):
        if isinstance(weights, nn.Module):
            weights = member_blob(spec.model, data.input_shape, data.num_classes, weights)
        return member_result(spec, spec.member_indices[pos], spec.seed, data, progress, device,
                             val_logits=val_logits, test_logits=test_logits, weights=weights,
                             history=progress.history[:epoch], extra={"trajectory": spec.index, "epoch": epoch, **extra})

    def evaluated(pos: int, module: nn.Module, epoch: int, **extra):
        return evaluate(spec, spec.member_indices[pos], spec.seed, module, data, progress, device,
                        history=progress.history[:epoch], extra={"trajectory": spec.index, "epoch": epoch, **extra})

    run = TrajectoryRun(spec, base, model, extras, collected, plan, data, device, evaluated, result,
                        lambda m, x: predict_logits(m, x, device), lambda m, x: forward_batches(m, x, device))
    try:
        results = strategy.finish(run)
    except StrategyError as exc:
        raise MemberError(str(exc)) from None
    if not plan.collect:  # these members only exist now
        for r in results:
            report(collected_event(spec.index, r.index, spec.epochs))
    return results


def _val_probs(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Validation probabilities; a MultiHead's are its heads' mean."""
    probs = predict_logits(model, x, device).softmax(-1)
    return probs.mean(1) if probs.dim() == 3 else probs

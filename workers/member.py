"""Train one ensemble member: one flat loop, a checkpoint after every epoch, resume.

Runs inside one Ray task but imports no Ray: the scheduler calls ``train_member`` with a
``planning.MemberSpec``, the data set, the CPU threads and device the task was given, and a
``report`` callback through which per-epoch metrics travel back to the driver (which does the
MLflow writes). The checkpoint, result type and events are ``workers.state``'s: a member stopped
after epoch k resumes at k + 1 and ends with the weights and predictions of an uninterrupted run.
"""
from __future__ import annotations

from typing import Optional

import torch

from ensemble_service.data import DataBundle, bootstrap_indices, is_streaming
from ensemble_service.schedules import member_scheduler
from workers.state import (
    Checkpoint, MemberResult, Report, Timer, build_model, build_optimizer, epoch_event, evaluate, prepare_model,
    run_epoch, setup, split_logits, start_event, steps_per_epoch, val_metrics,
)


def train_member(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                 report: Optional[Report] = None) -> MemberResult:
    """Train (or resume) one member described by a ``planning.MemberSpec``. ``data`` is a
    ``DataBundle`` (tensors, indexed here) or a streamed data set (``data.streaming``), whose
    epochs arrive as batches: shuffled for (seed, epoch), the member's bootstrap sample when bagging."""
    device = setup(num_threads, spec.device, gpu_assigned)
    report = report or (lambda _event: None)
    streamed = is_streaming(data)

    torch.manual_seed(spec.seed)
    model = prepare_model(build_model(spec.model, data.input_shape, data.num_classes).to(device), spec)
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    order = torch.Generator().manual_seed(spec.seed)
    if not streamed:
        n = len(data.x_train)
        train_idx = bootstrap_indices(n, spec.seed) if spec.bagging else torch.arange(n)
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    # trainer.schedule: a per-iteration LR scheduler (None: the optimizer's lr throughout); a streamed
    # set's bootstrap sample varies in size, so its steps are counted on the training split's rows
    scheduler = member_scheduler(optimizer, spec.schedule, spec.warmup_epochs, spec.epochs,
                                 steps_per_epoch(data.train_size if streamed else len(train_idx), spec.batch_size, model))

    states, generators = {"model": model, "optimizer": optimizer, "scheduler": scheduler}, {"order": order}
    identity = {"kind": "member", "member": spec.index, "seed": spec.seed, "bagging": bool(spec.bagging),
                "model": dict(spec.model), "optimizer": dict(spec.optimizer), "epochs": spec.epochs,
                "batch_size": spec.batch_size, "schedule": [spec.schedule, spec.warmup_epochs]}
    checkpoint = Checkpoint(spec.checkpoint_path, identity, device)
    progress = checkpoint.resume(states, generators)
    report(start_event(spec.index, [spec.index], progress, spec.epochs, device))

    for epoch in range(progress.epoch, spec.epochs):
        with Timer(progress):
            if streamed:
                batches = data.train_batches(spec.batch_size, spec.seed, epoch, spec.bagging, device)
                train_loss, lr = run_epoch(spec, epoch, model, optimizer, None, None, None, scheduler=scheduler,
                                           batches=batches)
            else:
                perm = train_idx[torch.randperm(len(train_idx), generator=order)]
                train_loss, lr = run_epoch(spec, epoch, model, optimizer, x_train, y_train, perm, scheduler=scheduler)
            val = val_metrics(spec, epoch, split_logits(model, data, "val", device).softmax(-1), data.y_val)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"], "val_nll": val["nll"], "lr": lr}
        progress.history.append(record)
        progress.epoch = epoch + 1
        checkpoint.save(progress, states, generators)
        report(epoch_event(spec.index, spec.epochs, progress.train_seconds, record))

    return evaluate(spec, spec.index, spec.seed, model, data, progress, device, history=progress.history)

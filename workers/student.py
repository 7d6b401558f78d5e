"""Distil an ensemble into one student (Hinton et al. 2015): one flat loop, a checkpoint after every
epoch, resume. Runs inside one Ray task but imports no Ray or MLflow.

The scheduler calls :func:`train_student` with a ``planning.StudentSpec``. The teacher (the
ensemble's member checkpoints and manifest records, run by ``ensemble_service.serving`` exactly as
it is served) gives soft targets on the training split: at temperature T, the members' softened
distributions averaged, ``q = sum_m w_m softmax(z_m / T)`` (``w``: the ensemble's own weights
where it has them, else uniform). The student's loss per batch is

    alpha * T^2 * KL(q || softmax(z_s / T)) + (1 - alpha) * cross_entropy(z_s, y)

(T^2 keeps the soft term's gradients on the hard term's scale as T changes). Everything else is
the member loop's (``workers.member``): seed, data order, per-epoch validation, checkpoint, events.
The result carries, in ``extra``, the teacher's test metrics and the forward time of the teacher
and of the student over the test split, both run as ``ensemble_service.serving`` serves them, on
the same device and threads (the best of ``TIMING_REPEATS``).
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ensemble_service import metrics
from ensemble_service.data import DataBundle
from ensemble_service.serving import Ensemble, ServingError
from workers.state import (
    Checkpoint, MemberError, MemberResult, Report, Timer, build_model, build_optimizer, epoch_event, evaluate,
    predict_logits, run_epoch, setup, start_event, val_metrics,
)

TIMING_REPEATS = 3


def teacher_probs(teacher: Ensemble, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's (weighted) mean of its members' softmax(z / T) on model inputs ``x``, ``[N, C]``."""
    z = teacher.logits(x).to(torch.float64)
    m = z.shape[0]
    w = teacher.stored_weights
    w = torch.full((m,), 1.0 / m, dtype=torch.float64) if w is None else (w.to(torch.float64) / w.to(torch.float64).sum())
    return (w[:, None, None] * torch.softmax(z / temperature, dim=-1)).sum(0).to(torch.float32)


def distillation_loss(logits: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor, temperature: float,
                      alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(soft || softmax(logits / T)) + (1 - alpha) * CE(logits, labels) (batch means)."""
    hard = F.cross_entropy(logits, labels)
    if alpha == 0:
        return hard
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean")
    return alpha * temperature * temperature * kd + (1.0 - alpha) * hard


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device) -> float:
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def train_student(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                  report: Optional[Report] = None) -> MemberResult:
    """Train (or resume) the student a ``planning.StudentSpec`` describes (see the module docstring)."""
    device = setup(num_threads, spec.device, gpu_assigned)
    report = report or (lambda _event: None)
    T, alpha = float(spec.temperature), float(spec.alpha)
    try:
        teacher = Ensemble.from_blobs(list(spec.teacher_blobs), [dict(r) for r in spec.teacher_records], {},
                                      device=device)
    except ServingError as exc:
        raise MemberError(f"cannot load the teacher ensemble: {exc}") from None
    if tuple(teacher.input_shape) != tuple(data.input_shape) or teacher.num_classes != data.num_classes:
        raise MemberError(f"the teacher takes {list(teacher.input_shape)} inputs with {teacher.num_classes} classes; "
                          f"the data set has {list(data.input_shape)} and {data.num_classes}")
    soft = teacher_probs(teacher, data.x_train, T).to(device)

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes).to(device)
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    order = torch.Generator().manual_seed(spec.seed)
    n = len(data.x_train)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    ids = torch.arange(n, device=device)   # run_epoch's "labels": positions, to look up labels and soft targets

    def loss_fn(m, xb, ib):
        return distillation_loss(m(xb), soft[ib], y_train[ib], T, alpha)

    teacher_id = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in spec.teacher_blobs)).hexdigest()[:16]
    states, generators = {"model": model, "optimizer": optimizer}, {"order": order}
    identity = {"kind": "student", "member": spec.index, "seed": spec.seed, "model": dict(spec.model),
                "optimizer": dict(spec.optimizer), "epochs": spec.epochs, "batch_size": spec.batch_size,
                "teacher": teacher_id, "temperature": T, "alpha": alpha}
    checkpoint = Checkpoint(spec.checkpoint_path, identity, device)
    progress = checkpoint.resume(states, generators)
    report(start_event(spec.index, [spec.index], progress, spec.epochs, device))

    for epoch in range(progress.epoch, spec.epochs):
        with Timer(progress):
            perm = torch.randperm(n, generator=order)
            train_loss, _ = run_epoch(spec, epoch, model, optimizer, x_train, ids, perm, loss_fn=loss_fn)
            val = val_metrics(spec, epoch, predict_logits(model, data.x_val, device).softmax(-1), data.y_val)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"], "val_nll": val["nll"]}
        progress.history.append(record)
        progress.epoch = epoch + 1
        checkpoint.save(progress, states, generators)
        report(epoch_event(spec.index, spec.epochs, progress.train_seconds, record))

    result = evaluate(spec, spec.index, spec.seed, model, data, progress, device, history=progress.history,
                      extra={"role": "student"})
    served = Ensemble.from_blobs([result.weights], None, {}, device=device)   # as the student will be served
    with torch.inference_mode():
        taught = metrics.member_metrics(teacher_probs(teacher, data.x_test), data.y_test)
        teacher_s = _best_time(lambda: teacher.logits(data.x_test), device)
        student_s = _best_time(lambda: served.logits(data.x_test), device)
    result.extra.update(teacher_test_acc=taught["acc"], teacher_test_nll=taught["nll"], teacher_test_ece=taught["ece"],
                        teacher_members=teacher.num_members, teacher_forward_seconds=teacher_s,
                        student_forward_seconds=student_s)
    return result

"""Train one ensemble member: one flat loop, a checkpoint after every epoch, resume.

Runs inside one Ray task but imports no Ray: the scheduler calls ``train_member`` with
the data set, the number of CPU threads and the device the task was given, and a
``report`` callback through which per-epoch metrics travel back to the driver (which
does the MLflow writes).

The checkpoint at ``spec.checkpoint_path`` carries everything needed to resume: the
model config, input shape and class count, weights, optimizer state, the number of
completed epochs, the torch RNG state and the data-order generator's state, the
per-epoch history and a restart count. It is written atomically after each epoch and
read with ``torch.load(..., weights_only=True)``. If it exists when the member starts,
training resumes at the next epoch; the final weights and predictions equal those of
an uninterrupted run (same seed, same batches).
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ensemble_service import metrics
from ensemble_service.data import DataBundle, bootstrap_indices
from ensemble_service import models, optimizers
from ensemble_service.artifact import member_blob

CHECKPOINT_FORMAT = 1
EVAL_BATCH = 1024

Report = Callable[[Dict[str, Any]], None]


class MemberError(RuntimeError):
    """Training cannot go on (diverged loss, bad checkpoint); not retried."""


@dataclass
class MemberResult:
    index: int
    seed: int
    architecture: str
    model: Dict[str, Any]
    history: List[Dict[str, float]]
    metrics: Dict[str, float]
    val_probs: torch.Tensor
    test_probs: torch.Tensor
    test_logits: torch.Tensor
    weights: bytes                  # torch.save of {"model", "input_shape", "num_classes", "state_dict"}
    resumed_from: int = 0           # completed epochs found in the checkpoint at start (0 = fresh)
    restarts: int = 0               # how many times this member was started again from a checkpoint
    train_seconds: float = 0.0
    device: str = "cpu"
    host: str = field(default_factory=socket.gethostname)
    extra: Dict[str, Any] = field(default_factory=dict)


def resolve_device(preference: str, gpu_assigned: bool) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise MemberError("trainer.device=cuda but this worker has no CUDA device")
    if (preference == "cuda" or gpu_assigned) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_optimizer(params, spec: Dict[str, Any], **impl: Any) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (a ``_target_`` spec); ``impl`` (e.g. ``fused=True``) picks torch's
    implementation only, never the update rule."""
    try:
        return optimizers.build_optimizer(params, spec, **impl)
    except optimizers.OptimizerError as exc:
        raise MemberError(str(exc)) from None


def build_model(model_spec: Dict[str, Any], input_shape, num_classes: int) -> torch.nn.Module:
    try:
        return models.build_model(model_spec, tuple(input_shape), num_classes)
    except models.ModelError as exc:
        raise MemberError(str(exc)) from None


@torch.no_grad()
def forward_batches(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model(x)`` in chunks of EVAL_BATCH, on the CPU, in whatever mode ``model`` is in."""
    out = [model(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out) if out else torch.empty(0)


def predict_logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return forward_batches(model, x, device)


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: refuse rather than train on garbage
        raise MemberError(f"cannot read checkpoint {path}: {exc}") from None
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MemberError(f"checkpoint {path} has an unknown format")
    return ckpt


def diverged(spec, epoch: int, value: float) -> MemberError:
    return MemberError(f"member {spec.index}: training loss became {value} in epoch {epoch + 1}; "
                       f"lower optimizer.lr (now {spec.optimizer['lr']})")


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def steps_per_epoch(n: int, batch_size: int, model: torch.nn.Module) -> int:
    """Optimizer steps ``run_epoch`` takes over ``n`` samples (a trailing batch of one is
    skipped when the model has BatchNorm)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= (2 if has_batchnorm(model) else 1) else 0)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def run_epoch(spec, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              x_train: torch.Tensor, y_train: torch.Tensor, perm: torch.Tensor, *,
              loss_fn: Optional[LossFn] = None, before_step: Optional[Callable[[], None]] = None) -> float:
    """One pass over the samples ``perm`` in batches of ``spec.batch_size``; the mean training loss.

    ``loss_fn(model, xb, yb)`` defaults to the cross-entropy of ``model(xb)``; ``before_step()``
    runs before each optimizer step (e.g. to set a per-iteration learning rate). A non-finite
    batch loss raises ``diverged``.
    """
    model.train()
    skip_single = has_batchnorm(model)
    total, count = 0.0, 0
    for i in range(0, len(perm), spec.batch_size):
        idx = perm[i:i + spec.batch_size].to(x_train.device)
        if len(idx) < 2 and skip_single:
            continue  # BatchNorm cannot train on a batch of one
        xb, yb = x_train[idx], y_train[idx]
        if before_step is not None:
            before_step()
        loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise diverged(spec, epoch, batch_loss)
        total += batch_loss * len(idx)
        count += len(idx)
    return total / max(count, 1)


def val_metrics(spec, epoch: int, val_probs: torch.Tensor, y_val: torch.Tensor) -> Dict[str, float]:
    """Per-epoch validation metrics; non-finite probabilities raise ``diverged``."""
    if not torch.isfinite(val_probs).all():
        raise diverged(spec, epoch, float("nan"))
    return metrics.member_metrics(val_probs, y_val)


def result_metrics(val_probs: torch.Tensor, y_val: torch.Tensor,
                   test_probs: torch.Tensor, y_test: torch.Tensor) -> Dict[str, float]:
    """The final metrics of a member (MemberResult.metrics)."""
    val = metrics.member_metrics(val_probs, y_val)
    test = metrics.member_metrics(test_probs, y_test)
    return {
        "val_acc": val["acc"], "val_nll": val["nll"],
        "test_acc": test["acc"], "test_nll": test["nll"], "test_brier": test["brier"], "test_ece": test["ece"],
    }


def train_member(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                 report: Optional[Report] = None) -> MemberResult:
    """Train (or resume) one member described by a ``planning.MemberSpec``."""
    torch.set_num_threads(max(1, int(num_threads)))
    device = resolve_device(spec.device, gpu_assigned)
    report = report or (lambda _event: None)

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes).to(device)
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    order = torch.Generator().manual_seed(spec.seed)

    n = len(data.x_train)
    train_idx = bootstrap_indices(n, spec.seed) if spec.bagging else torch.arange(n)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val, data.y_val

    start_epoch, history, restarts, seconds = 0, [], 0, 0.0
    ckpt = load_checkpoint(spec.checkpoint_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        torch.set_rng_state(ckpt["rng_torch"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        order.set_state(ckpt["rng_order"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        restarts, seconds = int(ckpt["restarts"]) + 1, float(ckpt["train_seconds"])
    resumed_from = start_epoch
    report({"type": "start", "member": spec.index, "epoch": start_epoch, "epochs": spec.epochs,
            "resumed_from": resumed_from, "restarts": restarts, "device": str(device)})

    for epoch in range(start_epoch, spec.epochs):
        t0 = time.perf_counter()
        perm = train_idx[torch.randperm(len(train_idx), generator=order)]
        train_loss = run_epoch(spec, epoch, model, optimizer, x_train, y_train, perm)
        val = val_metrics(spec, epoch, predict_logits(model, x_val, device).softmax(-1), y_val)
        seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"], "val_nll": val["nll"]}
        history.append(record)
        save_checkpoint(spec.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "member_index": spec.index, "seed": spec.seed,
            "model": dict(spec.model), "optimizer": dict(spec.optimizer),
            "input_shape": list(data.input_shape), "num_classes": int(data.num_classes),
            "epoch": epoch + 1, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "rng_torch": torch.get_rng_state(), "rng_order": order.get_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history, "restarts": restarts, "train_seconds": seconds,
        })
        report({"type": "epoch", "member": spec.index, "epochs": spec.epochs, "seconds": seconds, **record})

    val_logits = predict_logits(model, x_val, device)
    test_logits = predict_logits(model, data.x_test, device)
    val_probs, test_probs = val_logits.softmax(-1), test_logits.softmax(-1)
    return MemberResult(
        index=spec.index, seed=spec.seed, architecture=spec.architecture, model=dict(spec.model),
        history=history, metrics=result_metrics(val_probs, y_val, test_probs, data.y_test),
        val_probs=val_probs, test_probs=test_probs,
        test_logits=test_logits, weights=member_blob(spec.model, data.input_shape, data.num_classes, model.cpu()),
        resumed_from=resumed_from, restarts=restarts, train_seconds=seconds, device=str(device),
    )

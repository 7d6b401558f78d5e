"""What every worker shares: the resume checkpoint, the result type, the event schema, the loop's
pieces. Runs inside a Ray task but imports no Ray.

Checkpoint (:class:`Checkpoint`), written atomically after every epoch to the task's
``checkpoint_path`` (a local path or an object-store URI: ``ensemble_service.storage``) and read
with ``torch.load(weights_only=True)``, holds everything needed to resume (nanoGPT's train.py is the model: one dict, built in one place)::

    format, identity (kind, task, members, seeds, strategy: refused when it is another task's),
    epoch (completed), history (per member), restarts, train_seconds,
    states: {"model", "optimizer", "scheduler", ...: state_dict()}   (whatever the worker passes)
    rng: {"torch", "cuda", <generator name>: state}                  (global and data-order RNGs)
    extra: the worker's own plain data (e.g. the members a trajectory collected so far)

A checkpoint found at start is resumed at the next epoch and gives the same members as an
uninterrupted run (same seed, same batches, restored optimizer, scheduler and RNG states).

Events (:func:`start_event`, :func:`epoch_event`, :func:`collected_event`) are plain dicts with one
schema for every worker: ``type``, ``task`` (the task's index), and per type::

    start:     members, epoch, epochs, resumed_from, restarts, device
    epoch:     epoch, epochs, seconds, train_loss, val_acc, val_nll[, lr][, members: {index: values}]
    collected: member, epoch
"""
from __future__ import annotations

import contextlib
import io
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ensemble_service import metrics, models, optimizers, storage
from ensemble_service.artifact import member_blob
from ensemble_service.data.streaming import in_key_order, is_streaming

CHECKPOINT_FORMAT = 2
EVAL_BATCH = 1024

Report = Callable[[Dict[str, Any]], None]
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class MemberError(RuntimeError):
    """Training cannot go on (diverged loss, bad checkpoint, impossible spec); not retried."""


# --------------------------------------------------------------------------- results


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
    weights: bytes                  # ensemble_service.artifact.member_blob of the member
    resumed_from: int = 0           # completed epochs found in the checkpoint at start (0 = fresh)
    restarts: int = 0               # how many times this member's task was started again from a checkpoint
    train_seconds: float = 0.0
    device: str = "cpu"
    host: str = field(default_factory=socket.gethostname)
    extra: Dict[str, Any] = field(default_factory=dict)


def result_metrics(val_probs: torch.Tensor, y_val: torch.Tensor,
                   test_probs: torch.Tensor, y_test: torch.Tensor) -> Dict[str, float]:
    """The final metrics of a member (MemberResult.metrics)."""
    val = metrics.member_metrics(val_probs, y_val)
    test = metrics.member_metrics(test_probs, y_test)
    return {"val_acc": val["acc"], "val_nll": val["nll"], "test_acc": test["acc"], "test_nll": test["nll"],
            "test_brier": test["brier"], "test_ece": test["ece"]}


# --------------------------------------------------------------------------- events


def start_event(task: int, members: Sequence[int], progress: "Progress", epochs: int, device) -> Dict[str, Any]:
    return {"type": "start", "task": int(task), "members": [int(m) for m in members], "epoch": progress.epoch,
            "epochs": int(epochs), "resumed_from": progress.resumed_from, "restarts": progress.restarts,
            "device": str(device)}


def epoch_event(task: int, epochs: int, seconds: float, record: Mapping[str, Any],
                members: Optional[Mapping[int, Mapping[str, float]]] = None) -> Dict[str, Any]:
    event = {"type": "epoch", "task": int(task), "epochs": int(epochs), "seconds": float(seconds), **record}
    if members is not None:
        event["members"] = {int(k): dict(v) for k, v in members.items()}
    return event


def collected_event(task: int, member: int, epoch: int) -> Dict[str, Any]:
    return {"type": "collected", "task": int(task), "member": int(member), "epoch": int(epoch)}


# --------------------------------------------------------------------------- checkpoint


@dataclass
class Progress:
    """Where a task stands: completed epochs, per-member history, restarts, training seconds."""
    epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    train_seconds: float = 0.0
    resumed_from: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def _plain(state: Dict[str, Any]) -> Dict[str, Any]:
    """A state dict without callables (LR schedulers keep lambdas / anneal functions in theirs)."""
    return {k: v for k, v in state.items() if not callable(v)}


class Checkpoint:
    """The resume checkpoint of one task (see the module docstring)."""

    def __init__(self, path: str, identity: Mapping[str, Any], device: torch.device):
        self.path, self.identity, self.device = path, dict(identity), torch.device(device)

    def _read(self) -> Optional[Dict[str, Any]]:
        ckpt = load_checkpoint(self.path)
        if ckpt is None:
            return None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise MemberError(f"checkpoint {self.path} has an unknown format; delete it to start over")
        if ckpt.get("identity") != self.identity:
            raise MemberError(f"checkpoint {self.path} belongs to another task ({ckpt.get('identity')}); "
                              "delete it to start over")
        return ckpt

    def resume(self, states: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> Progress:
        """Load the checkpoint into ``states`` (objects with ``load_state_dict``) and ``generators``
        when there is one; a fresh :class:`Progress` otherwise."""
        ckpt = self._read()
        if ckpt is None:
            return Progress()
        for name, obj in states.items():
            if obj is not None:
                obj.load_state_dict(ckpt["states"][name])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for name, gen in generators.items():
            gen.set_state(rng[name])
        epoch = int(ckpt["epoch"])
        return Progress(epoch=epoch, history=list(ckpt["history"]), restarts=int(ckpt["restarts"]) + 1,
                        train_seconds=float(ckpt["train_seconds"]), resumed_from=epoch, extra=dict(ckpt["extra"]))

    def save(self, progress: Progress, states: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
        rng: Dict[str, Any] = {"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rng.update({name: gen.get_state() for name, gen in generators.items()})
        payload = {
            "format": CHECKPOINT_FORMAT, "identity": self.identity, "epoch": progress.epoch,
            "history": progress.history, "restarts": progress.restarts, "train_seconds": progress.train_seconds,
            "states": {name: _plain(obj.state_dict()) for name, obj in states.items() if obj is not None},
            "rng": rng, "extra": progress.extra,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        try:
            storage.write_bytes(self.path, buffer.getvalue())  # atomic: the old checkpoint or this one
        except storage.StorageError as exc:
            raise MemberError(str(exc)) from None


def load_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (a local path or an object-store URI) as a dict; None if there is none."""
    try:
        blob = storage.read_bytes(path)
    except storage.StorageError as exc:
        raise MemberError(str(exc)) from None
    if blob is None:
        return None
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: refuse rather than train on garbage
        raise MemberError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


# --------------------------------------------------------------------------- the loop's pieces


def setup(num_threads: int, preference: str, gpu_assigned: bool) -> torch.device:
    """Threads for the CPUs the task holds, and the device: CUDA when Ray assigned a GPU (or asked)."""
    torch.set_num_threads(max(1, int(num_threads)))
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise MemberError("trainer.device=cuda but this worker has no CUDA device")
    if (preference == "cuda" or gpu_assigned) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(model_spec: Dict[str, Any], input_shape, num_classes: int) -> torch.nn.Module:
    try:
        return models.build_model(model_spec, tuple(input_shape), num_classes)
    except models.ModelError as exc:
        raise MemberError(str(exc)) from None


def build_optimizer(params, spec: Dict[str, Any], **impl: Any) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names; ``impl`` (e.g. ``fused=True``) picks torch's implementation only."""
    try:
        return optimizers.build_optimizer(params, spec, **impl)
    except optimizers.OptimizerError as exc:
        raise MemberError(str(exc)) from None


@torch.no_grad()
def forward_batches(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model(x)`` in chunks of EVAL_BATCH, on the CPU, in whatever mode ``model`` is in."""
    out = [model(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out) if out else torch.empty(0)


def predict_logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return forward_batches(model, x, device)


@torch.no_grad()
def split_logits(model: torch.nn.Module, data, split: str, device: torch.device) -> torch.Tensor:
    """Eval-mode logits on the "val" or "test" split, on the CPU: of ``data.x_<split>``, or for a
    streamed data set of every row streamed once, in row-key order (the order of ``data.y_<split>``)."""
    if not is_streaming(data):
        return predict_logits(model, getattr(data, f"x_{split}"), device)
    model.eval()
    keys, outs = [], []
    for xb, kb in data.eval_batches(split, EVAL_BATCH):
        outs.append(model(xb.to(device)).float().cpu())
        keys.append(kb)
    return in_key_order(keys, outs)


def diverged(spec, epoch: int, value: float) -> MemberError:
    lr = optimizers.learning_rate(spec.optimizer)
    hint = f"lower optimizer.lr (now {lr})" if lr is not None else "lower the learning rate"
    return MemberError(f"member {spec.index}: training loss became {value} in epoch {epoch + 1}; {hint}")


def prepare_model(model: torch.nn.Module, spec) -> torch.nn.Module:
    """The model in the memory format the spec asks for (``trainer.channels_last``)."""
    if getattr(spec, "channels_last", False):
        return model.to(memory_format=torch.channels_last)
    return model


def _autocast(spec, device: torch.device):
    """bf16 autocast for the training forward pass and loss (``trainer.precision=bf16``), else nothing."""
    if getattr(spec, "precision", "fp32") == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def steps_per_epoch(n: int, batch_size: int, model: torch.nn.Module) -> int:
    """Optimizer steps ``run_epoch`` takes over ``n`` samples (a trailing batch of one is skipped
    when the model has BatchNorm)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= (2 if has_batchnorm(model) else 1) else 0)


def run_epoch(spec, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              x_train: Optional[torch.Tensor], y_train: Optional[torch.Tensor], perm: Optional[torch.Tensor], *,
              loss_fn: Optional[LossFn] = None, scheduler=None,
              batches: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Tuple[float, float]:
    """One pass over the samples ``perm`` in batches of ``spec.batch_size`` (or over ``batches``,
    ``(x, y)`` pairs a streamed data set yields): (the mean training loss, the learning rate of the
    last step).

    ``loss_fn(model, xb, yb)`` defaults to the cross-entropy of ``model(xb)``; ``scheduler`` (a
    per-iteration LR scheduler) is stepped after each optimizer step. A non-finite epoch loss
    raises ``diverged`` (checked once per epoch, so the GPU is not synchronized after every step).
    """
    model.train()
    skip_single = has_batchnorm(model)
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    lr = float(optimizer.param_groups[0]["lr"])
    channels_last = getattr(spec, "channels_last", False)
    if batches is None:
        perm = perm.to(x_train.device)  # one copy per epoch, not one per batch
        batches = ((x_train[idx], y_train[idx]) for idx in
                   (perm[i:i + spec.batch_size] for i in range(0, len(perm), spec.batch_size)))
    for xb, yb in batches:
        if len(yb) < 2 and skip_single:
            continue  # BatchNorm cannot train on a batch of one
        if channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(spec, device):
            loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().double() * len(yb)  # on the device: no host sync per step
        count += len(yb)
    mean = float(total) / max(count, 1)           # one sync per epoch
    if not math.isfinite(mean):
        raise diverged(spec, epoch, mean)
    return mean, lr


def val_metrics(spec, epoch: int, val_probs: torch.Tensor, y_val: torch.Tensor) -> Dict[str, float]:
    """Per-epoch validation metrics; non-finite probabilities raise ``diverged``."""
    if not torch.isfinite(val_probs).all():
        raise diverged(spec, epoch, float("nan"))
    return metrics.member_metrics(val_probs, y_val)


class Timer:
    """Training seconds, summed over epochs (resumed runs add to what the checkpoint says)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.progress.train_seconds += time.perf_counter() - self.t0


def member_result(spec, index: int, seed: int, data, progress: Progress, device, *, val_logits: torch.Tensor,
                  test_logits: torch.Tensor, weights: bytes, history: List[Dict[str, Any]],
                  extra: Optional[Dict[str, Any]] = None) -> MemberResult:
    """The result of one member from its logits and weights (every worker builds it here)."""
    val_probs, test_probs = val_logits.softmax(-1), test_logits.softmax(-1)
    return MemberResult(
        index=int(index), seed=int(seed), architecture=models.architecture(spec.model), model=dict(spec.model),
        history=[dict(h) for h in history], metrics=result_metrics(val_probs, data.y_val, test_probs, data.y_test),
        val_probs=val_probs, test_probs=test_probs, test_logits=test_logits, weights=weights,
        resumed_from=progress.resumed_from, restarts=progress.restarts, train_seconds=progress.train_seconds,
        device=str(device), extra=dict(extra or {}))


def evaluate(spec, index: int, seed: int, model: torch.nn.Module, data, progress: Progress, device, *,
             history: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None,
             blob_extra: Optional[Dict[str, Any]] = None) -> MemberResult:
    """A member's result from its model: eval-mode logits on val and test, its weights."""
    return member_result(spec, index, seed, data, progress, device,
                         val_logits=split_logits(model, data, "val", device),
                         test_logits=split_logits(model, data, "test", device),
                         weights=member_blob(spec.model, data.input_shape, data.num_classes, model, blob_extra),
                         history=history, extra=extra)

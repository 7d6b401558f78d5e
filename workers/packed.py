"""Train K independent members of one architecture in one task as one stacked model (cluster.pack=K).

Like ``workers/member.py`` (whose helpers this reuses) it runs inside one Ray task but imports no
Ray or MLflow: the scheduler calls :func:`train_packed` with a ``planning.PackedSpec``, the data,
the CPU threads and device the task was given, and a ``report`` callback.

Packing changes how members are computed, not what they are. Member ``m`` of the pack:

* starts from the weights ``train_member`` would give it: ``torch.manual_seed(m.seed)`` then
  ``build_model``, once per member, in ``spec.members`` order;
* sees the batches ``train_member`` would give it: its own ``torch.Generator().manual_seed(m.seed)``
  draws ``torch.randperm`` over its training indices each epoch (``bootstrap_indices(n, m.seed)``
  when ``m.bagging``), cut into batches of ``batch_size`` (a trailing batch of one is skipped for
  BatchNorm models, as ``run_epoch`` does);
* gets the update ``train_member`` would give it: the K members' parameters are stacked
  (``torch.func.stack_module_state``) into leaf tensors ``[K, ...]`` and one optimizer built by
  ``build_optimizer`` from the shared optimizer config (torch's fused implementation on CPU/CUDA)
  runs over them. SGD (momentum, weight decay, nesterov) and Adam are elementwise, so a stacked
  step is K solo steps. The loss is the
  *sum* over members of each member's mean cross-entropy, so member k's gradient is its solo
  gradient. Each step gathers a ``[K, B, ...]`` batch with one advanced-indexing op (one row of
  indices per member) and runs ``vmap(functional_call)`` over (params, buffers, inputs) with
  ``in_dims=(0, 0, 0)``. Losses stay tensors; they are synced once per epoch.

Weights, predictions and metrics therefore equal the solo run's up to float rounding (batched
matmuls and torch's fused optimizer kernels may round differently from the solo loop's). Measured
on digits (bench/bench_packed.py: 8 MLPs, Adam, 20 epochs) every member's test probabilities stay
within 1e-6 of its solo run's. (Storing Linear weights transposed to save autograd a layout copy
was tried and dropped: about 5% faster per step, but its different rounding let one Adam member
drift by 1e-2.)

BatchNorm is supported with per-member statistics: each member's running mean / var /
num_batches_tracked are rows of stacked buffers passed to the vmapped ``functional_call`` with
``in_dims=0``; training-mode BatchNorm updates them in place, row k from member k's batch, exactly
like a solo run. Dropout runs under ``vmap(..., randomness="different")``: every member draws its
own masks from the global torch RNG, so masks differ between members but are *not* the masks a solo
run of that member would draw (the equality with ``train_member`` holds for ``dropout=0``).

Reports: ``{"type": "start", "task", "members", "epoch", "epochs", "resumed_from", "restarts",
"device"}`` once, then per epoch ``{"type": "epoch", "task", "epoch", "epochs", "train_loss",
"val_acc", "val_nll", "lr", "seconds", "members": {member index: {"train_loss", "val_acc", "val_nll", "lr"}}}``
(the top-level values are means over the members), and after the last epoch
``{"type": "collected", "task", "member", "epoch"}`` for each member.

Checkpoint (``spec.checkpoint_path``, atomic, after every epoch, ``torch.load(weights_only=True)``):
``format``, ``kind="packed"``, ``task``, ``member_indices``, ``seeds``, ``bagging``, ``model``,
``optimizer``, ``input_shape``, ``num_classes``, ``epochs``, ``batch_size``, ``epoch`` (completed
epochs), ``params`` / ``buffers`` (the stacked ``[K, ...]`` tensors by name), ``optimizer_state``,
``rng_torch`` (and ``rng_cuda`` on a GPU), ``rng_orders`` (each member's order-generator state),
``histories`` (each member's history), ``restarts`` and ``train_seconds``. A checkpoint found at
start is resumed at the next epoch and gives the same members as an uninterrupted run; one written
for other members (indices or seeds) is refused.

Results: one ``MemberResult`` per member in ``spec.members`` order, each as ``train_member``
returns it: ``weights`` is ``artifact.member_blob`` of that member alone (it loads into a plain
``create_model`` instance), ``val_probs`` / ``test_probs`` / ``test_logits`` come from
``predict_logits`` of that member's own model. ``train_seconds`` is the *pack's* training time
(summed over epochs like ``train_member``'s, for all K members together: they cannot be told
apart, so every member of a pack reports the same value), and ``extra = {"packed": K,
"pack_task": spec.index}``. ``resumed_from`` / ``restarts`` are the pack's.

Speed (bench/bench_packed.py): the win is per-step Python/dispatch overhead paid once per pack
instead of once per member; the arithmetic is the same. For small models on one CPU thread the
pack becomes compute-bound (K batched matmuls per layer), so the ratio to K solo runs approaches
the solo runs' compute share, not 1/K.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ensemble_service.data import DataBundle, bootstrap_indices
from ensemble_service.schedules import member_scheduler
from workers.state import (
    EVAL_BATCH, Checkpoint, MemberError, MemberResult, Report, Timer, build_model, build_optimizer, collected_event,
    diverged, epoch_event, evaluate, has_batchnorm, setup, start_event, steps_per_epoch, val_metrics,
)

#: What every member of a pack must share (they are one stacked model with one optimizer).
SHARED = ("model", "optimizer", "epochs", "batch_size", "device", "schedule", "warmup_epochs")


def check_pack(spec) -> tuple:
    """The pack's members; MemberError when they cannot be trained as one stacked model."""
    members = tuple(spec.members)
    if not members:
        raise MemberError(f"packed task {spec.index} has no members")
    first = members[0]
    for m in members[1:]:
        for name in SHARED:
            if getattr(m, name) != getattr(first, name):
                raise MemberError(
                    f"packed task {spec.index}: member {m.index} has {name}={getattr(m, name)!r} but member "
                    f"{first.index} has {getattr(first, name)!r}; packed members must share "
                    f"{', '.join(SHARED)} (set cluster.pack=1 to train them apart)")
    indices = [m.index for m in members]
    if len(set(indices)) != len(indices):
        raise MemberError(f"packed task {spec.index}: member indices repeat: {indices}")
    return members


def _fused(device: torch.device) -> Dict[str, Any]:
    # Same update rule, one kernel per stacked tensor instead of several Python-dispatched ops.
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _set_member(model: torch.nn.Module, k: int, params: Dict[str, torch.Tensor],
                buffers: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy row k of the stacked tensors into every parameter and buffer of ``model`` (a plain
    module of the pack's architecture); returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name][k])
        for name, b in model.named_buffers():
            b.copy_(buffers[name][k])
    return model


class _Stacked:
    """The pack's stacked parameters and buffers, saved and restored like a module's state."""

    def __init__(self, params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor]):
        self.params, self.buffers = params, buffers

    def state_dict(self) -> Dict[str, Any]:
        return {"params": {k: v.detach() for k, v in self.params.items()}, "buffers": dict(self.buffers)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(state["params"][name])
            for name, t in self.buffers.items():
                t.copy_(state["buffers"][name])


def train_packed(spec, data: DataBundle, *, num_threads: int = 1, gpu_assigned: bool = False,
                 report: Optional[Report] = None) -> List[MemberResult]:
    """Train (or resume) the K members of a ``planning.PackedSpec`` as one stacked model."""
    members = check_pack(spec)
    first, K = members[0], len(members)
    device = setup(num_threads, first.device, gpu_assigned)
    report = report or (lambda _event: None)
    epochs, batch_size = int(first.epochs), int(first.batch_size)

    # Each member's initial weights and data order exactly as train_member creates them.
    models = []
    for m in members:
        torch.manual_seed(m.seed)
        models.append(build_model(m.model, data.input_shape, data.num_classes).to(device))
    orders = {f"order{k}": torch.Generator().manual_seed(m.seed) for k, m in enumerate(members)}
    n = len(data.x_train)
    train_idx = [bootstrap_indices(n, m.seed) if m.bagging else torch.arange(n) for m in members]

    stacked_params, stacked_buffers = stack_module_state(models)  # new [K, ...] tensors
    base = models[0].to("meta")  # the architecture only; weights live in the stacked tensors
    del models
    params = {k: v.detach().requires_grad_(True) for k, v in stacked_params.items()}  # the leaves
    buffers = {k: v.detach() for k, v in stacked_buffers.items()}
    optimizer = build_optimizer(list(params.values()), first.optimizer, **_fused(device))
    skip_single = has_batchnorm(base)
    # trainer.schedule: one per-iteration LR scheduler for the stacked optimizer (every member's lr is the same)
    scheduler = member_scheduler(optimizer, first.schedule, first.warmup_epochs, epochs,
                                 steps_per_epoch(n, batch_size, base))

    # functional_call's per-call untying pass is only needed when the model ties weights (none of
    # the registered models does); skipping it saves ~40 us per step.
    tied = (len(dict(base.named_parameters(remove_duplicate=False))) != len(dict(base.named_parameters()))
            or len(dict(base.named_buffers(remove_duplicate=False))) != len(dict(base.named_buffers())))

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,), tie_weights=tied)

    batched_forward = vmap(forward, in_dims=(0, 0, 0), randomness="different")

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val, data.y_val

    states = {"stacked": _Stacked(params, buffers), "optimizer": optimizer, "scheduler": scheduler}
    identity = {"kind": "packed", "task": spec.index, "member_indices": [m.index for m in members],
                "seeds": [m.seed for m in members], "bagging": [bool(m.bagging) for m in members],
                "model": dict(first.model), "optimizer": dict(first.optimizer), "epochs": epochs,
                "batch_size": batch_size, "schedule": [first.schedule, first.warmup_epochs]}
    checkpoint = Checkpoint(spec.checkpoint_path, identity, device)
    progress = checkpoint.resume(states, orders)
    histories = progress.history or [[] for _ in members]  # one history per member
    progress.history = histories
    report(start_event(spec.index, [m.index for m in members], progress, epochs, device))

    for epoch in range(progress.epoch, epochs):
        with Timer(progress):
            # [K, n]: row k is member k's sample order for this epoch (its own generator, as train_member)
            perms = torch.stack([idx[torch.randperm(len(idx), generator=order)]
                                 for idx, order in zip(train_idx, orders.values())]).to(device)
            base.train()
            batch_losses, sizes = [], []  # [K] tensors and batch sizes, summed (and synced) once per epoch
            lr = float(optimizer.param_groups[0]["lr"])
            for i in range(0, n, batch_size):
                idx = perms[:, i:i + batch_size]
                b = idx.shape[1]
                if b < 2 and skip_single:
                    continue  # BatchNorm cannot train on a batch of one (as run_epoch)
                xb, yb = x_train[idx], y_train[idx]                     # [K, B, ...], [K, B]
                logits = batched_forward(params, buffers, xb)              # [K, B, C]
                losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(K, b).mean(1)
                for p in params.values():
                    p.grad = None
                losses.sum().backward()  # member k's gradient = the gradient of its own mean loss
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                batch_losses.append(losses.detach())
                sizes.append(b)
            if batch_losses:  # the solo loop's sum of batch loss * batch size / samples, per member
                weights = torch.tensor(sizes, dtype=torch.float64, device=device)
                train_loss = ((torch.stack(batch_losses).double() * weights[:, None]).sum(0) / sum(sizes)).tolist()
            else:
                train_loss = [0.0] * K
            for m, value in zip(members, train_loss):
                if not math.isfinite(value):
                    raise diverged(m, epoch, value)
            val_probs = _eval_logits(batched_forward, base, params, buffers, x_val, device, K).softmax(-1)
            vals = [val_metrics(m, epoch, val_probs[k], y_val) for k, m in enumerate(members)]
        per_member = {}
        for k, m in enumerate(members):
            record = {"epoch": epoch + 1, "train_loss": train_loss[k], "val_acc": vals[k]["acc"],
                      "val_nll": vals[k]["nll"], "lr": lr}
            histories[k].append(record)
            per_member[m.index] = {key: record[key] for key in ("train_loss", "val_acc", "val_nll", "lr")}
        progress.epoch = epoch + 1
        checkpoint.save(progress, states, orders)
        report(epoch_event(spec.index, epochs, progress.train_seconds,
                           {"epoch": epoch + 1, "train_loss": _mean(train_loss),
                            "val_acc": _mean([v["acc"] for v in vals]), "val_nll": _mean([v["nll"] for v in vals]),
                            "lr": lr},
                           members=per_member))

    results = []
    for k, m in enumerate(members):
        model = _set_member(copy.deepcopy(base).to_empty(device=device), k, params, buffers)
        results.append(evaluate(m, m.index, m.seed, model, data, progress, device, history=histories[k],
                                extra={"packed": K, "pack_task": spec.index}))
        report(collected_event(spec.index, m.index, epochs))
    return results


@torch.no_grad()
def _eval_logits(batched_forward, base: torch.nn.Module, params, buffers, x: torch.Tensor,
                 device: torch.device, k: int) -> torch.Tensor:
    """[K, N, C] logits of every member on ``x`` (eval mode, chunks of EVAL_BATCH), on the CPU.
    (The chunk is expanded to [K, ...] rather than passed with in_dims=None: faster under vmap.)"""
    base.eval()
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        chunk = x[i:i + EVAL_BATCH].to(device)
        out.append(batched_forward(params, buffers, chunk.expand(k, *chunk.shape)).float().cpu())
    return torch.cat(out, dim=1) if out else torch.empty(0)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))

"""Learning-rate schedules of plain members (``trainer.schedule``, ``trainer.warmup_epochs``).

Pure torch: :func:`lr_factor` is the schedule as a function of the 1-based iteration, and
:func:`member_scheduler` the ``torch.optim.lr_scheduler.LambdaLR`` that ``workers/member.py`` and
``workers/packed.py`` step after every optimizer step (like the strategies' schedulers), so a member
resumed from its checkpoint continues the schedule where it stopped.

With ``T`` iterations in all (epochs x steps per epoch), ``W`` of warm-up and the optimizer's
``lr`` as the peak rate ``lr0``, iteration ``t`` (1-based) runs at ``lr0 * lr_factor(t)``:

* warm-up, ``t <= W``: ``t / W`` (linear, from ``lr0 / W`` up to ``lr0``);
* after it, with ``s = t - W`` in ``1..n`` and ``n = T - W``:

  - ``constant``: 1;
  - ``cosine``: ``(1 + cos(pi * (s - 1) / n)) / 2`` (from 1 down towards 0; Loshchilov & Hutter 2017
    without restarts);
  - ``step``: ``0.1 ** k`` where ``k`` counts the milestones at 50% and 75% of ``n`` that ``s`` has passed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SCHEDULES = ("constant", "cosine", "step")
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def lr_factor(t: int, total_iters: int, warmup_iters: int, schedule: str) -> float:
    """The multiplier of the peak learning rate at 1-based iteration ``t`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if not (1 <= t and 0 <= warmup_iters < total_iters):
        raise ValueError(f"lr_factor needs t >= 1 and 0 <= warmup_iters < total_iters "
                         f"(got {t}, {warmup_iters}, {total_iters})")
    if t <= warmup_iters:
        return t / warmup_iters
    s, n = min(t, total_iters) - warmup_iters, total_iters - warmup_iters
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (s - 1) / n))
    if schedule == "step":
        return STEP_GAMMA ** sum(1 for m in STEP_MILESTONES if s > m * n)
    return 1.0


def member_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_epochs: int, epochs: int,
                     steps_per_epoch: int) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
    """A LambdaLR stepped once per optimizer step (its step ``i``, 0-based, sets the factor of
    iteration ``i + 1``); None for a constant rate without warm-up (the optimizer's lr as set)."""
    if schedule == "constant" and warmup_epochs == 0:
        return None
    total, warmup = int(epochs) * int(steps_per_epoch), int(warmup_epochs) * int(steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, total, warmup, schedule))

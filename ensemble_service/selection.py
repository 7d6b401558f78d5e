"""Greedy ensemble selection (Caruana et al. 2004, "Ensemble selection from libraries of models"):
pure torch, no MLflow.

Forward selection **with replacement** on held-out (validation) predictions: start from the empty
ensemble; at each of ``size`` steps add the pool member whose addition gives the best ensemble (the
mean of the probabilities picked so far, a member picked twice counting twice); the selection is the
best ensemble along that path (the paper's step 4: the path can get worse after its best point, and
its first step is the best single member, so the selection is never worse on validation than the
pool's best member). A member's weight is its share of the picks.

Metrics: ``val_nll`` (lower is better) or ``val_acc`` (higher is better; ties go to the lower NLL).
Remaining ties go to the member earlier in the pool, and along the path to the shorter prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

METRICS = ("val_nll", "val_acc")
EPS = 1e-12      # probabilities are clamped here before the log, as metrics.nll does
CHUNK = 32       # candidates scored at once (memory: CHUNK x batch x classes float64)


class SelectionError(ValueError):
    """Bad selection input; one line."""


@dataclass
class Selection:
    picks: List[int]            # pool positions in the order picked, with repetitions (the best prefix)
    path_nll: List[float]       # validation NLL of the ensemble after step k = 1..size (the whole path)
    path_acc: List[float]       # validation accuracy after step k
    best_step: int              # len(picks): the prefix kept

    @property
    def counts(self) -> Dict[int, int]:
        """Pool position -> times picked, in the order of first pick."""
        out: Dict[int, int] = {}
        for p in self.picks:
            out[p] = out.get(p, 0) + 1
        return out

    @property
    def weights(self) -> Dict[int, float]:
        """Pool position -> its share of the picks (sums to 1)."""
        return {p: c / len(self.picks) for p, c in self.counts.items()}


def _scores(total: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, k: int):
    """NLL and accuracy of (total + probs[m]) / k for every candidate m, in chunks."""
    nll, acc = [], []
    idx = targets[None, :, None]
    for i in range(0, probs.shape[0], CHUNK):
        cand = (total[None] + probs[i:i + CHUNK]) / k                       # [c, B, C]
        p_true = cand.gather(2, idx.expand(cand.shape[0], -1, -1)).squeeze(2)
        nll.append(-torch.log(p_true.clamp_min(EPS)).mean(1))
        acc.append((cand.argmax(-1) == targets[None]).to(torch.float64).mean(1))
    return torch.cat(nll), torch.cat(acc)


def _best(nll: torch.Tensor, acc: torch.Tensor, metric: str) -> int:
    """Index of the best candidate (ties: the lower NLL for val_acc, then the lowest index)."""
    if metric == "val_nll":
        return int(torch.nonzero(nll == nll.min())[0])
    top = torch.nonzero(acc == acc.max()).flatten()
    return int(top[torch.nonzero(nll[top] == nll[top].min())[0]])


def greedy_select(val_probs, targets, size: int, metric: str = "val_nll") -> Selection:
    """Select from the pool ``val_probs`` ``[M, B, C]`` (each member's validation probabilities) with
    ``targets`` ``[B]`` by at most ``size`` greedy picks with replacement (see the module docstring)."""
    if metric not in METRICS:
        raise SelectionError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SelectionError(f"the selection size must be at least 1, got {size!r}")
    probs = torch.as_tensor(val_probs).to(torch.float64)
    t = torch.as_tensor(targets).to(torch.int64)
    if probs.dim() != 3 or probs.shape[0] == 0:
        raise SelectionError(f"the pool's predictions must be [members, batch, classes], got {tuple(probs.shape)}")
    if t.dim() != 1 or t.shape[0] != probs.shape[1] or t.shape[0] == 0:
        raise SelectionError(f"{tuple(t.shape)} targets for predictions on {probs.shape[1]} items")
    if int(t.min()) < 0 or int(t.max()) >= probs.shape[2]:
        raise SelectionError(f"targets must be class indices 0..{probs.shape[2] - 1}")
    total = torch.zeros(probs.shape[1:], dtype=torch.float64)
    picks: List[int] = []
    path_nll: List[float] = []
    path_acc: List[float] = []
    for k in range(1, size + 1):
        nll, acc = _scores(total, probs, t, k)
        m = _best(nll, acc, metric)
        picks.append(m)
        total += probs[m]
        path_nll.append(float(nll[m]))
        path_acc.append(float(acc[m]))
    steps = range(len(picks))
    if metric == "val_nll":
        best = min(steps, key=lambda i: (path_nll[i], i))
    else:
        best = min(steps, key=lambda i: (-path_acc[i], path_nll[i], i))
    return Selection(picks=picks[:best + 1], path_nll=path_nll, path_acc=path_acc, best_step=best + 1)

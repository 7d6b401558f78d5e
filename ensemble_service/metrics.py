"""Classification metrics for ensemble members and combined ensembles.

Pure functions on torch tensors returning Python floats (or dicts / lists of
floats), suitable for logging to MLflow.

Conventions
-----------
* ``probs`` is ``[B, C]``: probabilities whose rows sum to 1 (within 1e-3).
  ``member_probs`` is ``[M, B, C]``. ``targets`` is ``[B]`` of integer class
  indices in ``0..C-1``. Lists and NumPy arrays are accepted.
* A prediction is the argmax of a row; on exact ties the lowest class index.
* Sums and means are computed in float64. Calibration bins are assigned in the
  dtype of the probabilities (see :func:`ece`).
* Bad input (wrong dimensions, mismatched batch sizes, empty batch, NaN/inf,
  rows not summing to 1, targets out of range) raises
  :class:`~ensemble_service.validation.AggregationError`, a ``ValueError``,
  with a one-line message.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ensemble_service import aggregation as agg, validation
from ensemble_service.validation import AggregationError

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "reliability_bins",
    "disagreement",
    "oracle_accuracy",
    "member_metrics",
    "ensemble_metrics",
    "fit_temperature",
    "calibration_metrics",
    "auroc",
    "selective_risk",
    "uncertainty_metrics",
]


# --------------------------------------------------------------------------- helpers


def _probs_targets(probs: Any, targets: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validated probabilities (float32/float64 as given) and int64 targets."""
    p = validation.validate_probs(probs, ndim=2)
    return p, _targets(targets, p.shape[0], p.shape[1], p.device)


def _member_probs(member_probs: Any) -> torch.Tensor:
    return validation.validate_probs(member_probs, ndim=3)


def _targets(targets: Any, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    t = validation.as_tensor(targets, "targets")
    if t.dim() != 1:
        raise AggregationError(f"targets must be 1-D (batch), got shape {tuple(t.shape)}")
    if t.shape[0] != batch:
        raise AggregationError(f"targets has {t.shape[0]} entries but probabilities have {batch} items")
    t = validation.as_int_tensor(t, "targets")
    validation.check_label_range(t, num_classes, "targets")
    return t.to(device)


def _n_bins(n_bins: Any) -> int:
    return validation.as_index(n_bins, "n_bins")


def _bin_stats(p: torch.Tensor, t: torch.Tensor, n_bins: int):
    """Per-bin (lower, upper, count, sum of confidence, sum of correct)."""
    conf = p.max(dim=-1).values
    correct = (validation.first_argmax(p) == t).to(torch.float64)
    # Edges are k / n_bins rounded to the dtype of the probabilities, so a
    # confidence written as the same decimal (e.g. 0.4 = 6/15 with 15 bins)
    # lands exactly on its edge and goes to the lower bin.
    edges = [k / n_bins for k in range(n_bins + 1)]
    inner = torch.tensor(edges[1:-1], dtype=p.dtype, device=p.device)
    # bucketize(right=False): inner[i-1] < v <= inner[i]  ->  bins (lo, hi]; first bin takes 0.
    idx = torch.bucketize(conf, inner, right=False)
    conf = conf.to(torch.float64)
    count = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, correct)
    return edges, count, conf_sum, acc_sum


# ----------------------------------------------------------------- per-prediction set


def accuracy(probs: Any, targets: Any) -> float:
    """Fraction of items whose argmax equals the target."""
    p, t = _probs_targets(probs, targets)
    return float((validation.first_argmax(p) == t).to(torch.float64).mean())


def nll(probs: Any, targets: Any, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class, ``-mean(log(max(p_true, eps)))``."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise AggregationError(f"eps must be a positive number, got {eps!r}")
    p, t = _probs_targets(probs, targets)
    p_true = p.to(torch.float64).gather(1, t[:, None]).squeeze(1)
    return float(-torch.log(p_true.clamp_min(eps)).mean())


def brier(probs: Any, targets: Any) -> float:
    """Multi-class Brier score.

    ``mean over items of sum over classes of (p_c - onehot_c)^2``; ranges from 0
    (perfect) to 2 (all mass on one wrong class). Not divided by C.
    """
    p, t = _probs_targets(probs, targets)
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).to(torch.float64)
    return float(((p.to(torch.float64) - onehot) ** 2).sum(dim=1).mean())


def ece(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    Confidence is the max probability of an item. The interval [0, 1] is cut
    into ``n_bins`` bins ``(k/n, (k+1)/n]`` (the first bin also includes 0);
    edges are ``k/n`` rounded to the dtype of ``probs``, so a float32 confidence
    of 0.4 lies on the edge 6/15 and belongs to bin 5.
    ``ECE = sum over bins of (count_bin / B) * |accuracy_bin - mean confidence_bin|``;
    empty bins contribute nothing.
    """
    n = _n_bins(n_bins)
    p, t = _probs_targets(probs, targets)
    _, count, conf_sum, acc_sum = _bin_stats(p, t, n)
    nonempty = count > 0
    gap = (acc_sum[nonempty] - conf_sum[nonempty]).abs()  # = count * |acc - conf|
    return float(gap.sum() / p.shape[0])


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> Dict[str, List[Any]]:
    """Per-bin statistics for a reliability diagram (same bins as :func:`ece`).

    Returns a dict of equal-length lists (one entry per bin, in order):
    ``bin_lower``, ``bin_upper``, ``confidence`` (mean max-probability),
    ``accuracy``, ``count`` (number of items, as int). Empty bins have
    ``count == 0`` and ``confidence == accuracy == 0.0``; plotters should skip them.
    """
    n = _n_bins(n_bins)
    p, t = _probs_targets(probs, targets)
    edges, count, conf_sum, acc_sum = _bin_stats(p, t, n)
    safe = count.clamp_min(1.0)
    return {
        "bin_lower": [float(e) for e in edges[:-1]],
        "bin_upper": [float(e) for e in edges[1:]],
        "confidence": [float(v) for v in (conf_sum / safe)],
        "accuracy": [float(v) for v in (acc_sum / safe)],
        "count": [int(v) for v in count],
    }


def member_metrics(probs: Any, targets: Any) -> Dict[str, float]:
    """``{"acc", "nll", "brier", "ece"}`` for one set of probabilities ``[B, C]``."""
    p, t = _probs_targets(probs, targets)
    return {"acc": accuracy(p, t), "nll": nll(p, t), "brier": brier(p, t), "ece": ece(p, t)}


# ------------------------------------------------------------------------ member sets


def disagreement(member_probs: Any) -> float:
    """Mean over unordered member pairs of the fraction of items whose argmaxes differ.

    0.0 for a single member. Equals the mean over items of the fraction of
    member pairs that disagree on that item.
    """
    p = _member_probs(member_probs)
    m, _, c = p.shape
    if m < 2:
        return 0.0
    counts = torch.nn.functional.one_hot(validation.first_argmax(p), c).sum(dim=0).to(torch.float64)
    agreeing_pairs = (counts * (counts - 1) / 2).sum(dim=-1)  # [B]
    total_pairs = m * (m - 1) / 2
    return float((1.0 - agreeing_pairs / total_pairs).mean())


def oracle_accuracy(member_probs: Any, targets: Any) -> float:
    """Fraction of items that at least one member classifies correctly."""
    p = _member_probs(member_probs)
    t = _targets(targets, p.shape[1], p.shape[2], p.device)
    hit = (validation.first_argmax(p) == t[None, :]).any(dim=0)
    return float(hit.to(torch.float64).mean())


def ensemble_metrics(
    member_probs: Any,
    targets: Any,
    val_accuracies: Optional[Union[Sequence[float], torch.Tensor]] = None,
) -> Dict[str, float]:
    """Metrics of the combined ensemble and of its members, as a flat dict of floats.

    Keys (``mean_*`` refers to the soft-voting / mean-probability ensemble):

    * ``mean_acc``, ``mean_nll``, ``mean_brier``, ``mean_ece``: the mean ensemble.
    * ``vote_acc``: hard majority vote (tie rule of :func:`aggregation.vote`).
    * ``weighted_acc``, ``weighted_nll``: mean ensemble weighted by
      :func:`aggregation.weights_from_accuracy` of ``val_accuracies``
      (uniform weights if None, i.e. equal to the mean ensemble).
    * ``logit_mean_acc``, ``logit_mean_nll``: softmax of mean log-probabilities.
    * ``best_member_acc``, ``mean_member_acc``, ``mean_member_nll``,
      ``mean_member_brier``, ``mean_member_ece``: over individual members.
    * ``disagreement``, ``oracle_acc``: see :func:`disagreement`, :func:`oracle_accuracy`.
    * ``num_members``: M, as a float.
    """
    p = _member_probs(member_probs)
    m, b, c = p.shape
    t = _targets(targets, b, c, p.device)
    if val_accuracies is None:
        weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
    else:
        weights = agg.weights_from_accuracy(val_accuracies)

    mean_p = agg.aggregate(p, method="mean").probabilities
    vote_res = agg.aggregate(p, method="vote")
    weighted_p = agg.aggregate(p, method="weighted", weights=weights).probabilities
    logit_p = agg.aggregate(p, method="logit_mean").probabilities

    members = [member_metrics(p[i], t) for i in range(m)]
    member_accs = [d["acc"] for d in members]

    return {
        "mean_acc": accuracy(mean_p, t),
        "mean_nll": nll(mean_p, t),
        "mean_brier": brier(mean_p, t),
        "mean_ece": ece(mean_p, t),
        "vote_acc": float((vote_res.labels == t).to(torch.float64).mean()),
        "weighted_acc": accuracy(weighted_p, t),
        "weighted_nll": nll(weighted_p, t),
        "logit_mean_acc": accuracy(logit_p, t),
        "logit_mean_nll": nll(logit_p, t),
        "best_member_acc": max(member_accs),
        "mean_member_acc": sum(member_accs) / m,
        "mean_member_nll": sum(d["nll"] for d in members) / m,
        "mean_member_brier": sum(d["brier"] for d in members) / m,
        "mean_member_ece": sum(d["ece"] for d in members) / m,
        "disagreement": disagreement(p),
        "oracle_acc": oracle_accuracy(p, t),
        "num_members": float(m),
    }


# ------------------------------------------------------------ calibration (temperature scaling)


def fit_temperature(probs: Any, targets: Any, max_iter: int = 100) -> float:
    """The temperature ``T`` that minimizes the NLL of ``softmax(ln p / T)`` (Guo et al. 2017) for
    combined probabilities ``[B, C]`` (a mean ensemble's logits are ``ln p_bar``).

    One scalar, fitted with L-BFGS (strong Wolfe line search) on ``ln T`` from ``T = 1`` in float64,
    kept in ``[0.01, 100]``. It never raises the NLL it is fitted on: when the optimum found is not
    below the NLL at ``T = 1`` (already calibrated, or a degenerate case), the answer is ``1.0``.
    """
    p, t = _probs_targets(probs, targets)
    logp = torch.log(p.detach().to(torch.float64).clamp_min(agg.LOG_CLAMP))

    def loss_at(log_t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logp / log_t.exp(), t)

    with torch.enable_grad():
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=int(max_iter), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_at(log_t)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        bound = math.log(100.0)
        log_t = log_t.detach().clamp(-bound, bound)
        base, fitted = float(loss_at(torch.zeros((), dtype=torch.float64))), float(loss_at(log_t))
    if not (math.isfinite(fitted) and fitted < base):
        return 1.0
    return float(log_t.exp())


def calibration_metrics(val_probs: Any, y_val: Any, test_probs: Any, y_test: Any, n_bins: int = 15
                        ) -> Dict[str, float]:
    """``{"temperature", "calibrated_nll", "calibrated_ece"}``: the temperature fitted on the
    validation split's combined probabilities ``[B, C]``, and the test split's NLL and ECE once scaled."""
    temperature = fit_temperature(val_probs, y_val)
    scaled = agg.temperature_scale(test_probs, temperature)
    return {"temperature": temperature, "calibrated_nll": nll(scaled, y_test),
            "calibrated_ece": ece(scaled, y_test, n_bins=n_bins)}


# ------------------------------------------------------------------ uncertainty as a ranking


def auroc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve of ``scores`` ``[B]`` (higher = more likely positive) for the
    boolean labels ``positives`` ``[B]``: the probability that a random positive scores above a random
    negative, ties counting 1/2 (Mann-Whitney U / (n_pos n_neg), with average ranks). NaN when there
    are no positives or no negatives."""
    s = validation.as_tensor(scores, "scores").to(torch.float64).reshape(-1)
    y = validation.as_tensor(positives, "positives").reshape(-1).to(torch.bool)
    if s.shape != y.shape:
        raise AggregationError(f"scores has {s.shape[0]} entries but positives has {y.shape[0]}")
    validation.check_finite(s, "scores")
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    ranks = (ends - (counts.to(torch.float64) - 1) / 2)[inverse]   # 1-based average ranks
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def selective_risk(scores: Any, correct: Any, coverage: float = 0.9) -> Tuple[float, float]:
    """Selective classification (Geifman & El-Yaniv 2017): keep the items with the lowest
    uncertainty ``scores`` ``[B]`` first. Returns ``(AURC, accuracy at coverage)``: AURC is the mean,
    over k = 1..B, of the error rate among the k kept items; the accuracy is that of the
    ``ceil(coverage * B)`` kept items. Items with equal scores are kept in random order, counted by
    their expected errors (so the answer does not depend on the items' order)."""
    s = validation.as_tensor(scores, "scores").to(torch.float64).reshape(-1)
    ok = validation.as_tensor(correct, "correct").reshape(-1).to(torch.bool)
    if s.shape != ok.shape or s.numel() == 0:
        raise AggregationError(f"scores ({s.numel()}) and correct ({ok.numel()}) must be equal, non-empty")
    if not (isinstance(coverage, (int, float)) and 0 < coverage <= 1):
        raise AggregationError(f"coverage must be in (0, 1], got {coverage!r}")
    validation.check_finite(s, "scores")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    errors = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, (~ok).to(torch.float64))
    ends, err_ends = torch.cumsum(counts, 0), torch.cumsum(errors, 0)
    n = s.numel()
    k = torch.arange(1, n + 1)
    g = torch.searchsorted(ends, k, right=False)       # the tie group holding the k-th kept item
    before = (ends - counts)[g]
    expected = (err_ends - errors)[g] + (k - before).to(torch.float64) * errors[g] / counts[g].to(torch.float64)
    risk = expected / k.to(torch.float64)
    kept = max(1, math.ceil(coverage * n - 1e-9))
    return float(risk.mean()), float(1.0 - risk[kept - 1])


def uncertainty_metrics(member_probs: Any, targets: Any, ood_member_probs: Any = None) -> Dict[str, float]:
    """How well the mean ensemble's per-item uncertainty (``aggregation.uncertainty``: predictive
    entropy, mutual information) ranks its own errors and out-of-distribution inputs.

    Keys, for ``score`` in ``entropy`` and ``mi``: ``mean_<score>`` (over the items), ``aurc_<score>`` and
    ``selective_acc_at_90_<score>`` (:func:`selective_risk`), ``misclassification_auroc_<score>``
    (:func:`auroc` of the score for the items the ensemble gets wrong; NaN when it gets none or all
    wrong) and, with ``ood_member_probs`` (the members on out-of-distribution inputs, ``[M, B', C]``),
    ``ood_auroc_<score>`` (the score on those inputs against the score on ``member_probs``' inputs).
    """
    p = _member_probs(member_probs)
    t = _targets(targets, p.shape[1], p.shape[2], p.device)
    u = agg.uncertainty(p)
    scores = {"entropy": u["entropy"], "mi": u["mutual_information"]}
    correct = validation.first_argmax(p.mean(0)) == t
    out: Dict[str, float] = {}
    ood = None if ood_member_probs is None else agg.uncertainty(_member_probs(ood_member_probs))
    for name, score in scores.items():
        out[f"mean_{name}"] = float(score.to(torch.float64).mean())
        out[f"aurc_{name}"], out[f"selective_acc_at_90_{name}"] = selective_risk(score, correct, 0.9)
        out[f"misclassification_auroc_{name}"] = auroc(score, ~correct)
        if ood is not None:
            other = ood["entropy" if name == "entropy" else "mutual_information"]
            out[f"ood_auroc_{name}"] = auroc(torch.cat([score, other]),
                                             torch.cat([torch.zeros(len(score)), torch.ones(len(other))]))
    return out

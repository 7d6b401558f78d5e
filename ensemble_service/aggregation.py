"""Combine the predictions of ensemble members into one prediction.

Pure functions on torch tensors; nothing here touches Ray, MLflow or the disk.

Conventions
-----------
Shapes
    Member predictions are a tensor of shape ``[M, B, C]`` (M members, B items,
    C classes) holding either probabilities (each row over C sums to 1) or raw
    logits, or a tensor of shape ``[M, B]`` of integer class labels. Combined
    outputs are ``[B, C]`` (probabilities / vote shares) and ``[B]`` (labels,
    agreement).

Inputs
    Anything :func:`torch.as_tensor` accepts: tensors, NumPy arrays, nested
    Python lists. Inputs are validated (dimensions, empty batch, no members,
    NaN/inf, probabilities in [0, 1] summing to 1 within ``atol``, weight length
    and sign, label range) and every problem is reported as an
    :class:`AggregationError` (a ``ValueError``) with a one-line message.

Dtypes
    Labels are always returned as ``torch.int64``. Floating outputs keep the
    dtype of a float32 or float64 input; every other input (half precision,
    bfloat16, integers, bools, nested Python lists of floats, which torch
    converts to float32) is returned as ``torch.float32``. Results of
    :func:`vote_labels` (where no floating input exists) are float32.
    Outputs live on the device of the input predictions.

Range
    Any finite input gives a finite result: the mean of logits (where the sum
    of float32 values near ``3.4e38`` would overflow), votes and weights are
    computed in float64 and rounded to the output dtype at the end; weights
    given as Python numbers are read as float64, so finite weights beyond
    float32's range (``1e39``) or below it (``1e-300``) keep their ratios.

Weights
    Optional per-member weights (length M) must be finite and non-negative with
    at least one positive entry; they are normalized to sum to 1 (see
    :func:`normalize_weights`). If weights are given they are applied by every
    method; method ``"weighted"`` merely insists that they are given.

Ties
    * A member's own vote is its argmax; if a member has several maximal
      classes, the lowest class index is its vote.
    * :func:`vote`: among classes with the most votes, the class with the
      highest (weighted) mean probability wins; if that is tied as well, the
      lowest class index wins.
    * :func:`vote_labels`: only labels are known, so among classes with the most
      votes the lowest class index wins.
    * Soft methods (mean, weighted, logit_mean): the label is the argmax of the
      combined probabilities, lowest class index on exact ties.
    Vote counts and mean probabilities are compared in float64 with an absolute
    tolerance of 1e-9, so that weighted sums that differ only by rounding count
    as tied and results do not depend on the order of the members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ensemble_service.validation import (
    AggregationError, as_index, as_int_tensor, as_tensor, check_3d, check_finite, check_label_range, first_argmax,
    float_dtype_of, shape_str, to_float, validate_probs,
)

__all__ = [
    "softmax",
    "AggregationError",
    "AggregateResult",
    "METHODS",
    "KINDS",
    "validate_probs",
    "validate_logits",
    "validate_labels",
    "normalize_weights",
    "mean",
    "logit_mean",
    "vote",
    "vote_labels",
    "weights_from_accuracy",
    "agreement",
    "aggregate",
    "UNCERTAINTY",
    "uncertainty",
    "temperature_scale",
]

METHODS: Tuple[str, ...] = ("mean", "vote", "weighted", "logit_mean")
KINDS: Tuple[str, ...] = ("probs", "logits", "labels")

#: Floor applied to probabilities before taking their log (``logit_mean`` on probs).
LOG_CLAMP = 1e-12
#: Absolute tolerance (float64) under which vote counts / mean probabilities tie.
TIE_TOL = 1e-9

TensorLike = Union[torch.Tensor, Sequence[Any], Any]


@dataclass
class AggregateResult:
    """Output of :func:`aggregate`.

    labels: ``[B]`` int64 ensemble labels.
    probabilities: ``[B, C]`` combined probabilities (vote shares for voting methods).
    agreement: ``[B]`` fraction of members whose own argmax equals ``labels``.
    uncertainty: with ``with_uncertainty``, ``[B]`` tensors by name: ``entropy``, ``expected_entropy``,
    ``mutual_information`` (:func:`uncertainty`; not for labels) and, for votes, ``vote_share`` (the
    share of the (weighted) votes that the label got).
    """

    labels: torch.Tensor
    probabilities: torch.Tensor
    agreement: torch.Tensor
    uncertainty: Optional[dict] = None


def _break_ties(primary: torch.Tensor, secondary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the max of ``primary`` [B, C]; ties (within TIE_TOL) go to the
    highest ``secondary`` and then to the lowest index."""
    c = primary.shape[-1]
    best = primary.max(dim=-1, keepdim=True).values
    cand = primary >= best - TIE_TOL
    if secondary is not None:
        sec = secondary.masked_fill(~cand, -math.inf)
        best2 = sec.max(dim=-1, keepdim=True).values
        cand = cand & (sec >= best2 - TIE_TOL)
    idx = torch.arange(c, device=primary.device)
    return torch.where(cand, idx, torch.full_like(idx, c)).min(dim=-1).values


def _as_float64_if_numbers(x: Any, name: str) -> Tuple[torch.Tensor, torch.dtype]:
    """(values, the float dtype torch would give them): Python floats read as float64, so that
    finite values outside float32's range are not rounded to inf or 0 first."""
    t = as_tensor(x, name)
    dtype = float_dtype_of(t)
    if not isinstance(x, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        t = as_tensor(torch.as_tensor(x, dtype=torch.float64), name)
    return t, dtype


def _weights_or_none(weights: Any, m: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weights is None:
        return None
    return normalize_weights(weights, m, dtype=like.dtype).to(like.device)


# ------------------------------------------------------------------------ validation


def validate_logits(logits: TensorLike) -> torch.Tensor:
    """Check member logits ``[M, B, C]`` (non-empty, finite); return a float tensor."""
    t = as_tensor(logits, "logits")
    check_3d(t, "predictions")
    t = to_float(t)
    check_finite(t, "predictions")
    return t


def validate_labels(labels: TensorLike, num_classes: Optional[int]) -> torch.Tensor:
    """Check member labels ``[M, B]`` against ``num_classes``; return int64.

    Floats are accepted when they are whole numbers; bools are rejected.
    """
    if num_classes is None:
        raise AggregationError("num_classes is required for labels")
    c = as_index(num_classes, "num_classes")
    t = as_tensor(labels, "labels")
    if t.dim() != 2:
        raise AggregationError(f"labels must be 2-D (members x batch), got shape {shape_str(t)}")
    if t.shape[0] == 0:
        raise AggregationError(f"labels have no members (shape {shape_str(t)})")
    if t.shape[1] == 0:
        raise AggregationError(f"empty batch (labels have shape {shape_str(t)})")
    t = as_int_tensor(t, "labels")
    check_label_range(t, c, "labels")
    return t


def normalize_weights(
    weights: TensorLike, num_members: int, *, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Validate per-member weights and scale them to sum to 1.

    ``weights`` must be 1-D with ``num_members`` finite, non-negative entries, at
    least one of them positive. The result is ``[M]`` in ``dtype`` (default:
    float64 for float64 input, float32 otherwise), on the CPU unless the input
    tensor lived elsewhere. Python / NumPy numbers are read as float64, so finite
    weights outside float32's range keep their ratios (``[1e39, 3e39]`` -> ``[0.25, 0.75]``).
    """
    m = as_index(num_members, "num_members")
    w, default_dtype = _as_float64_if_numbers(weights, "weights")
    if w.dtype == torch.bool:
        raise AggregationError("weights must be numbers, got dtype torch.bool")
    if w.dim() != 1:
        raise AggregationError(f"weights must be 1-D (one per member), got shape {shape_str(w)}")
    if w.shape[0] != m:
        raise AggregationError(f"weights has {w.shape[0]} entries but there are {m} members")
    out_dtype = dtype if dtype is not None else default_dtype
    w64 = w.detach().to(torch.float64)
    if not bool(torch.isfinite(w64).all()):
        raise AggregationError("weights contain NaN or infinite values")
    if bool((w64 < 0).any()):
        raise AggregationError("weights must be non-negative")
    if float(w64.max()) <= 0:
        raise AggregationError("weights must have at least one positive entry")
    w64 = w64 / w64.max()  # avoid overflow of the sum for huge weights
    return (w64 / w64.sum()).to(out_dtype)


def weights_from_accuracy(val_accuracies: Union[Sequence[float], torch.Tensor]) -> torch.Tensor:
    """Member weights proportional to validation accuracy, summing to 1.

    Accuracies must be finite and non-negative (any scale: fractions or
    percentages give the same weights). If all are zero, weights are uniform.
    Returns ``[M]`` float64 for float64 input, float32 otherwise.
    """
    a = as_tensor(val_accuracies, "val_accuracies")
    if a.dtype == torch.bool:
        raise AggregationError("val_accuracies must be numbers, got dtype torch.bool")
    if a.dim() != 1:
        raise AggregationError(f"val_accuracies must be 1-D (one per member), got shape {shape_str(a)}")
    if a.shape[0] == 0:
        raise AggregationError("val_accuracies is empty (no members)")
    dtype = float_dtype_of(a)
    a64 = a.detach().to(torch.float64)
    if not bool(torch.isfinite(a64).all()):
        raise AggregationError("val_accuracies contain NaN or infinite values")
    if bool((a64 < 0).any()):
        raise AggregationError("val_accuracies must be non-negative")
    if float(a64.max()) == 0.0:
        return torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=dtype)
    a64 = a64 / a64.max()
    return (a64 / a64.sum()).to(dtype)


# ------------------------------------------------------------------------- combiners


def softmax(z: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(z, dim=-1)``. On the CPU, with fewer than 16 classes over 128 rows or more, it
    runs over a classes-first copy: torch's CPU kernel vectorizes along the last dimension, and for
    2-15 classes it is several times slower than the same softmax over the first. One thread, the
    copies there and back included (`bench/bench_forward.py`): [5, 1024, 10] logits 0.18 vs 0.93 ms,
    [5, 1024, 2] 0.05 vs 0.27 ms, [5, 64, 10] (five members' batch of 64) 21 vs 61 us; [5, 64, 2] is
    even. The two agree to float rounding (about 3e-8)."""
    c = z.shape[-1]
    if z.device.type != "cpu" or c >= 16 or z.numel() < 128 * c:
        return torch.softmax(z, dim=-1)
    return torch.softmax(z.movedim(-1, 0).contiguous(), dim=0).movedim(0, -1).contiguous()


def _mean(p: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    if w is None:
        return p.mean(dim=0)
    return (w[:, None, None] * p).sum(dim=0)


def _logit_mean(z: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    # In float64, as sum_m w_m * z_m with weights summing to 1 (1/M without weights): a plain sum
    # of float32 logits near 3.4e38 overflows (and inf - inf is NaN in softmax), and the weighted
    # terms keep even float64 logits near 1.8e308 in range.
    m = z.shape[0]
    w64 = torch.full((m,), 1.0 / m, dtype=torch.float64, device=z.device) if w is None else w.to(torch.float64)
    return softmax(_mean(z.to(torch.float64), w64)).to(float_dtype_of(z))


def _vote(p: torch.Tensor, w: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    m, _, c = p.shape
    member = first_argmax(p)  # [M, B]
    onehot = torch.nn.functional.one_hot(member, c).to(torch.float64)  # [M, B, C]
    p64 = p.to(torch.float64)
    w64 = None if w is None else w.to(torch.float64)
    shares = _mean(onehot, w64)
    mean_p = _mean(p64, w64)
    labels = _break_ties(shares, mean_p)
    return labels, shares.to(p.dtype)


def _vote_labels(
    labels: torch.Tensor, c: int, w: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    m, b = labels.shape
    weight = torch.full((m,), 1.0 / m, dtype=torch.float64) if w is None else w.to(torch.float64)
    shares = torch.zeros(b, c, dtype=torch.float64)  # [B, C]: no [M, B, C] one-hot, whatever C is
    shares.scatter_add_(1, labels.t(), weight[None, :].expand(b, m).contiguous())
    return _break_ties(shares), shares.to(torch.float32)


def mean(probs: TensorLike, weights: Optional[TensorLike] = None) -> torch.Tensor:
    """Soft voting: the (weighted) average of member probabilities, ``[B, C]``."""
    p = validate_probs(probs)
    return _mean(p, _weights_or_none(weights, p.shape[0], p))


def logit_mean(logits: TensorLike, weights: Optional[TensorLike] = None) -> torch.Tensor:
    """Softmax of the (weighted) mean of member logits, ``[B, C]``."""
    z = validate_logits(logits)
    return _logit_mean(z, _weights_or_none(weights, z.shape[0], z))


def vote(
    probs: TensorLike, weights: Optional[TensorLike] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard majority vote over each member's argmax.

    Returns ``(labels [B] int64, shares [B, C])`` where ``shares[b, c]`` is the
    fraction of members (of total weight, if ``weights`` are given) voting for
    class ``c``.

    Tie rule: a member whose probabilities have several maxima votes for the
    lowest of those classes. Among classes tied for the most votes, the class
    with the highest (weighted) mean probability wins; if that is tied too, the
    lowest class index wins. Comparisons use float64 with tolerance ``TIE_TOL``.
    """
    p = validate_probs(probs)
    return _vote(p, _weights_or_none(weights, p.shape[0], p))


def vote_labels(
    labels: TensorLike, num_classes: int, weights: Optional[TensorLike] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Majority vote when only member labels ``[M, B]`` are known.

    Returns ``(labels [B] int64, shares [B, C] float32)``. With ``weights`` each
    member's vote counts its normalized weight instead of 1/M.

    Tie rule: among classes tied for the most votes (within ``TIE_TOL``), the
    lowest class index wins.
    """
    t = validate_labels(labels, num_classes)
    c = as_index(num_classes, "num_classes")
    w = None if weights is None else normalize_weights(weights, t.shape[0], dtype=torch.float64)
    if w is not None:
        w = w.to(t.device)
    return _vote_labels(t, c, w)


def agreement(
    member_labels: TensorLike, labels: TensorLike, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fraction of members whose label (argmax) equals the ensemble label.

    ``member_labels`` is ``[M, B]``, ``labels`` is ``[B]``; returns ``[B]`` in ``dtype``.
    """
    ml = as_tensor(member_labels, "member_labels")
    if ml.dim() != 2:
        raise AggregationError(
            f"member_labels must be 2-D (members x batch), got shape {shape_str(ml)}"
        )
    if ml.shape[0] == 0:
        raise AggregationError(f"member_labels have no members (shape {shape_str(ml)})")
    lb = as_tensor(labels, "labels")
    if lb.dim() != 1:
        raise AggregationError(f"labels must be 1-D (batch), got shape {shape_str(lb)}")
    if ml.shape[1] != lb.shape[0]:
        raise AggregationError(
            f"member_labels have {ml.shape[1]} items but labels have {lb.shape[0]}"
        )
    if lb.shape[0] == 0:
        raise AggregationError("empty batch")
    ml = as_int_tensor(ml, "member_labels")
    lb = as_int_tensor(lb, "labels").to(ml.device)
    return (ml == lb[None, :]).to(dtype).mean(dim=0)


# ------------------------------------------------------------------------ entry point


def aggregate(
    predictions: TensorLike,
    method: str = "mean",
    kind: str = "probs",
    weights: Optional[TensorLike] = None,
    num_classes: Optional[int] = None,
    with_uncertainty: bool = False,
) -> AggregateResult:
    """Combine member predictions with one of ``METHODS``.

    kind:
        ``"probs"`` ([M, B, C] probabilities), ``"logits"`` ([M, B, C] logits) or
        ``"labels"`` ([M, B] integer labels; needs ``num_classes``).
    method:
        ``"mean"``: average of probabilities (logits are softmaxed first).
        ``"weighted"``: the same with ``weights`` (required); on labels, a weighted vote.
        ``"vote"``: hard majority vote (see :func:`vote`); probabilities returned
        are the vote shares.
        ``"logit_mean"``: softmax of the mean of logits; for probabilities the
        logits are ``log(clamp(p, 1e-12))``, i.e. a normalized geometric mean.
    weights:
        Optional per-member weights, used by every method when given.
    num_classes:
        Required for labels; for probs/logits, if given it must equal C.
    with_uncertainty:
        Also return each item's uncertainty (``AggregateResult.uncertainty``).

    Raises :class:`AggregationError` on any bad input.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise AggregationError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise AggregationError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if method == "weighted" and weights is None:
        raise AggregationError("method 'weighted' needs weights")

    if kind == "labels":
        if method in ("mean", "logit_mean"):
            raise AggregationError(
                f"method {method!r} needs probabilities or logits, not labels; "
                "use 'vote' or 'weighted'"
            )
        t = validate_labels(predictions, num_classes)
        c = as_index(num_classes, "num_classes")
        w = None
        if weights is not None:
            w = normalize_weights(weights, t.shape[0], dtype=torch.float64).to(t.device)
        labels, shares = _vote_labels(t, c, w)
        unc = {"vote_share": _share(shares, labels)} if with_uncertainty else None
        return AggregateResult(labels, shares, agreement(t, labels, dtype=shares.dtype), unc)

    if kind == "probs":
        p = validate_probs(predictions)
        z = None
    else:
        z = validate_logits(predictions)
        p = softmax(z)
    m, _, c = p.shape
    if num_classes is not None and as_index(num_classes, "num_classes") != c:
        raise AggregationError(f"num_classes is {num_classes} but predictions have {c} classes")
    w = _weights_or_none(weights, m, p)

    if method == "vote":
        labels, combined = _vote(p, w)
    else:
        if method == "logit_mean":
            if z is None:
                z = torch.log(p.clamp_min(LOG_CLAMP))
            combined = _logit_mean(z, w)
        else:  # mean, weighted
            combined = _mean(p, w)
        labels = first_argmax(combined)
    if not bool(torch.isfinite(combined).all()):  # a guard: every finite input above gives a finite result
        raise AggregationError("predictions cannot be combined: the result is not finite")
    member_labels = first_argmax(p)
    unc = None
    if with_uncertainty:
        unc = _uncertainty(p, w)
        if method == "vote":
            unc["vote_share"] = _share(combined, labels)
    return AggregateResult(labels, combined, agreement(member_labels, labels, dtype=p.dtype), unc)


# ------------------------------------------------------------------------ uncertainty

#: the per-item uncertainty fields of :func:`uncertainty`, in order
UNCERTAINTY: Tuple[str, ...] = ("entropy", "expected_entropy", "mutual_information")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum_c p_c ln p_c`` over the last dim (``0 ln 0 = 0``), float64."""
    p64 = p.to(torch.float64)
    return -torch.special.xlogy(p64, p64).sum(dim=-1)


def uncertainty(probs: TensorLike, weights: Optional[TensorLike] = None) -> dict:
    """Per-item uncertainty of the (weighted) mean ensemble of member probabilities ``[M, B, C]``,
    in nats (natural log), each ``[B]`` in the dtype of the probabilities:

    * ``entropy``: the predictive entropy ``H[p_bar]`` of the mean ``p_bar = sum_m w_m p_m``
      (total uncertainty; Lakshminarayanan et al. 2017);
    * ``expected_entropy``: ``sum_m w_m H[p_m]``, the members' mean entropy (aleatoric);
    * ``mutual_information``: ``H[p_bar] - sum_m w_m H[p_m]`` (epistemic: the members' disagreement;
      Depeweg et al. 2018), >= 0 by the concavity of the entropy; rounding below 0 is clipped to 0.

    ``weights`` (one per member) default to ``1/M``. Two members ``[[1, 0]]`` and ``[[0, 1]]`` give
    entropy ``ln 2``, expected entropy 0 and mutual information ``ln 2``; identical members give 0.
    """
    p = validate_probs(probs)
    return _uncertainty(p, _weights_or_none(weights, p.shape[0], p))


def _share(shares: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return shares.gather(1, labels[:, None]).squeeze(1)


def _uncertainty(p: torch.Tensor, w: Optional[torch.Tensor]) -> dict:
    w64 = (torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=torch.float64, device=p.device) if w is None
           else w.to(torch.float64))
    p64 = p.to(torch.float64)
    total = _entropy(_mean(p64, w64))
    expected = (w64[:, None] * _entropy(p64)).sum(dim=0)
    mi = (total - expected).clamp_min(0.0)
    dtype = float_dtype_of(p)
    return {"entropy": total.to(dtype), "expected_entropy": expected.to(dtype), "mutual_information": mi.to(dtype)}


def temperature_scale(probs: TensorLike, temperature: float) -> torch.Tensor:
    """Temperature scaling of combined probabilities ``[B, C]`` (Guo et al. 2017):
    ``softmax(ln p / T)``, i.e. ``p ** (1/T)`` renormalized; ``T > 1`` softens, ``T < 1`` sharpens, the
    argmax never changes. The logits of a mean ensemble are the log of its mean probabilities
    (clamped at ``LOG_CLAMP``)."""
    p = validate_probs(probs, ndim=2)
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise AggregationError(f"temperature must be a positive number, got {temperature!r}")
    z = torch.log(p.to(torch.float64).clamp_min(LOG_CLAMP)) / t
    return softmax(z).to(float_dtype_of(p))

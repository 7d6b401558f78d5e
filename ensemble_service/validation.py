"""Validation shared by aggregation and metrics: tensors from lists, shapes, finiteness, labels.

Pure torch. Every problem is an :class:`AggregationError` (a ``ValueError``) with a one-line message
that names the argument.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch

TensorLike = Union[torch.Tensor, Sequence[Any], Any]


class AggregationError(ValueError):
    """Bad input to an aggregation or metric function (one-line, human-readable message)."""


def shape_str(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """torch.as_tensor, turning any conversion failure into AggregationError."""
    if x is None:
        raise AggregationError(f"{name} is missing (got None)")
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as exc:  # ragged lists, strings, objects ...
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AggregationError(f"{name} could not be converted to a tensor: {msg}") from None
    if t.is_complex():
        raise AggregationError(f"{name} must be real numbers, got dtype {t.dtype}")
    return t


def to_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.float32)


def float_dtype_of(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise AggregationError(f"{name} contain NaN or infinite values")


def check_3d(t: torch.Tensor, name: str = "predictions") -> None:
    if t.dim() != 3:
        raise AggregationError(
            f"{name} must be 3-D (members x batch x classes), got shape {shape_str(t)}"
        )
    m, b, c = t.shape
    if m == 0:
        raise AggregationError(f"{name} have no members (shape {shape_str(t)})")
    if b == 0:
        raise AggregationError(f"empty batch ({name} have shape {shape_str(t)})")
    if c == 0:
        raise AggregationError(f"{name} have no classes (shape {shape_str(t)})")


def as_index(value: Any, name: str) -> int:
    """A positive int from int-like values (int, NumPy integer, 0-d int tensor)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise AggregationError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = value.__index__()
    except Exception:
        raise AggregationError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise AggregationError(f"{name} must be a positive integer, got {n}")
    return n


def as_int_tensor(x: Any, name: str) -> torch.Tensor:
    """Integer tensor (int64) from ints, or from floats that are whole numbers."""
    t = as_tensor(x, name)
    if t.dtype == torch.bool:
        raise AggregationError(f"{name} must be integers, got dtype torch.bool")
    if t.is_floating_point():
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            raise AggregationError(f"{name} contain NaN or infinite values")
        if not bool((t == t.round()).all()):
            raise AggregationError(f"{name} must be integers, got non-integral values")
    return t.to(torch.int64)


def check_label_range(t: torch.Tensor, num_classes: int, name: str) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise AggregationError(f"{name} out of range 0..{num_classes - 1} (found {bad})")


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, lowest index among exact ties (device independent)."""
    c = x.shape[-1]
    idx = torch.arange(c, device=x.device)
    is_max = x == x.max(dim=-1, keepdim=True).values
    return torch.where(is_max, idx, torch.full_like(idx, c)).min(dim=-1).values


def validate_probs(probs: TensorLike, atol: float = 1e-3, *, ndim: int = 3) -> torch.Tensor:
    """Check member probabilities and return them as a float tensor.

    ``probs`` must be ``[M, B, C]`` (or ``[B, C]`` with ``ndim=2``), non-empty,
    finite, within ``[0, 1]`` (``atol`` slack) and each row over classes must sum
    to 1 within ``atol``. Raises :class:`AggregationError` otherwise.
    """
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
        raise AggregationError(f"atol must be a non-negative number, got {atol!r}")
    if ndim not in (2, 3):
        raise AggregationError(f"ndim must be 2 or 3, got {ndim!r}")
    t = as_tensor(probs, "predictions" if ndim == 3 else "probabilities")
    if ndim == 3:
        check_3d(t, "predictions")
    else:
        if t.dim() != 2:
            raise AggregationError(
                f"probabilities must be 2-D (batch x classes), got shape {shape_str(t)}"
            )
        if t.shape[0] == 0:
            raise AggregationError(f"empty batch (probabilities have shape {shape_str(t)})")
        if t.shape[1] == 0:
            raise AggregationError(f"probabilities have no classes (shape {shape_str(t)})")
    t = to_float(t)
    check_finite(t, "predictions" if ndim == 3 else "probabilities")
    d = t.detach()
    lo, hi = float(d.min()), float(d.max())
    if lo < -atol or hi > 1 + atol:
        bad = lo if lo < -atol else hi
        raise AggregationError(f"probabilities must lie in [0, 1] (found {bad:.3g})")
    dev = float((d.double().sum(dim=-1) - 1.0).abs().max())
    if dev > atol:
        raise AggregationError(
            f"probabilities must sum to 1 over classes (max deviation {dev:.3g})"
        )
    return t

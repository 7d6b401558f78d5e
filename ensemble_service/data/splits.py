"""Train / validation / test splits and bootstrap samples.

For data with an official test split the validation split is taken out of the official training
split (``val_fraction`` of it); otherwise test and validation are both fractions of the *whole* set.
Split sizes are rounded to the nearest integer, splits are stratified by label and fixed by
``split_seed`` (same seed, same splits). Stratification falls back to a plain seeded random split
only when it is impossible (a class with a single member, or a split smaller than the number of
classes).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Tuple

import numpy as np
import torch


def count(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def split(y: np.ndarray, n_holdout: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(y)-1`` into (keep, holdout) with ``len(holdout) == n_holdout``.

    Stratified by ``y`` when possible; otherwise a plain seeded random split. Deterministic in seed.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if n_holdout <= 0:
        return np.random.default_rng(seed).permutation(idx), idx[:0]
    try:
        keep, hold = train_test_split(idx, test_size=n_holdout, random_state=seed, stratify=y)
    except ValueError:
        # too few members of some class, or fewer holdout items than classes
        keep, hold = train_test_split(idx, test_size=n_holdout, random_state=seed, stratify=None)
    return np.asarray(keep), np.asarray(hold)


def check_fraction(label: str, value: Any) -> float:
    from ensemble_service.data.base import DataError

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise DataError(f"{label} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_seed(value: Any) -> int:
    from ensemble_service.data.base import DataError

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**32:
        raise DataError(f"split_seed must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def bootstrap_indices(n: int, seed: int) -> torch.Tensor:
    """``n`` indices drawn uniformly with replacement from ``range(n)`` (a bootstrap sample for
    bagging), from a ``torch.Generator`` seeded with ``seed``; int64 tensor of shape ``(n,)``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.randint(0, int(n), (int(n),), generator=gen, dtype=torch.int64)

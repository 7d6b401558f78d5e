"""Data sets that need no files: scikit-learn's bundled ``digits`` and the ``synthetic`` blobs.

``digits``
    scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, no download). Raw inputs are
    sklearn's pixel values 0..16 (``[8, 8]`` or the 64 flattened); the model sees them / 16 as
    ``(1, 8, 8)``. There is no official test split: test and validation are fractions of the whole
    set, stratified by label.
``synthetic``
    Tiny deterministic Gaussian blobs rendered as images, for tests and smoke runs: ``num_classes``
    classes, ``input_shape`` ``[C, H, W]`` or ``[C, L]``, ``n_train`` / ``n_val`` / ``n_test`` samples
    (``val_fraction`` and ``test_fraction`` are not used), generated with ``seed``; ``split_seed``
    decides which samples land in which split. No preprocessing: raw inputs are model inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.preprocess import Pipeline
from ensemble_service.data.splits import split

DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass
class DigitsData(DataConfig):
    name: str = "digits"


@register_source
class Digits(Source):
    name = "digits"
    schema = DigitsData
    description = "scikit-learn's bundled 8x8 handwritten digits (1797 images), pixels 0..16 scaled to [0, 1]"

    def static_shape(self, cfg):
        return (1, 8, 8), 10

    def load(self, cfg: DataConfig) -> Raw:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.asarray(digits.data, dtype=np.float32).reshape(-1, 8, 8)
        pipeline = Pipeline((8, 8), [{"op": "divide", "by": 16.0}, {"op": "reshape", "shape": [1, 8, 8]}])
        return Raw(x, np.asarray(digits.target, dtype=np.int64), pipeline, num_classes=10,
                   class_names=list(DIGIT_NAMES), label="digits")


@dataclass
class SyntheticData(DataConfig):
    name: str = "synthetic"
    n_train: int = 96
    n_val: int = 48
    n_test: int = 48
    num_classes: int = 3
    input_shape: List[int] = field(default_factory=lambda: [1, 8, 8])
    seed: int = 0


def synthetic_options(cfg: SyntheticData) -> Tuple[Tuple[int, ...], int]:
    def integer(key: str, minimum: int) -> int:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
            raise DataError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    integer("n_train", 1), integer("n_val", 0), integer("n_test", 0), integer("seed", 0)
    classes = integer("num_classes", 2)
    shape = cfg.input_shape
    if (isinstance(shape, (str, bytes)) or not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 3
            or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 1 for d in shape)):
        raise DataError(f"data.input_shape must be a list [C, H, W] or [C, L] of positive integers, got {shape!r}")
    return tuple(int(d) for d in shape), classes


@register_source
class Synthetic(Source):
    name = "synthetic"
    schema = SyntheticData
    description = "tiny deterministic Gaussian blobs rendered as images (default 96 train / 48 val / 48 test)"
    has_test_split = True

    def static_shape(self, cfg: Optional[SyntheticData]):
        return synthetic_options(cfg or SyntheticData())

    def check(self, cfg: SyntheticData) -> None:
        synthetic_options(cfg)

    def load(self, cfg: SyntheticData) -> Raw:
        shape, classes = synthetic_options(cfg)
        n_total = cfg.n_train + cfg.n_val + cfg.n_test
        x, y = make_blobs(n_total, classes, shape, cfg.seed)
        rest, test = split(y, cfg.n_test, cfg.split_seed)
        keep, val = split(y[rest], cfg.n_val, cfg.split_seed)
        train, val = rest[keep], rest[val]
        return Raw(x[train], y[train], Pipeline(shape), x_val=x[val], y_val=y[val], x_test=x[test],
                   y_test=y[test], num_classes=classes, label="synthetic")


def make_blobs(n: int, num_classes: int, input_shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent Gaussian blobs plus noise, clipped to [0, 1]. Balanced labels."""
    rng = np.random.default_rng(seed)
    channels, spatial = input_shape[0], input_shape[1:]
    y = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(y)
    # class k has its blob centred at a distinct place: spread along the first spatial axis,
    # wiggling along the others
    t = (np.arange(num_classes) + 0.5) / num_classes
    centers = np.stack(
        [(spatial[0] - 1) * t]
        + [(s - 1) * (0.5 + 0.35 * np.sin(2 * np.pi * t + d)) for d, s in enumerate(spatial[1:], start=1)],
        axis=1,
    )  # (K, ndim)
    sigma = max(0.75, max(spatial) / (2.0 * num_classes))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in spatial], indexing="ij"), axis=-1)
    jitter = rng.normal(0.0, 0.3, size=(n, len(spatial)))
    c = centers[y] + jitter  # (n, ndim)
    d2 = ((grid[None] - c.reshape((n,) + (1,) * len(spatial) + (len(spatial),))) ** 2).sum(-1)
    blob = np.exp(-d2 / (2 * sigma**2))  # (n, *spatial)
    gains = 1.0 - 0.5 * np.arange(channels) / max(channels, 1)
    x = blob[:, None] * gains.reshape((1, channels) + (1,) * len(spatial))
    x = x + rng.normal(0.0, 0.15, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y

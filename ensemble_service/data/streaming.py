"""Data sets larger than memory: what a streaming source hands the members instead of tensors.

A streaming source (``data=parquet``; ``data=arrays`` / ``data=image_folder`` with
``data.streaming=true``) is read once on the driver, unit by unit (a parquet row group, a slice of
an ``.npz`` array's rows, a chunk of image files; no Ray yet, bounded memory), to check the values, find the classes, fit the
preprocessing on the training split and count the splits. It returns a :class:`StreamingBundle`:
the same facts a :class:`~ensemble_service.data.DataBundle` has (shape, classes, class names, the
fitted pipeline, split sizes, and the validation and test *labels*), plus :class:`StreamSpec`, the
plain description of where the rows are. No inputs travel through Ray's object store: each member
reads its epochs itself through Ray Data (``ensemble_service.data.raydata``) and
``iter_torch_batches``.

Rows are identified by their content. :func:`row_keys` hashes each row's raw feature values (as
float32 bits) and its label to a 64-bit key, identically on the driver and in every Ray Data task
whatever the file layout or read order: column by column (splitmix64) for rows of up to
:data:`WIDE_ROW` values (a table's columns), per row with BLAKE2b (8-byte digest of the row's
float32 bytes) for wider rows (images, long arrays), where a Python loop over the columns would be
slow. The key decides

* the split: ``u = key / 2**64`` (mixed with ``data.split_seed``); test if ``u < test_fraction``,
  validation if ``u < test_fraction + val_fraction``, else training. Not stratified (the in-memory
  sources stratify); identical rows always land in the same split. A source with ready-made splits
  (an ``.npz``'s ``x_val``/``x_test``) puts those units wholly in their split and draws only the
  others' rows, with the fraction of a given split set to 0 (``Source.split_of``);
* bagging: each training row appears ``Poisson(1)`` times in a member's sample, the count drawn from
  the key and the member's seed (the streaming form of a bootstrap sample: about 63.2% of the rows,
  some repeated, the same sample every epoch);
* the order of validation and test predictions: each member returns them sorted by key, so every
  member's row i is the same row, and ``y_val``/``y_test`` here are in that order.

Workers call :meth:`StreamingBundle.train_batches` / :meth:`StreamingBundle.eval_batches`
(:mod:`.streamed`); those import the Ray Data module lazily, so ``workers/`` imports no Ray. This
module is the pure part (NumPy): row keys, splits, bootstrap counts, statistics.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
#: Poisson(1) cumulative probabilities P(K <= k), k = 0..11 (the rest is below 1e-9)
_POISSON1_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(12)])


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijection on uint64), vectorized."""
    with np.errstate(over="ignore"):
        z = z.copy()
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


#: rows with more raw values than this are hashed per row (BLAKE2b), not column by column
WIDE_ROW = 1024


def row_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """uint64 ``[B]``: a hash of each row's raw features (float32 bits) and its label."""
    bits = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1)).view(np.uint32)
    with np.errstate(over="ignore"):
        if bits.shape[1] > WIDE_ROW:
            digests = b"".join(hashlib.blake2b(row.astype("<u4", copy=False).tobytes(), digest_size=8).digest()
                               for row in bits)
            h = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
        else:
            h = np.full(len(bits), 0x243F6A8885A308D3, dtype=np.uint64)
            for j in range(bits.shape[1]):
                h = _mix(h ^ (bits[:, j].astype(np.uint64) + _GOLDEN * np.uint64(j + 1)))
        h = _mix(h ^ (np.asarray(y).astype(np.int64).astype(np.uint64) + np.uint64(0x13198A2E03707344)))
    return h


def _uniform(keys: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """[0, 1) per key, independent for each (seed, salt)."""
    with np.errstate(over="ignore"):
        mixed = _mix(keys ^ _mix(np.full(len(keys), (int(seed) * 1000003 + salt) & 0xFFFFFFFFFFFFFFFF,
                                         dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


TRAIN, VAL, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}


def assign_split(keys: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """int8 ``[B]``: TRAIN, VAL or TEST for each row key (see the module docstring)."""
    u = _uniform(keys, seed, 1)
    out = np.full(len(keys), TRAIN, dtype=np.int8)
    out[u < test_fraction + val_fraction] = VAL
    out[u < test_fraction] = TEST
    return out


def poisson_counts(keys: np.ndarray, seed: int) -> np.ndarray:
    """int64 ``[B]``: how often each row appears in the bootstrap sample of the member with ``seed``."""
    return np.searchsorted(_POISSON1_CDF, _uniform(keys, seed, 2), side="right").astype(np.int64)


@dataclass(frozen=True)
class StreamSpec:
    """Where the rows are and how a raw row becomes a model input (plain values: picklable)."""
    source: str                         # the data source ("parquet", "arrays", "image_folder")
    uri: str                            # data.path / data.root (a path or an object-store URI)
    units: Tuple[Tuple[str, int, int], ...]   # (file or array, unit, rows): what one read task reads
    features: Tuple[str, ...]
    target: str
    classes: Tuple[Any, ...]            # target value of class i
    preprocessing: Dict[str, Any]       # the fitted Pipeline (raw -> model inputs)
    val_fraction: float
    test_fraction: float
    split_seed: int
    read_tasks: int = 1                 # concurrent Ray Data read tasks per member
    extra: Dict[str, Any] = field(default_factory=dict)   # what else the source's read_unit needs


def is_streaming(data: Any) -> bool:
    return bool(getattr(data, "streaming", False))


def in_key_order(keys: Sequence[np.ndarray], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-batch ``values`` and sort their rows by the batches' row keys."""
    if not values:
        return torch.empty(0)
    order = np.argsort(np.concatenate(keys), kind="stable")
    return torch.cat(values)[torch.from_numpy(order)]


class Moments:
    """Per-feature count, mean and M2 over batches (Chan et al.'s parallel update, float64): the
    training split's mean and std without holding it."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        if not len(x):  # (a unit without training rows: reshape(0, -1) would fail)
            return
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        n_b, mean_b = len(x), x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def labels_in_key_order(parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """The labels of ``parts`` (each a unit's row keys and labels) sorted by row key: the order in
    which every member returns its validation and test predictions."""
    keys = np.concatenate([k for k, _ in parts])
    y = np.concatenate([v for _, v in parts])
    return torch.from_numpy(y[np.argsort(keys, kind="stable")].astype(np.int64))


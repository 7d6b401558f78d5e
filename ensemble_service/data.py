"""Data sets for the ensemble training service.

Everything here is plain PyTorch / NumPy / scikit-learn: no Ray, no MLflow. The driver calls
:func:`load_dataset` once and ships the resulting :class:`DataBundle` (plain tensors, picklable) to
the workers through Ray's object store.

Registered data sets (see :func:`list_datasets`, :func:`dataset_info`):

``digits``
    scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no download). Pixels are divided by 16
    (range [0, 1]); ``input_shape`` is ``(1, 8, 8)``. There is no official test split, so the whole set
    is split stratified by label into train / val / test, with ``test_fraction`` and ``val_fraction``
    both taken as fractions of the *whole* set.
``mnist1d``
    MNIST-1D (Greydanus 2020), generated offline with the ``mnist1d`` package (never downloaded) and
    cached at ``<root>/mnist1d/mnist1d.npz``. 4000 train / 1000 test signals, ``input_shape (1, 40)``.
    Inputs are standardized with one scalar mean and standard deviation computed on the final *train*
    split (after the validation split was taken out), applied to all three splits.
``synthetic``
    Tiny deterministic Gaussian blobs rendered as images, for tests and smoke runs. Defaults: 3 classes,
    ``input_shape (1, 8, 8)``, 96 train / 48 val / 48 test. Options (the ``synthetic`` mapping):
    ``n_train``, ``n_val``, ``n_test``, ``num_classes``, ``input_shape`` (a list: ``[C, H, W]`` or
    ``[C, L]``) and ``seed`` (generation seed, default 0). The pool of samples depends only on the
    options; ``split_seed`` decides which samples land in which split. ``val_fraction`` and
    ``test_fraction`` are ignored: the split sizes come from the options.
``mnist``, ``fashion_mnist``
    torchvision's on-disk layout: ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/`` holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). ``input_shape (1, 28, 28)``,
    pixels / 255.
``cifar10``
    torchvision's layout ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (pickled dicts).
    They are unpickled with a restricted unpickler that only accepts plain containers and NumPy array
    reconstruction. ``input_shape (3, 32, 32)``, pixels / 255.

Splits: for data sets with an official test split the validation split is taken out of the official
training split (``val_fraction`` of it), stratified by label. Split sizes are rounded to the nearest
integer. Every split is fixed by ``split_seed`` (same seed, same splits). Stratification falls back to
a plain seeded random split only when it is impossible (a class with a single member, or a split
smaller than the number of classes).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import numbers
import os
import pickle
import random
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

__all__ = [
    "DataError",
    "DatasetInfo",
    "DataBundle",
    "register_dataset",
    "list_datasets",
    "dataset_info",
    "check_available",
    "load_dataset",
    "bootstrap_indices",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data set cannot be provided; the message names the problem and what to do about it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered data set, known without loading it."""

    name: str
    input_shape: tuple[int, ...]  # per-sample shape: (C, H, W) for images, (C, L) for 1-D signals
    num_classes: int
    has_test_split: bool
    description: str


@dataclass
class DataBundle:
    """A loaded, split data set: float32 inputs of shape ``(N, *input_shape)``, int64 targets."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        """Number of samples per split: ``{"train": ..., "val": ..., "test": ...}``."""
        return {
            "train": int(self.y_train.shape[0]),
            "val": int(self.y_val.shape[0]),
            "test": int(self.y_test.shape[0]),
        }


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# A loader is called as loader(root=Path, options=Mapping, split_seed=int) and returns a dict with
# numpy arrays (or tensors) "x_train", "y_train" and optionally "x_val"/"y_val" and "x_test"/"y_test".
# Missing splits are made by load_dataset (stratified, split_seed). It may also return "input_shape"
# and "num_classes" to override the registered facts (the synthetic data set does).
Loader = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class _FileSpec:
    """A required file; any of ``candidates`` satisfies it (e.g. plain or gzipped)."""

    candidates: tuple[Path, ...]

    def found(self) -> Path | None:
        for path in self.candidates:
            if path.is_file():
                return path
        return None

    def describe(self) -> str:
        if len(self.candidates) == 2 and self.candidates[1].name == self.candidates[0].name + ".gz":
            return f"{self.candidates[0]}[.gz]"
        return " or ".join(str(p) for p in self.candidates)


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    loader: Loader
    required_files: Callable[[Path], list[_FileSpec]] | None
    downloader: Callable[[Path], None] | None
    standardize: bool


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    has_test_split: bool,
    description: str,
    required_files: Callable[[Path], list[_FileSpec]] | None = None,
    downloader: Callable[[Path], None] | None = None,
    standardize: bool = False,
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader`` under ``name`` with its static :class:`DatasetInfo`.

    ``required_files(root)`` lists files that must exist (used by :func:`check_available`),
    ``downloader(root)`` fetches them when ``download=True``; ``standardize`` makes
    :func:`load_dataset` standardize inputs with the train split's scalar mean/std.
    Registering a name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("data set name must be a non-empty string")
    if name in _REGISTRY:
        raise ValueError(f"data set {name!r} is already registered")
    info = DatasetInfo(
        name=name,
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        has_test_split=bool(has_test_split),
        description=str(description),
    )

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = _Entry(info, loader, required_files, downloader, bool(standardize))
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Names of the registered data sets, sorted."""
    return sorted(_REGISTRY)


def _entry(name: Any) -> _Entry:
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(list_datasets())}")
    return entry


def dataset_info(name: str, synthetic: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Static facts about data set ``name``; unknown names raise :class:`DataError`.

    For ``synthetic`` the defaults are returned unless ``synthetic`` options are given, in which
    case the effective ``input_shape`` / ``num_classes`` are returned (options are validated).
    """
    info = _entry(name).info
    if name == "synthetic" and synthetic is not None:
        opts = _synthetic_options(synthetic)
        info = replace(info, input_shape=opts["input_shape"], num_classes=opts["num_classes"])
    return info


def _missing_files(entry: _Entry, root: Path) -> list[_FileSpec]:
    if entry.required_files is None:
        return []
    return [spec for spec in entry.required_files(root) if spec.found() is None]


def _missing_error(name: str, missing: list[_FileSpec]) -> DataError:
    more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
    return DataError(
        f"data set '{name}' is not on disk: missing {missing[0].describe()}{more}; "
        f"pass data.download=true to fetch it, or put the files there (or point data.root elsewhere)"
    )


def _as_root(root: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(root)))


def check_available(name: str, root: PathLike = ".data", download: bool = False) -> None:
    """Cheap pre-flight check: raise :class:`DataError` when ``name`` is unknown, or when its files
    are missing under ``root`` and ``download`` is false. Never touches the network."""
    entry = _entry(name)
    if download:
        return
    missing = _missing_files(entry, _as_root(root))
    if missing:
        raise _missing_error(name, missing)


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def _count(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def _split(y: np.ndarray, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(y)-1`` into (keep, holdout) with ``len(holdout) == n_holdout``.

    Stratified by ``y`` when possible; otherwise a plain seeded random split. Deterministic in seed.
    """
    idx = np.arange(len(y))
    if n_holdout <= 0:
        return np.random.default_rng(seed).permutation(idx), idx[:0]
    try:
        keep, hold = train_test_split(idx, test_size=n_holdout, random_state=seed, stratify=y)
    except ValueError:
        # too few members of some class, or fewer holdout items than classes
        keep, hold = train_test_split(idx, test_size=n_holdout, random_state=seed, stratify=None)
    return np.asarray(keep), np.asarray(hold)


def _check_fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise DataError(f"{label} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**32:
        raise DataError(f"split_seed must be an integer in [0, 2**32), got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Public loading entry point
# --------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    root: PathLike = ".data",
    download: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
) -> DataBundle:
    """Load data set ``name`` and split it into train / val / test (see the module docstring).

    ``root`` is where files live (torchvision layout); with ``download=True`` missing files of
    mnist / fashion_mnist / cifar10 are fetched there. ``synthetic`` holds the options of the
    ``synthetic`` data set and is ignored by the others.
    """
    entry = _entry(name)
    root_path = _as_root(root)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    split_seed = _check_seed(split_seed)

    missing = _missing_files(entry, root_path)
    if missing:
        if not download or entry.downloader is None:
            raise _missing_error(name, missing)
        entry.downloader(root_path)
        missing = _missing_files(entry, root_path)
        if missing:
            raise DataError(f"download of '{name}' finished but {missing[0].describe()} is still missing")

    options: Mapping[str, Any] = (synthetic or {}) if name == "synthetic" else {}
    raw = entry.loader(root=root_path, options=options, split_seed=split_seed)
    input_shape = tuple(int(d) for d in raw.get("input_shape", entry.info.input_shape))
    num_classes = int(raw.get("num_classes", entry.info.num_classes))

    x_train, y_train = _as_numpy(raw["x_train"]), _as_numpy(raw["y_train"])
    if raw.get("x_test") is None:
        n = len(y_train)
        n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
        if n - n_test - n_val < 1:
            raise DataError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data "
                f"out of {n} samples of '{name}'; lower them"
            )
        rest, test = _split(y_train, n_test, split_seed)
        keep, val = _split(y_train[rest], n_val, split_seed)
        train, val = rest[keep], rest[val]
        x_test, y_test = x_train[test], y_train[test]
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[train], y_train[train]
    else:
        x_test, y_test = _as_numpy(raw["x_test"]), _as_numpy(raw["y_test"])
        if raw.get("x_val") is None:
            n = len(y_train)
            n_val = _count(val_fraction, n)
            if n - n_val < 1:
                raise DataError(f"val_fraction={val_fraction} leaves no training data out of {n} samples; lower it")
            keep, val = _split(y_train, n_val, split_seed)
            x_val, y_val = x_train[val], y_train[val]
            x_train, y_train = x_train[keep], y_train[keep]
        else:
            x_val, y_val = _as_numpy(raw["x_val"]), _as_numpy(raw["y_val"])

    x_train = x_train.astype(np.float32, copy=False)
    x_val = x_val.astype(np.float32, copy=False)
    x_test = x_test.astype(np.float32, copy=False)
    if entry.standardize and len(x_train):
        mean = float(x_train.mean(dtype=np.float64))
        std = float(x_train.std(dtype=np.float64)) or 1.0
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

    splits = {}
    for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test)):
        x = np.ascontiguousarray(x, dtype=np.float32).reshape((len(x), *input_shape))
        y = np.asarray(y).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"'{name}' {split} split has {len(x)} inputs but {len(y)} targets; the files are inconsistent")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"'{name}' {split} split has labels outside [0, {num_classes}); the files are corrupt")
        splits[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return DataBundle(
        name=name,
        input_shape=input_shape,
        num_classes=num_classes,
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
    )


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


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


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@register_dataset(
    "digits",
    input_shape=(1, 8, 8),
    num_classes=10,
    has_test_split=False,
    description="scikit-learn's bundled 8x8 handwritten digits (1797 images), pixels scaled to [0, 1]",
)
def _load_digits(*, root: Path, options: Mapping[str, Any], split_seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return {"x_train": x, "y_train": np.asarray(digits.target, dtype=np.int64)}


# --------------------------------------------------------------------------------------------------
# mnist1d
# --------------------------------------------------------------------------------------------------

_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the ``mnist1d`` package's default arguments, offline.

    ``make_dataset`` reseeds the global RNGs, so Python's, NumPy's and torch's global RNG states are
    saved before and restored after, leaving the caller's random streams untouched.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise DataError(f"the mnist1d package is not importable ({exc}); install mnist1d==0.0.2.post1") from exc
        # make_dataset only generates (get_dataset is the function that downloads; it is not used)
        ds = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
    return {
        "x": np.asarray(ds["x"], dtype=np.float32),
        "y": np.asarray(ds["y"], dtype=np.int64),
        "x_test": np.asarray(ds["x_test"], dtype=np.float32),
        "y_test": np.asarray(ds["y_test"], dtype=np.int64),
    }


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in _MNIST1D_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable MNIST-1D cache %s (%s); regenerating it", path, exc)
        return None
    ok = (
        arrays["x"].ndim == 2
        and arrays["x_test"].ndim == 2
        and arrays["x"].shape[1] == arrays["x_test"].shape[1] == 40
        and arrays["y"].shape == (arrays["x"].shape[0],)
        and arrays["y_test"].shape == (arrays["x_test"].shape[0],)
    )
    if not ok:
        log.warning("ignoring malformed MNIST-1D cache %s; regenerating it", path)
        return None
    return arrays


def _write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@register_dataset(
    "mnist1d",
    input_shape=(1, 40),
    num_classes=10,
    has_test_split=True,
    description="MNIST-1D: 1-D signals of length 40 generated offline (4000 train / 1000 test), standardized",
    standardize=True,
)
def _load_mnist1d(*, root: Path, options: Mapping[str, Any], split_seed: int) -> dict[str, Any]:
    path = root / "mnist1d" / "mnist1d.npz"
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            _write_npz_atomic(path, arrays)
        except OSError as exc:
            log.warning("could not cache MNIST-1D at %s (%s); it will be generated again next time", path, exc)
    return {
        "x_train": arrays["x"][:, None, :],
        "y_train": arrays["y"],
        "x_test": arrays["x_test"][:, None, :],
        "y_test": arrays["y_test"],
    }


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------

_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n_train": 96,
    "n_val": 48,
    "n_test": 48,
    "num_classes": 3,
    "input_shape": (1, 8, 8),
    "seed": 0,
}


def _synthetic_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise DataError(f"synthetic options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(map(str, options)) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(
            f"unknown synthetic option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_SYNTHETIC_DEFAULTS))}"
        )
    opts = dict(_SYNTHETIC_DEFAULTS)
    opts.update({str(k): v for k, v in options.items()})

    def integer(key: str, minimum: int) -> int:
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
            raise DataError(f"synthetic.{key} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    out = {
        "n_train": integer("n_train", 1),
        "n_val": integer("n_val", 0),
        "n_test": integer("n_test", 0),
        "num_classes": integer("num_classes", 2),
        "seed": integer("seed", 0),
    }
    shape = opts["input_shape"]
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or not 2 <= len(shape) <= 3
        or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or int(d) < 1 for d in shape)
    ):
        raise DataError(f"synthetic.input_shape must be a list [C, H, W] or [C, L] of positive integers, got {shape!r}")
    out["input_shape"] = tuple(int(d) for d in shape)
    return out


def _make_blobs(n: int, num_classes: int, input_shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
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


@register_dataset(
    "synthetic",
    input_shape=_SYNTHETIC_DEFAULTS["input_shape"],
    num_classes=_SYNTHETIC_DEFAULTS["num_classes"],
    has_test_split=True,
    description="tiny deterministic Gaussian blobs rendered as images (default 96 train / 48 val / 48 test)",
)
def _load_synthetic(*, root: Path, options: Mapping[str, Any], split_seed: int) -> dict[str, Any]:
    opts = _synthetic_options(options)
    n_total = opts["n_train"] + opts["n_val"] + opts["n_test"]
    x, y = _make_blobs(n_total, opts["num_classes"], opts["input_shape"], opts["seed"])
    rest, test = _split(y, opts["n_test"], split_seed)
    keep, val = _split(y[rest], opts["n_val"], split_seed)
    train, val = rest[keep], rest[val]
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_val": x[val],
        "y_val": y[val],
        "x_test": x[test],
        "y_test": y[test],
        "input_shape": opts["input_shape"],
        "num_classes": opts["num_classes"],
    }


# --------------------------------------------------------------------------------------------------
# Downloading (mnist, fashion_mnist, cifar10); never used by the tests
# --------------------------------------------------------------------------------------------------

_DOWNLOAD_TIMEOUT_S = 60


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch ``url`` to ``dest`` atomically, verifying ``md5``; any failure is a one-line DataError."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {dest.parent} ({exc}); point data.root at a writable directory") from exc
    tmp = dest.with_name(dest.name + ".part")
    log.info("downloading %s to %s", url, dest)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ensemble-service"})
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError and timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        reason = str(getattr(exc, "reason", None) or exc).replace("\n", " ") or type(exc).__name__
        raise DataError(
            f"could not download {url} ({reason}); check the network, or fetch the file yourself to {dest}"
        ) from exc
    if md5 is not None:
        got = _md5(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {url} (md5 {got}, expected {md5}); retry the download")
    os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}); delete it and download it again") from exc


def _read_idx(path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, then ``ndim``
    big-endian uint32 dimensions, then the data, big-endian. Raises :class:`DataError` if corrupt."""
    raw = _read_bytes(path)
    fix = "the file is corrupt; delete it and download it again"
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file; {fix}")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path} has IDX magic number {magic:#010x}, expected {expected_magic:#010x}; {fix}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} has an invalid IDX magic number {magic:#010x}; {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[raw[2]]
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its IDX header {tuple(dims)} announces {expected}; {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_specs(folder: str) -> Callable[[Path], list[_FileSpec]]:
    def specs(root: Path) -> list[_FileSpec]:
        raw = root / folder / "raw"
        return [_FileSpec((raw / f, raw / (f + ".gz"))) for f in _IDX_FILES.values()]

    return specs


def _load_idx_pair(images_spec: _FileSpec, labels_spec: _FileSpec) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = images_spec.found(), labels_spec.found()
    assert images_path is not None and labels_path is not None  # checked by load_dataset
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of shape {images.shape[1:]}, expected (28, 28); the file is corrupt")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images; "
            f"the files do not belong together"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} has labels above 9; the file is corrupt")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


def _idx_loader(folder: str) -> Loader:
    def load(*, root: Path, options: Mapping[str, Any], split_seed: int) -> dict[str, Any]:
        tr_img, tr_lab, te_img, te_lab = _idx_specs(folder)(root)
        x_train, y_train = _load_idx_pair(tr_img, tr_lab)
        x_test, y_test = _load_idx_pair(te_img, te_lab)
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    return load


def _idx_downloader(folder: str, base_url: str, md5s: Mapping[str, str]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        for spec in _idx_specs(folder)(root):
            if spec.found() is None:
                gz = spec.candidates[1]
                _download(base_url + gz.name, gz, md5s.get(gz.name))

    return download


# Checksums as published with the files (the same torchvision verifies).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

register_dataset(
    "mnist",
    input_shape=(1, 28, 28),
    num_classes=10,
    has_test_split=True,
    description="MNIST handwritten digits (60000 train / 10000 test), torchvision layout <root>/MNIST/raw",
    required_files=_idx_specs("MNIST"),
    downloader=_idx_downloader("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", _MNIST_MD5),
)(_idx_loader("MNIST"))

register_dataset(
    "fashion_mnist",
    input_shape=(1, 28, 28),
    num_classes=10,
    has_test_split=True,
    description="Fashion-MNIST (60000 train / 10000 test), torchvision layout <root>/FashionMNIST/raw",
    required_files=_idx_specs("FashionMNIST"),
    downloader=_idx_downloader(
        "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FASHION_MNIST_MD5
    ),
)(_idx_loader("FashionMNIST"))


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
_CIFAR_TEST = "test_batch"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

_SAFE_GLOBALS: dict[tuple[str, str], Any] | None = None


def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle may reference: plain builtins, ``_codecs.encode`` (how
    protocol-2 pickles spell bytes) and NumPy's array / dtype / scalar reconstruction."""
    global _SAFE_GLOBALS
    if _SAFE_GLOBALS is None:
        import _codecs

        try:
            from numpy._core import multiarray as _multiarray, numeric as _numeric
        except ImportError:  # numpy < 2
            from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore[no-redef]
        allowed: dict[tuple[str, str], Any] = {}
        for module in ("builtins", "__builtin__"):
            for builtin in (dict, list, bytes, str, int):
                allowed[(module, builtin.__name__)] = builtin
        allowed[("_codecs", "encode")] = _codecs.encode
        allowed[("numpy", "ndarray")] = np.ndarray
        allowed[("numpy", "dtype")] = np.dtype
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(module, "_reconstruct")] = _multiarray._reconstruct
            allowed[(module, "scalar")] = _multiarray.scalar
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = _numeric._frombuffer
        _SAFE_GLOBALS = allowed
    return _SAFE_GLOBALS


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _safe_globals().get((module, name))
        if obj is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return obj


def _get(d: Mapping[Any, Any], key: str) -> Any:
    if key in d:
        return d[key]
    return d.get(key.encode("ascii"))


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "delete it and download the data set again"
    try:
        with open(path, "rb") as fh:
            batch = _RestrictedUnpickler(fh, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to unpickle {path}: it references the forbidden global '{exc}' "
            f"(a CIFAR-10 batch holds only arrays, lists and strings); {fix}"
        ) from None
    except Exception as exc:  # any unpickling failure means a corrupt file
        reason = str(exc).replace("\n", " ") or type(exc).__name__
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({reason}); {fix}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch dict; {fix}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path} has no uint8 'data' array of shape (N, 3072) (found {shape}); {fix}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} has non-integer 'labels'; {fix}") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} has {labels.size} labels for {data.shape[0]} images; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path} has labels outside 0..9; {fix}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_specs(root: Path) -> list[_FileSpec]:
    folder = root / _CIFAR_DIR
    return [_FileSpec((folder / name,)) for name in (*_CIFAR_TRAIN, _CIFAR_TEST)]


@register_dataset(
    "cifar10",
    input_shape=(3, 32, 32),
    num_classes=10,
    has_test_split=True,
    description="CIFAR-10 colour images (50000 train / 10000 test), torchvision layout <root>/cifar-10-batches-py",
    required_files=_cifar_specs,
    downloader=lambda root: _download_cifar10(root),
)
def _load_cifar10(*, root: Path, options: Mapping[str, Any], split_seed: int) -> dict[str, Any]:
    folder = root / _CIFAR_DIR
    train = [_load_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    x_test, y_test = _load_cifar_batch(folder / _CIFAR_TEST)
    x_train = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    y_train = np.concatenate([y for _, y in train])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test.astype(np.float32) / 255.0, "y_test": y_test}


def _download_cifar10(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    if not (archive.is_file() and _md5(archive) == _CIFAR_TGZ_MD5):
        _download(_CIFAR_URL, archive, _CIFAR_TGZ_MD5)
    _extract_cifar(archive, root)
    for name, md5 in _CIFAR_MD5.items():
        path = root / _CIFAR_DIR / name
        if _md5(path) != md5:
            raise DataError(f"{path} failed its md5 check after extraction; delete {root / _CIFAR_DIR} and retry")
    archive.unlink(missing_ok=True)


def _extract_cifar(archive: Path, root: Path) -> None:
    """Extract only regular files and folders under ``cifar-10-batches-py/``; no links, no absolute
    paths, no ``..``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if (
                    member.name.startswith(("/", "\\"))
                    or not parts
                    or parts[0] != _CIFAR_DIR
                    or ".." in parts
                    or not (member.isfile() or member.isdir())
                ):
                    log.warning("skipping unexpected archive member %r in %s", member.name, archive)
                    continue
                members.append(member)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(root, members=members)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); delete it and retry the download") from exc

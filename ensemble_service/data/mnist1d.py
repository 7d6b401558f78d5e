"""MNIST-1D (Greydanus 2020): 1-D signals of length 40, generated offline and cached.

Generated with the ``mnist1d`` package's default arguments (never downloaded) and cached at
``<root>/mnist1d/mnist1d.npz``: 4000 train / 1000 test signals, 10 classes. Raw inputs are the
signals (``[40]``); the model sees them standardized with one scalar mean and standard deviation
of the final *train* split (after the validation split was taken out) as ``(1, 40)``.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.bundled import DIGIT_NAMES
from ensemble_service.data.preprocess import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Mnist1dData(DataConfig):
    name: str = "mnist1d"
    root: str = "./data"          # the cache lives in <root>/mnist1d/mnist1d.npz


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


def _read_mnist1d_cache(path: Path) -> Optional[dict]:
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


@register_source
class Mnist1d(Source):
    name = "mnist1d"
    schema = Mnist1dData
    description = "MNIST-1D: 1-D signals of length 40 generated offline (4000 train / 1000 test), standardized"
    has_test_split = True

    def static_shape(self, cfg):
        return (1, 40), 10

    def load(self, cfg: Mnist1dData) -> Raw:
        path = Path(os.path.expanduser(cfg.root)) / "mnist1d" / "mnist1d.npz"
        arrays = _read_mnist1d_cache(path)
        if arrays is None:
            arrays = _generate_mnist1d()
            try:
                _write_npz_atomic(path, arrays)
            except OSError as exc:
                log.warning("could not cache MNIST-1D at %s (%s); it will be generated again next time", path, exc)
        pipeline = Pipeline((40,), [{"op": "standardize", "mode": "scalar"}, {"op": "reshape", "shape": [1, 40]}])
        return Raw(arrays["x"], arrays["y"], pipeline, x_test=arrays["x_test"], y_test=arrays["y_test"],
                   num_classes=10, class_names=list(DIGIT_NAMES), label="mnist1d")

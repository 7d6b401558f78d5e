"""``data=arrays data.path=FILE.npz``: the user's own arrays.

The archive holds ``x`` (numbers, ``[N, ...]``) and ``y`` (integer labels 0..C-1), and optionally
``x_val``/``y_val`` and ``x_test``/``y_test`` (otherwise split off by ``data.val_fraction`` /
``data.test_fraction``, stratified) and ``class_names`` (C strings). It is read with
``allow_pickle=False``. Raw inputs are ``x``'s rows as they are; ``data.standardize=true``
standardizes each feature (element of a row) with the training split's mean and std.

``data.streaming=true`` streams an archive larger than memory (written by ``numpy.savez``, local or
``s3://``/``gs://``) through Ray Data instead of loading it: :mod:`.arrays_stream`.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ensemble_service.data.arrays_stream import SPLIT_KEYS, check_pairs
from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.preprocess import Pipeline



@dataclass
class ArraysData(DataConfig):
    name: str = "arrays"
    path: str = ""              # a .npz archive with x, y (and optionally x_val, y_val, x_test, y_test, class_names)
    standardize: bool = False   # standardize each feature with the training split's mean and std
    streaming: bool = False     # stream the archive through Ray Data (it needs numpy.savez, not savez_compressed)
    read_tasks: int = 1         # concurrent Ray Data read tasks per member (streaming)
    rows_per_unit: Optional[int] = None   # rows per read unit (streaming; null: about 8 MiB of inputs)


def path_of(cfg: Any, key: str = "path", suffixes=None) -> Path:
    """``data.<key>`` as an existing file, else a one-line DataError."""
    value = getattr(cfg, key, "")
    what = f"data.{key}"
    if not value:
        hint = f" (e.g. {what}=data/train{suffixes[0]})" if suffixes else ""
        raise DataError(f"data={cfg.name} needs {what}{hint}")
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise DataError(f"{what}={value}: no such file (relative paths are taken from {os.getcwd()})")
    if not path.is_file():
        raise DataError(f"{what}={value} is a directory, not a file")
    if suffixes and path.suffix.lower() not in suffixes:
        raise DataError(f"{what}={value}: expected a {' or '.join(suffixes)} file")
    return path


def labels(y: Any, where: str) -> np.ndarray:
    """Integer class labels >= 0 from ``y`` (integral floats allowed); a one-line DataError otherwise."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where} must be 1-D (one label per row), got shape {list(y.shape)}")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise DataError(f"{where} must hold integer class labels 0..C-1, got {y.dtype} values")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{where} must hold integer class labels 0..C-1; found non-integer values")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{where} must hold class labels 0..C-1; found {int(y.min())}")
    return y


def inputs(x: Any, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise DataError(f"{where} must hold numbers, got {x.dtype} values")
    if x.ndim < 2:
        raise DataError(f"{where} must have one row per sample ([N, ...] with at least 2 dimensions), "
                        f"got shape {list(x.shape)}")
    return x


def class_names_of(value: Any, where: str) -> Optional[List[str]]:
    if value is None:
        return None
    names = np.asarray(value)
    if names.ndim != 1 or names.dtype.kind not in "USO":
        raise DataError(f"{where} must be a 1-D array of strings, got {names.dtype} of shape {list(names.shape)}")
    return [str(n) for n in names.tolist()]


@register_source
class Arrays(Source):
    name = "arrays"
    schema = ArraysData
    description = "your arrays: a .npz with x, y (optional x_val, y_val, x_test, y_test, class_names)"

    def check(self, cfg: ArraysData) -> None:
        from ensemble_service.data import arrays_stream

        arrays_stream.check_options(cfg)
        if cfg.streaming:
            arrays_stream.check(cfg)
        else:
            path_of(cfg, suffixes=(".npz",))

    def load_stream(self, cfg: ArraysData):
        from ensemble_service.data import arrays_stream

        return arrays_stream.load_stream(cfg, labels=labels, class_names_of=class_names_of)

    def read_unit(self, stream, path: str, unit: int):
        from ensemble_service.data import arrays_stream

        return arrays_stream.read_unit(stream, path, unit)

    def split_of(self, stream, path: str, keys: np.ndarray) -> np.ndarray:
        from ensemble_service.data import arrays_stream

        return arrays_stream.split_of(stream, path, keys)

    def unit_splits(self, stream, path: str):
        from ensemble_service.data import arrays_stream

        return arrays_stream.unit_splits(stream, path)

    def load(self, cfg: ArraysData) -> Raw:
        path = path_of(cfg, suffixes=(".npz",))
        where = f"data.path={cfg.path}"
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            why = _first(exc)
            if "pickled" in why:  # numpy's guess for a file that is neither a ZIP archive nor a .npy file
                why = "it is not a ZIP archive as numpy.savez writes, nor a .npy file"
            raise DataError(f"{where}: cannot read it as a .npz archive ({why})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{where} holds one array; save inputs and labels together with "
                            "numpy.savez(path, x=inputs, y=labels)")
        with archive:
            found = sorted(archive.files)
            arrays: Dict[str, np.ndarray] = {}
            for key in ("x", "y", "x_val", "y_val", "x_test", "y_test", "class_names"):
                if key in archive.files:
                    try:
                        arrays[key] = archive[key]
                    except ValueError as exc:  # object arrays need pickle: refused
                        raise DataError(f"{where}: array {key!r} cannot be read without unpickling "
                                        f"({_first(exc)}); save plain numeric arrays") from None
        check_pairs(found, where)
        out = {}
        for xk, yk in SPLIT_KEYS:
            if xk in arrays:
                out[xk], out[yk] = inputs(arrays[xk], f"{where}: {xk}"), labels(arrays[yk], f"{where}: {yk}")
                if len(out[xk]) != len(out[yk]):
                    raise DataError(f"{where}: {xk} has {len(out[xk])} rows but {yk} has {len(out[yk])} labels")
        shape = out["x"].shape[1:]
        for xk in ("x_val", "x_test"):
            if xk in out and out[xk].shape[1:] != shape:
                raise DataError(f"{where}: {xk} rows have shape {list(out[xk].shape[1:])} but x rows {list(shape)}")
        ops = [{"op": "standardize", "mode": "feature"}] if cfg.standardize else []
        return Raw(out["x"], out["y"], Pipeline(shape, ops), x_val=out.get("x_val"), y_val=out.get("y_val"),
                   x_test=out.get("x_test"), y_test=out.get("y_test"),
                   class_names=class_names_of(arrays.get("class_names"), f"{where}: class_names"),
                   label=f"arrays:{path.name}")


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

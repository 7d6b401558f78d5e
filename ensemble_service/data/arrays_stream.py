"""``data=arrays data.path=FILE.npz data.streaming=true``: an ``.npz`` larger than memory, streamed.

The archive (a local path or an object-store URI: ``s3://BUCKET/KEY.npz``, ``gs://...``) must be
written by ``numpy.savez`` (uncompressed): :mod:`.npz` reads a unit's rows in place, one ranged read
each. Read units are slices of ``data.rows_per_unit`` rows (default: about 8 MiB of model inputs)
of ``x`` (with the same rows of ``y``), and of ``x_val``/``x_test`` where the archive has them.

The driver reads every unit once (no Ray yet, one unit in memory at a time) to check it as the
in-memory load does (numbers, labels integers >= 0, no NaN or infinite values, consistent shapes),
count the classes (1 + the largest label, or the number of ``class_names``), split the rows and
fit ``data.standardize`` on the training rows (:class:`~.streaming.Moments`). ``x``'s rows are split
by their content keys (:func:`~.streaming.assign_split`; not stratified) into training, validation
(``data.val_fraction``, unless the archive has ``x_val``) and test (``data.test_fraction``, unless it
has ``x_test``); the units of ``x_val`` and ``x_test`` belong wholly to their split.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import numpy as np

from ensemble_service.data import npz
from ensemble_service.data.base import DataError, check_classes_present, check_split_counts
from ensemble_service.data.preprocess import Pipeline
from ensemble_service.data.streamed import StreamingBundle
from ensemble_service.data.streaming import (
    TEST, TRAIN, VAL, Moments, StreamSpec, assign_split, labels_in_key_order, row_keys,
)

SPLIT_KEYS = (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test"))


def check_pairs(found, where: str) -> None:
    """The archive's array names ``found`` hold ``x`` and ``y``, and each split's inputs with its labels
    (one-line DataError otherwise); the in-memory load checks the same (``arrays.py``)."""
    for xk, yk in SPLIT_KEYS:
        if (xk in found) != (yk in found):
            have, lack = (xk, yk) if xk in found else (yk, xk)
            raise DataError(f"{where} has {have!r} but no {lack!r}")
    if "x" not in found:
        raise DataError(f"{where} has no arrays 'x' and 'y' (found: {', '.join(sorted(found)) or 'none'}); "
                        "save them with numpy.savez(path, x=inputs, y=labels)")
UNIT_BYTES = 8 * 2 ** 20      # a read unit's model inputs (float32), when data.rows_per_unit is not set
FIXED = {"x_val": VAL, "x_test": TEST}


def resolved(path: str) -> str:
    """data.path as the workers must see it: a URI as given, a local path made absolute here."""
    import os
    from pathlib import Path

    from ensemble_service import storage

    return path if storage.is_remote(path) else str(Path(os.path.expanduser(path)).resolve())


def check_options(cfg) -> None:
    """data.read_tasks and data.rows_per_unit (whether or not the set streams)."""
    if isinstance(cfg.read_tasks, bool) or not isinstance(cfg.read_tasks, int) or cfg.read_tasks < 1:
        raise DataError(f"data.read_tasks must be at least 1, got {cfg.read_tasks!r}")
    if cfg.rows_per_unit is not None and (isinstance(cfg.rows_per_unit, bool) or not isinstance(cfg.rows_per_unit, int)
                                          or cfg.rows_per_unit < 1):
        raise DataError(f"data.rows_per_unit must be at least 1 (or null), got {cfg.rows_per_unit!r}")


def check(cfg) -> None:
    """The cheap pre-flight: options, and the archive is there."""
    check_options(cfg)
    if not cfg.path:
        raise DataError("data=arrays needs data.path (e.g. data.path=data/train.npz)")
    if not str(cfg.path).lower().split("?")[0].endswith(".npz"):
        raise DataError(f"data.path={cfg.path}: expected a .npz file")
    npz.open_archive(resolved(cfg.path), f"data.path={cfg.path}")


def _members(cfg, where: str, class_names_of: Callable):
    """(filesystem, path, {key: Member}, class_names) after checking the arrays' kinds and shapes."""
    fs, path = npz.open_archive(resolved(cfg.path), where)
    with fs.open_input_file(path) as f:
        members = npz.locate(f, where)
        names = npz.read_whole(f, "class_names", where) if "class_names" in members else None
    check_pairs(members, where)
    shape = members["x"].shape[1:]
    for xk, yk in SPLIT_KEYS:
        if xk not in members:
            continue
        x, y = members[xk], members[yk]
        if np.dtype(x.dtype).kind not in "biuf":
            raise DataError(f"{where}: {xk} must hold numbers, got {np.dtype(x.dtype)} values")
        if len(x.shape) < 2:
            raise DataError(f"{where}: {xk} must have one row per sample ([N, ...] with at least 2 dimensions), "
                            f"got shape {list(x.shape)}")
        if len(y.shape) != 1:
            raise DataError(f"{where}: {yk} must be 1-D (one label per row), got shape {list(y.shape)}")
        if np.dtype(y.dtype).kind not in "biuf":
            raise DataError(f"{where}: {yk} must hold integer class labels 0..C-1, got {np.dtype(y.dtype)} values")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{where}: {xk} has {x.shape[0]} rows but {yk} has {y.shape[0]} labels")
        if x.shape[1:] != shape:
            raise DataError(f"{where}: {xk} rows have shape {list(x.shape[1:])} but x rows {list(shape)}")
    return fs, path, members, class_names_of(names, f"{where}: class_names")


def _unit_rows(stream: StreamSpec, key: str, unit: int) -> Tuple[int, int]:
    r = int(stream.extra["rows_per_unit"])
    return unit * r, (unit + 1) * r


def _raw_unit(stream: StreamSpec, key: str, unit: int) -> Tuple[np.ndarray, np.ndarray]:
    fs, path = npz.open_archive(stream.uri, f"data.path={stream.uri}")
    a, b = _unit_rows(stream, key, unit)
    with fs.open_input_file(path) as f:
        x = npz.read_rows(f, npz.Member.from_dict(stream.extra["members"][key]), a, b)
        y = npz.read_rows(f, npz.Member.from_dict(stream.extra["members"]["y" + key[1:]]), a, b)
    return x, y


def read_unit(stream: StreamSpec, key: str, unit: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of unit ``unit`` of array ``key`` ("x", "x_val", "x_test") and their labels (int64), the
    inputs in the archive's dtype (the pipeline makes them float32)."""
    x, y = _raw_unit(stream, key, unit)
    return x, y.astype(np.int64)


def split_of(stream: StreamSpec, key: str, keys: np.ndarray) -> np.ndarray:
    if key in FIXED:
        return np.full(len(keys), FIXED[key], dtype=np.int8)
    return assign_split(keys, stream.val_fraction, stream.test_fraction, stream.split_seed)


def unit_splits(stream: StreamSpec, key: str) -> Tuple[int, ...]:
    if key in FIXED:
        return (FIXED[key],)
    return (TRAIN,) + ((VAL,) if stream.val_fraction > 0 else ()) + ((TEST,) if stream.test_fraction > 0 else ())


def _checked(stream: StreamSpec, key: str, unit: int, where: str, labels: Callable) -> Tuple[np.ndarray, np.ndarray]:
    """A unit read as the workers read it, checked as the in-memory load checks the whole array."""
    x, y = _raw_unit(stream, key, unit)
    y = labels(y, f"{where}: y{key[1:]}")
    a, _ = _unit_rows(stream, key, unit)
    rows = f"rows {a}-{a + len(y) - 1}"
    if x.dtype.kind == "f":
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise DataError(f"{where}: {key} has {bad} NaN or infinite value(s) ({rows}); clean or drop them")
        if x.dtype.itemsize > 4:
            big = int((np.abs(x) > np.finfo(np.float32).max).sum())
            if big:
                raise DataError(f"{where}: {key} has {big} value(s) beyond float32's range (about 3.4e38) "
                                f"({rows}); rescale them")
    return x, y


def load_stream(cfg, labels: Callable, class_names_of: Callable) -> StreamingBundle:
    """The driver's pass (see the module docstring); ``labels`` and ``class_names_of`` are the
    in-memory source's checks (:mod:`.arrays`), applied to each unit's labels and to the class names."""
    from ensemble_service.data.splits import check_fraction, check_seed

    check(cfg)
    where = f"data.path={cfg.path}"
    seed = check_seed(cfg.split_seed)
    _, _, members, class_names = _members(cfg, where, class_names_of)
    # a ready-made split is kept: x's rows go to it with fraction 0
    val_fraction = 0.0 if "x_val" in members else check_fraction("val_fraction", cfg.val_fraction)
    test_fraction = 0.0 if "x_test" in members else check_fraction("test_fraction", cfg.test_fraction)
    shape = members["x"].shape[1:]
    r = int(cfg.rows_per_unit or max(1, UNIT_BYTES // (4 * max(1, math.prod(shape)))))
    units = tuple((xk, u, min(r, members[xk].shape[0] - u * r)) for xk, _ in SPLIT_KEYS if xk in members
                  for u in range(math.ceil(members[xk].shape[0] / r)))
    extra = {"members": {k: m.as_dict() for k, m in members.items() if k != "class_names"}, "rows_per_unit": r}
    label = f"arrays:{resolved(cfg.path).rstrip('/').rsplit('/', 1)[-1]}"

    def spec(preprocessing) -> StreamSpec:
        return StreamSpec(source="arrays", uri=resolved(cfg.path), units=units, features=(), target="", classes=(),
                          preprocessing=preprocessing, val_fraction=val_fraction, test_fraction=test_fraction,
                          split_seed=seed, read_tasks=int(cfg.read_tasks), extra=extra)

    stream = spec({})
    moments = Moments()
    counts = {TRAIN: 0, VAL: 0, TEST: 0}
    held: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {VAL: [], TEST: []}
    top, present = -1, set()
    for key, unit, _ in units:
        x, y = _checked(stream, key, unit, where, labels)
        keys = row_keys(x, y)
        split = split_of(stream, key, keys)
        if cfg.standardize:
            moments.add(x[split == TRAIN])
        for s in counts:
            counts[s] += int((split == s).sum())
        for s in held:
            held[s].append((keys[split == s], y[split == s]))
        if len(y):
            top = max(top, int(y.max()))
            present.update(np.unique(y).tolist())
    num_classes = top + 1
    if len(present) < 2:
        raise DataError(f"{where}: samples of only {len(present)} class(es) (labels {sorted(present)}); "
                        "a classifier needs at least 2")
    check_split_counts(counts, where, val_fraction, test_fraction)
    if class_names is None:
        check_classes_present(present, num_classes, where)
    if class_names is not None and len(class_names) != num_classes:
        if len(class_names) > num_classes:
            num_classes = len(class_names)  # classes without samples still have names
        else:
            raise DataError(f"{where} names {len(class_names)} classes but its labels have {num_classes}")
    ops = []
    if cfg.standardize:
        std = moments.std()
        std[~(std > 1e-12)] = 1.0
        ops = [{"op": "standardize", "mode": "feature", "mean": moments.mean.tolist(), "std": std.tolist()}]
    pipeline = Pipeline(shape, ops)

    return StreamingBundle(name="arrays", input_shape=tuple(pipeline.input_shape), num_classes=num_classes,
                           y_val=labels_in_key_order(held[VAL]), y_test=labels_in_key_order(held[TEST]), stream=spec(pipeline.to_dict()),
                           train_size=counts[TRAIN], class_names=class_names, preprocessing=pipeline.to_dict(),
                           label=label)

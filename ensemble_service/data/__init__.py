"""Data: the built-in data sets and the user's own, split and preprocessed the same way.

Sources (one module each, one registry :data:`SOURCES`; pick one with ``data=<name>``):

* ``digits``, ``synthetic`` (:mod:`.bundled`): no files needed;
* ``mnist1d`` (:mod:`.mnist1d`): generated offline, cached under ``data.root``;
* ``mnist``, ``fashion_mnist``, ``cifar10`` (:mod:`.torchvision`): torchvision's on-disk layout;
* ``arrays`` (``data.path=FILE.npz``), ``csv`` (``data.path=FILE.csv data.target=COLUMN``),
  ``image_folder`` (``data.root=DIR data.image_size=S``): the user's files;
* ``custom`` (``data._target_=mypkg.data.load``): the user's function;
* ``parquet`` (``data.path=DIR_OR_URI data.target=COLUMN``): tables larger than memory, streamed by
  the members through Ray Data (:mod:`.streaming`: a :class:`StreamingBundle` instead of tensors).
  ``arrays`` and ``image_folder`` stream too with ``data.streaming=true`` (:mod:`.arrays_stream`,
  :mod:`.image_stream`).

Everything here is plain PyTorch / NumPy: no Ray, no MLflow. The driver calls :func:`load` once
and ships the :class:`DataBundle` (plain tensors, picklable) to the workers through Ray's object
store. Each source returns raw inputs and a preprocessing :class:`Pipeline`; :func:`load` splits
(see :mod:`.splits`), fits the pipeline on the training split, and applies it to every split. The
fitted pipeline (``DataBundle.preprocessing``) and the class names travel with the ensemble.

Every problem (missing file, missing key or column, labels that are not integers 0..C-1, NaN or
infinite inputs, fewer than 2 classes, an image that cannot be decoded, mismatched lengths) is a
:class:`DataError` with one line, raised on the driver before Ray or MLflow start.
"""
from __future__ import annotations

from typing import Any, List, Union

import numpy as np
import torch

from ensemble_service.data.base import (
    SOURCES, DataBundle, DataConfig, DataError, DatasetInfo, Raw, Source, as_config, check_classes_present,
    register_source,
)
from ensemble_service.data.preprocess import Pipeline, PreprocessError
from ensemble_service.data.splits import bootstrap_indices, check_fraction, check_seed, count, split
from ensemble_service.data.streamed import StreamingBundle
from ensemble_service.data.streaming import is_streaming
from ensemble_service.data import bundled, mnist1d, torchvision, arrays, csvfile, image_folder, custom, parquet  # noqa: F401,E402

__all__ = [
    "SOURCES", "DataBundle", "DataConfig", "DataError", "DatasetInfo", "Pipeline", "PreprocessError", "Raw",
    "Source", "StreamingBundle", "as_config", "bootstrap_indices", "check", "info", "is_streaming", "list_datasets",
    "load", "load_dataset", "register_source",
]


def list_datasets() -> List[str]:
    """Names of the registered data sources, sorted."""
    return SOURCES.names()


def info(cfg: Union[str, DataConfig, dict]) -> DatasetInfo:
    """What is known about a data set without loading it (``input_shape``/``num_classes`` are None
    for the user's files, which only tell once read)."""
    if isinstance(cfg, str):
        return SOURCES.get(cfg).info(None)
    cfg = as_config(cfg)
    return SOURCES.get(cfg.name).info(cfg)


def check(cfg: Union[DataConfig, dict]) -> None:
    """Cheap pre-flight: unknown source, bad fractions or missing files raise DataError. Never
    touches the network."""
    cfg = as_config(cfg)
    source = SOURCES.get(cfg.name)
    check_fraction("val_fraction", cfg.val_fraction)
    check_fraction("test_fraction", cfg.test_fraction)
    check_seed(cfg.split_seed)
    source.check(cfg)


def load_dataset(name: str, **options: Any) -> DataBundle:
    """Load data set ``name`` with its options, e.g. ``load_dataset("csv", path="iris.csv", target="species")``."""
    return load({"name": name, **options})


def load(cfg: Union[DataConfig, dict]) -> Union[DataBundle, StreamingBundle]:
    """Load, split and preprocess the data set ``cfg`` describes (see the module docstring); a
    :class:`StreamingBundle` when ``data.streaming`` is true."""
    cfg = as_config(cfg)
    source = SOURCES.get(cfg.name)
    if getattr(cfg, "streaming", False):
        return source.load_stream(cfg)
    val_fraction = check_fraction("val_fraction", cfg.val_fraction)
    test_fraction = check_fraction("test_fraction", cfg.test_fraction)
    split_seed = check_seed(cfg.split_seed)
    raw = source.load(cfg)
    name = raw.label or cfg.name

    x_train, y_train = np.asarray(raw.x_train), np.asarray(raw.y_train)
    if len(x_train) != len(y_train):
        raise DataError(f"'{name}' has {len(x_train)} inputs but {len(y_train)} targets; the files are inconsistent")
    if raw.x_test is None:
        n = len(y_train)
        n_test = count(test_fraction, n)
        n_val = count(val_fraction, n) if raw.x_val is None else 0  # a given validation split is kept
        if n - n_test - n_val < 1:
            fractions = (f"val_fraction={val_fraction} and test_fraction={test_fraction} leave" if raw.x_val is None
                         else f"test_fraction={test_fraction} leaves")
            raise DataError(f"{fractions} no training data out of {n} samples of '{name}'; lower them")
        rest, test = split(y_train, n_test, split_seed)
        keep, val = split(y_train[rest], n_val, split_seed)
        train, val = rest[keep], rest[val]
        x_test, y_test = x_train[test], y_train[test]
        if raw.x_val is None:
            x_val, y_val = x_train[val], y_train[val]
        else:
            x_val, y_val = np.asarray(raw.x_val), np.asarray(raw.y_val)
        x_train, y_train = x_train[train], y_train[train]
    else:
        x_test, y_test = np.asarray(raw.x_test), np.asarray(raw.y_test)
        if raw.x_val is None:
            n = len(y_train)
            n_val = count(val_fraction, n)
            if n - n_val < 1:
                raise DataError(f"val_fraction={val_fraction} leaves no training data out of {n} samples; lower it")
            keep, val = split(y_train, n_val, split_seed)
            x_val, y_val = x_train[val], y_train[val]
            x_train, y_train = x_train[keep], y_train[keep]
        else:
            x_val, y_val = np.asarray(raw.x_val), np.asarray(raw.y_val)

    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    for split_name, (x, y) in splits.items():
        if len(x) != len(y):
            raise DataError(f"'{name}' {split_name} split has {len(x)} inputs but {len(y)} targets; "
                            "the files are inconsistent")
        if x.shape[1:] != x_train.shape[1:]:
            raise DataError(f"'{name}' {split_name} split has inputs of shape {list(x.shape[1:])} but the training "
                            f"inputs are {list(x_train.shape[1:])}; every split needs the same shape")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise DataError(f"'{name}' {split_name} split has {bad} NaN or infinite input value(s); clean or drop them")
        if x.dtype.kind == "f" and x.dtype.itemsize > 4 and x.size:
            big = int((np.abs(x) > np.finfo(np.float32).max).sum())  # would be infinite as float32 model inputs
            if big:
                raise DataError(f"'{name}' {split_name} split has {big} input value(s) beyond float32's range "
                                "(about 3.4e38); rescale them")
    if len(y_train) == 0:
        raise DataError(f"'{name}' has no training samples")
    seen = int(max(int(y.max()) for _, y in splits.values() if len(y))) + 1
    num_classes = int(raw.num_classes) if raw.num_classes is not None else seen
    if num_classes < 2:
        raise DataError(f"'{name}' has {num_classes} class; a classifier needs at least 2")
    present = np.unique(np.concatenate([np.asarray(y).ravel() for _, y in splits.values()]))
    if len(present) < 2:  # e.g. every label is 1: two classes by count, one in the data
        raise DataError(f"'{name}' has samples of only 1 class (label {present[0]}); a classifier needs at least 2")
    if raw.num_classes is None and raw.class_names is None:
        check_classes_present(present, num_classes, f"'{name}'")
    if raw.class_names is not None and len(raw.class_names) != num_classes:
        if raw.num_classes is None and len(raw.class_names) > num_classes:
            num_classes = len(raw.class_names)  # classes without samples still have names
        else:
            raise DataError(f"'{name}' names {len(raw.class_names)} classes but its labels have {num_classes}")

    pipeline = raw.pipeline.fit(x_train)
    out = {}
    for split_name, (x, y) in splits.items():
        y = np.asarray(y).astype(np.int64)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"'{name}' {split_name} split has labels outside [0, {num_classes}); the files are corrupt")
        x = pipeline.transform(x) if len(x) else np.zeros((0, *pipeline.input_shape), dtype=np.float32)
        out[split_name] = (torch.from_numpy(x), torch.from_numpy(y))
    return DataBundle(
        name=cfg.name, input_shape=tuple(pipeline.input_shape), num_classes=num_classes,
        x_train=out["train"][0], y_train=out["train"][1], x_val=out["val"][0], y_val=out["val"][1],
        x_test=out["test"][0], y_test=out["test"][1],
        class_names=list(raw.class_names) if raw.class_names is not None else None,
        preprocessing=pipeline.to_dict(), label=name,
    )


def describe(bundle: DataBundle) -> str:
    """One line for the submit output: the data set, its splits, classes and preprocessing."""
    sizes = bundle.sizes()
    pre = Pipeline.from_dict(bundle.preprocessing).describe() if bundle.preprocessing else "none"
    return (f"data {bundle.label}: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test, "
            f"inputs {list(bundle.input_shape)}, {bundle.num_classes} classes; preprocessing: {pre}")


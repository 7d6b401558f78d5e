"""What every data source shares: the error type, the config schema, the raw arrays a source
returns, the loaded bundle, and the source registry.

A *source* (one module each: bundled, mnist1d, torchvision, arrays, csv, image_folder, custom) reads
its files into a :class:`Raw`: inputs in the format a client will later send (pixel values, CSV
columns, ...), integer labels, optional ready-made splits, class names and the
:class:`~ensemble_service.data.preprocess.Pipeline` that turns raw inputs into model inputs.
``ensemble_service.data.load`` then splits, fits the pipeline on the training split and returns a
:class:`DataBundle` of float32 tensors; the pipeline travels with the registered ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import numpy as np
import torch

from ensemble_service.catalog import Catalog
from ensemble_service.data.preprocess import Pipeline


class DataError(ValueError):
    """A data set cannot be provided; the message (one line) names the problem and what to do."""


@dataclass
class DataConfig:
    """Keys every data source has (its own schema adds the rest; see conf/data/*.yaml)."""
    name: str = "digits"
    val_fraction: float = 0.2     # of the whole set (or of the official training split, when there is a test split)
    test_fraction: float = 0.2    # of the whole set, where there is no official test split
    split_seed: int = 0           # same seed, same splits


@dataclass
class Raw:
    """A source's data before splitting and preprocessing (NumPy arrays, raw format)."""
    x_train: np.ndarray
    y_train: np.ndarray
    pipeline: Pipeline
    x_val: Optional[np.ndarray] = None
    y_val: Optional[np.ndarray] = None
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    num_classes: Optional[int] = None          # None: 1 + the largest label
    class_names: Optional[List[str]] = None
    label: str = ""                            # what the parent run's ensemble.data tag says


@dataclass
class DataBundle:
    """A loaded, split data set: float32 model inputs ``(N, *input_shape)``, int64 targets.

    ``preprocessing`` is the fitted pipeline as a plain dict (raw inputs -> model inputs); it is
    stored with the registered ensemble, which applies it to what clients send."""

    name: str
    input_shape: Tuple[int, ...]
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: Optional[List[str]] = None
    preprocessing: Optional[Dict[str, Any]] = None
    label: str = ""

    def sizes(self) -> Dict[str, int]:
        """Number of samples per split: ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": int(self.y_train.shape[0]), "val": int(self.y_val.shape[0]),
                "test": int(self.y_test.shape[0])}


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a data source known without loading it (None where only the files tell)."""
    name: str
    input_shape: Optional[Tuple[int, ...]]
    num_classes: Optional[int]
    has_test_split: bool
    description: str


class Source:
    """One kind of data. Subclasses set ``name``, ``schema`` and ``description`` and implement
    :meth:`load`; :meth:`check` is the cheap pre-flight (files present) run before Ray starts."""

    name: ClassVar[str]
    schema: ClassVar[Type[DataConfig]] = DataConfig
    description: ClassVar[str] = ""
    has_test_split: ClassVar[bool] = False

    def info(self, cfg: Optional[DataConfig] = None) -> DatasetInfo:
        shape, classes = self.static_shape(cfg)
        return DatasetInfo(self.name, shape, classes, self.has_test_split, self.description)

    def static_shape(self, cfg: Optional[DataConfig]) -> Tuple[Optional[Tuple[int, ...]], Optional[int]]:
        """(input_shape, num_classes) when known without reading files, else (None, None)."""
        return None, None

    def check(self, cfg: DataConfig) -> None:
        """Raise DataError when the source cannot be read (missing files, bad options)."""

    def load(self, cfg: DataConfig) -> Raw:
        raise NotImplementedError

    def read_unit(self, stream, path: str, unit: int):
        """A streamed data set's read unit ``unit`` of ``path``: raw features and class indices."""
        raise NotImplementedError

    def load_stream(self, cfg: DataConfig):
        """A ``streaming.StreamingBundle`` (``data.streaming=true``): checked and described on the
        driver, streamed by the members through Ray Data."""
        raise DataError(f"data={self.name} cannot stream; set data.streaming=false")

    def split_of(self, stream, path: str, keys: np.ndarray) -> np.ndarray:
        """The split (``streaming.TRAIN``/``VAL``/``TEST``) of each row of unit ``path`` from its row
        keys: drawn by ``streaming.assign_split`` unless the source puts a unit wholly in one split."""
        from ensemble_service.data.streaming import assign_split

        return assign_split(keys, stream.val_fraction, stream.test_fraction, stream.split_seed)

    def unit_splits(self, stream, path: str) -> Tuple[int, ...]:
        """The splits rows of unit ``path`` can belong to (a member streaming one skips the others)."""
        from ensemble_service.data.streaming import TEST, TRAIN, VAL

        return TRAIN, VAL, TEST


SOURCES: Catalog[Source] = Catalog("data set", DataError)


def table_features(columns: List[str], target: str, features: Optional[List[str]], where: str,
                   eligible=lambda column: True) -> List[str]:
    """The feature columns of a table (CSV, parquet) with ``columns``: ``features`` as given (each a
    column, none the target), else every column but ``target`` that ``eligible`` accepts (possibly
    none: the caller says why that is wrong). ``where`` names the table in the one-line errors."""
    if target not in columns:
        raise DataError(f"data.target={target!r} is not a column of {where} (columns: {', '.join(columns)})")
    if not features:
        return [c for c in columns if c != target and eligible(c)]
    features = list(features)
    unknown = [c for c in features if c not in columns]
    if unknown:
        raise DataError(f"data.features names column(s) {', '.join(unknown)} that {where} does not have "
                        f"(columns: {', '.join(columns)})")
    if target in features:
        raise DataError(f"data.features must not include the target column {target!r}")
    return features


def check_classes_present(present, num_classes: int, where: str) -> None:
    """Labels are class indices 0..C-1: a class below the largest label with no sample anywhere
    (labels 5..7, or 0, 2, 4) means the labels were not remapped, and a model would learn empty
    classes. ``present``: the distinct labels over every split; call it only where the classes
    come from the labels alone (no class names, no count from the source)."""
    missing = sorted(set(range(int(num_classes))) - {int(v) for v in present})
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise DataError(f"{where} has labels up to {int(num_classes) - 1} but no sample of class(es) {shown}; labels "
                        "must be 0..C-1 (remap them, e.g. y = numpy.unique(y, return_inverse=True)[1]), or list "
                        "every class in class_names")


def check_split_counts(counts: Dict[int, int], where: str, val_fraction: float, test_fraction: float,
                       what: str = "rows") -> None:
    """A one-line DataError when the content-hash split left a split without ``what`` (rows, images)."""
    from ensemble_service.data.streaming import TEST, TRAIN, VAL

    n = sum(counts.values())
    if counts[TRAIN] == 0:
        raise DataError(f"{where}: val_fraction={val_fraction} and test_fraction={test_fraction} leave no "
                        f"training {what} out of {n}; lower them")
    for s, name in ((VAL, "validation"), (TEST, "test")):
        if counts[s] == 0:
            raise DataError(f"{where}: no {name} {what} out of {n} ({what} are split by a hash of their content); "
                            f"add {what} or raise data.val_fraction / data.test_fraction")


def register_source(cls: Type[Source]) -> Type[Source]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    SOURCES.add(cls.name, cls())
    return cls


def as_config(cfg: Any) -> DataConfig:
    """A data config object for ``cfg``: a schema instance, or a mapping (``name`` picks the source)."""
    if isinstance(cfg, DataConfig):
        return cfg
    if isinstance(cfg, dict):
        source = SOURCES.get(cfg.get("name", "digits"))
        known = set(source.schema.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DataError(f"unknown option(s) {', '.join(unknown)} for data={source.name}; "
                            f"it takes: {', '.join(sorted(known - {'name'}))}")
        return source.schema(**cfg)
    raise DataError(f"a data config must be a mapping, got {type(cfg).__name__}")

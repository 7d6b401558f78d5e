"""``data=parquet data.path=DIR_OR_URI data.target=COLUMN``: a table larger than memory, streamed.

``data.path`` is a ``.parquet`` file, a directory of them (searched recursively, in sorted order),
or an object-store URI (``s3://bucket/prefix``, ``gs://...``; S3-compatible stores through
``AWS_ENDPOINT_URL``, as for checkpoints). The features are ``data.features`` (default: every
numeric column but the target); the target may hold class names or numbers (sorted distinct values
are the classes). A missing value in a feature or the target is an error.

With ``data.streaming=true`` (the default) nothing is loaded into memory: the driver reads the
files once, row group by row group (``pyarrow``, before Ray starts), to check the values, find the
classes, split the rows by their content keys and fit the standardization on the training split;
the members then stream their epochs through Ray Data (:mod:`.streaming`, :mod:`.raydata`).
``data.streaming=false`` loads the table like ``data=csv`` (stratified splits; it must fit in memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ensemble_service.data.base import (
    DataConfig, DataError, Raw, Source, check_split_counts, register_source, table_features,
)
from ensemble_service.data.preprocess import Pipeline
from ensemble_service.data.streamed import StreamingBundle
from ensemble_service.data.streaming import (
    TEST, TRAIN, VAL, Moments, StreamSpec, assign_split, labels_in_key_order, row_keys,
)


@dataclass
class ParquetData(DataConfig):
    name: str = "parquet"
    path: str = ""                          # a .parquet file, a directory of them, or s3:// / gs:// URI
    target: str = ""                        # the class column
    features: Optional[List[str]] = None    # feature columns (default: every numeric column but the target)
    standardize: bool = True                # standardize each feature (training split's mean and std)
    streaming: bool = True                  # stream through Ray Data (false: load into memory)
    read_tasks: int = 1                     # concurrent Ray Data read tasks per member (streaming)


def _fs(cfg_path: str):
    from ensemble_service import storage

    try:
        return storage.filesystem(cfg_path if storage.is_remote(cfg_path) else str(_local(cfg_path)))
    except storage.StorageError as exc:
        raise DataError(str(exc).replace("cluster.storage", "data.path")) from None


def _local(path: str):
    import os
    from pathlib import Path

    return Path(os.path.expanduser(path)).resolve()


def resolved(path: str) -> str:
    """data.path as the workers must see it: a URI as given, a local path made absolute here."""
    from ensemble_service import storage

    return path if storage.is_remote(path) else str(_local(path))


def _files(cfg: ParquetData) -> Tuple[Any, List[str]]:
    """(pyarrow filesystem, the parquet files under data.path, sorted)."""
    from pyarrow import fs as pafs

    if not cfg.path:
        raise DataError("data=parquet needs data.path=FILE_OR_DIR (a .parquet file, a directory of them, or "
                        "s3://BUCKET/PREFIX)")
    fs, root = _fs(cfg.path)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data.path={cfg.path}: no such file or directory")
        if info.type == pafs.FileType.File:
            return fs, [root]
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"data.path={cfg.path}: cannot list it ({' '.join(str(exc).split())[:200]})") from None
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise DataError(f"data.path={cfg.path} holds no .parquet files")
    return fs, files


def _numeric(t) -> bool:
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_floating(t)


def _schema(cfg: ParquetData, fs, files: List[str]):
    """(feature columns, units [(file, row group, rows)], target type) after checking the columns."""
    import pyarrow.parquet as pq

    units: List[Tuple[str, int, int]] = []
    schema = None
    for path in files:
        try:
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        except Exception as exc:  # not a parquet file, unreadable
            raise DataError(f"{path}: cannot read it as parquet ({' '.join(str(exc).split())[:200]})") from None
        arrow = meta.schema.to_arrow_schema()
        if schema is None:
            schema = arrow
        elif arrow.names != schema.names:
            raise DataError(f"{path} has the columns {', '.join(arrow.names)} but {files[0]} has "
                            f"{', '.join(schema.names)}; every file needs the same columns")
        units += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                  if meta.row_group(g).num_rows]
    names = list(schema.names)
    if not cfg.target:
        raise DataError("data=parquet needs data.target=COLUMN (the column holding the classes)")
    def numeric(column: str) -> bool:
        return _numeric(schema.field(column).type)

    features = table_features(names, cfg.target, cfg.features, f"data.path={cfg.path}", eligible=numeric)
    bad = [c for c in features if not numeric(c)]
    if bad:  # only columns the user listed can be non-numeric
        raise DataError(f"data.path={cfg.path}: feature column(s) {', '.join(map(repr, bad))} are not numeric; "
                        "encode them as numbers, or list the numeric ones with data.features=[...]")
    if not features:
        raise DataError(f"data.path={cfg.path} has no numeric feature columns besides the target {cfg.target!r}")
    if not units:
        raise DataError(f"data.path={cfg.path} has no rows")
    return features, units


def _class_name(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _target_values(column) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False)
    return values.astype(str) if values.dtype == object else values


def read_unit(stream: StreamSpec, path: str, row_group: int) -> Tuple[np.ndarray, np.ndarray]:
    """One row group's raw features ``[n, F]`` (float32) and class indices ``[n]`` (int64)."""
    import pyarrow.parquet as pq

    fs, _ = _fs(stream.uri)
    table = pq.ParquetFile(fs.open_input_file(path)).read_row_group(row_group,
                                                                   columns=[*stream.features, stream.target])
    x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in stream.features], 1).astype(np.float32)
    values = _target_values(table.column(stream.target))
    classes = np.asarray(stream.classes)
    y = np.searchsorted(classes, values)
    return x, y.astype(np.int64)


@register_source
class Parquet(Source):
    name = "parquet"
    schema = ParquetData
    description = ("your table as parquet files (a directory or s3:// prefix), larger than memory: "
                   "streamed through Ray Data (data.target)")

    def read_unit(self, stream: StreamSpec, path: str, row_group: int) -> Tuple[np.ndarray, np.ndarray]:
        return read_unit(stream, path, row_group)

    def check(self, cfg: ParquetData) -> None:
        if cfg.read_tasks < 1:
            raise DataError(f"data.read_tasks must be at least 1, got {cfg.read_tasks}")
        fs, files = _files(cfg)
        _schema(cfg, fs, files)

    def _scan(self, cfg: ParquetData):
        """The driver's pass over every row group: classes, then values, splits and statistics."""
        import pyarrow.parquet as pq

        fs, files = _files(cfg)
        features, units = _schema(cfg, fs, files)
        where = f"data.path={cfg.path}"
        distinct = None
        for path, group, _ in units:  # pass 1: the target column only
            col = pq.ParquetFile(fs.open_input_file(path)).read_row_group(group, columns=[cfg.target]).column(0)
            if col.null_count:
                raise DataError(f"{path} has {col.null_count} row(s) without a {cfg.target!r} value; fill or drop them")
            values = np.unique(_target_values(col))
            distinct = values if distinct is None else np.union1d(distinct, values)
        if len(distinct) < 2:
            raise DataError(f"data.target={cfg.target!r} holds {len(distinct)} distinct value(s) "
                            f"({', '.join(map(_class_name, distinct))}); a classifier needs at least 2 classes")
        return fs, features, units, distinct, where

    def load(self, cfg: ParquetData) -> Raw:
        """``data.streaming=false``: the whole table in memory (split and standardized by ``data.load``)."""
        _, features, units, classes, where = self._scan(cfg)
        stream = StreamSpec("parquet", resolved(cfg.path), tuple(units), tuple(features), cfg.target,
                            tuple(classes.tolist()), {}, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        xs, ys = zip(*(self._read_checked(stream, p, g, where) for p, g, _ in units))
        ops = [{"op": "standardize", "mode": "feature"}] if cfg.standardize else []
        return Raw(np.concatenate(xs), np.concatenate(ys), Pipeline((len(features),), ops, kind="table",
                                                                    columns=features),
                   num_classes=len(classes), class_names=[_class_name(v) for v in classes.tolist()],
                   label=f"parquet:{_label(cfg.path)}")

    @staticmethod
    def _read_checked(stream: StreamSpec, path: str, group: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
        import pyarrow.parquet as pq

        fs, _ = _fs(stream.uri)
        table = pq.ParquetFile(fs.open_input_file(path)).read_row_group(group, columns=list(stream.features))
        nulls = [c for c in stream.features if table.column(c).null_count]
        if nulls:
            raise DataError(f"{path} has missing values in column(s) {', '.join(map(repr, nulls))}; fill or drop them")
        x, y = read_unit(stream, path, group)
        if not np.isfinite(x).all():
            raise DataError(f"{path} has {int((~np.isfinite(x)).sum())} NaN or infinite feature value(s) "
                            f"(row group {group}); clean or drop them")
        return x, y

    def load_stream(self, cfg: ParquetData) -> StreamingBundle:
        """``data.streaming=true``: one pass over the files (see the module docstring)."""
        from ensemble_service.data.splits import check_fraction, check_seed

        val_fraction = check_fraction("val_fraction", cfg.val_fraction)
        test_fraction = check_fraction("test_fraction", cfg.test_fraction)
        seed = check_seed(cfg.split_seed)
        fs, features, units, classes, where = self._scan(cfg)
        stream = StreamSpec("parquet", resolved(cfg.path), tuple(units), tuple(features), cfg.target,
                            tuple(classes.tolist()), {}, val_fraction, test_fraction, seed, int(cfg.read_tasks))
        moments = Moments()
        counts = {TRAIN: 0, VAL: 0, TEST: 0}
        held: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {VAL: [], TEST: []}
        for path, group, _ in units:  # pass 2: values, splits, the training split's statistics
            x, y = self._read_checked(stream, path, group, where)
            keys = row_keys(x, y)
            split = assign_split(keys, val_fraction, test_fraction, seed)
            moments.add(x[split == TRAIN])
            for s in counts:
                counts[s] += int((split == s).sum())
            for s in held:
                held[s].append((keys[split == s], y[split == s]))
        check_split_counts(counts, where, val_fraction, test_fraction)
        ops = []
        if cfg.standardize:
            std = moments.std()
            std[~(std > 1e-12)] = 1.0
            ops = [{"op": "standardize", "mode": "feature", "mean": moments.mean.tolist(), "std": std.tolist()}]
        pipeline = Pipeline((len(features),), ops, kind="table", columns=features)
        stream = StreamSpec("parquet", resolved(cfg.path), tuple(units), tuple(features), cfg.target,
                            tuple(classes.tolist()), pipeline.to_dict(), val_fraction, test_fraction, seed,
                            int(cfg.read_tasks))

        return StreamingBundle(name="parquet", input_shape=(len(features),), num_classes=len(classes),
                               y_val=labels_in_key_order(held[VAL]), y_test=labels_in_key_order(held[TEST]), stream=stream,
                               train_size=counts[TRAIN], class_names=[_class_name(v) for v in classes.tolist()],
                               preprocessing=pipeline.to_dict(), label=f"parquet:{_label(cfg.path)}")


def _label(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path

"""``data=csv data.path=FILE.csv data.target=COLUMN``: a table of numeric features and a class column.

The feature columns are ``data.features`` (default: every column but the target; each must be
numeric). The target column may hold class names (strings) or numbers; its sorted distinct values
are the classes (label i = the i-th value, ``class_names`` their text). Rows with a missing value
are an error, or dropped with ``data.dropna=true``. Raw inputs are the feature columns in that
order (a pandas DataFrame with those columns, or rows of numbers); ``data.standardize`` (default
true) standardizes each column with the training split's mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ensemble_service.data.arrays import path_of
from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source, table_features
from ensemble_service.data.preprocess import Pipeline


@dataclass
class CsvData(DataConfig):
    name: str = "csv"
    path: str = ""                          # the .csv file (header row first)
    target: str = ""                        # the class column
    features: Optional[List[str]] = None    # feature columns (default: all but the target)
    standardize: bool = True                # standardize each feature column (training split's mean and std)
    dropna: bool = False                    # drop rows with missing values instead of refusing them


def _class_name(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


@register_source
class Csv(Source):
    name = "csv"
    schema = CsvData
    description = "your table: a .csv with numeric feature columns and a class column (data.target)"

    def check(self, cfg: CsvData) -> None:
        path_of(cfg, suffixes=(".csv", ".tsv", ".txt"))
        if not cfg.target:
            raise DataError("data=csv needs data.target=COLUMN (the column holding the classes)")

    def load(self, cfg: CsvData) -> Raw:
        import pandas as pd

        self.check(cfg)
        path = path_of(cfg, suffixes=(".csv", ".tsv", ".txt"))
        where = f"data.path={cfg.path}"
        try:
            frame = pd.read_csv(path, sep=None if path.suffix.lower() != ".csv" else ",", engine="python")
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            raise DataError(f"{where}: cannot read it as CSV ({' '.join(str(exc).split())[:200]})") from None
        columns = [str(c) for c in frame.columns]
        frame.columns = columns
        if frame.empty:
            raise DataError(f"{path.name} has a header but no data rows")
        features = table_features(columns, cfg.target, cfg.features, path.name)
        if not features:
            raise DataError(f"{path.name} has no feature columns besides the target {cfg.target!r}")
        frame = frame[features + [cfg.target]]
        missing = frame.isna()
        if missing.to_numpy().any():
            rows = np.flatnonzero(missing.any(axis=1).to_numpy())
            if not cfg.dropna:
                first = int(rows[0])
                col = next(c for c in frame.columns if bool(missing[c].iloc[first]))
                raise DataError(f"{path.name} has {len(rows)} row(s) with missing values (first: line {first + 2}, "
                                f"column {col!r}); fill them, or set data.dropna=true to drop those rows")
            frame = frame.drop(index=frame.index[rows])
            if frame.empty:
                raise DataError(f"{path.name}: every row has a missing value; nothing left after data.dropna")
        non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])
                       or pd.api.types.is_bool_dtype(frame[c])]
        if non_numeric:
            raise DataError(f"{path.name}: feature column(s) {', '.join(map(repr, non_numeric))} are not numeric; "
                            f"encode them as numbers, or list the numeric ones with data.features=[...]")
        x = frame[features].to_numpy(dtype=np.float64)
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise DataError(f"{path.name} has infinite feature values (first at data row {row + 1})")
        target = frame[cfg.target]
        try:
            values = sorted(target.unique().tolist())
        except TypeError:  # mixed numbers and text: order by text
            values = sorted(target.unique().tolist(), key=str)
        if len(values) < 2:
            raise DataError(f"data.target={cfg.target!r} holds {len(values)} distinct value(s) "
                            f"({', '.join(map(_class_name, values))}); a classifier needs at least 2 classes")
        index = {v: i for i, v in enumerate(values)}
        y = np.asarray([index[v] for v in target.tolist()], dtype=np.int64)
        ops = [{"op": "standardize", "mode": "feature"}] if cfg.standardize else []
        pipeline = Pipeline((len(features),), ops, kind="table", columns=features)
        return Raw(x, y, pipeline, num_classes=len(values),
                   class_names=[_class_name(v) for v in values], label=f"csv:{path.name}")

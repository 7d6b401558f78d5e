"""``data._target_=mypkg.data.load``: data from the user's own function.

The callable (importable from the working directory or ``PYTHONPATH``; its arguments as
``+data.<arg>=<value>``) returns one of:

* a mapping with the keys of the arrays source: ``x``, ``y`` and optionally ``x_val``/``y_val``,
  ``x_test``/``y_test``, ``class_names`` (NumPy arrays, torch tensors or lists);
* a mapping ``{"train": Dataset, "val": Dataset, "test": Dataset}`` (val and test optional) of
  torch ``Dataset``s whose items are ``(input, label)`` pairs;
* one ``Dataset``, or a pair ``(x, y)``.

Missing splits are split off as for any data set; ``data.standardize=true`` standardizes each
feature. Raw inputs are the returned inputs as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

import numpy as np

from ensemble_service.data.arrays import class_names_of, inputs, labels
from ensemble_service.data.base import DataConfig, DataError, Raw, Source, register_source
from ensemble_service.data.preprocess import Pipeline
from ensemble_service.targets import TargetError, instantiate


@dataclass
class CustomData(DataConfig):
    name: str = "custom"
    target: str = ""                                      # data._target_: the callable's import path
    args: Dict[str, Any] = field(default_factory=dict)    # its arguments (+data.<arg>=<value>)
    standardize: bool = False


def _numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return value


def _from_dataset(ds: Any, where: str):
    try:
        n = len(ds)
        items = [ds[i] for i in range(n)]
    except Exception as exc:
        raise DataError(f"{where}: cannot read the Dataset's items ({type(exc).__name__}: {exc})") from None
    if not items:
        raise DataError(f"{where}: the Dataset is empty")
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        raise DataError(f"{where}: Dataset items must be (input, label) pairs")
    xs = [np.asarray(_numpy(a)) for a, _ in items]
    shapes = sorted({x.shape for x in xs})
    if len(shapes) > 1:
        raise DataError(f"{where}: the Dataset's items have inputs of different shapes "
                        f"({', '.join(str(list(s)) for s in shapes[:3])}); make them one shape")
    # labels as they are (0-d arrays stack to a 1-D array of their dtype): `labels` checks them
    return np.stack(xs), np.asarray([np.asarray(_numpy(b)) for _, b in items])


def _is_dataset(value: Any) -> bool:
    return hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(
        value, (np.ndarray, list, tuple, dict, str, bytes)) and not hasattr(value, "detach")


@register_source
class Custom(Source):
    name = "custom"
    schema = CustomData
    description = "your loader: data._target_=mypkg.data.load returning x/y arrays or torch Datasets"

    def check(self, cfg: CustomData) -> None:
        from ensemble_service.targets import locate

        try:
            if not callable(locate(cfg.target, "data._target_")):
                raise DataError(f"data._target_={cfg.target} is not a function or class")
        except TargetError as exc:
            raise DataError(str(exc)) from None

    def load(self, cfg: CustomData) -> Raw:
        where = f"data._target_={cfg.target}"
        try:
            out = instantiate({"_target_": cfg.target, **dict(cfg.args)}, "data")
        except TargetError as exc:
            raise DataError(str(exc)) from None
        splits: Dict[str, Any] = {}
        if isinstance(out, tuple) and len(out) == 2 and not _is_dataset(out[0]):
            splits = {"x": out[0], "y": out[1]}
        elif _is_dataset(out):
            splits["x"], splits["y"] = _from_dataset(out, where)
        elif isinstance(out, Mapping) and "train" in out:
            for name, (xk, yk) in (("train", ("x", "y")), ("val", ("x_val", "y_val")), ("test", ("x_test", "y_test"))):
                if out.get(name) is not None:
                    splits[xk], splits[yk] = _from_dataset(out[name], f"{where} [{name!r}]")
            if "class_names" in out:
                splits["class_names"] = out["class_names"]
        elif isinstance(out, Mapping):
            splits = dict(out)
        else:
            raise DataError(f"{where} returned a {type(out).__name__}; return a dict with x and y (and optionally "
                            "x_val, y_val, x_test, y_test, class_names), a dict of torch Datasets, or (x, y)")
        if "x" not in splits or "y" not in splits:
            raise DataError(f"{where} returned no 'x' and 'y' (keys: {', '.join(map(str, splits)) or 'none'})")
        arrays = {}
        for xk, yk in (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test")):
            if (splits.get(xk) is None) != (splits.get(yk) is None):
                raise DataError(f"{where} returned {xk if splits.get(xk) is not None else yk!r} without its pair")
            if splits.get(xk) is not None:
                arrays[xk] = inputs(_numpy(splits[xk]), f"{where}: {xk}")
                arrays[yk] = labels(_numpy(splits[yk]), f"{where}: {yk}")
                if len(arrays[xk]) != len(arrays[yk]):
                    raise DataError(f"{where}: {xk} has {len(arrays[xk])} rows but {yk} has {len(arrays[yk])} labels")
        shape = arrays["x"].shape[1:]
        ops = [{"op": "standardize", "mode": "feature"}] if cfg.standardize else []
        return Raw(arrays["x"], arrays["y"], Pipeline(shape, ops), x_val=arrays.get("x_val"),
                   y_val=arrays.get("y_val"), x_test=arrays.get("x_test"), y_test=arrays.get("y_test"),
                   class_names=class_names_of(splits.get("class_names"), f"{where}: class_names"),
                   label=cfg.target.rsplit(".", 1)[-1])

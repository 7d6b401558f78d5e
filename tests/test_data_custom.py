"""ensemble_service.data.custom: ``data._target_=mypkg.data.load``: the user's function, written to a
module on sys.path, returning dicts of arrays or tensors, torch Datasets, or (x, y); its arguments;
and every data error as one line."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from data_formats import assert_pipeline_reproduces, one_line, rows
from ensemble_service.data import DataError, check, load

LOADERS = '''
import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

NOT_CALLABLE = 3


def inputs(n, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def arrays(n=30, classes=3):
    return {"x": inputs(n), "y": np.arange(n) % classes}


def tensors():
    return {"x": torch.from_numpy(inputs(20)), "y": torch.arange(20) % 2,
            "x_test": torch.from_numpy(inputs(6, seed=1)), "y_test": torch.tensor([0, 1, 1, 0, 1, 0]),
            "class_names": ["no", "yes"]}


def lists():
    return {"x": inputs(10).tolist(), "y": [0, 1] * 5}


def pair(n=12):
    return inputs(n), np.arange(n) % 2


class Squares(Dataset):
    """Items are (numpy input, python int label)."""

    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        v = float(i + self.offset)
        return np.array([[v, v * v], [1.0, -v]], dtype=np.float32), (i + self.offset) % 3


def datasets():
    return {"train": Squares(24), "val": Squares(6, 100), "test": Squares(9, 200), "class_names": ["r", "g", "b"]}


def train_only():
    return {"train": TensorDataset(torch.from_numpy(inputs(20)), torch.arange(20) % 4)}


def one_dataset():
    return TensorDataset(torch.from_numpy(inputs(15)), torch.arange(15) % 3)


def returns(kind):
    x, y = inputs(10, 2), np.arange(10) % 2
    return {
        "none": None,
        "number": 42,
        "no_y": {"x": x},
        "only_y_val": {"x": x, "y": y, "y_val": y},
        "lengths": {"x": x, "y": y[:7]},
        "text_labels": {"x": x, "y": np.array(["a", "b"] * 5)},
        "fraction_labels": {"x": x, "y": y + 0.25},
        "negative_labels": {"x": x, "y": y - 1},
        "nan": {"x": np.where(np.eye(10, 2) > 0, np.nan, x), "y": y},
        "one_class": {"x": x, "y": np.ones(10, int)},
        "names": {"x": x, "y": y, "class_names": ["a"]},
        "val_shape": {"x": x, "y": y, "x_val": inputs(4, 3), "y_val": np.arange(4) % 2},
        "test_shape": {"x": x, "y": y, "x_test": inputs(4, 5), "y_test": np.arange(4) % 2},
        "text_inputs": {"x": np.array([["a", "b"]] * 10), "y": y},
        "empty_dataset": TensorDataset(torch.zeros(0, 2), torch.zeros(0)),
        "not_pairs": TensorDataset(torch.zeros(4, 2)),
        "ragged_dataset": {"train": [(np.zeros(i % 3 + 1), i % 2) for i in range(6)]},
        "text_dataset_labels": {"train": [(np.zeros(2), "cat"), (np.ones(2), "dog")] * 3},
        "fraction_dataset_labels": {"train": [(np.zeros(2) + i, 0.5 * i) for i in range(6)]},
        "broken_dataset": {"train": Broken()},
    }[kind]


class Broken(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        raise KeyError(f"sample {i} is gone")


def raises():
    raise RuntimeError("cannot reach the database\\nsecond line")
'''


@pytest.fixture
def loaders(tmp_path, monkeypatch):
    """The module ``user_loaders`` (the code above) importable for the test."""
    (tmp_path / "user_loaders.py").write_text(textwrap.dedent(LOADERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_loaders", None)
    yield "user_loaders"
    sys.modules.pop("user_loaders", None)


def _cfg(fn, **options):
    args = options.pop("args", {})
    return {"name": "custom", "target": f"user_loaders.{fn}", "args": args, **options}


def _raw(fn, **kwargs):
    import user_loaders

    return getattr(user_loaders, fn)(**kwargs)


def test_dict_of_arrays(loaders):
    bundle = load(_cfg("arrays"))
    assert (bundle.name, bundle.label, bundle.input_shape, bundle.num_classes) == ("custom", "arrays", (3,), 3)
    assert bundle.sizes() == {"train": 18, "val": 6, "test": 6}
    assert bundle.class_names is None and bundle.preprocessing["ops"] == []
    raw = _raw("arrays")
    assert_pipeline_reproduces(bundle, raw["x"], raw["y"])


def test_arguments(loaders):
    bundle = load(_cfg("arrays", args={"n": 40, "classes": 4}))
    assert sum(bundle.sizes().values()) == 40 and bundle.num_classes == 4
    with pytest.raises(DataError) as err:
        load(_cfg("arrays", args={"size": 3}))
    one_line(err, "user_loaders.arrays", "size")


def test_dict_of_tensors_with_a_test_split_and_names(loaders):
    bundle = load(_cfg("tensors", val_fraction=0.25))
    assert bundle.sizes() == {"train": 15, "val": 5, "test": 6}
    assert bundle.class_names == ["no", "yes"]
    raw = _raw("tensors")
    assert torch.equal(bundle.x_test, raw["x_test"]) and torch.equal(bundle.y_test, raw["y_test"])
    assert rows(torch.cat([bundle.x_train, bundle.x_val])) == rows(raw["x"])


def test_lists_and_pairs(loaders):
    assert load(_cfg("lists")).input_shape == (3,)
    bundle = load(_cfg("pair", args={"n": 20}))
    assert bundle.label == "pair" and sum(bundle.sizes().values()) == 20
    x, y = _raw("pair", n=20)
    assert_pipeline_reproduces(bundle, x, y)


def test_dict_of_datasets(loaders):
    bundle = load(_cfg("datasets"))
    assert bundle.sizes() == {"train": 24, "val": 6, "test": 9}
    assert (bundle.input_shape, bundle.num_classes, bundle.class_names) == ((2, 2), 3, ["r", "g", "b"])
    test = _raw("datasets")["test"]
    assert torch.equal(bundle.x_test, torch.from_numpy(np.stack([test[i][0] for i in range(9)])))
    assert bundle.y_test.tolist() == [test[i][1] for i in range(9)]
    assert bundle.x_val[0].tolist() == [[100.0, 10000.0], [1.0, -100.0]]


def test_datasets_train_only_and_one_dataset(loaders):
    bundle = load(_cfg("train_only"))
    assert bundle.sizes() == {"train": 12, "val": 4, "test": 4} and bundle.num_classes == 4
    bundle = load(_cfg("one_dataset", standardize=True))
    assert bundle.num_classes == 3 and sum(bundle.sizes().values()) == 15
    ds = _raw("one_dataset")
    assert_pipeline_reproduces(bundle, ds.tensors[0].numpy(), ds.tensors[1].numpy())


def test_standardize(loaders):
    bundle = load(_cfg("arrays", standardize=True))
    op = bundle.preprocessing["ops"][0]
    assert (op["op"], op["mode"]) == ("standardize", "feature")
    np.testing.assert_allclose(bundle.x_train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(bundle.x_train.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    raw = _raw("arrays")
    assert_pipeline_reproduces(bundle, raw["x"], raw["y"])


# ---------------------------------------------------------------------------------------------
# every data error is one line naming the problem
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, needles", [
    ("none", ["returned a NoneType; return a dict with x and y"]),
    ("number", ["returned a int"]),
    ("no_y", ["returned no 'x' and 'y' (keys: x)"]),
    ("only_y_val", ["returned 'y_val' without its pair"]),
    ("lengths", ["x has 10 rows but y has 7 labels"]),
    ("text_labels", ["y must hold integer class labels 0..C-1, got <U1 values"]),
    ("fraction_labels", ["y must hold integer class labels 0..C-1; found non-integer values"]),
    ("negative_labels", ["y must hold class labels 0..C-1; found -1"]),
    ("nan", ["'returns' ", "split has", "NaN or infinite input value(s)"]),
    ("one_class", ["'returns' has samples of only 1 class (label 1)"]),
    ("names", ["names 1 classes but its labels have 2"]),
    ("val_shape", ["'returns' val split has inputs of shape [3] but the training inputs are [2]"]),
    ("test_shape", ["'returns' test split has inputs of shape [5] but the training inputs are [2]"]),
    ("text_inputs", ["x must hold numbers, got <U1 values"]),
    ("empty_dataset", ["the Dataset is empty"]),
    ("not_pairs", ["Dataset items must be (input, label) pairs"]),
    ("ragged_dataset", ["['train']: the Dataset's items have inputs of different shapes ([1], [2], [3])"]),
    ("text_dataset_labels", ["must hold integer class labels 0..C-1"]),
    ("fraction_dataset_labels", ["found non-integer values"]),
    ("broken_dataset", ["cannot read the Dataset's items (KeyError", "sample 0 is gone"]),
])
def test_data_errors(loaders, kind, needles):
    with pytest.raises(DataError) as err:
        load(_cfg("returns", args={"kind": kind}))
    one_line(err, "returns", *needles)


def test_loader_that_raises(loaders):
    with pytest.raises(DataError) as err:
        load(_cfg("raises"))
    one_line(err, "user_loaders.raises", "RuntimeError", "cannot reach the database")


def test_check_locates_the_callable(loaders):
    check(_cfg("arrays"))
    for target, needles in [
        ("user_loaders.NOT_CALLABLE", ["data._target_=user_loaders.NOT_CALLABLE is ", "not a "]),
        ("user_loaders.nothing", ["user_loaders has no attribute 'nothing'"]),
        ("nowhere_pkg_xyz.load", ["no module named 'nowhere_pkg_xyz'", "PYTHONPATH"]),
        ("not a path", ["is not a dotted import path"]),
        ("", ["must be a dotted import path"]),
    ]:
        for call in (check, load):
            with pytest.raises(DataError) as err:
                call({"name": "custom", "target": target})
            one_line(err, *needles)

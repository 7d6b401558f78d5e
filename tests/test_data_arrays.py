"""ensemble_service.data.arrays: ``data=arrays data.path=FILE.npz`` (x, y, optional splits and class
names), standardization with the training split's statistics, and every data error as one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_formats import assert_pipeline_reproduces, one_line, rows, write_npz
from ensemble_service.data import DataError, Pipeline, check, load


def _cfg(path, **options):
    return {"name": "arrays", "path": str(path), **options}


def _xy(n=30, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % classes


def test_arrays_bundle(tmp_path):
    x, y = _xy()
    bundle = load(_cfg(write_npz(tmp_path / "mine.npz", x=x, y=y)))
    assert (bundle.name, bundle.label, bundle.input_shape, bundle.num_classes) == ("arrays", "arrays:mine.npz", (4,), 3)
    assert bundle.class_names is None
    assert bundle.sizes() == {"train": 18, "val": 6, "test": 6}
    assert bundle.preprocessing == {"format": 1, "kind": "array", "raw_shape": [4], "ops": []}
    assert_pipeline_reproduces(bundle, x, y)  # no preprocessing: raw rows are model inputs


def test_arrays_of_images_and_integers(tmp_path):
    x = np.arange(20 * 2 * 3 * 3, dtype=np.uint8).reshape(20, 2, 3, 3)
    y = np.arange(20) % 2
    bundle = load(_cfg(write_npz(tmp_path / "a.npz", x=x, y=y.astype(np.float64))))  # integral floats are labels
    assert bundle.input_shape == (2, 3, 3) and bundle.num_classes == 2
    assert bundle.x_train.dtype == torch.float32 and bundle.y_train.dtype == torch.int64
    assert_pipeline_reproduces(bundle, x, y)
    assert_pipeline_reproduces(bundle, x.reshape(20, 18), y)  # flattened rows are accepted too


def test_class_names(tmp_path):
    x, y = _xy()
    bundle = load(_cfg(write_npz(tmp_path / "a.npz", x=x, y=y, class_names=np.array(["cat", "dog", "emu"]))))
    assert bundle.class_names == ["cat", "dog", "emu"] and bundle.num_classes == 3
    # more names than labels seen: the classes without samples still count
    bundle = load(_cfg(write_npz(tmp_path / "b.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d"]))))
    assert bundle.class_names == ["a", "b", "c", "d"] and bundle.num_classes == 4
    with pytest.raises(DataError) as err:
        load(_cfg(write_npz(tmp_path / "c.npz", x=x, y=y, class_names=np.array(["a", "b"]))))
    one_line(err, "names 2 classes but its labels have 3")
    with pytest.raises(DataError) as err:
        load(_cfg(write_npz(tmp_path / "d.npz", x=x, y=y, class_names=np.array([1, 2, 3]))))
    one_line(err, "class_names must be a 1-D array of strings")


def test_given_splits_are_kept(tmp_path):
    x, y = _xy(20)
    x_val, y_val = _xy(5, seed=1)
    x_test, y_test = _xy(7, seed=2)
    path = write_npz(tmp_path / "a.npz", x=x, y=y, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)
    bundle = load(_cfg(path, val_fraction=0.4, test_fraction=0.4))
    assert bundle.sizes() == {"train": 20, "val": 5, "test": 7}
    assert torch.equal(bundle.x_val, torch.from_numpy(x_val)) and bundle.y_val.tolist() == y_val.tolist()
    assert torch.equal(bundle.x_test, torch.from_numpy(x_test)) and bundle.y_test.tolist() == y_test.tolist()
    assert rows(bundle.x_train) == rows(x)


def test_standardize_with_the_training_split_by_hand(tmp_path):
    x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    x_test = np.array([[3.0, 20.0], [5.0, 40.0]])
    path = write_npz(tmp_path / "a.npz", x=x, y=np.array([0, 1, 0]), x_test=x_test, y_test=np.array([1, 0]))
    bundle = load(_cfg(path, standardize=True, val_fraction=0.0))  # the training split is all of x
    op = bundle.preprocessing["ops"][0]
    mean, std = [3.0, 20.0], [math.sqrt(8 / 3), math.sqrt(200 / 3)]
    assert op["op"] == "standardize" and op["mode"] == "feature"
    np.testing.assert_allclose(op["mean"], mean)
    np.testing.assert_allclose(op["std"], std)
    np.testing.assert_allclose(bundle.x_test.numpy(), [[0.0, 0.0], [2 / std[0], 20 / std[1]]], rtol=1e-6)
    assert Pipeline.from_dict(bundle.preprocessing).describe() == "standardize (feature)"


def test_standardize_uses_only_the_training_split(tmp_path):
    x, y = _xy(40, d=3)
    x[:, 0] += np.arange(40)  # a trend, so the statistics of any subset differ from the whole set's
    bundle = load(_cfg(write_npz(tmp_path / "a.npz", x=x, y=y), standardize=True))
    assert bundle.sizes()["train"] == 24
    np.testing.assert_allclose(bundle.x_train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(bundle.x_train.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    op = bundle.preprocessing["ops"][0]
    transformed = Pipeline.from_dict(bundle.preprocessing)(x)
    train_rows = rows(bundle.x_train)
    in_train = np.array([row.tobytes() in train_rows for row in transformed])
    assert in_train.sum() == 24
    np.testing.assert_allclose(op["mean"], x[in_train].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(op["std"], x[in_train].astype(np.float64).std(0), rtol=1e-6)
    assert not np.allclose(op["mean"], x.mean(0))
    assert_pipeline_reproduces(bundle, x, y)


# ---------------------------------------------------------------------------------------------
# every data error is one line naming the problem
# ---------------------------------------------------------------------------------------------


def test_path_errors(tmp_path):
    cases = [
        ({"name": "arrays"}, ["data=arrays needs data.path (e.g. data.path=data/train.npz)"]),
        (_cfg(tmp_path / "missing.npz"), ["data.path=", "missing.npz: no such file"]),
        (_cfg(tmp_path), ["is a directory, not a file"]),
    ]
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    cases.append((_cfg(tmp_path / "table.csv"), ["table.csv: expected a .npz file"]))
    for cfg, needles in cases:
        for call in (check, load):
            with pytest.raises(DataError) as err:
                call(cfg)
            one_line(err, *needles)


def _error(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load(_cfg(tmp_path / "bad.npz"))
    return err


X, Y = _xy(10, d=2, classes=2)


@pytest.mark.parametrize("arrays, needles", [
    ({"x": X}, ["has 'x' but no 'y'"]),
    ({"y": Y}, ["has 'y' but no 'x'"]),
    ({"inputs": X, "labels": Y}, ["has no arrays 'x' and 'y' (found: inputs, labels)"]),
    ({"x": X, "y": Y, "x_val": X}, ["has 'x_val' but no 'y_val'"]),
    ({"x": X, "y": Y, "y_test": Y}, ["has 'y_test' but no 'x_test'"]),
    ({"x": X, "y": np.array(["cat", "dog"] * 5)}, ["y must hold integer class labels 0..C-1, got <U3 values"]),
    ({"x": X, "y": Y + 0.5}, ["y must hold integer class labels 0..C-1; found non-integer values"]),
    ({"x": X, "y": Y - 1}, ["y must hold class labels 0..C-1; found -1"]),
    ({"x": X, "y": Y.reshape(5, 2)}, ["y must be 1-D (one label per row), got shape [5, 2]"]),
    ({"x": X, "y": Y[:9]}, ["x has 10 rows but y has 9 labels"]),
    ({"x": X[:, 0], "y": Y}, ["x must have one row per sample", "got shape [10]"]),
    ({"x": np.array([["a", "b"]] * 10), "y": Y}, ["x must hold numbers, got <U1 values"]),
    ({"x": np.where(np.eye(10, 2) > 0, np.nan, X), "y": Y}, ["split has", "NaN or infinite input value(s)"]),
    ({"x": np.where(np.eye(10, 2) > 0, np.inf, X), "y": Y}, ["NaN or infinite input value(s)"]),
    ({"x": X, "y": np.zeros(10, int)}, ["has 1 class; a classifier needs at least 2"]),
    ({"x": X, "y": Y, "x_test": np.ones((3, 5)), "y_test": np.zeros(3, int)},
     ["x_test rows have shape [5] but x rows [2]"]),
    ({"x": X, "y": Y, "x_val": X[:3], "y_val": Y[:2]}, ["x_val has 3 rows but y_val has 2 labels"]),
    ({"x": X[:0], "y": Y[:0]}, ["leave no training data out of 0 samples"]),
])
def test_data_errors(tmp_path, arrays, needles):
    one_line(_error(tmp_path, **arrays), "bad.npz", *needles)


def test_single_class_even_if_its_label_is_not_zero(tmp_path):
    one_line(_error(tmp_path, x=X, y=np.ones(10, int)), "bad.npz", "has samples of only 1 class (label 1)",
             "a classifier needs at least 2")


def test_unreadable_archives(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DataError) as err:
        load(_cfg(tmp_path / "bad.npz"))
    one_line(err, "cannot read it as a .npz archive", "not a ZIP archive as numpy.savez writes")
    assert "pickle" not in str(err.value)  # numpy's guess would advise loading it unsafely
    with open(tmp_path / "one.npz", "wb") as fh:
        np.save(fh, X)  # a single .npy array under a .npz name
    with pytest.raises(DataError) as err:
        load(_cfg(tmp_path / "one.npz"))
    one_line(err, "holds one array", "numpy.savez(path, x=inputs, y=labels)")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 10, dtype=object), y=Y)
    with pytest.raises(DataError) as err:
        load(_cfg(tmp_path / "obj.npz"))
    one_line(err, "array 'x' cannot be read without unpickling")


def test_values_beyond_float32_are_an_error(tmp_path):
    # finite as float64, infinite as the model's float32
    x = np.concatenate([np.full((1, 2), -1e300), np.zeros((9, 2))])
    one_line(_error(tmp_path, x=x, y=np.arange(10) % 2), "bad.npz", "split has 2 input value(s) beyond float32's range")


@pytest.mark.parametrize("streaming", [False, True])
def test_labels_that_leave_classes_empty_are_refused_unless_named(tmp_path, streaming):
    x = np.random.default_rng(1).normal(size=(90, 4)).astype(np.float32)
    shifted = np.arange(90) % 3 + 5                      # 5, 6, 7: classes 0..4 would have no sample
    with pytest.raises(DataError) as err:
        load(_cfg(write_npz(tmp_path / "s.npz", x=x, y=shifted), streaming=streaming))
    one_line(err, "s.npz", "has labels up to 7 but no sample of class(es) 0, 1, 2, 3, 4", "labels must be 0..C-1")
    gaps = (np.arange(90) % 3) * 2                       # 0, 2, 4
    with pytest.raises(DataError) as err:
        load(_cfg(write_npz(tmp_path / "g.npz", x=x, y=gaps), streaming=streaming))
    one_line(err, "has labels up to 4 but no sample of class(es) 1, 3")
    # the user names five classes: 1 and 3 are declared, just without samples
    named = load(_cfg(write_npz(tmp_path / "n.npz", x=x, y=gaps, class_names=np.array(list("abcde"))),
                      streaming=streaming))
    assert named.num_classes == 5

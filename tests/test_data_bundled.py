"""ensemble_service.data.bundled: scikit-learn's digits and the synthetic blobs (no files needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_formats import assert_pipeline_reproduces, one_line, rows
from ensemble_service.data import DataError, Pipeline, info, load, load_dataset
from ensemble_service.data.bundled import make_blobs


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_bundle():
    bundle = load_dataset("digits")
    assert (bundle.name, bundle.label, bundle.input_shape, bundle.num_classes) == ("digits", "digits", (1, 8, 8), 10)
    assert bundle.class_names == [str(d) for d in range(10)]
    assert bundle.preprocessing == {"format": 1, "kind": "array", "raw_shape": [8, 8],
                                    "ops": [{"op": "divide", "by": 16.0}, {"op": "reshape", "shape": [1, 8, 8]}]}
    x = torch.cat([bundle.x_train, bundle.x_val, bundle.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # sklearn's 0..16, divided by 16
    assert set(torch.unique(x * 16).tolist()) == set(range(17))


def test_digits_pipeline_takes_sklearn_values():
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_dataset("digits", split_seed=9)
    assert_pipeline_reproduces(bundle, digits.data, digits.target)  # [N, 64] rows of 0..16
    assert_pipeline_reproduces(bundle, digits.images, digits.target)  # [N, 8, 8]


def test_digits_takes_only_the_common_options(tmp_path):
    with pytest.raises(DataError) as err:
        load({"name": "digits", "root": str(tmp_path)})
    one_line(err, "unknown option(s) root for data=digits")


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_options_and_learnable():
    bundle = load({"name": "synthetic", "n_train": 40, "n_val": 8, "n_test": 12, "num_classes": 4,
                   "input_shape": [2, 16]})
    assert bundle.sizes() == {"train": 40, "val": 8, "test": 12}
    assert bundle.input_shape == (2, 16) and bundle.num_classes == 4
    assert tuple(bundle.x_train.shape) == (40, 2, 16)
    assert info({"name": "synthetic", "input_shape": [2, 16], "num_classes": 4}).input_shape == (2, 16)

    default = load_dataset("synthetic")
    # a nearest-class-mean classifier does far better than chance (1/3)
    means = torch.stack([default.x_train[default.y_train == k].mean(0) for k in range(3)])
    dist = ((default.x_test[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == default.y_test).float().mean() > 0.8


def test_synthetic_ignores_fractions_and_split_seed_only_moves_samples():
    a = load({"name": "synthetic", "val_fraction": 0.4, "test_fraction": 0.01})
    assert a.sizes() == {"train": 96, "val": 48, "test": 48}
    b = load({"name": "synthetic", "split_seed": 1})
    all_a = torch.cat([a.x_train, a.x_val, a.x_test])
    all_b = torch.cat([b.x_train, b.x_val, b.x_test])
    assert rows(all_a) == rows(all_b) and not torch.equal(a.x_train, b.x_train)
    c = load({"name": "synthetic", "seed": 1})
    assert not (rows(torch.cat([c.x_train, c.x_val, c.x_test])) & rows(all_a))


def test_synthetic_pipeline_is_the_identity():
    bundle = load({"name": "synthetic", "split_seed": 3})
    assert bundle.preprocessing == {"format": 1, "kind": "array", "raw_shape": [1, 8, 8], "ops": []}
    x, y = make_blobs(96 + 48 + 48, 3, (1, 8, 8), 0)
    assert_pipeline_reproduces(bundle, x, y)
    assert Pipeline.from_dict(bundle.preprocessing)(x.reshape(len(x), 64)).shape == (192, 1, 8, 8)


def test_make_blobs_balanced_in_range_and_deterministic():
    x, y = make_blobs(30, 3, (2, 5, 4), seed=7)
    assert x.shape == (30, 2, 5, 4) and x.dtype == np.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert np.bincount(y).tolist() == [10, 10, 10]
    x2, y2 = make_blobs(30, 3, (2, 5, 4), seed=7)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"bogus": 1}, "unknown option(s) bogus for data=synthetic"),
        ({"input_shape": [8]}, "data.input_shape must be a list [C, H, W] or [C, L]"),
        ({"input_shape": "1,8,8"}, "data.input_shape must be a list"),
        ({"input_shape": [1, 0, 8]}, "data.input_shape must be a list"),
        ({"num_classes": 1}, "data.num_classes must be an integer >= 2, got 1"),
        ({"n_train": 0}, "data.n_train must be an integer >= 1, got 0"),
        ({"n_val": 1.5}, "data.n_val must be an integer >= 0, got 1.5"),
        ({"seed": -1}, "data.seed must be an integer >= 0, got -1"),
    ],
)
def test_synthetic_bad_options(options, needle):
    with pytest.raises(DataError) as err:
        load({"name": "synthetic", **options})
    one_line(err, needle)

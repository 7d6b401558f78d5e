"""ensemble_service.data.splits: split sizes, stratified seeded splits, argument checks, bootstrap samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_formats import one_line
from ensemble_service.data import DataError, bootstrap_indices
from ensemble_service.data.splits import check_fraction, check_seed, count, split


def test_count_rounds_half_up():
    assert [count(0.2, n) for n in (0, 1, 2, 3, 7, 10, 1797)] == [0, 0, 0, 1, 1, 2, 359]
    assert count(0.25, 2) == 1 and count(0.25, 6) == 2  # 0.5 -> 1, 1.5 -> 2
    assert count(0.0, 100) == 0


def test_split_sizes_partition_and_determinism():
    y = np.arange(50) % 5
    keep, hold = split(y, 10, seed=3)
    assert len(keep) == 40 and len(hold) == 10
    assert sorted(np.concatenate([keep, hold]).tolist()) == list(range(50))
    again_keep, again_hold = split(y, 10, seed=3)
    assert np.array_equal(keep, again_keep) and np.array_equal(hold, again_hold)
    other_keep, other_hold = split(y, 10, seed=4)
    assert not np.array_equal(np.sort(hold), np.sort(other_hold))


def test_split_is_stratified():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    _, hold = split(y, 20, seed=0)
    assert np.bincount(y[hold], minlength=3).tolist() == [12, 6, 2]


def test_split_falls_back_to_random_when_stratifying_is_impossible():
    y = np.array([0, 0, 0, 0, 1])  # class 1 has a single member
    keep, hold = split(y, 2, seed=0)
    assert len(hold) == 2 and sorted(np.concatenate([keep, hold]).tolist()) == [0, 1, 2, 3, 4]
    y = np.arange(10)  # fewer holdout items (3) than classes (10)
    keep, hold = split(y, 3, seed=1)
    assert len(hold) == 3 and len(keep) == 7


def test_split_with_nothing_held_out_permutes():
    y = np.arange(8) % 2
    keep, hold = split(y, 0, seed=5)
    assert len(hold) == 0 and hold.dtype.kind == "i"
    assert sorted(keep.tolist()) == list(range(8))
    assert np.array_equal(keep, split(y, 0, seed=5)[0])


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999, 0, 1 / 3])
def test_check_fraction_accepts(value):
    assert check_fraction("val_fraction", value) == float(value)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.2, "0.2", None, True, float("nan")])
def test_check_fraction_refuses(value):
    with pytest.raises(DataError) as err:
        check_fraction("test_fraction", value)
    one_line(err, f"test_fraction must be a number in [0, 1), got {value!r}")


def test_check_seed():
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1 and check_seed(np.int64(7)) == 7
    for value in (-1, 2**32, 1.0, "3", True):
        with pytest.raises(DataError) as err:
            check_seed(value)
        one_line(err, f"split_seed must be an integer in [0, 2**32), got {value!r}")


def test_bootstrap_indices():
    a = bootstrap_indices(200, seed=11)
    b = bootstrap_indices(200, seed=11)
    c = bootstrap_indices(200, seed=12)
    assert a.dtype == torch.int64 and a.shape == (200,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 200
    assert len(torch.unique(a)) < 200  # sampling with replacement repeats indices
    # uses its own generator: the global torch RNG is untouched
    state = torch.get_rng_state()
    bootstrap_indices(50, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert bootstrap_indices(0, seed=0).shape == (0,)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError):
            bootstrap_indices(bad, seed=0)

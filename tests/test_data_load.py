"""ensemble_service.data: the registry of sources, info/check/load, and the splits as load makes them.
Offline and fast: every source is loaded from tiny files written here in its real format; MNIST-1D
is generated once per session."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from data_formats import (  # noqa: F401  (no_network: autouse fixture)
    bundle_tensors, image_array, mnist1d_generated, no_network, one_line, rows, write_cifar_dataset, write_csv,
    write_idx_dataset, write_image, write_npz, write_parquet,
)
from ensemble_service.data import (
    SOURCES, DataBundle, DataError, DatasetInfo, Pipeline, Raw, Source, check, describe, info, list_datasets, load,
    load_dataset, register_source,
)

ALL_DATASETS = ["arrays", "cifar10", "csv", "custom", "digits", "fashion_mnist", "image_folder", "mnist", "mnist1d", "parquet",
                "synthetic"]
USER_SOURCES = ("arrays", "csv", "custom", "image_folder", "parquet")
SCALED_TO_UNIT = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "image_folder")

LOADER = '''
import numpy as np


def load(n=30):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    return {"x": x, "y": np.arange(n) % 3}
'''


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A config per registered source, pointing at tiny files in its real format."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("mnist", "fashion_mnist", "cifar10", "user")}
    write_idx_dataset(roots["mnist"], "MNIST")
    write_idx_dataset(roots["fashion_mnist"], "FashionMNIST", gz=True)
    write_cifar_dataset(roots["cifar10"])
    user = roots["user"]
    rng = np.random.default_rng(0)
    write_npz(user / "a.npz", x=rng.normal(size=(30, 4)).astype(np.float32), y=np.arange(30) % 3)
    lines = ["f1,f2,label"] + [f"{i * 0.5},{(i * 7) % 11},{'ab'[i % 2]}" for i in range(20)]
    write_csv(user / "t.csv", "\n".join(lines) + "\n")
    for i in range(12):
        write_image(user / "imgs" / ("cat" if i % 2 else "dog") / f"{i}.png", image_array(i, 10 + i, 9, 1))
    (user / "loader_mod_load.py").write_text(LOADER)
    write_parquet(user / "pq", {"f1": rng.normal(size=40), "f2": np.arange(40) % 7, "label": np.arange(40) % 2},
                  row_group_size=8)
    sys.path.insert(0, str(user))
    yield {
        "digits": {"name": "digits"},
        "synthetic": {"name": "synthetic"},
        "mnist1d": {"name": "mnist1d", "root": str(mnist1d_generated(tmp_path_factory)["root"])},
        "mnist": {"name": "mnist", "root": str(roots["mnist"])},
        "fashion_mnist": {"name": "fashion_mnist", "root": str(roots["fashion_mnist"])},
        "cifar10": {"name": "cifar10", "root": str(roots["cifar10"])},
        "arrays": {"name": "arrays", "path": str(user / "a.npz")},
        "csv": {"name": "csv", "path": str(user / "t.csv"), "target": "label"},
        "image_folder": {"name": "image_folder", "root": str(user / "imgs"), "image_size": 6},
        "custom": {"name": "custom", "target": "loader_mod_load.load", "args": {"n": 30}},
        "parquet": {"name": "parquet", "path": str(user / "pq"), "target": "label", "streaming": False},
    }
    sys.path.remove(str(user))
    sys.modules.pop("loader_mod_load", None)


# ---------------------------------------------------------------------------------------------
# registry and infos
# ---------------------------------------------------------------------------------------------


def test_list_datasets_sorted_and_complete():
    names = list_datasets()
    assert names == sorted(names)
    assert set(ALL_DATASETS) <= set(names)


def test_static_infos():
    expected = {
        "digits": ((1, 8, 8), 10, False),
        "mnist1d": ((1, 40), 10, True),
        "synthetic": ((1, 8, 8), 3, True),
        "mnist": ((1, 28, 28), 10, True),
        "fashion_mnist": ((1, 28, 28), 10, True),
        "cifar10": ((3, 32, 32), 10, True),
        # the user's data: only the files tell
        "arrays": (None, None, False),
        "csv": (None, None, False),
        "image_folder": (None, None, False),
        "custom": (None, None, False),
    }
    for name, (shape, classes, has_test) in expected.items():
        got = info(name)
        assert isinstance(got, DatasetInfo)
        assert (got.name, got.input_shape, got.num_classes, got.has_test_split) == (name, shape, classes, has_test)
        assert got.description
        with pytest.raises(Exception):
            got.num_classes = 3  # frozen


def test_info_takes_a_config():
    assert info({"name": "synthetic", "input_shape": [2, 16], "num_classes": 4}).input_shape == (2, 16)
    assert info({"name": "synthetic", "input_shape": [2, 16], "num_classes": 4}).num_classes == 4
    assert info({"name": "mnist", "root": "/nowhere"}).input_shape == (1, 28, 28)  # no files read


@pytest.mark.parametrize("name", list_datasets())
def test_info_matches_loaded_bundle(name, configs):
    if name not in configs:
        pytest.fail(f"data set {name!r} is registered but this test has no files for it")
    static = info(name)
    bundle = load(configs[name])
    assert isinstance(bundle, DataBundle)
    assert bundle.name == name
    if name in USER_SOURCES:
        assert static.input_shape is None and static.num_classes is None
    else:
        assert bundle.input_shape == static.input_shape
        assert bundle.num_classes == static.num_classes
    for split in ("train", "val", "test"):
        x, y = getattr(bundle, f"x_{split}"), getattr(bundle, f"y_{split}")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == bundle.input_shape
        assert x.shape[0] == y.shape[0] > 0
        assert 0 <= int(y.min()) and int(y.max()) < bundle.num_classes
        assert torch.isfinite(x).all()
        if name in SCALED_TO_UNIT:  # images are scaled to [0, 1]; mnist1d and csv are standardized
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    sizes = bundle.sizes()
    assert sizes == {"train": len(bundle.y_train), "val": len(bundle.y_val), "test": len(bundle.y_test)}
    assert bundle.preprocessing["format"] == 1
    assert Pipeline.from_dict(bundle.preprocessing).input_shape == bundle.input_shape


def test_user_sources_shapes_and_classes(configs):
    expected = {
        "arrays": ((4,), 3, None),
        "csv": ((2,), 2, ["a", "b"]),
        "image_folder": ((1, 6, 6), 2, ["cat", "dog"]),
        "custom": ((2, 3), 3, None),
    }
    for name, (shape, classes, names) in expected.items():
        bundle = load(configs[name])
        assert (bundle.input_shape, bundle.num_classes, bundle.class_names) == (shape, classes, names), name


def test_split_sizes_of_bundled_sets(tmp_path_factory):
    assert load_dataset("digits").sizes() == {"train": 1079, "val": 359, "test": 359}
    assert load_dataset("synthetic").sizes() == {"train": 96, "val": 48, "test": 48}
    assert mnist1d_generated(tmp_path_factory)["bundle"].sizes() == {"train": 3200, "val": 800, "test": 1000}


def test_load_dataset_takes_options(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.ones((10, 2)), y=np.arange(10) % 2)
    bundle = load_dataset("arrays", path=str(tmp_path / "a.npz"), val_fraction=0.1, test_fraction=0.3)
    assert bundle.sizes() == {"train": 6, "val": 1, "test": 3}
    assert bundle.label == "arrays:a.npz"


def test_unknown_name_lists_choices(tmp_path):
    for call in (
        lambda: info("foo"),
        lambda: info({"name": "foo"}),
        lambda: load({"name": "foo", "root": str(tmp_path)}),
        lambda: load_dataset("foo"),
        lambda: check({"name": "foo"}),
    ):
        with pytest.raises(DataError) as err:
            call()
        one_line(err, "unknown data set 'foo'",
                 "choose one of: arrays, cifar10, csv, custom, digits, fashion_mnist, image_folder, mnist, mnist1d, parquet, "
                 "synthetic")


def test_unknown_option_names_the_source_and_its_keys(tmp_path):
    with pytest.raises(DataError) as err:
        load({"name": "digits", "root": str(tmp_path)})
    one_line(err, "unknown option(s) root for data=digits", "it takes: split_seed, test_fraction, val_fraction")
    with pytest.raises(DataError) as err:
        check({"name": "csv", "colour": "red", "path": "x.csv"})
    one_line(err, "colour", "data=csv", "target")
    with pytest.raises(DataError) as err:
        load(["digits"])
    one_line(err, "a data config must be a mapping, got list")


def test_register_source_and_duplicates(monkeypatch):
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))
    with pytest.raises(ValueError):
        register_source(type("Dup", (Source,), {"name": "digits"}))

    @register_source
    class Tiny(Source):
        name = "tiny"
        description = "twenty points"

        def static_shape(self, cfg):
            return (1, 2), 2

        def load(self, cfg):
            x = np.arange(40, dtype=np.float32).reshape(20, 1, 2)
            return Raw(x, np.arange(20) % 2, Pipeline((1, 2)))

    assert "tiny" in list_datasets()
    assert info("tiny").input_shape == (1, 2)
    bundle = load_dataset("tiny", val_fraction=0.2, test_fraction=0.2)
    assert bundle.sizes() == {"train": 12, "val": 4, "test": 4}
    assert bundle.label == "tiny" and bundle.class_names is None
    with pytest.raises(ValueError):
        register_source(Tiny)


# ---------------------------------------------------------------------------------------------
# check: the cheap pre-flight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", os.path.join("MNIST", "raw", "train-images-idx3-ubyte")),
        ("fashion_mnist", os.path.join("FashionMNIST", "raw", "train-images-idx3-ubyte")),
        ("cifar10", os.path.join("cifar-10-batches-py", "data_batch_1")),
    ],
)
def test_missing_files_without_download(tmp_path, name, expected):
    cfg = {"name": name, "root": str(tmp_path)}
    for call in (lambda: check(cfg), lambda: load(cfg)):
        with pytest.raises(DataError) as err:
            call()
        one_line(err, str(tmp_path / expected), "pass data.download=true")
    check({**cfg, "download": True})  # with download allowed the pre-flight check passes, offline


def test_partially_missing_files_named(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        check({"name": "mnist", "root": str(tmp_path)})
    one_line(err, "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("cfg", [{"name": "digits"}, {"name": "synthetic"}, {"name": "mnist1d", "root": "/nowhere"}])
def test_no_files_needed(cfg):
    check(cfg)


def test_check_of_user_sources(tmp_path):
    for cfg, needles in [
        ({"name": "arrays"}, ["data=arrays needs data.path"]),
        ({"name": "arrays", "path": str(tmp_path / "no.npz")}, ["data.path=", "no.npz: no such file"]),
        ({"name": "csv", "path": str(tmp_path)}, ["is a directory, not a file"]),
        ({"name": "image_folder"}, ["data=image_folder needs data.root=DIR"]),
        ({"name": "custom", "target": "no_such_module_xyz.load"}, ["no module named 'no_such_module_xyz'"]),
    ]:
        with pytest.raises(DataError) as err:
            check(cfg)
        one_line(err, *needles)


def test_check_validates_fractions_and_seed():
    for cfg, needle in [
        ({"name": "digits", "val_fraction": 1.0}, "val_fraction must be a number in [0, 1), got 1.0"),
        ({"name": "digits", "test_fraction": "0.2"}, "test_fraction must be a number in [0, 1), got '0.2'"),
        ({"name": "digits", "split_seed": True}, "split_seed must be an integer in [0, 2**32), got True"),
    ]:
        with pytest.raises(DataError) as err:
            check(cfg)
        one_line(err, needle)


# ---------------------------------------------------------------------------------------------
# splits, as load makes them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_digits_stratified(seed):
    bundle = load_dataset("digits", split_seed=seed)
    full = np.bincount(torch.cat([bundle.y_train, bundle.y_val, bundle.y_test]).numpy(), minlength=10)
    total = full.sum()
    assert total == 1797
    for y in (bundle.y_train, bundle.y_val, bundle.y_test):
        counts = np.bincount(y.numpy(), minlength=10)
        expected = full * len(y) / total
        assert np.all(np.abs(counts - expected) <= 1.0), (counts, expected)


def test_val_split_from_train_stratified(configs):
    bundle = load(configs["mnist"])  # 50 train images, 5 per class
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 20}
    assert np.bincount(bundle.y_val.numpy(), minlength=10).tolist() == [1] * 10


@pytest.mark.parametrize("name", ["digits", "synthetic", "mnist", "cifar10", "arrays", "csv", "image_folder", "custom"])
def test_splits_deterministic_by_seed(name, configs):
    a = load({**configs[name], "split_seed": 3})
    b = load({**configs[name], "split_seed": 3})
    c = load({**configs[name], "split_seed": 4})
    assert all(torch.equal(u, v) for u, v in zip(bundle_tensors(a), bundle_tensors(b)))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_val, c.x_val)


def test_digits_splits_partition_the_data_set():
    from sklearn.datasets import load_digits

    bundle = load_dataset("digits", split_seed=5)
    full = (load_digits().data.astype(np.float32) / 16.0).reshape(-1, 64)
    parts = torch.cat([bundle.x_train, bundle.x_val, bundle.x_test]).reshape(-1, 64).numpy()
    assert len(parts) == len(full)
    # every original image appears exactly once across train/val/test (digits has no duplicate images)
    assert rows(full) == rows(parts)
    assert len(rows(parts)) == len(full)
    train, val, test = rows(bundle.x_train), rows(bundle.x_val), rows(bundle.x_test)
    assert not (train & val) and not (train & test) and not (val & test)


@pytest.mark.parametrize("name", ["synthetic", "mnist", "cifar10", "mnist1d", "arrays", "csv", "image_folder", "custom"])
def test_splits_disjoint(name, configs):
    bundle = load({**configs[name], "split_seed": 2})
    train, val, test = rows(bundle.x_train), rows(bundle.x_val), rows(bundle.x_test)
    assert len(train) == len(bundle.x_train)  # distinct samples, so set sizes are counts
    assert not (train & val) and not (train & test) and not (val & test)


def test_fraction_validation():
    for options, needle in [
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5 - 1e-9}, "no training data"),
        ({"split_seed": -1}, "split_seed"),
    ]:
        with pytest.raises(DataError) as err:
            load_dataset("digits", **options)
        one_line(err, needle)
    assert load_dataset("digits", val_fraction=0.0).sizes()["val"] == 0


def test_fractions_of_the_whole_set_rounded(tmp_path):
    # no official test split: test and validation are fractions of all 20 samples, rounded
    write_npz(tmp_path / "a.npz", x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    for val, test, sizes in [(0.2, 0.2, (12, 4, 4)), (0.1, 0.33, (11, 2, 7)), (0.0, 0.5, (10, 0, 10)),
                             (0.025, 0.025, (18, 1, 1))]:
        bundle = load({"name": "arrays", "path": str(tmp_path / "a.npz"), "val_fraction": val, "test_fraction": test})
        assert tuple(bundle.sizes().values()) == sizes, (val, test)


def test_given_val_split_is_kept_and_only_test_is_split_off(tmp_path):
    x = np.arange(20.0).reshape(10, 2)
    x_val = 100 + np.arange(6.0).reshape(3, 2)
    write_npz(tmp_path / "a.npz", x=x, y=np.arange(10) % 2, x_val=x_val, y_val=np.array([1, 0, 1]))
    bundle = load({"name": "arrays", "path": str(tmp_path / "a.npz"), "val_fraction": 0.3, "test_fraction": 0.2})
    assert bundle.sizes() == {"train": 8, "val": 3, "test": 2}
    assert torch.equal(bundle.x_val, torch.from_numpy(x_val.astype(np.float32)))  # as given, in order
    assert bundle.y_val.tolist() == [1, 0, 1]
    assert rows(torch.cat([bundle.x_train, bundle.x_test])) == rows(x)


def test_given_val_split_does_not_count_against_training_data(tmp_path):
    # 10 samples, test_fraction 0.45 -> 5 test; val_fraction does not apply since x_val is given
    write_npz(tmp_path / "a.npz", x=np.arange(20.0).reshape(10, 2), y=np.arange(10) % 2,
              x_val=np.zeros((2, 2)), y_val=np.array([0, 1]))
    bundle = load({"name": "arrays", "path": str(tmp_path / "a.npz"), "val_fraction": 0.5, "test_fraction": 0.45})
    assert bundle.sizes() == {"train": 5, "val": 2, "test": 5}


def test_given_test_split_val_taken_from_train(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.arange(20.0).reshape(10, 2), y=np.arange(10) % 2,
              x_test=np.full((4, 2), -1.0), y_test=np.array([0, 1, 1, 0]))
    bundle = load({"name": "arrays", "path": str(tmp_path / "a.npz"), "val_fraction": 0.2})
    assert bundle.sizes() == {"train": 8, "val": 2, "test": 4}
    assert bundle.y_test.tolist() == [0, 1, 1, 0]
    with pytest.raises(DataError) as err:
        load({"name": "arrays", "path": str(tmp_path / "a.npz"), "val_fraction": 0.96})
    one_line(err, "val_fraction=0.96 leaves no training data out of 10 samples")


# ---------------------------------------------------------------------------------------------
# bundle, description
# ---------------------------------------------------------------------------------------------


def test_bundle_is_picklable():
    bundle = load_dataset("synthetic")
    clone = pickle.loads(pickle.dumps(bundle))
    assert clone.name == "synthetic" and clone.input_shape == bundle.input_shape
    assert all(torch.equal(u, v) for u, v in zip(bundle_tensors(bundle), bundle_tensors(clone)))
    assert clone.sizes() == bundle.sizes()
    assert clone.preprocessing == bundle.preprocessing


def test_describe_is_one_line(configs):
    assert describe(load_dataset("digits")) == (
        "data digits: 1079 train / 359 val / 359 test, inputs [1, 8, 8], 10 classes; "
        "preprocessing: / 16, reshape [1, 8, 8]")
    text = describe(load(configs["csv"]))
    assert text == "data csv:t.csv: 12 train / 4 val / 4 test, inputs [2], 2 classes; preprocessing: standardize (feature)"
    assert describe(load(configs["image_folder"])).endswith("preprocessing: HWC -> CHW, / 255")
    assert describe(load(configs["arrays"])).endswith("preprocessing: none")

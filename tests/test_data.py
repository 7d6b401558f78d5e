"""Tests of ensemble_service.data. Offline and fast: the file-based data sets are exercised on tiny
files written here in their real on-disk formats; MNIST-1D is generated once per module."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_service import data
from ensemble_service.data import (
    DataBundle,
    DataError,
    DatasetInfo,
    bootstrap_indices,
    check_available,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)

ALL_DATASETS = ["cifar10", "digits", "fashion_mnist", "mnist", "mnist1d", "synthetic"]
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to download fails loudly instead of touching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------
# writers of the real on-disk formats
# ---------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim  # 00 00 08 (unsigned byte) <ndim>: 2051 for images, 2049 for labels
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _make_images(n: int, offset: int, size=(28, 28), channels=None) -> np.ndarray:
    """Distinct uint8 images: pixel values depend on the image number (offset + i)."""
    rng = np.random.default_rng(offset)
    shape = (n, *size) if channels is None else (n, channels * size[0] * size[1])
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = (offset + np.arange(n)) % 256  # make every image unique
    images.reshape(n, -1)[:, 1] = (offset + np.arange(n)) // 256
    return images


def write_idx_dataset(root: Path, folder: str, n_train=50, n_test=20, gz=False, mixed=False) -> dict:
    """Write the four IDX files of an MNIST-like data set under ``root/folder/raw``."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": _make_images(n_train, 0),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": _make_images(n_test, 1000),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for i, (name, array) in enumerate(arrays.items()):
        payload = _idx_bytes(array)
        if gz or (mixed and i % 2):
            with gzip.open(raw / (name + ".gz"), "wb") as fh:
                fh.write(payload)
        else:
            (raw / name).write_bytes(payload)
    return arrays


def _cifar_batch(n: int, offset: int) -> dict:
    # like the real files: bytes keys, uint8 data of shape (N, 3072), a list of int labels
    return {
        b"batch_label": f"batch {offset}".encode(),
        b"labels": [int(v) for v in (offset + np.arange(n)) % 10],
        b"data": _make_images(n, offset, size=(32, 32), channels=3),
        b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
    }


def write_cifar_dataset(root: Path, per_batch=4, n_test=6, protocol=2) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(per_batch, 100 * i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n_test, 1000)
    for name, batch in batches.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    return batches


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _same_states(a, b) -> bool:
    (py_a, np_a, t_a), (py_b, np_b, t_b) = a, b
    return (
        py_a == py_b
        and np_a[0] == np_b[0]
        and np.array_equal(np_a[1], np_b[1])
        and np_a[2:] == np_b[2:]
        and torch.equal(t_a, t_b)
    )


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    """Generate MNIST-1D once for the whole module; record the global RNG states around it."""
    root = tmp_path_factory.mktemp("mnist1d_root")
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    before = _rng_states()
    bundle = load_dataset("mnist1d", root=root)
    after = _rng_states()
    return {"root": root, "bundle": bundle, "before": before, "after": after}


@pytest.fixture(scope="module")
def file_roots(tmp_path_factory, mnist1d_run):
    """A root per data set holding tiny files in the real formats."""
    roots = {"digits": tmp_path_factory.mktemp("empty"), "synthetic": tmp_path_factory.mktemp("empty2")}
    roots["mnist1d"] = mnist1d_run["root"]
    roots["mnist"] = tmp_path_factory.mktemp("mnist")
    write_idx_dataset(roots["mnist"], "MNIST")
    roots["fashion_mnist"] = tmp_path_factory.mktemp("fashion")
    write_idx_dataset(roots["fashion_mnist"], "FashionMNIST", gz=True)
    roots["cifar10"] = tmp_path_factory.mktemp("cifar")
    write_cifar_dataset(roots["cifar10"])
    return roots


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
    }
    for name, (shape, classes, has_test) in expected.items():
        info = dataset_info(name)
        assert isinstance(info, DatasetInfo)
        assert (info.name, info.input_shape, info.num_classes, info.has_test_split) == (name, shape, classes, has_test)
        assert info.description
        with pytest.raises(Exception):
            info.num_classes = 3  # frozen


@pytest.mark.parametrize("name", list_datasets())
def test_info_matches_loaded_bundle(name, file_roots):
    if name not in file_roots:
        pytest.fail(f"data set {name!r} is registered but this test has no files for it")
    info = dataset_info(name)
    bundle = load_dataset(name, root=file_roots[name])
    assert isinstance(bundle, DataBundle)
    assert bundle.name == name
    assert bundle.input_shape == info.input_shape
    assert bundle.num_classes == info.num_classes
    for split in ("train", "val", "test"):
        x, y = getattr(bundle, f"x_{split}"), getattr(bundle, f"y_{split}")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == info.input_shape
        assert x.shape[0] == y.shape[0] > 0
        assert 0 <= int(y.min()) and int(y.max()) < info.num_classes
        assert torch.isfinite(x).all()
        if name != "mnist1d":  # images are scaled to [0, 1]; mnist1d is standardized
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    sizes = bundle.sizes()
    assert sizes == {"train": len(bundle.y_train), "val": len(bundle.y_val), "test": len(bundle.y_test)}


def test_split_sizes_of_bundled_sets(mnist1d_run):
    assert load_dataset("digits").sizes() == {"train": 1079, "val": 359, "test": 359}
    assert load_dataset("synthetic").sizes() == {"train": 96, "val": 48, "test": 48}
    assert mnist1d_run["bundle"].sizes() == {"train": 3200, "val": 800, "test": 1000}


def test_unknown_name_lists_choices(tmp_path):
    for call in (
        lambda: dataset_info("foo"),
        lambda: load_dataset("foo", root=tmp_path),
        lambda: check_available("foo", tmp_path, False),
    ):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert "unknown data set 'foo'" in msg
        assert "choose one of: cifar10, digits, fashion_mnist, mnist, mnist1d, synthetic" in msg


def test_register_dataset_and_duplicates(monkeypatch):
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    with pytest.raises(ValueError):
        register_dataset("digits", input_shape=(1, 8, 8), num_classes=10, has_test_split=False, description="x")(
            lambda **kw: {}
        )

    @register_dataset("tiny", input_shape=(1, 2), num_classes=2, has_test_split=False, description="two points")
    def _tiny(*, root, options, split_seed):
        x = np.arange(40, dtype=np.float32).reshape(20, 1, 2)
        return {"x_train": x, "y_train": np.arange(20) % 2}

    assert "tiny" in list_datasets()
    assert dataset_info("tiny").input_shape == (1, 2)
    bundle = load_dataset("tiny", val_fraction=0.2, test_fraction=0.2)
    assert bundle.sizes() == {"train": 12, "val": 4, "test": 4}
    with pytest.raises(ValueError):
        register_dataset("tiny", input_shape=(1, 2), num_classes=2, has_test_split=False, description="again")


# ---------------------------------------------------------------------------------------------
# splits
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


def test_val_split_from_train_stratified(file_roots):
    bundle = load_dataset("mnist", root=file_roots["mnist"])  # 50 train images, 5 per class
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 20}
    assert np.bincount(bundle.y_val.numpy(), minlength=10).tolist() == [1] * 10


def _bundle_tensors(bundle):
    return [bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, bundle.x_test, bundle.y_test]


@pytest.mark.parametrize("name", ["digits", "synthetic", "mnist", "cifar10"])
def test_splits_deterministic_by_seed(name, file_roots):
    root = file_roots[name]
    a = load_dataset(name, root=root, split_seed=3)
    b = load_dataset(name, root=root, split_seed=3)
    c = load_dataset(name, root=root, split_seed=4)
    assert all(torch.equal(u, v) for u, v in zip(_bundle_tensors(a), _bundle_tensors(b)))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_val, c.x_val)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_digits_splits_partition_the_data_set():
    from sklearn.datasets import load_digits

    bundle = load_dataset("digits", split_seed=5)
    full = (load_digits().data.astype(np.float32) / 16.0).reshape(-1, 64)
    parts = torch.cat([bundle.x_train, bundle.x_val, bundle.x_test]).reshape(-1, 64).numpy()
    assert len(parts) == len(full)
    # every original image appears exactly once across train/val/test (digits has no duplicate images)
    assert _rows(torch.from_numpy(full)) == _rows(torch.from_numpy(parts))
    assert len(_rows(torch.from_numpy(parts))) == len(full)
    train, val, test = _rows(bundle.x_train), _rows(bundle.x_val), _rows(bundle.x_test)
    assert not (train & val) and not (train & test) and not (val & test)


@pytest.mark.parametrize("name", ["synthetic", "mnist", "cifar10", "mnist1d"])
def test_splits_disjoint(name, file_roots):
    bundle = load_dataset(name, root=file_roots[name], split_seed=2)
    train, val, test = _rows(bundle.x_train), _rows(bundle.x_val), _rows(bundle.x_test)
    assert len(train) == len(bundle.x_train)  # distinct samples, so set sizes are counts
    assert not (train & val) and not (train & test) and not (val & test)


def test_fraction_validation():
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.2)
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=-0.1)
    with pytest.raises(DataError, match="no training data"):
        load_dataset("digits", val_fraction=0.5, test_fraction=0.5 - 1e-9)
    with pytest.raises(DataError, match="split_seed"):
        load_dataset("digits", split_seed=-1)
    assert load_dataset("digits", val_fraction=0.0).sizes()["val"] == 0


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_options_and_learnable():
    bundle = load_dataset(
        "synthetic", synthetic={"n_train": 40, "n_val": 8, "n_test": 12, "num_classes": 4, "input_shape": [2, 16]}
    )
    assert bundle.sizes() == {"train": 40, "val": 8, "test": 12}
    assert bundle.input_shape == (2, 16) and bundle.num_classes == 4
    assert tuple(bundle.x_train.shape) == (40, 2, 16)
    assert dataset_info("synthetic", {"input_shape": [2, 16], "num_classes": 4}).input_shape == (2, 16)

    default = load_dataset("synthetic")
    # a nearest-class-mean classifier does far better than chance (1/3)
    means = torch.stack([default.x_train[default.y_train == k].mean(0) for k in range(3)])
    dist = ((default.x_test[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == default.y_test).float().mean() > 0.8


@pytest.mark.parametrize(
    "options",
    [{"bogus": 1}, {"input_shape": [8]}, {"input_shape": "1,8,8"}, {"num_classes": 1}, {"n_train": 0}, {"n_val": 1.5}],
)
def test_synthetic_bad_options(options):
    with pytest.raises(DataError):
        load_dataset("synthetic", synthetic=options)


# ---------------------------------------------------------------------------------------------
# mnist1d
# ---------------------------------------------------------------------------------------------


def test_mnist1d_restores_global_rng_state(mnist1d_run):
    assert _same_states(mnist1d_run["before"], mnist1d_run["after"])


def test_mnist1d_cache_is_reused(mnist1d_run, monkeypatch):
    cache = mnist1d_run["root"] / "mnist1d" / "mnist1d.npz"
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as npz:
        assert npz["x"].shape == (4000, 40) and npz["x_test"].shape == (1000, 40)

    def must_not_run():
        raise AssertionError("MNIST-1D generated again despite the cache")

    monkeypatch.setattr(data, "_generate_mnist1d", must_not_run)
    again = load_dataset("mnist1d", root=mnist1d_run["root"])
    first = mnist1d_run["bundle"]
    assert all(torch.equal(u, v) for u, v in zip(_bundle_tensors(first), _bundle_tensors(again)))


def test_mnist1d_generated_once_then_cached(tmp_path, monkeypatch):
    calls = []

    def fake_generate():
        calls.append(1)
        rng = np.random.default_rng(0)
        return {
            "x": rng.normal(size=(50, 40)).astype(np.float32),
            "y": np.arange(50) % 10,
            "x_test": rng.normal(size=(10, 40)).astype(np.float32),
            "y_test": np.arange(10) % 10,
        }

    monkeypatch.setattr(data, "_generate_mnist1d", fake_generate)
    first = load_dataset("mnist1d", root=tmp_path)
    second = load_dataset("mnist1d", root=tmp_path)
    assert len(calls) == 1
    assert (tmp_path / "mnist1d" / "mnist1d.npz").is_file()
    assert torch.equal(first.x_train, second.x_train)
    # a corrupt cache is regenerated, not trusted
    (tmp_path / "mnist1d" / "mnist1d.npz").write_bytes(b"garbage")
    load_dataset("mnist1d", root=tmp_path)
    assert len(calls) == 2


def test_mnist1d_standardized_with_train_statistics(mnist1d_run):
    bundle = mnist1d_run["bundle"]
    assert abs(float(bundle.x_train.mean())) < 1e-4
    assert abs(float(bundle.x_train.std()) - 1.0) < 1e-3


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "gz", "mixed"])
def test_idx_values_round_trip(tmp_path, layout):
    arrays = write_idx_dataset(tmp_path, "MNIST", gz=layout == "gz", mixed=layout == "mixed")
    bundle = load_dataset("mnist", root=tmp_path)
    # the official test split keeps its order
    expected_test = arrays["t10k-images-idx3-ubyte"].astype(np.float32)[:, None] / 255.0
    assert torch.equal(bundle.x_test, torch.from_numpy(expected_test))
    assert bundle.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # train + val hold exactly the training images, each with its own label
    written = {
        img.astype(np.float32).tobytes(): int(lab)
        for img, lab in zip(arrays["train-images-idx3-ubyte"].reshape(50, -1), arrays["train-labels-idx1-ubyte"])
    }
    got = {}
    for x, y in ((bundle.x_train, bundle.y_train), (bundle.x_val, bundle.y_val)):
        for img, lab in zip((x * 255.0).round().reshape(len(x), -1).numpy(), y.tolist()):
            got[img.tobytes()] = lab
    assert got == written


def test_fashion_mnist_layout(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST", mixed=True)
    check_available("fashion_mnist", tmp_path, False)
    assert load_dataset("fashion_mnist", root=tmp_path).sizes() == {"train": 40, "val": 10, "test": 20}
    with pytest.raises(DataError, match="MNIST/raw"):
        check_available("mnist", tmp_path, False)  # a different folder


def test_idx_corrupt_magic(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    payload = bytearray(path.read_bytes())
    payload[2] = 0x42  # not an IDX type code
    path.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="magic") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


def test_idx_swapped_files_rejected(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(labels)  # labels where images belong: magic 2049 != 2051
    with pytest.raises(DataError, match="magic"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "shape", "count", "gzip"])
def test_idx_corrupt_contents(tmp_path, damage):
    write_idx_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-7])
    elif damage == "shape":
        images.write_bytes(_idx_bytes(_make_images(50, 0, size=(27, 27))))
    elif damage == "count":
        (raw / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(49, np.uint8)))
    else:
        images.unlink()
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_values_round_trip(tmp_path, protocol):
    batches = write_cifar_dataset(tmp_path, protocol=protocol)
    bundle = load_dataset("cifar10", root=tmp_path)
    assert bundle.sizes() == {"train": 16, "val": 4, "test": 6}
    test = batches["test_batch"]
    expected = test[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    assert torch.equal(bundle.x_test, torch.from_numpy(expected))
    assert bundle.y_test.tolist() == test[b"labels"]
    n_train = sum(len(batches[f"data_batch_{i}"][b"labels"]) for i in range(1, 6))
    assert len(bundle.y_train) + len(bundle.y_val) == n_train


def test_cifar_str_keys_like_python2_pickles(tmp_path):
    # Python 2 pickles of the official files load with str keys under encoding='latin1'
    write_cifar_dataset(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = {"data": _make_images(3, 7, size=(32, 32), channels=3), "labels": [1, 2, 3], "batch_label": "b"}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    assert load_dataset("cifar10", root=tmp_path).y_test.tolist() == [1, 2, 3]


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_forbidden_global_never_executed(tmp_path, protocol):
    write_cifar_dataset(tmp_path)
    marker = tmp_path / "pwned"
    batch = _cifar_batch(4, 100)
    batch[b"payload"] = _Evil(f"touch {marker}")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    with pytest.raises(DataError, match="forbidden global") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "system" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["not_pickle", "wrong_shape", "label_count", "not_dict"])
def test_cifar_corrupt_batch(tmp_path, damage):
    write_cifar_dataset(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "not_pickle":
        path.write_bytes(b"this is not a pickle")
    else:
        obj = {
            "wrong_shape": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            "label_count": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            "not_dict": [1, 2, 3],
        }[damage]
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# availability and downloading
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
    for call in (lambda: check_available(name, tmp_path, False), lambda: load_dataset(name, root=tmp_path)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert str(tmp_path / expected) in msg
        assert "pass data.download=true" in msg
        assert "\n" not in msg
    check_available(name, tmp_path, True)  # with download allowed the pre-flight check passes, offline


def test_partially_missing_files_named(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        check_available("mnist", tmp_path, False)


@pytest.mark.parametrize("name", ["digits", "synthetic", "mnist1d"])
def test_no_files_needed(tmp_path, name):
    check_available(name, tmp_path, False)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_network_failure_is_one_line_data_error(tmp_path, monkeypatch, name):
    requested = []

    def offline(request, *args, **kwargs):
        requested.append(request.full_url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        load_dataset(name, root=tmp_path, download=True)
    msg = str(err.value)
    assert "could not download" in msg and "\n" not in msg
    assert requested and requested[0].startswith(("https://", "http://"))
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


# ---------------------------------------------------------------------------------------------
# bundle and bootstrap
# ---------------------------------------------------------------------------------------------


def test_bundle_is_picklable():
    bundle = load_dataset("synthetic")
    clone = pickle.loads(pickle.dumps(bundle))
    assert clone.name == "synthetic" and clone.input_shape == bundle.input_shape
    assert all(torch.equal(u, v) for u, v in zip(_bundle_tensors(bundle), _bundle_tensors(clone)))
    assert clone.sizes() == bundle.sizes()


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
    with pytest.raises(ValueError):
        bootstrap_indices(-1, seed=0)


# ---------------------------------------------------------------------------------------------
# downloading, offline: a fake urlopen serves tiny files in the real formats
# ---------------------------------------------------------------------------------------------


def _serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    import io

    requested = []

    def fake_urlopen(request, *args, **kwargs):
        url = request.full_url
        requested.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(files[name])

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    return requested


def _md5_bytes(payload: bytes) -> str:
    import hashlib

    return hashlib.md5(payload).hexdigest()


def test_mnist_download_into_torchvision_layout(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_idx_dataset(source, "MNIST", gz=True)
    files = {p.name: p.read_bytes() for p in (source / "MNIST" / "raw").iterdir()}
    for name, payload in files.items():
        monkeypatch.setitem(data._MNIST_MD5, name, _md5_bytes(payload))
    requested = _serve(monkeypatch, files)
    root = tmp_path / "root"
    bundle = load_dataset("mnist", root=root, download=True)
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 20}
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(n + ".gz" for n in IDX_NAMES)
    assert all(url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for url in requested)
    # already there: no second download
    requested.clear()
    load_dataset("mnist", root=root, download=True)
    assert requested == []


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    _serve(monkeypatch, {n + ".gz": b"not the real file" for n in IDX_NAMES})
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def _tar_gz(members: dict[str, bytes], extra=None) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def test_cifar_download_extracts_safely(tmp_path, monkeypatch):
    import tarfile

    source = tmp_path / "source"
    write_cifar_dataset(source)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in (source / "cifar-10-batches-py").iterdir()}
    members["../escaped"] = b"outside"
    members["/abs_escaped"] = b"outside"
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_gz(members, extra=[link])
    monkeypatch.setattr(data, "_CIFAR_TGZ_MD5", _md5_bytes(archive))
    for name, payload in members.items():
        if name.startswith("cifar-10-batches-py/"):
            monkeypatch.setitem(data._CIFAR_MD5, name.split("/", 1)[1], _md5_bytes(payload))
    requested = _serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    root = tmp_path / "root"
    bundle = load_dataset("cifar10", root=root, download=True)
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert bundle.sizes() == {"train": 16, "val": 4, "test": 6}
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()
    assert not Path("/abs_escaped").exists()
    assert not (root / "cifar-10-python.tar.gz").exists()  # archive removed after extraction

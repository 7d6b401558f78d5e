"""ensemble_service.data.torchvision: MNIST / Fashion-MNIST (IDX files) and CIFAR-10 (pickled batches)
in torchvision's layout, read from tiny files written in the real formats. Downloads are served by a
fake ``urlopen``; a test never touches the network."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from data_formats import (  # noqa: F401  (no_network: autouse fixture)
    IDX_NAMES, cifar_batch, idx_bytes, make_images, no_network, one_line, write_cifar_dataset, write_idx_dataset,
)
from ensemble_service.data import DataError, Pipeline, check, load
from ensemble_service.data import torchvision as tv


def _load(name, root, **options):
    return load({"name": name, "root": str(root), **options})


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "gz", "mixed"])
def test_idx_values_round_trip(tmp_path, layout):
    arrays = write_idx_dataset(tmp_path, "MNIST", gz=layout == "gz", mixed=layout == "mixed")
    bundle = _load("mnist", tmp_path)
    # the official test split keeps its order
    expected_test = arrays["t10k-images-idx3-ubyte"].astype(np.float32)[:, None] / np.float32(255.0)
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


def test_mnist_pipeline_takes_the_files_bytes(tmp_path):
    arrays = write_idx_dataset(tmp_path, "MNIST")
    bundle = _load("mnist", tmp_path)
    assert bundle.class_names == [str(d) for d in range(10)] and bundle.label == "mnist"
    assert bundle.preprocessing == {"format": 1, "kind": "array", "raw_shape": [28, 28],
                                    "ops": [{"op": "divide", "by": 255.0}, {"op": "reshape", "shape": [1, 28, 28]}]}
    pipeline = Pipeline.from_dict(bundle.preprocessing)
    raw_test = arrays["t10k-images-idx3-ubyte"]  # uint8 0..255, as a client sends them
    assert torch.equal(torch.from_numpy(pipeline(raw_test)), bundle.x_test)
    assert torch.equal(torch.from_numpy(pipeline(raw_test.reshape(20, 784).tolist())), bundle.x_test)


def test_fashion_mnist_layout(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST", mixed=True)
    check({"name": "fashion_mnist", "root": str(tmp_path)})
    bundle = _load("fashion_mnist", tmp_path)
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 20}
    assert bundle.class_names[0] == "T-shirt/top" and bundle.class_names[9] == "Ankle boot"
    with pytest.raises(DataError) as err:
        check({"name": "mnist", "root": str(tmp_path)})  # a different folder
    one_line(err, "MNIST/raw")


def test_idx_corrupt_magic(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    payload = bytearray(path.read_bytes())
    payload[2] = 0x42  # not an IDX type code
    path.write_bytes(bytes(payload))
    with pytest.raises(DataError) as err:
        _load("mnist", tmp_path)
    one_line(err, "magic", str(path))


def test_idx_swapped_files_rejected(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(labels)  # labels where images belong: magic 2049 != 2051
    with pytest.raises(DataError) as err:
        _load("mnist", tmp_path)
    one_line(err, "magic")


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "announces"),
    ("shape", "expected (28, 28)"),
    ("count", "has 49 labels but"),
    ("gzip", "cannot read"),
    ("label", "labels above 9"),
])
def test_idx_corrupt_contents(tmp_path, damage, needle):
    write_idx_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-7])
    elif damage == "shape":
        images.write_bytes(idx_bytes(make_images(50, 0, size=(27, 27))))
    elif damage == "count":
        (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(49, np.uint8)))
    elif damage == "label":
        (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(50, 10, np.uint8)))
    else:
        images.unlink()
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError) as err:
        _load("mnist", tmp_path)
    one_line(err, needle)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_values_round_trip(tmp_path, protocol):
    batches = write_cifar_dataset(tmp_path, protocol=protocol)
    bundle = _load("cifar10", tmp_path)
    assert bundle.sizes() == {"train": 16, "val": 4, "test": 6}
    test = batches["test_batch"]
    expected = test[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    assert torch.equal(bundle.x_test, torch.from_numpy(expected))
    assert bundle.y_test.tolist() == test[b"labels"]
    n_train = sum(len(batches[f"data_batch_{i}"][b"labels"]) for i in range(1, 6))
    assert len(bundle.y_train) + len(bundle.y_val) == n_train


def test_cifar_pipeline_takes_the_files_bytes(tmp_path):
    batches = write_cifar_dataset(tmp_path)
    bundle = _load("cifar10", tmp_path)
    assert bundle.class_names[:3] == ["airplane", "automobile", "bird"] and bundle.input_shape == (3, 32, 32)
    assert bundle.preprocessing == {"format": 1, "kind": "array", "raw_shape": [3, 32, 32],
                                    "ops": [{"op": "divide", "by": 255.0}]}
    pipeline = Pipeline.from_dict(bundle.preprocessing)
    raw = batches["test_batch"][b"data"]  # [N, 3072] bytes, channel-major: what the files hold
    assert torch.equal(torch.from_numpy(pipeline(raw)), bundle.x_test)
    assert torch.equal(torch.from_numpy(pipeline(raw.reshape(-1, 3, 32, 32))), bundle.x_test)


def test_cifar_str_keys_like_python2_pickles(tmp_path):
    # Python 2 pickles of the official files load with str keys under encoding='latin1'
    write_cifar_dataset(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = {"data": make_images(3, 7, size=(32, 32), channels=3), "labels": [1, 2, 3], "batch_label": "b"}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    assert _load("cifar10", tmp_path).y_test.tolist() == [1, 2, 3]


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_forbidden_global_never_executed(tmp_path, protocol):
    write_cifar_dataset(tmp_path)
    marker = tmp_path / "pwned"
    batch = cifar_batch(4, 100)
    batch[b"payload"] = _Evil(f"touch {marker}")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    with pytest.raises(DataError) as err:
        _load("cifar10", tmp_path)
    one_line(err, "forbidden global", "system", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("damage, needle", [
    ("not_pickle", "is not a readable CIFAR-10 batch"),
    ("wrong_shape", "no uint8 'data' array of shape (N, 3072)"),
    ("label_count", "has 1 labels for 2 images"),
    ("not_dict", "does not hold a CIFAR-10 batch dict"),
    ("bad_label", "labels outside 0..9"),
    ("text_label", "non-integer 'labels'"),
])
def test_cifar_corrupt_batch(tmp_path, damage, needle):
    write_cifar_dataset(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "not_pickle":
        path.write_bytes(b"this is not a pickle")
    else:
        obj = {
            "wrong_shape": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            "label_count": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            "not_dict": [1, 2, 3],
            "bad_label": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            "text_label": {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]},
        }[damage]
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError) as err:
        _load("cifar10", tmp_path)
    one_line(err, needle, str(path))


# ---------------------------------------------------------------------------------------------
# downloading, offline: a fake urlopen fails or serves tiny files in the real formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_network_failure_is_one_line_data_error(tmp_path, monkeypatch, name):
    requested = []

    def offline(request, *args, **kwargs):
        requested.append(request.full_url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        _load(name, tmp_path, download=True)
    one_line(err, "could not download", "Name or service not known")
    assert requested and requested[0].startswith(("https://", "http://"))
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


def _serve(monkeypatch, files: dict) -> list:
    requested = []

    def fake_urlopen(request, *args, **kwargs):
        url = request.full_url
        requested.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(files[name])

    monkeypatch.setattr(tv.urllib.request, "urlopen", fake_urlopen)
    return requested


def _md5_bytes(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


def test_mnist_download_into_torchvision_layout(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_idx_dataset(source, "MNIST", gz=True)
    files = {p.name: p.read_bytes() for p in (source / "MNIST" / "raw").iterdir()}
    for name, payload in files.items():
        monkeypatch.setitem(tv._MNIST_MD5, name, _md5_bytes(payload))
    requested = _serve(monkeypatch, files)
    root = tmp_path / "root"
    bundle = _load("mnist", root, download=True)
    assert bundle.sizes() == {"train": 40, "val": 10, "test": 20}
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(n + ".gz" for n in IDX_NAMES)
    assert all(url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for url in requested)
    # already there: no second download
    requested.clear()
    _load("mnist", root, download=True)
    assert requested == []


def test_download_http_error(tmp_path, monkeypatch):
    _serve(monkeypatch, {})
    with pytest.raises(DataError) as err:
        _load("mnist", tmp_path, download=True)
    one_line(err, "could not download https://ossci-datasets.s3.amazonaws.com/mnist/", "Not Found")


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    _serve(monkeypatch, {n + ".gz": b"not the real file" for n in IDX_NAMES})
    with pytest.raises(DataError) as err:
        _load("fashion_mnist", tmp_path, download=True)
    one_line(err, "checksum mismatch")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def _tar_gz(members: dict, extra=None) -> bytes:
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
    source = tmp_path / "source"
    write_cifar_dataset(source)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in (source / "cifar-10-batches-py").iterdir()}
    members["../escaped"] = b"outside"
    members["/abs_escaped"] = b"outside"
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_gz(members, extra=[link])
    monkeypatch.setattr(tv, "_CIFAR_TGZ_MD5", _md5_bytes(archive))
    for name, payload in members.items():
        if name.startswith("cifar-10-batches-py/"):
            monkeypatch.setitem(tv._CIFAR_MD5, name.split("/", 1)[1], _md5_bytes(payload))
    requested = _serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    root = tmp_path / "root"
    bundle = _load("cifar10", root, download=True)
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert bundle.sizes() == {"train": 16, "val": 4, "test": 6}
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()
    assert not Path("/abs_escaped").exists()
    assert not (root / "cifar-10-python.tar.gz").exists()  # archive removed after extraction


def test_cifar_extracted_file_failing_its_checksum(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar_dataset(source)
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in (source / "cifar-10-batches-py").iterdir()}
    archive = _tar_gz(members)
    monkeypatch.setattr(tv, "_CIFAR_TGZ_MD5", _md5_bytes(archive))  # the published per-file md5s do not match
    _serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    with pytest.raises(DataError) as err:
        _load("cifar10", tmp_path / "root", download=True)
    one_line(err, "failed its md5 check after extraction")

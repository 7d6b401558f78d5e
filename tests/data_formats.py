"""Helpers for the tests of ensemble_service.data (imported as ``from data_formats import ...``).

Writers of the real on-disk formats (IDX, CIFAR-10 pickles, .npz, CSV, PNG/JPEG images), the
no-network fixture, the MNIST-1D data set generated once per test session, and assertions shared
by the per-module test files."""
from __future__ import annotations

import gzip
import io
import pickle
import random
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pytest
import torch

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# the network is off limits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download fails loudly instead of touching the network (import this fixture
    into a test module to make it autouse there)."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST) and CIFAR-10
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim  # 00 00 08 (unsigned byte) <ndim>: 2051 for images, 2049 for labels
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_images(n: int, offset: int, size=(28, 28), channels=None) -> np.ndarray:
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
        "train-images-idx3-ubyte": make_images(n_train, 0),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": make_images(n_test, 1000),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for i, (name, array) in enumerate(arrays.items()):
        payload = idx_bytes(array)
        if gz or (mixed and i % 2):
            with gzip.open(raw / (name + ".gz"), "wb") as fh:
                fh.write(payload)
        else:
            (raw / name).write_bytes(payload)
    return arrays


def cifar_batch(n: int, offset: int) -> dict:
    # like the real files: bytes keys, uint8 data of shape (N, 3072), a list of int labels
    return {
        b"batch_label": f"batch {offset}".encode(),
        b"labels": [int(v) for v in (offset + np.arange(n)) % 10],
        b"data": make_images(n, offset, size=(32, 32), channels=3),
        b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
    }


def write_cifar_dataset(root: Path, per_batch=4, n_test=6, protocol=2) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, 100 * i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, 1000)
    for name, batch in batches.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    return batches


# ---------------------------------------------------------------------------------------------
# the user's formats: .npz, CSV, image folders
# ---------------------------------------------------------------------------------------------


def write_npz(path: Path, **arrays: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_csv(path: Path, text: str) -> Path:
    """``text`` with its common leading indentation removed, written as is."""
    import textwrap

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def image_array(seed: int, height: int, width: int, channels: int) -> np.ndarray:
    """A smooth uint8 image (a gradient plus a seed-dependent offset), distinct per seed."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy * 7 + xx * 3 + seed * 37) % 256
    if channels == 1:
        return base.astype(np.uint8)
    return np.stack([(base + 80 * c) % 256 for c in range(channels)], axis=-1).astype(np.uint8)


def write_image(path: Path, array: np.ndarray, fmt: Optional[str] = None) -> Path:
    """``array`` (``[H, W]`` grey or ``[H, W, 3]`` RGB, uint8) as an image file (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt)
    return path


def write_image_folder(root: Path, classes: Dict[str, Sequence[tuple]]) -> List[tuple]:
    """``classes``: folder name -> list of ``(file name, height, width, channels)``. Returns
    ``[(path, class folder)]`` in writing order."""
    written = []
    seed = 0
    for folder, files in classes.items():
        for name, h, w, c in files:
            seed += 1
            written.append((write_image(root / folder / name, image_array(seed, h, w, c)), folder))
    return written


# ---------------------------------------------------------------------------------------------
# MNIST-1D, generated once per session (about 5 s)
# ---------------------------------------------------------------------------------------------


def rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def same_states(a, b) -> bool:
    (py_a, np_a, t_a), (py_b, np_b, t_b) = a, b
    return (
        py_a == py_b
        and np_a[0] == np_b[0]
        and np.array_equal(np_a[1], np_b[1])
        and np_a[2:] == np_b[2:]
        and torch.equal(t_a, t_b)
    )


_MNIST1D: Dict[str, Any] = {}


def mnist1d_generated(tmp_path_factory) -> Dict[str, Any]:
    """Generate MNIST-1D once per session into a fresh root (the real ``mnist1d`` package, no
    download); records the global RNG states just before and after. Keys: root, bundle, before, after."""
    if not _MNIST1D:
        from ensemble_service.data import load

        root = tmp_path_factory.mktemp("mnist1d_root")
        # the first load imports scikit-learn, whose imports (rich) draw from Python's global RNG once;
        # what is checked here is that loading (generating MNIST-1D included) draws nothing
        load({"name": "synthetic"})
        random.seed(123)
        np.random.seed(456)
        torch.manual_seed(789)
        before = rng_states()
        bundle = load({"name": "mnist1d", "root": str(root)})
        after = rng_states()
        _MNIST1D.update(root=root, bundle=bundle, before=before, after=after)
    return _MNIST1D


# ---------------------------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------------------------


def one_line(exc_info, *needles: str) -> str:
    """The message of ``pytest.raises``' exception: asserts it is one line holding every needle."""
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def bundle_tensors(bundle) -> list:
    return [bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, bundle.x_test, bundle.y_test]


def rows(x) -> set:
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return {row.tobytes() for row in np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)}


def labelled_rows(x, y) -> list:
    """Sorted ``(row bytes, label)`` pairs: a multiset of samples, comparable across orders."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return sorted((row.tobytes(), int(label)) for row, label in zip(flat, y))


def assert_pipeline_reproduces(bundle, raw_inputs: Any, raw_labels: Iterable[int]) -> None:
    """The pipeline stored in ``bundle.preprocessing``, rebuilt from its dict and applied to every raw
    sample of the data set (in the format a client sends), gives exactly the bundle's model inputs:
    the multiset of (model input, label) over train + val + test equals the transformed raw samples
    with their labels, and every test row is one of them (bit for bit)."""
    from ensemble_service.data import Pipeline

    pipeline = Pipeline.from_dict(bundle.preprocessing)
    transformed = pipeline(raw_inputs)
    labels = np.asarray(list(raw_labels))
    assert transformed.dtype == np.float32
    assert tuple(transformed.shape[1:]) == tuple(bundle.input_shape)
    assert len(rows(transformed)) == len(transformed), "raw samples must be distinct for this check"
    expected = labelled_rows(transformed, labels)
    got = labelled_rows(torch.cat([bundle.x_train, bundle.x_val, bundle.x_test]),
                        torch.cat([bundle.y_train, bundle.y_val, bundle.y_test]))
    assert got == expected
    test = labelled_rows(bundle.x_test, bundle.y_test)
    assert len(test) > 0 and set(test) <= set(expected)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(directory, columns: dict, files: int = 2, row_group_size: int = 1000):
    """``columns`` (name -> 1-D array) as ``files`` parquet files of consecutive rows under
    ``directory`` (one level down, to exercise the recursive listing), in row groups of
    ``row_group_size``; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path

    directory = Path(directory)
    (directory / "part").mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    bounds = np.linspace(0, n, files + 1).astype(int)
    for i in range(files):
        table = pa.table({k: np.asarray(v)[bounds[i]:bounds[i + 1]] for k, v in columns.items()})
        pq.write_table(table, directory / "part" / f"{i:04d}.parquet", row_group_size=row_group_size)
    return directory

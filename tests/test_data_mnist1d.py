"""ensemble_service.data.mnist1d: generated offline once (session-wide), cached, standardized with
the training split's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_formats import bundle_tensors, mnist1d_generated, no_network, rows, same_states  # noqa: F401
from ensemble_service.data import Pipeline, load
from ensemble_service.data import mnist1d as mnist1d_module


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    return mnist1d_generated(tmp_path_factory)


def _cache(root):
    with np.load(root / "mnist1d" / "mnist1d.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _fake_generate(calls):
    def generate():
        calls.append(1)
        rng = np.random.default_rng(0)
        return {
            "x": rng.normal(size=(50, 40)).astype(np.float32),
            "y": np.arange(50) % 10,
            "x_test": rng.normal(size=(10, 40)).astype(np.float32),
            "y_test": np.arange(10) % 10,
        }

    return generate


def test_mnist1d_restores_global_rng_state(mnist1d_run):
    assert same_states(mnist1d_run["before"], mnist1d_run["after"])


def test_mnist1d_bundle(mnist1d_run):
    bundle = mnist1d_run["bundle"]
    assert (bundle.input_shape, bundle.num_classes, bundle.label) == ((1, 40), 10, "mnist1d")
    assert bundle.class_names == [str(d) for d in range(10)]
    assert bundle.sizes() == {"train": 3200, "val": 800, "test": 1000}


def test_mnist1d_cache_is_reused(mnist1d_run, monkeypatch):
    cache = _cache(mnist1d_run["root"])
    assert cache["x"].shape == (4000, 40) and cache["x_test"].shape == (1000, 40)

    def must_not_run():
        raise AssertionError("MNIST-1D generated again despite the cache")

    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", must_not_run)
    again = load({"name": "mnist1d", "root": str(mnist1d_run["root"])})
    first = mnist1d_run["bundle"]
    assert all(torch.equal(u, v) for u, v in zip(bundle_tensors(first), bundle_tensors(again)))


def test_mnist1d_generated_once_then_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", _fake_generate(calls))
    first = load({"name": "mnist1d", "root": str(tmp_path)})
    second = load({"name": "mnist1d", "root": str(tmp_path)})
    assert len(calls) == 1
    assert (tmp_path / "mnist1d" / "mnist1d.npz").is_file()
    assert torch.equal(first.x_train, second.x_train)
    # a corrupt cache is regenerated, not trusted
    (tmp_path / "mnist1d" / "mnist1d.npz").write_bytes(b"garbage")
    load({"name": "mnist1d", "root": str(tmp_path)})
    assert len(calls) == 2


def test_mnist1d_malformed_cache_is_regenerated(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", _fake_generate(calls))
    cache = tmp_path / "mnist1d" / "mnist1d.npz"
    cache.parent.mkdir()
    np.savez(cache, x=np.zeros((5, 39)), y=np.zeros(5), x_test=np.zeros((2, 39)), y_test=np.zeros(2))  # length 39
    bundle = load({"name": "mnist1d", "root": str(tmp_path)})
    assert len(calls) == 1 and bundle.sizes() == {"train": 40, "val": 10, "test": 10}
    assert _cache(tmp_path)["x"].shape == (50, 40)
    np.savez(cache, x=np.zeros((5, 40)))  # keys missing
    load({"name": "mnist1d", "root": str(tmp_path)})
    assert len(calls) == 2


def test_mnist1d_standardized_with_train_statistics(mnist1d_run):
    bundle = mnist1d_run["bundle"]
    assert abs(float(bundle.x_train.mean())) < 1e-4
    assert abs(float(bundle.x_train.std()) - 1.0) < 1e-3
    op = bundle.preprocessing["ops"][0]
    assert (op["op"], op["mode"]) == ("standardize", "scalar")
    # the statistics are those of the raw signals that ended in the training split (not val, not test)
    cache = _cache(mnist1d_run["root"])
    pipeline = Pipeline.from_dict(bundle.preprocessing)
    transformed = pipeline(cache["x"])
    train_rows = rows(bundle.x_train)
    in_train = np.array([row.tobytes() in train_rows for row in transformed.reshape(4000, -1)])
    assert in_train.sum() == 3200
    raw_train = cache["x"][in_train].astype(np.float64)
    assert op["mean"] == pytest.approx(raw_train.mean(), rel=1e-6)
    assert op["std"] == pytest.approx(raw_train.std(), rel=1e-6)
    assert op["mean"] != pytest.approx(cache["x"].astype(np.float64).mean(), rel=1e-6)


def test_mnist1d_pipeline_takes_the_raw_signals(mnist1d_run):
    bundle = mnist1d_run["bundle"]
    cache = _cache(mnist1d_run["root"])
    pipeline = Pipeline.from_dict(bundle.preprocessing)
    assert bundle.preprocessing["raw_shape"] == [40] and pipeline.input_shape == (1, 40)
    # the official test split keeps its order: the raw test signals give exactly the bundle's test inputs
    assert torch.equal(torch.from_numpy(pipeline(cache["x_test"])), bundle.x_test)
    assert bundle.y_test.tolist() == cache["y_test"].tolist()

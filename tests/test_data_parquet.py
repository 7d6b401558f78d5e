"""data=parquet: the driver's pass (splits by row key, classes, statistics, labels in key order),
its one-line errors, and members streaming their epochs through Ray Data (resume, bagging)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_formats import write_parquet
from ensemble_service.data import DataError, StreamingBundle, is_streaming, load
from ensemble_service.data import streaming
from ensemble_service.planning import MemberSpec


def table(n=3000, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32) * np.arange(1, features + 1) + 3.0
    y = (x[:, 0] > 3.0).astype(int) + (x[:, 1] > 5.0).astype(int)
    cols = {f"f{j}": x[:, j] for j in range(features)}
    cols["kind"] = np.array(["ant", "bee", "cat"])[y]
    cols["note"] = np.array(["text"] * n)              # not numeric: never a default feature
    return cols, x, y


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory):
    cols, x, y = table()
    return write_parquet(tmp_path_factory.mktemp("pq"), cols, files=3, row_group_size=250), x, y


# --------------------------------------------------------------------------- keys, splits, bootstrap


def test_row_keys_depend_on_content_only():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    keys = streaming.row_keys(x, y)
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 4
    assert np.array_equal(streaming.row_keys(x[::-1], y[::-1]), keys[::-1])       # order of reading: no matter
    assert np.array_equal(streaming.row_keys(x.astype(np.float64), y), keys)       # float32 bits either way
    assert streaming.row_keys(x, y + 1)[0] != keys[0]                              # the label counts
    assert streaming.row_keys(x[:1] + 1e-3, y[:1])[0] != keys[0]


def test_split_fractions_and_poisson_bootstrap_counts():
    rng = np.random.default_rng(1)
    keys = streaming.row_keys(rng.normal(size=(40000, 3)), rng.integers(0, 3, 40000))
    split = streaming.assign_split(keys, 0.2, 0.1, seed=0)
    share = np.bincount(split, minlength=3) / len(split)
    np.testing.assert_allclose(share, [0.7, 0.2, 0.1], atol=0.01)
    assert not np.array_equal(streaming.assign_split(keys, 0.2, 0.1, seed=1), split)   # split_seed matters
    counts = streaming.poisson_counts(keys, seed=7)
    assert abs(counts.mean() - 1.0) < 0.02                                     # Poisson(1): mean 1
    assert abs((counts == 0).mean() - math.exp(-1)) < 0.01                     # 36.8% of rows left out
    assert abs((counts == 2).mean() - math.exp(-1) / 2) < 0.01
    assert np.array_equal(streaming.poisson_counts(keys, seed=7), counts)
    assert not np.array_equal(streaming.poisson_counts(keys, seed=8), counts)  # each member its own sample


def test_moments_over_batches_equal_numpy_over_the_whole():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 5)) * 100 + 1e4
    m = streaming.Moments()
    for part in np.array_split(x, 7):
        m.add(part)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std(), x.std(0), rtol=1e-9)


# --------------------------------------------------------------------------- the driver's pass


def test_the_driver_pass_splits_counts_and_standardizes_the_training_split(pq_dir):
    path, x, y = pq_dir
    bundle = load({"name": "parquet", "path": str(path), "target": "kind", "val_fraction": 0.2, "test_fraction": 0.1})
    assert isinstance(bundle, StreamingBundle) and is_streaming(bundle)
    assert bundle.input_shape == (4,) and bundle.num_classes == 3 and bundle.class_names == ["ant", "bee", "cat"]
    assert bundle.stream.features == ("f0", "f1", "f2", "f3")                   # "note" is not numeric
    assert len(bundle.stream.units) == 12                                         # 3 files x 4 row groups
    # by hand: the same keys and split rule over the whole table
    keys = streaming.row_keys(x, y)
    split = streaming.assign_split(keys, 0.2, 0.1, 0)
    assert bundle.sizes() == {"train": int((split == 0).sum()), "val": int((split == 1).sum()),
                              "test": int((split == 2).sum())}
    assert sum(bundle.sizes().values()) == 3000
    for s, labels in ((1, bundle.y_val), (2, bundle.y_test)):
        order = np.argsort(keys[split == s], kind="stable")
        assert labels.tolist() == y[split == s][order].tolist()
    std = bundle.preprocessing["ops"][0]
    np.testing.assert_allclose(std["mean"], x[split == 0].astype(np.float64).mean(0), rtol=1e-8)
    np.testing.assert_allclose(std["std"], x[split == 0].astype(np.float64).std(0), rtol=1e-6)
    assert bundle.preprocessing["kind"] == "table" and bundle.preprocessing["columns"] == ["f0", "f1", "f2", "f3"]


def test_streaming_false_loads_the_table_in_memory(pq_dir):
    path, x, y = pq_dir
    bundle = load({"name": "parquet", "path": str(path), "target": "kind", "features": ["f1", "f3"],
                   "streaming": False})
    assert not is_streaming(bundle) and bundle.input_shape == (2,)
    assert sum(bundle.sizes().values()) == 3000 and bundle.class_names == ["ant", "bee", "cat"]


@pytest.mark.parametrize("options, message", [
    ({"path": ""}, "data=parquet needs data.path=FILE_OR_DIR"),
    ({"path": "/nowhere/at/all"}, "data.path=/nowhere/at/all: no such file or directory"),
    ({"target": "species"}, "data.target='species' is not a column of"),
    ({"target": ""}, "data=parquet needs data.target=COLUMN"),
    ({"features": ["f0", "nope"]}, "data.features names column(s) nope"),
    ({"features": ["f0", "note"]}, "feature column(s) 'note' are not numeric"),
    ({"features": ["f0", "kind"]}, "must not include the target column 'kind'"),
    ({"read_tasks": 0}, "data.read_tasks must be at least 1"),
])
def test_bad_options_are_one_line(pq_dir, options, message):
    path, _, _ = pq_dir
    cfg = {"name": "parquet", "path": str(path), "target": "kind", **options}
    with pytest.raises(DataError) as err:
        from ensemble_service.data import check

        check(cfg)
        load(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_values_are_one_line(tmp_path):
    cols, _, _ = table(200)
    cols["f2"] = cols["f2"].copy()
    cols["f2"][17] = np.nan
    nan_dir = write_parquet(tmp_path / "nan", cols, files=1, row_group_size=50)
    with pytest.raises(DataError, match=r"1 NaN or infinite feature value\(s\) \(row group 0\)"):
        load({"name": "parquet", "path": str(nan_dir), "target": "kind"})
    one = write_parquet(tmp_path / "one", {"a": np.arange(10.0), "t": np.zeros(10, int)}, files=1)
    with pytest.raises(DataError, match=r"holds 1 distinct value\(s\) \(0\); a classifier needs at least 2"):
        load({"name": "parquet", "path": str(one), "target": "t"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .parquet files"):
        load({"name": "parquet", "path": str(tmp_path / "empty"), "target": "t"})


def test_a_parquet_set_on_s3_is_read_through_the_same_filesystem_as_checkpoints(s3, pq_dir):
    import pyarrow.fs as pafs

    from ensemble_service import storage

    path, _, _ = pq_dir
    fs, root = storage.filesystem(s3.uri("tables"))
    pafs.copy_files(str(path), root, destination_filesystem=fs)
    remote = load({"name": "parquet", "path": s3.uri("tables"), "target": "kind"})
    local = load({"name": "parquet", "path": str(path), "target": "kind"})
    assert remote.sizes() == local.sizes() and remote.preprocessing == local.preprocessing
    assert torch.equal(remote.y_test, local.y_test) and remote.label == "parquet:tables"
    assert remote.stream.units[0][0].startswith(f"{s3.name}/tables/")


# --------------------------------------------------------------------------- members streaming (Ray Data)


def member_spec(tmp_path, **kw):
    base = dict(index=0, seed=5, epochs=3, batch_size=64, bagging=False, device="cpu",
                model={"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
                       "depth": 1, "width": 16},
                optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
                checkpoint_path=str(tmp_path / "m.ckpt"))
    base.update(kw)
    return MemberSpec(**base)


class Stop(Exception):
    pass



@pytest.mark.slow
def test_a_streaming_member_resumes_like_an_uninterrupted_run(ray_here, pq_dir, tmp_path):
    from workers.member import train_member

    path, _, _ = pq_dir
    bundle = load({"name": "parquet", "path": str(path), "target": "kind"})
    whole = train_member(member_spec(tmp_path / "a"), bundle)
    assert whole.test_probs.shape == (bundle.sizes()["test"], 3) and whole.metrics["test_acc"] > 0.8

    def stop_after_1(event):
        if event["type"] == "epoch" and event["epoch"] == 1:
            raise Stop()

    spec = member_spec(tmp_path / "b")
    with pytest.raises(Stop):
        train_member(spec, bundle, report=stop_after_1)
    resumed = train_member(spec, bundle)
    assert resumed.resumed_from == 1
    torch.testing.assert_close(resumed.test_probs, whole.test_probs)   # same batches: same member
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in whole.history])


@pytest.mark.slow
def test_streamed_epochs_cover_the_training_split_or_the_bootstrap_sample(ray_here, pq_dir):
    path, x, y = pq_dir
    bundle = load({"name": "parquet", "path": str(path), "target": "kind"})
    keys = streaming.row_keys(x, y)
    train = streaming.assign_split(keys, 0.2, 0.2, 0) == 0

    def epoch_rows(seed, epoch, bagging):
        xs = [xb for xb, _ in bundle.train_batches(100, seed, epoch, bagging)]
        return torch.cat(xs)

    plain = epoch_rows(5, 0, False)
    assert len(plain) == bundle.sizes()["train"] == int(train.sum())
    again = epoch_rows(5, 0, False)
    assert torch.equal(plain, again)                                     # (seed, epoch) decides the order
    assert not torch.equal(epoch_rows(5, 1, False), plain)                # the next epoch is shuffled anew
    bagged = epoch_rows(5, 0, True)
    assert len(bagged) == int(streaming.poisson_counts(keys[train], 5).sum())   # the member's bootstrap sample
    # evaluation streams every validation row once; in key order they line up with y_val
    seen = [kb for _, kb in bundle.eval_batches("val", 128)]
    assert sorted(np.concatenate(seen).tolist()) == sorted(keys[streaming.assign_split(keys, 0.2, 0.2, 0) == 1].tolist())


NOT_CONNECTED = """
import sys, ray
from ensemble_service.data import load
bundle = load({"name": "parquet", "path": sys.argv[1], "target": "kind"})
try:
    next(iter(bundle.train_batches(64, 0, 0, False)))
except RuntimeError as exc:
    print("refused:", exc)
print("ray initialized:", ray.is_initialized())
"""


def test_streaming_needs_a_connected_ray_and_never_starts_one(pq_dir):
    import subprocess
    import sys

    path, _, _ = pq_dir
    out = subprocess.run([sys.executable, "-c", NOT_CONNECTED, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: data=parquet streams through Ray Data inside a Ray cluster" in out.stdout
    assert "ray initialized: False" in out.stdout


def test_streaming_is_refused_for_trajectories_and_packs(pq_dir):
    from ensemble_service.config import ConfigError, load_config

    path, _, _ = pq_dir
    base = ["data=parquet", f"data.path={path}", "data.target=kind"]
    with pytest.raises(ConfigError, match="strategy=snapshot needs its data in memory"):
        load_config([*base, "strategy=snapshot", "optimizer=sgd", "trainer.epochs=10"])
    with pytest.raises(ConfigError, match="cluster.pack needs the data in memory"):
        load_config([*base, "cluster.pack=2"])
    assert load_config([*base, "strategy=snapshot", "optimizer=sgd", "trainer.epochs=10", "data.streaming=false"])

"""data=arrays / data=image_folder with data.streaming=true: rows read in place from an .npz (unit
by unit, never the whole array), ready-made splits kept whole, the driver's pass (splits, classes,
statistics, labels in key order) checked against NumPy by hand, image units decoded like the
in-memory load, wide-row keys, one-line errors, and members streaming both through Ray Data."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from data_formats import write_image_folder
from ensemble_service.data import (
    SOURCES, DataError, StreamingBundle, as_config, check, is_streaming, load, npz, streaming,
)


def arrays_cfg(path, **kw):
    return {"name": "arrays", "path": str(path), "streaming": True, **kw}


def by_key(keys, values):
    return np.asarray(values)[np.argsort(keys, kind="stable")]


# --------------------------------------------------------------------------- .npz rows in place


@pytest.mark.parametrize("x, y", [
    (np.arange(103 * 5, dtype=np.float64).reshape(103, 5) / 7, np.arange(103, dtype=np.int32) % 3),
    (np.random.default_rng(0).integers(0, 256, (103, 4, 3), dtype=np.uint8), (np.arange(103) % 2).astype(np.uint8)),
    (np.random.default_rng(1).normal(size=(103, 2, 2, 2)).astype(">f4"), (np.arange(103) % 4).astype(np.float64)),
])
def test_units_read_the_rows_np_load_reads(tmp_path, x, y):
    path = tmp_path / "a.npz"
    np.savez(path, x=x, y=y)
    bundle = load(arrays_cfg(path, rows_per_unit=10, val_fraction=0.1, test_fraction=0.1))
    assert [u[2] for u in bundle.stream.units] == [10] * 10 + [3]              # the last unit: rows 100-102
    source = SOURCES.get("arrays")
    with np.load(path) as whole:
        for key, unit, rows in bundle.stream.units:
            xu, yu = source.read_unit(bundle.stream, key, unit)
            assert xu.dtype == whole["x"].dtype and np.array_equal(xu, whole["x"][unit * 10:unit * 10 + rows])
            assert yu.dtype == np.int64 and yu.tolist() == whole["y"][unit * 10:unit * 10 + rows].astype(int).tolist()
    assert bundle.input_shape == x.shape[1:] and bundle.num_classes == int(y.max()) + 1


def test_rows_are_ranged_reads_of_the_archive(tmp_path):
    x = np.arange(50 * 6, dtype=np.int16).reshape(50, 6)
    path = tmp_path / "a.npz"
    np.savez(path, x=x, y=np.zeros(50, int))
    with open(path, "rb") as f:
        members = npz.locate(f, "a.npz")
    m = members["x"]
    assert m.shape == (50, 6) and m.dtype == "<i2" and m.row_bytes == 12
    raw = path.read_bytes()                                        # the data of row 17 sits at offset + 17 * 12
    assert np.frombuffer(raw[m.offset + 17 * 12:m.offset + 18 * 12], "<i2").tolist() == list(range(102, 108))

    class Counting:                                                # a file that records what is read of it
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def read_at(self, n, offset):
            self.read_bytes += n
            self.f.seek(offset)
            return self.f.read(n)

    with open(path, "rb") as f:
        counting = Counting(f)
        assert np.array_equal(npz.read_rows(counting, m, 40, 60), x[40:])
    assert counting.read_bytes == 10 * 12                          # rows 40-49 only, not the archive


def test_a_compressed_or_fortran_archive_is_a_one_line_error(tmp_path):
    x, y = np.ones((20, 3)), np.arange(20) % 2
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    with pytest.raises(DataError) as err:
        load(arrays_cfg(tmp_path / "c.npz"))
    assert "array 'x' is compressed (numpy.savez_compressed)" in str(err.value)
    assert "numpy.savez, or set data.streaming=false" in str(err.value) and "\n" not in str(err.value)
    assert load({"name": "arrays", "path": str(tmp_path / "c.npz")}).sizes()["train"] > 0   # in memory: fine
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x), y=y)
    with pytest.raises(DataError, match="'x' is stored in Fortran order"):
        load(arrays_cfg(tmp_path / "f.npz"))


# --------------------------------------------------------------------------- the driver's pass


def labelled(n, seed, features=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)) * np.arange(1, features + 1) + 5
    return x, (x[:, 0] > 5).astype(int) + (x[:, 1] > 6).astype(int)


def test_ready_made_splits_stay_whole_and_the_rest_is_split_by_key(tmp_path):
    x, y = labelled(400, 0)
    xv, yv = labelled(37, 1)
    xt, yt = labelled(23, 2)
    np.savez(tmp_path / "all.npz", x=x, y=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt)
    bundle = load(arrays_cfg(tmp_path / "all.npz", rows_per_unit=64))
    assert bundle.sizes() == {"train": 400, "val": 37, "test": 23}          # x is all training
    assert bundle.y_val.tolist() == by_key(streaming.row_keys(xv, yv), yv).tolist()
    assert bundle.y_test.tolist() == by_key(streaming.row_keys(xt, yt), yt).tolist()
    units = {key for key, _, _ in bundle.stream.units}
    assert units == {"x", "x_val", "x_test"}
    source = SOURCES.get("arrays")
    assert source.unit_splits(bundle.stream, "x") == (streaming.TRAIN,)   # members skip x for val / test

    # only x_val given: the test rows are test_fraction of x's rows by key, val_fraction counts for nothing
    np.savez(tmp_path / "val.npz", x=x, y=y, x_val=xv, y_val=yv)
    bundle = load(arrays_cfg(tmp_path / "val.npz", val_fraction=0.3, test_fraction=0.25))
    split = streaming.assign_split(streaming.row_keys(x, y), 0.0, 0.25, 0)
    assert bundle.sizes() == {"train": int((split == 0).sum()), "val": 37, "test": int((split == 2).sum())}
    assert (split == 1).sum() == 0 and 70 < (split == 2).sum() < 130
    assert sum(bundle.sizes().values()) == 400 + 37


def test_the_driver_pass_splits_counts_and_standardizes_like_numpy(tmp_path):
    x, y = labelled(1000, 3, features=4)
    names = np.array(["low", "mid", "high", "unused"])
    np.savez(tmp_path / "a.npz", x=x, y=y, class_names=names)
    bundle = load(arrays_cfg(tmp_path / "a.npz", standardize=True, val_fraction=0.2, test_fraction=0.1,
                             rows_per_unit=128, split_seed=4))
    assert isinstance(bundle, StreamingBundle) and is_streaming(bundle) and bundle.label == "arrays:a.npz"
    assert bundle.num_classes == 4 and bundle.class_names == ["low", "mid", "high", "unused"]
    keys = streaming.row_keys(x, y)
    split = streaming.assign_split(keys, 0.2, 0.1, 4)
    assert bundle.sizes() == {"train": int((split == 0).sum()), "val": int((split == 1).sum()),
                              "test": int((split == 2).sum())}
    assert sum(bundle.sizes().values()) == 1000
    assert bundle.y_val.tolist() == by_key(keys[split == 1], y[split == 1]).tolist()
    op = bundle.preprocessing["ops"][0]
    np.testing.assert_allclose(op["mean"], np.mean(x[split == 0], axis=0), rtol=1e-6)
    np.testing.assert_allclose(op["std"], np.std(x[split == 0], axis=0), rtol=1e-6)
    assert bundle.preprocessing["kind"] == "array" and bundle.preprocessing["raw_shape"] == [4]


def test_an_archive_on_s3_streams_from_the_same_filesystem_as_checkpoints(s3, tmp_path):
    from ensemble_service import storage

    x, y = labelled(300, 5)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    storage.write_bytes(s3.uri("arrays/a.npz"), (tmp_path / "a.npz").read_bytes())
    remote = load(arrays_cfg(s3.uri("arrays/a.npz"), rows_per_unit=50))
    local = load(arrays_cfg(tmp_path / "a.npz", rows_per_unit=50))
    assert remote.sizes() == local.sizes() and torch.equal(remote.y_test, local.y_test)
    assert remote.stream.uri == s3.uri("arrays/a.npz")
    xu, yu = SOURCES.get("arrays").read_unit(remote.stream, "x", 5)
    assert np.array_equal(xu, x[250:300]) and yu.tolist() == y[250:300].tolist()


@pytest.mark.parametrize("arrays, options, message", [
    ({"x": np.ones((9, 2))}, {}, "has 'x' but no 'y'"),
    ({"x": np.ones((9, 2)), "y": np.arange(8)}, {}, "x has 9 rows but y has 8 labels"),
    ({"x": np.ones((9, 2)), "y": np.arange(9), "x_val": np.ones((3, 4)), "y_val": np.arange(3)}, {},
     "x_val rows have shape [4] but x rows [2]"),
    ({"x": np.ones(9), "y": np.arange(9)}, {}, "x must have one row per sample"),
    ({"x": np.ones((9, 2)), "y": np.arange(9) - 1.0}, {}, "y must hold class labels 0..C-1; found -1"),
    ({"x": np.ones((9, 2)), "y": np.arange(9) / 2}, {}, "non-integer values"),
    ({"x": np.where(np.arange(18).reshape(9, 2) == 13, np.nan, 1.0), "y": np.arange(9) % 2}, {"rows_per_unit": 4},
     "x has 1 NaN or infinite value(s) (rows 4-7)"),
    ({"x": np.ones((9, 2)), "y": np.zeros(9)}, {}, "samples of only 1 class(es)"),
    ({"x": np.ones((9, 2)), "y": np.arange(9) % 2}, {"read_tasks": 0}, "data.read_tasks must be at least 1"),
    ({"x": np.ones((9, 2)), "y": np.arange(9) % 2}, {"rows_per_unit": 0}, "data.rows_per_unit must be at least 1"),
])
def test_bad_archives_and_options_are_one_line(tmp_path, arrays, options, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError) as err:
        cfg = arrays_cfg(tmp_path / "a.npz", **options)
        check(cfg)
        load(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_misnamed_archive_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*nope.npz: no such file"):
        check(arrays_cfg(tmp_path / "nope.npz"))
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(DataError, match="expected a .npz file"):
        check(arrays_cfg(tmp_path / "a.csv"))
    (tmp_path / "z.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read it as a .npz archive"):
        load(arrays_cfg(tmp_path / "z.npz"))


# --------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("img") / "shapes"
    sizes = [(9, 12, 3), (16, 16, 3), (20, 14, 1)]
    classes = {c: [(f"{i:03d}.png", *sizes[i % 3]) for i in range(n)] for c, n in
               (("circle", 23), ("square", 17), ("star", 20))}
    write_image_folder(root, classes)
    return root


def test_image_units_decode_to_what_the_in_memory_load_reads(folder):
    cfg = {"name": "image_folder", "root": str(folder), "image_size": 8, "streaming": True, "rows_per_unit": 7}
    bundle = load(cfg)
    raw = SOURCES.get("image_folder").load(as_config({**cfg, "streaming": False}))
    assert [u[2] for u in bundle.stream.units] == [7] * 8 + [4]               # 60 images
    parts = [SOURCES.get("image_folder").read_unit(bundle.stream, p, u) for p, u, _ in bundle.stream.units]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert x.dtype == np.uint8 and np.array_equal(x, raw.x_train) and y.tolist() == raw.y_train.tolist()
    assert bundle.input_shape == (3, 8, 8) and bundle.num_classes == 3
    assert bundle.class_names == ["circle", "square", "star"] and bundle.label == "image_folder:shapes"
    assert bundle.preprocessing == raw.pipeline.to_dict()                      # the fixed image pipeline
    keys = streaming.row_keys(x, y)
    split = streaming.assign_split(keys, 0.2, 0.2, 0)
    assert bundle.sizes() == {"train": int((split == 0).sum()), "val": int((split == 1).sum()),
                              "test": int((split == 2).sum())} and sum(bundle.sizes().values()) == 60
    assert bundle.y_test.tolist() == by_key(keys[split == 2], y[split == 2]).tolist()


def test_a_broken_image_is_a_one_line_error_naming_it(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "star" / "999.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as err:
        load({"name": "image_folder", "root": str(root), "streaming": True, "channels": 3})
    assert "999.png is not an image Pillow can read" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.read_tasks must be at least 1"):
        check({"name": "image_folder", "root": str(root), "streaming": True, "read_tasks": 0})


# --------------------------------------------------------------------------- row keys


def test_narrow_row_keys_are_unchanged_and_wide_rows_are_hashed_per_row():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert streaming.row_keys(x, np.array([0, 1, 0, 1])).tolist() == [        # the keys parquet sets had
        16585803272915466687, 12019243634551571739, 16951505398478046650, 11791112518102198390]
    images = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(50) % 3
    keys = streaming.row_keys(images, labels)
    assert len(set(keys.tolist())) == 50
    # 3072 values: BLAKE2b of the row's float32 bytes (8-byte digest, little-endian), then the label mixed in
    import hashlib

    digest = hashlib.blake2b(images[1].astype("<f4").tobytes(), digest_size=8).digest()
    h = np.array([int.from_bytes(digest, "little") ^ (1 + 0x13198A2E03707344)], dtype=np.uint64)
    assert keys[1] == streaming._mix(h)[0]
    assert np.array_equal(streaming.row_keys(images[::-1], labels[::-1]), keys[::-1])   # order: no matter
    assert np.array_equal(streaming.row_keys(images.astype(np.float64), labels), keys)  # float32 values either way
    assert streaming.row_keys(images, labels + 1)[0] != keys[0]                         # the label counts
    changed = images.copy()
    changed[0, 31, 31, 2] ^= 1
    assert streaming.row_keys(changed, labels)[0] != keys[0] and streaming.row_keys(changed, labels)[1] == keys[1]
    # another process (as a Ray Data task is) computes the same keys
    code = ("import numpy as np; from ensemble_service.data import streaming; "
            "i = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8); "
            "print(streaming.row_keys(i, np.arange(50) % 3)[:3].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(keys[:3].tolist()), out.stderr


# --------------------------------------------------------------------------- config


def test_streaming_arrays_and_images_are_refused_for_trajectories_and_packs(tmp_path, folder):
    from ensemble_service.config import ConfigError, load_config

    x, y = labelled(100, 0)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    base = ["data=arrays", f"data.path={tmp_path / 'a.npz'}", "data.streaming=true"]
    with pytest.raises(ConfigError, match="strategy=snapshot needs its data in memory"):
        load_config([*base, "strategy=snapshot", "optimizer=sgd", "trainer.epochs=10"])
    with pytest.raises(ConfigError, match="cluster.pack needs the data in memory"):
        load_config([*base, "cluster.pack=2"])
    with pytest.raises(ConfigError, match="data.read_tasks must be at least 1, got 0"):
        load_config([*base, "data.read_tasks=0"])
    with pytest.raises(ConfigError, match="cluster.pack needs the data in memory"):
        load_config(["data=image_folder", f"data.root={folder}", "data.streaming=true", "cluster.pack=2"])
    assert load_config(base).data.streaming is True


# --------------------------------------------------------------------------- members streaming (Ray Data)



@pytest.mark.slow
def test_members_stream_the_archive_and_the_folder_with_the_drivers_keys(ray_here, tmp_path, folder):
    x, y = labelled(600, 6)
    xv, yv = labelled(40, 7)
    np.savez(tmp_path / "a.npz", x=x.astype(np.float32), y=y, x_val=xv.astype(np.float32), y_val=yv)
    bundle = load(arrays_cfg(tmp_path / "a.npz", rows_per_unit=64, standardize=True))
    keys = streaming.row_keys(x.astype(np.float32), y)
    train = streaming.assign_split(keys, 0.0, 0.2, 0) == 0
    epoch = torch.cat([xb for xb, _ in bundle.train_batches(50, 3, 0, False)])
    assert len(epoch) == bundle.sizes()["train"] == int(train.sum())
    std = bundle.preprocessing["ops"][0]
    expect = (x[train].astype(np.float32) - np.float32(std["mean"])) / np.float32(std["std"])
    assert sorted(map(tuple, np.round(epoch.numpy(), 4).tolist())) == sorted(map(tuple, np.round(expect, 4).tolist()))
    bagged = torch.cat([yb for _, yb in bundle.train_batches(50, 3, 0, True)])
    assert len(bagged) == int(streaming.poisson_counts(keys[train], 3).sum())
    seen = np.concatenate([kb for _, kb in bundle.eval_batches("val", 16)])     # only x_val's units
    assert sorted(seen.tolist()) == sorted(streaming.row_keys(xv.astype(np.float32), yv).tolist())

    images = load({"name": "image_folder", "root": str(folder), "image_size": 8, "streaming": True,
                   "rows_per_unit": 16})
    batches = list(images.eval_batches("test", 8))
    assert sum(len(kb) for _, kb in batches) == images.sizes()["test"]
    assert batches[0][0].shape[1:] == (3, 8, 8) and 0.0 <= float(batches[0][0].min()) and float(batches[0][0].max()) <= 1.0


def test_moments_skip_a_unit_without_training_rows():
    x = np.arange(12.0).reshape(4, 3)
    m = streaming.Moments()
    m.add(x[:0])                   # a unit of x_val: no training rows
    m.add(x)
    m.add(np.zeros((0, 3)))
    np.testing.assert_allclose(m.mean, [4.5, 5.5, 6.5])
    np.testing.assert_allclose(m.std(), np.std(x, axis=0))

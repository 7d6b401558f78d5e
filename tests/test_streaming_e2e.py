"""A parquet set and an .npz archive three times the size of the cluster's object store, trained
through `ensemble submit` with the members streaming them through Ray Data: they finish with the
metrics layout of any other run, and the registered model answers raw rows; an image folder
streamed the same way trains and its registered model predicts from pixels."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from data_formats import write_parquet
from ensemble_service import names

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STORE = 75 * 2 ** 20          # Ray's smallest object store
FEATURES = 256


def test_a_parquet_set_three_times_the_object_store_trains_and_tracks_like_any_other(tmp_path):
    rows = 3 * STORE // (FEATURES * 4) + 4096                # float32 model inputs: > 3x the store
    rng = np.random.default_rng(0)
    cols = {}
    for j in range(FEATURES):
        cols[f"f{j:03d}"] = rng.normal(size=rows).astype(np.float32)
    label = (cols["f000"] + cols["f001"] > 0).astype(np.int64) + (cols["f002"] > 1.0).astype(np.int64)
    cols["label"] = label
    data = write_parquet(tmp_path / "big", cols, files=8, row_group_size=16384)
    del cols
    assert rows * FEATURES * 4 > 3 * STORE

    db = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(BIN / "ensemble"), "submit", "data=parquet", f"data.path={data}", "data.target=label",
         "model=mlp", "model.depth=1", "model.width=16", "strategy.members=2", "trainer.epochs=1",
         "trainer.batch_size=512", "optimizer.lr=0.005", "cluster.num_cpus=2", f"cluster.object_store_memory={STORE}",
         f"cluster.storage={tmp_path}/ck", f"tracking.uri={db}", "tracking.experiment=streamed"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "75 MiB object store" in proc.stdout
    sizes = re.search(r"(\d+) train / (\d+) val / (\d+) test", proc.stdout)
    assert sizes and sum(int(v) for v in sizes.groups()) == rows

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("streamed")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ensemble.kind") == "parent")
    members = [r for r in runs if r.data.tags.get("ensemble.kind") == "member"]
    assert parent.info.status == "FINISHED" and len(members) == 2
    # the layout every run has: the parent's ensemble metrics, each member's epochs and final metrics
    assert set(names.PARENT_METRICS) <= set(parent.data.metrics), set(names.PARENT_METRICS) - set(parent.data.metrics)
    assert parent.data.metrics["ensemble_mean_test_acc"] > 0.7               # a learnable rule; the largest class is 50%
    for m in members:
        assert {"train_loss", "val_acc", "val_nll", "test_acc", "test_nll", "test_brier", "test_ece"} <= set(m.data.metrics)
        arts = {a.path for a in client.list_artifacts(m.info.run_id, "predictions")}
        assert arts == {"predictions/val_probs.npy", "predictions/test_probs.npy"}
    assert {"members.csv", "members.json", "config.yaml", "data.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # the registered model takes raw rows (its columns by name) and standardizes them itself
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(db)
    try:
        model = mlflow.pyfunc.load_model("models:/streamed@latest")
    finally:
        mlflow.set_tracking_uri(None)
    frame = pd.DataFrame({f"f{j:03d}": [2.0, -2.0] if j < 2 else [0.0, 0.0] for j in range(FEATURES)})
    probs = model.predict(frame)
    assert probs.shape == (2, 3) and probs[0].argmax() == 1 and probs[1].argmax() == 0


def submit(tmp_path, experiment, *args):
    """`ensemble submit ARGS` with a private Ray cluster and MLflow store under tmp_path; the
    finished process and the MLflow client."""
    db = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(BIN / "ensemble"), "submit", *args, "strategy.members=2", "cluster.num_cpus=2",
         f"cluster.object_store_memory={STORE}", f"cluster.storage={tmp_path}/ck", f"tracking.uri={db}",
         f"tracking.experiment={experiment}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, MlflowClient(db), db


def layout(client, experiment):
    """The parent and its 2 members, with the metrics and artifacts every run has; the parent."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ensemble.kind") == "parent")
    members = [r for r in runs if r.data.tags.get("ensemble.kind") == "member"]
    assert parent.info.status == "FINISHED" and len(members) == 2
    assert set(names.PARENT_METRICS) <= set(parent.data.metrics), set(names.PARENT_METRICS) - set(parent.data.metrics)
    for m in members:
        assert {"train_loss", "val_acc", "val_nll", "test_acc", "test_nll", "test_brier", "test_ece"} <= set(m.data.metrics)
        arts = {a.path for a in client.list_artifacts(m.info.run_id, "predictions")}
        assert arts == {"predictions/val_probs.npy", "predictions/test_probs.npy"}
    return parent


def registered(db, name):
    import mlflow

    mlflow.set_tracking_uri(db)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@latest")
    finally:
        mlflow.set_tracking_uri(None)


def test_an_npz_three_times_the_object_store_streams_in_place_and_tracks_like_any_other(tmp_path):
    rows, test_rows = 3 * STORE // (FEATURES * 4) + 4096, 3000     # x alone: > 3x the store as float32
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows + test_rows, 16, 16)).astype(np.float32)
    y = (x[:, 0, 0] + x[:, 0, 1] > 0).astype(np.int64) + (x[:, 0, 2] > 1.0).astype(np.int64)
    path = tmp_path / "big.npz"
    np.savez(path, x=x[:rows], y=y[:rows], x_test=x[rows:], y_test=y[rows:])   # numpy.savez: uncompressed
    del x, y
    assert rows * FEATURES * 4 > 3 * STORE and path.stat().st_size > 3 * STORE

    proc, client, db = submit(
        tmp_path, "streamed_npz", "data=arrays", f"data.path={path}", "data.streaming=true", "data.standardize=true",
        "model=mlp", "model.depth=1", "model.width=16", "trainer.epochs=1", "trainer.batch_size=512",
        "optimizer.lr=0.005")
    assert "75 MiB object store" in proc.stdout
    sizes = re.search(r"(\d+) train / (\d+) val / (\d+) test", proc.stdout)
    assert sizes and int(sizes.group(3)) == test_rows                        # x_test: the test split, whole
    assert int(sizes.group(1)) + int(sizes.group(2)) == rows                 # x: training and validation
    parent = layout(client, "streamed_npz")
    assert parent.data.metrics["ensemble_mean_test_acc"] > 0.7               # a learnable rule; the largest class is 50%

    # the registered model takes raw rows [B, 16, 16] and standardizes them itself
    raw = np.zeros((2, 16, 16), dtype=np.float32)
    raw[0, 0, :2], raw[1, 0, :2] = 2.0, -2.0
    probs = registered(db, "streamed_npz").predict(raw)
    assert probs.shape == (2, 3) and probs[0].argmax() == 1 and probs[1].argmax() == 0


def test_an_image_folder_streams_its_images_and_the_registered_model_predicts_pixels(tmp_path):
    from data_formats import write_image

    rng = np.random.default_rng(2)
    for i in range(300):                       # dark and bright 16 x 16 RGB images, resized to 8 x 8
        cls = i % 2
        pixels = rng.integers(0, 96, (16, 16, 3)) + 150 * cls
        write_image(tmp_path / "imgs" / ("bright" if cls else "dark") / f"{i:03d}.png", pixels.astype(np.uint8))

    proc, client, db = submit(
        tmp_path, "streamed_images", "data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=8",
        "data.streaming=true", "data.rows_per_unit=64", "model=mlp", "model.depth=1", "model.width=16",
        "trainer.epochs=3", "trainer.batch_size=16", "optimizer=sgd", "optimizer.lr=0.05")
    sizes = re.search(r"(\d+) train / (\d+) val / (\d+) test", proc.stdout)
    assert sizes and sum(int(v) for v in sizes.groups()) == 300
    parent = layout(client, "streamed_images")
    assert parent.data.metrics["ensemble_mean_test_acc"] > 0.9

    images = np.stack([np.full((8, 8, 3), 20, np.uint8), np.full((8, 8, 3), 230, np.uint8)])   # raw: 8 x 8 x 3
    probs = registered(db, "streamed_images").predict(images)
    assert probs.shape == (2, 2) and probs[0].argmax() == 1 and probs[1].argmax() == 0   # classes: bright, dark

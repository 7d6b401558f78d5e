"""Checkpoint storage (ensemble_service.storage) on a local directory and on a real S3-compatible
server (moto's server mode on loopback): paths and URIs, atomic writes, a worker resuming from an
S3 checkpoint, checkpoints removed after success unless cluster.keep_checkpoints, a bucket that
does not exist refused before anything runs."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mlflow import MlflowClient

from ensemble_service import runner, storage
from ensemble_service.config import ConfigError, load_config
from ensemble_service.data import load_dataset
from ensemble_service.planning import MemberSpec, plan
from workers.member import train_member
from workers.state import load_checkpoint

from test_runner import SMALL, InProcess


# --------------------------------------------------------------------------- paths and URIs


def test_root_resolves_paths_on_the_driver_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENSEMBLE_STORAGE", raising=False)
    assert storage.root(None) == str(tmp_path.resolve() / ".ensemble" / "checkpoints")
    assert storage.root("ck") == str(tmp_path.resolve() / "ck")
    assert storage.root(f"file://{tmp_path}/x") == str(tmp_path.resolve() / "x")
    monkeypatch.setenv("ENSEMBLE_STORAGE", "s3://bucket/some/prefix/")
    assert storage.root(None) == "s3://bucket/some/prefix"
    assert storage.root("gs://b/p") == "gs://b/p"                       # cluster.storage wins over the variable
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.root("s3:///prefix")


def test_join_for_paths_and_uris():
    assert storage.join("/a/b", "e1", "m.ckpt") == "/a/b/e1/m.ckpt"
    assert storage.join("s3://bkt/p", "e1", "m.ckpt") == "s3://bkt/p/e1/m.ckpt"
    assert storage.join("s3://bkt", "e1") == "s3://bkt/e1"
    assert (storage.join("s3://bkt/p?endpoint_override=h:9000&scheme=http", "m.ckpt")
            == "s3://bkt/p/m.ckpt?endpoint_override=h:9000&scheme=http")
    assert storage.is_remote("gs://b/p") and not storage.is_remote("/x") and not storage.is_remote("file:///x")


def test_plan_puts_every_task_checkpoint_under_the_uri(tmp_path):
    cfg = load_config([*SMALL, "strategy.members=3", "cluster.storage=s3://bkt/ck/"])
    p = plan(cfg, ensemble="E1")
    assert p.checkpoint_dir == "s3://bkt/ck/E1"
    assert [t.checkpoint_path for t in p.tasks] == [f"s3://bkt/ck/E1/member_{i:03d}.ckpt" for i in range(3)]


# --------------------------------------------------------------------------- read, write, list, remove


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").uri("prefix")


def test_write_read_list_remove(where):
    a, b = storage.join(where, "e1", "a.ckpt"), storage.join(where, "e1", "sub", "b.ckpt")
    assert storage.read_bytes(a) is None and not storage.exists(a) and storage.listing(where) == []
    storage.write_bytes(a, b"first")
    storage.write_bytes(b, b"\x00" * 1000)
    storage.write_bytes(a, b"second")                                   # replaced whole
    assert storage.read_bytes(a) == b"second" and storage.exists(a)
    assert storage.listing(where) == ["e1/a.ckpt", "e1/sub/b.ckpt"]     # no temporary file left behind
    storage.remove_tree(storage.join(where, "e1"))
    assert storage.listing(where) == [] and storage.read_bytes(b) is None
    storage.remove_tree(storage.join(where, "nothing-here"))           # not an error


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from ensemble_service import storage
    uri = sys.argv[1]
    if storage.is_remote(uri):
        # an upload of several parts (pyarrow sends 5 MiB parts as they fill), killed before it completes
        fs, path = storage.filesystem(uri)
        stream = fs.open_output_stream(path)
        stream.write(b"N" * (12 << 20))
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        # killed after the temporary file is written, before it is renamed over the old one
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        storage.write_bytes(uri, b"N" * (12 << 20))
""")


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_whole(where):
    uri = storage.join(where, "m.ckpt")
    storage.write_bytes(uri, b"old checkpoint")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, uri], env=dict(os.environ), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert storage.read_bytes(uri) == b"old checkpoint"


def test_check_names_a_missing_bucket_and_accepts_a_writable_one(s3, tmp_path):
    assert storage.check(s3.uri("ck")) == ""
    assert s3.keys() == []                                              # the probe is deleted
    problem = storage.check("s3://no-such-bucket-here/ck")
    assert problem.startswith("cannot write checkpoints to cluster.storage=s3://no-such-bucket-here/ck")
    assert "bucket does not exist" in problem and "\n" not in problem
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in storage.check(str(tmp_path / "file" / "ck"))
    assert storage.check(str(tmp_path / "new" / "ck")) == ""
    assert not (tmp_path / "new").exists()                              # what the probe made goes again


def test_check_writes_locally_too():
    """root passes os.access everywhere: /proc took the check and failed in every member's task."""
    assert storage.check("/proc/no-such-dir/ck") == ("cluster.storage=/proc/no-such-dir/ck: cannot write "
                                                     "checkpoints there (No such file or directory)")


# --------------------------------------------------------------------------- a worker on S3


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=96, n_val=48, n_test=48, num_classes=3, input_shape=[1, 8, 8])


class Stop(Exception):
    pass


def test_a_member_stopped_mid_training_resumes_from_its_s3_checkpoint(s3, data):
    spec = MemberSpec(index=0, seed=3, epochs=4, batch_size=16, bagging=False, device="cpu",
                      model={"name": "mlp", "batchnorm": True, "dropout": 0.1, "init": "default",
                             "activation": "relu", "depth": 1, "width": 32},
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
                      checkpoint_path=s3.uri("ck/e1/member_000.ckpt"))
    whole = train_member(dataclasses.replace(spec, checkpoint_path=s3.uri("ck/e0/member_000.ckpt")), data)

    def stop_after_2(event):
        if event["type"] == "epoch" and event["epoch"] == 2:
            raise Stop()

    with pytest.raises(Stop):
        train_member(spec, data, report=stop_after_2)
    assert "ck/e1/member_000.ckpt" in s3.keys("ck/e1")
    assert load_checkpoint(spec.checkpoint_path)["epoch"] == 2

    events = []
    resumed = train_member(spec, data, report=events.append)
    start = next(e for e in events if e["type"] == "start")
    assert start["resumed_from"] == 2 and start["restarts"] == 1
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [3, 4]
    assert resumed.resumed_from == 2 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed.test_probs, whole.test_probs)    # same member as an uninterrupted run
    assert load_checkpoint(spec.checkpoint_path)["epoch"] == 4


# --------------------------------------------------------------------------- the pipeline


def s3_config(tmp_path, s3, *overrides):
    return load_config([*SMALL, "strategy.members=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                        f"cluster.storage={s3.uri('ck')}", *overrides])


def test_checkpoints_on_s3_are_removed_after_success(tmp_path, s3):
    seen = []

    class Watching(InProcess):  # what the store holds once every member finished, before the cleanup
        def run_tasks(self, specs, *args, **kw):
            out = super().run_tasks(specs, *args, **kw)
            seen.extend(s3.keys("ck"))
            return out

    result = runner.submit(s3_config(tmp_path, s3), scheduler=Watching())
    eid = result.plan.ensemble_id
    assert seen == [f"ck/{eid}/member_000.ckpt", f"ck/{eid}/member_001.ckpt"]
    assert s3.keys("ck") == []
    assert MlflowClient(result.tracking_uri).get_run(result.parent_run_id).info.status == "FINISHED"


def test_keep_checkpoints_keeps_them(tmp_path, s3):
    result = runner.submit(s3_config(tmp_path, s3, "cluster.keep_checkpoints=true"), scheduler=InProcess())
    eid = result.plan.ensemble_id
    assert s3.keys("ck") == [f"ck/{eid}/member_000.ckpt", f"ck/{eid}/member_001.ckpt"]
    ckpt = load_checkpoint(s3.uri(f"ck/{eid}/member_001.ckpt"))
    assert ckpt["epoch"] == 2 and ckpt["identity"]["member"] == 1


def test_keep_checkpoints_locally(tmp_path):
    cfg = load_config([*SMALL, "strategy.members=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                       f"cluster.storage={tmp_path}/ck", "cluster.keep_checkpoints=true"])
    kept = runner.submit(cfg, scheduler=InProcess())
    expected = [f"{kept.plan.ensemble_id}/member_{i:03d}.ckpt" for i in range(2)]
    assert storage.listing(str(tmp_path / "ck")) == expected
    cfg.cluster.keep_checkpoints = False
    again = runner.submit(cfg, scheduler=InProcess())                  # same config, same process, same second
    assert again.plan.ensemble_id != kept.plan.ensemble_id
    assert all(m["restarts"] == 0 for m in again.members)               # nothing resumed from the kept ones
    assert storage.listing(str(tmp_path / "ck")) == expected


def test_a_missing_bucket_is_a_config_error_before_any_run(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config([*SMALL, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "cluster.storage=s3://absent-bucket/ck"])
    sched = InProcess()
    with pytest.raises(ConfigError, match="cannot write checkpoints to cluster.storage=s3://absent-bucket/ck"):
        runner.submit(cfg, scheduler=sched)
    assert not sched.connected
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments(filter_string="name = 'runner'") == []


def test_the_cli_refuses_a_missing_bucket_in_one_line(tmp_path, s3_server):
    env = {**os.environ, **s3_server.env, "ENSEMBLE_STORAGE": "s3://absent-bucket/ck"}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ensemble"), "submit", "data=synthetic",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot write checkpoints to cluster.storage=s3://absent-bucket/ck")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

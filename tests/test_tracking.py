"""EnsembleTracker's exit path: every open run closed in one batched write, with what was still
queued for it; store writes are never cut in half by a signal."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event

from ensemble_service.tracking import EnsembleTracker, uninterrupted

MEMBERS = 300


def statements(tracker: EnsembleTracker):
    """Every SQL statement and commit on the tracker's store from now on."""
    engine = tracker._sql_store().engine
    seen = {"sql": [], "commits": 0}

    def on_sql(conn, cursor, statement, parameters, context, executemany):
        seen["sql"].append(statement)

    def on_commit(conn):
        seen["commits"] += 1

    event.listen(engine, "before_cursor_execute", on_sql)
    event.listen(engine, "commit", on_commit)
    return seen


def test_end_all_closes_every_run_in_one_write_with_its_queued_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = EnsembleTracker(uri, "close")
    parent = tr.start_parent("parent", {"strategy": {"name": "independent"}}, {"ensemble.strategy": "independent"})
    members = [tr.start_member(i, f"member-{i}", {"seed": i}, {}) for i in range(MEMBERS)]
    for i, rid in enumerate(members):              # per-epoch metrics not flushed yet
        for epoch in (1, 2):
            tr.queue_metrics(rid, {"train_loss": 1.0 / (epoch + i), "val_acc": 0.5 + epoch / 10}, step=epoch)
    tr.end(members[0], "FINISHED")                 # one member had finished
    seen = statements(tr)
    t0 = time.perf_counter()
    tr.end_all("KILLED", "interrupted")
    seconds = time.perf_counter() - t0

    updates = [s for s in seen["sql"] if s.lstrip().upper().startswith("UPDATE RUNS")]
    assert len(updates) == 1, updates              # one UPDATE closes all 300 open runs
    # that write, then the queued metrics of 299 runs in chunks of WRITE_CHUNK runs
    assert seen["commits"] == 1 + -(-(MEMBERS - 1) // EnsembleTracker.WRITE_CHUNK), seen["commits"]
    assert tr.open_runs == []
    assert seconds < 30

    client = MlflowClient(uri)
    runs = client.search_runs([tr.experiment_id], max_results=1000)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status[members[0]] == "FINISHED"
    assert {status[r] for r in members[1:] + [parent]} == {"KILLED"}
    by_id = {r.info.run_id: r for r in runs}
    for i in (1, 150, MEMBERS - 1):
        run = by_id[members[i]]
        assert run.data.tags["ensemble.error"] == "interrupted" and run.info.end_time is not None
        history = client.get_metric_history(members[i], "train_loss")
        assert sorted((h.step, h.value) for h in history) == [(1, 1.0 / (1 + i)), (2, 1.0 / (2 + i))]
        assert run.data.metrics["val_acc"] == pytest.approx(0.7)   # the latest value, step 2
    assert "ensemble.error" not in by_id[members[0]].data.tags


def test_flush_of_many_runs_takes_a_few_transactions(tmp_path):
    tr = EnsembleTracker(f"sqlite:///{tmp_path}/mlflow.db", "flush")
    tr.start_parent("parent", {}, {})
    members = [tr.start_member(i, f"member-{i}", {}, {}) for i in range(60)]
    for rid in members:
        tr.queue_metrics(rid, {"train_loss": 0.5}, step=1)
        tr.queue_tags(rid, {"ensemble.device": "cpu"})
    seen = statements(tr)
    tr.flush()
    assert seen["commits"] == 3                    # 60 runs, 25 per transaction
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(members[59])
    assert run.data.metrics == {"train_loss": 0.5} and run.data.tags["ensemble.device"] == "cpu"
    assert run.info.status == "RUNNING"


def test_a_signal_during_a_store_write_arrives_after_it():
    done = []

    @uninterrupted
    def write():
        os.kill(os.getpid(), signal.SIGINT)        # Ctrl-C in the middle of the write
        time.sleep(0.2)
        done.append("written")
        return "ok"

    with pytest.raises(KeyboardInterrupt):
        write()
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_members_share_the_parents_ensemble_tags_datasets_and_get_a_description(tmp_path):
    from ensemble_service import names

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = EnsembleTracker(uri, "shared")
    parent = tr.start_parent("p", {}, {names.TAG_ID: "e-1", names.TAG_STRATEGY: "independent", names.TAG_DATA: "toy"})
    datasets = [{"name": "toy", "digest": f"d{i}", "context": c, "source_type": "code", "source": "{}",
                 "schema": None, "profile": json.dumps({"num_rows": n})}
                for i, (c, n) in enumerate((("train", 30), ("validation", 10), ("test", 12)))]
    tr.log_data(parent, {"name": "toy"}, np.arange(3), datasets=datasets)
    bagged = tr.start_member(0, "member-0", {"seed": 1}, {names.TAG_ROLE: "member"}, description="Member 0.",
                             sampling="bootstrap")
    plain = tr.start_member(1, "member-1", {"seed": 2}, {})
    tr.log_ensemble(parent, {names.ENSEMBLE_MEAN_TEST_ACC: 0.75, names.ENSEMBLE_MEAN_TEST_NLL: 0.5,
                             names.DISAGREEMENT: 0.1}, {"k": [1], "acc": [0.7], "nll": [0.6]}, {}, [], np.zeros((3, 2)))
    tr.log_overview(parent, "**summary**", "e-1", '{"name": "p", "createdAt": 1, "state": "{}"}')
    tr.end_all("FINISHED")
    client = MlflowClient(uri)

    def inputs(rid):
        return {i.dataset.digest: {t.key: t.value for t in i.tags} for i in client.get_run(rid).inputs.dataset_inputs}

    assert inputs(parent) == {"d0": {names.MLFLOW_DATA_CONTEXT: "train"}, "d1": {names.MLFLOW_DATA_CONTEXT: "validation"},
                              "d2": {names.MLFLOW_DATA_CONTEXT: "test"}}
    assert inputs(bagged)["d0"] == {names.MLFLOW_DATA_CONTEXT: "train", names.TAG_SAMPLING: "bootstrap"}
    assert inputs(plain) == inputs(parent)
    for rid in (bagged, plain):
        tags = client.get_run(rid).data.tags
        assert tags[names.TAG_ID] == "e-1" and tags[names.TAG_STRATEGY] == "independent" and names.TAG_DATA not in tags
    assert client.get_run(bagged).data.tags[names.MLFLOW_DESCRIPTION] == "Member 0."
    assert names.MLFLOW_DESCRIPTION not in client.get_run(plain).data.tags
    run = client.get_run(parent)
    assert run.data.tags[names.MLFLOW_DESCRIPTION] == "**summary**"
    # the pair the UI compares parent and members on: the ensemble's mean aggregation
    assert (run.data.metrics[names.TEST_ACC], run.data.metrics[names.TEST_NLL]) == (0.75, 0.5)
    exp = client.get_experiment(tr.experiment_id)
    assert exp.tags[names.MLFLOW_VIEW_PREFIX + "e-1"] == '{"name": "p", "createdAt": 1, "state": "{}"}'
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_without_a_kind_is_marked_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("older")
    assert EnsembleTracker(uri, "older").experiment_id == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")   # someone's own choice stays
    EnsembleTracker(uri, "older")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"


def test_an_experiment_created_by_another_submit_after_the_lookup_is_joined(tmp_path, monkeypatch):
    """Two jobs of a sweep start at once: both look the experiment up, find none and create it;
    the second create fails in the store (RESOURCE_ALREADY_EXISTS) and must join the first's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    other = MlflowClient(uri)
    lookup = MlflowClient.get_experiment_by_name
    calls = []

    def racing_lookup(self, name):
        calls.append(name)
        if len(calls) == 1:   # this submit's lookup: not there yet; the other submit creates it now
            other.create_experiment(name)
            return None
        return lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racing_lookup)
    tracker = EnsembleTracker(uri, "sweep-exp")
    assert tracker.experiment_id == lookup(other, "sweep-exp").experiment_id and len(calls) == 2

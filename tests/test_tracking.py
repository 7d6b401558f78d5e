"""EnsembleTracker's exit path: every open run closed in one batched write, with what was still
queued for it; store writes are never cut in half by a signal."""
from __future__ import annotations

import os
import signal
import time

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

"""All MLflow code: one parent run per ensemble, one nested run per member.

Layout in the tracking store (experiment ``tracking.experiment``, marked a model-training
experiment; its tags hold one saved view of the runs page per ensemble, ``runs_view``):
- parent run (tags ``ensemble.strategy``, ``ensemble.data``, ``ensemble.model``,
  ``ensemble.id``, ``ensemble.kind=parent``; a markdown description): the resolved config as
  params and as ``config.yaml``; the data splits as dataset inputs; ensemble metrics
  (``ensemble_mean_test_acc`` ..., and ``test_acc``/``test_nll``, the names members use);
  ``members.csv`` and ``members.json`` (the member table); ``predictions/test_labels.npy``.
- member runs (tag ``mlflow.parentRunId``, ``ensemble.member_index``, ``ensemble.kind=member``,
  the parent's ``ensemble.id`` and ``ensemble.strategy``; a description): the same dataset
  inputs, seed and architecture as params, per-epoch ``train_loss``, ``val_acc``, ``val_nll``
  (step = epoch), final ``test_*`` metrics, the checkpoint ``checkpoint/member.pt`` (config +
  weights, a ``torch.load(weights_only=True)`` file) and ``predictions/{val,test}_probs.npy``.

The default store is a SQLite file ``mlflow.db`` in the working directory (made
absolute on the driver), unless ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` says
otherwise. SQLite allows one writer, so only the driver writes here. Every run this
module opens is closed: FINISHED, FAILED or KILLED, never left RUNNING.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import logging  # noqa: E402


for _name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.tracking._tracking_service.utils"):
    logging.getLogger(_name).setLevel(logging.WARNING)
import numpy as np  # noqa: E402

from ensemble_service import names  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

class TrackingError(RuntimeError):
    pass


# MLflow 3's experiment kind: a model-training experiment (not GenAI development)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def resolve_uri(uri: Optional[str] = None) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; always absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            path = str(Path(path).resolve())
        return f"sqlite:///{path}"
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()  # a bare path: a file store, made absolute
    return uri


def local_artifact_root(uri: str) -> Optional[str]:
    """For a SQLite store, artifacts go next to the database file (absolute)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def uninterrupted(fn):
    """Run ``fn`` with SIGINT and SIGTERM held until it returns, then deliver them to the handler
    that was in place. A KeyboardInterrupt raised inside a SQLAlchemy write (Ctrl-C, or the
    CLI's SIGTERM handler) leaves that write's SQLite transaction open, and the store locked,
    while the exception lives: the runs could then not be closed. Main thread only (signals
    are delivered there)."""
    import functools
    import signal
    import threading

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        arrived: List[int] = []
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: arrived.append(signum))
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            for signum in arrived[:1]:  # deliver the first one now, as if it had just arrived
                handler = previous[signum]
                if callable(handler):
                    handler(signum, None)
                elif handler == signal.SIG_DFL:
                    os.kill(os.getpid(), signum)
    return wrapper


MAX_DESCRIPTION = 8000  # MLflow's limit on a tag's value


class EnsembleTracker:
    """Driver-side writer of one ensemble's runs."""

    @uninterrupted  # a new store is created here: its schema migrations must not be cut in half
    def __init__(self, uri: Optional[str], experiment: str):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)
        self.parent_id: Optional[str] = None
        self.shared_tags: Dict[str, str] = {}  # the parent's tags every member carries too (the UI filters on them)
        self.datasets: List[Any] = []           # the parent's dataset inputs (log_data), reused by members
        self.open_runs: List[str] = []
        self._metrics: Dict[str, List[Metric]] = {}   # buffered, written in one log_batch per run
        self._tags: Dict[str, Dict[str, str]] = {}
        self._last_flush = time.monotonic()

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # one made elsewhere (or before this tag was set)
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:  # another submit (a sweep's other job) created it since the lookup
            exp = self.client.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if exp is None:
                raise
            return exp.experiment_id

    # -- runs -------------------------------------------------------------
    @uninterrupted
    def start_parent(self, run_name: str, config: Dict[str, Any], tags: Dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={names.TAG_KIND: names.KIND_PARENT, **tags})
        self.parent_id = run.info.run_id
        self.shared_tags = {k: str(tags[k]) for k in (names.TAG_ID, names.TAG_STRATEGY) if k in tags}
        self.open_runs.append(self.parent_id)
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_id, params=params[i:i + 100])
        import yaml

        self.log_text(self.parent_id, yaml.safe_dump(config, sort_keys=False), names.CONFIG_YAML)
        return self.parent_id

    @uninterrupted
    def start_member(self, index: int, run_name: str, params: Dict[str, Any], tags: Dict[str, str],
                     description: str = "", sampling: str = "") -> str:
        """A nested run under the parent, with the parent's ensemble id and strategy tags, the
        ``description`` (markdown, the UI's Description) and the parent's dataset inputs (the
        training split's input tagged ``ensemble.sampling=sampling`` when given, e.g. bootstrap)."""
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={"mlflow.parentRunId": self.parent_id, names.TAG_KIND: names.KIND_MEMBER,
                  names.TAG_MEMBER_INDEX: str(index), **self.shared_tags, **tags,
                  **({names.MLFLOW_DESCRIPTION: description} if description else {})},
        )
        rid = run.info.run_id
        self.open_runs.append(rid)
        self.client.log_batch(rid, params=[Param(k, v) for k, v in sorted(flatten(params).items())])
        if self.datasets:
            self.client.log_inputs(rid, datasets=self._inputs(sampling))
        return rid

    # -- the project's terms ----------------------------------------------------------------
    def log_data(self, parent: str, info: Dict[str, Any], test_labels, val_labels=None,
                 datasets: Optional[List[Dict[str, Any]]] = None) -> None:
        """What the ensemble was trained on (data.json), the test labels its metrics use (and the
        validation labels, which selecting members on their validation predictions needs) and its
        splits as MLflow dataset inputs (``runs_view.dataset_inputs``: the UI's Dataset column);
        members started after this get the same inputs."""
        self.log_array(parent, test_labels, names.TEST_LABELS)
        if val_labels is not None:
            self.log_array(parent, val_labels, names.VAL_LABELS)
        self.log_text(parent, json.dumps(info, indent=2), names.DATA_INFO)
        if datasets:
            self.datasets = list(datasets)
            self._log_inputs(parent, self._inputs())

    @uninterrupted
    def _log_inputs(self, run_id: str, inputs) -> None:
        self.client.log_inputs(run_id, datasets=inputs)

    def _inputs(self, sampling: str = ""):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        out = []
        for d in self.datasets:
            tags = [InputTag(names.MLFLOW_DATA_CONTEXT, d["context"])]
            if sampling and d["context"] == "train":
                tags.append(InputTag(names.TAG_SAMPLING, sampling))
            out.append(DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"],
                                            d.get("schema"), d.get("profile")), tags))
        return out

    def log_overview(self, parent: str, description: str, view_key: str = "", view: str = "") -> None:
        """The parent's description (markdown; written with its next flush) and, with ``view``, the
        experiment's saved view ``view_key`` of this ensemble's runs (``runs_view.saved_view``)."""
        self.queue_tags(parent, {names.MLFLOW_DESCRIPTION: description[:MAX_DESCRIPTION]})
        if view_key and view:
            self._set_experiment_tag(names.MLFLOW_VIEW_PREFIX + view_key, view)

    @uninterrupted
    def _set_experiment_tag(self, key: str, value: str) -> None:
        self.client.set_experiment_tag(self.experiment_id, key, value)

    def log_epochs(self, run_id: str, records: List[Dict[str, Any]]) -> None:
        """Queue per-epoch metrics (step = epoch) of the records given."""
        for rec in records:
            values = {k: rec[k] for k in names.EPOCH_METRICS if k in rec}
            self.queue_metrics(run_id, values, step=int(rec["epoch"]))

    def log_member(self, run_id: str, result, tags: Dict[str, Any], end: bool = True) -> None:
        """A finished member: its final metrics, tags, checkpoint and predictions; the run ends FINISHED
        (unless ``end=False``: a distilled student's run stays open until it is registered)."""
        final = {k: v for k, v in result.metrics.items() if k in names.FINAL_METRICS}  # val_* are epoch series
        self.queue_metrics(run_id, {**final, names.TRAIN_SECONDS: result.train_seconds})
        self.queue_tags(run_id, tags)
        self.log_bytes(run_id, result.weights, names.MEMBER_CHECKPOINT)
        self.log_array(run_id, result.val_probs.numpy(), names.VAL_PROBS)
        self.log_array(run_id, result.test_probs.numpy(), names.TEST_PROBS)
        if end:
            self.end(run_id, "FINISHED")
        else:
            self.flush(run_id)

    def fail_member(self, run_id: str, message: str) -> None:
        self.set_tags(run_id, {names.TAG_ERROR: message[:4000]})
        self.end(run_id, "FAILED")

    def log_ensemble(self, parent: str, values: Dict[str, float], curve: Dict[str, List[float]],
                     plots: Dict[str, bytes], table: List[Dict[str, Any]], mean_probs) -> None:
        """The ensemble's metrics (and the pair it shares with its members: ``names.SHARED_METRIC_OF``),
        its size curve (step k), plots, member table and mean probabilities."""
        shared = {name: values[key] for key, name in names.SHARED_METRIC_OF.items() if key in values}
        self.log_metrics(parent, {**values, **shared})
        for k, acc, nll in zip(curve["k"], curve["acc"], curve["nll"]):
            self.queue_metrics(parent, {names.SIZE_CURVE_ACC: acc, names.SIZE_CURVE_NLL: nll}, step=k)
        self.flush(parent)
        for path, png in plots.items():
            self.log_bytes(parent, png, path)
        self.log_text(parent, self.member_table_csv(table), names.MEMBER_TABLE_CSV)
        self.log_text(parent, json.dumps(table, indent=2), names.MEMBER_TABLE_JSON)
        self.log_array(parent, mean_probs, names.ENSEMBLE_TEST_PROBS)

    def log_metrics(self, run_id: str, values: Dict[str, float], step: int = 0) -> None:
        self.queue_metrics(run_id, values, step)
        self.flush(run_id)

    def set_tags(self, run_id: str, tags: Dict[str, Any]) -> None:
        self.queue_tags(run_id, tags)
        self.flush(run_id)

    # Each SQLite write is a committed transaction (~10-30 ms here): per-epoch metrics and tags
    # are queued and written together, one log_batch per run, at most every `every` seconds.
    def queue_metrics(self, run_id: str, values: Dict[str, float], step: int = 0) -> None:
        ts = _now_ms()
        self._metrics.setdefault(run_id, []).extend(
            Metric(k, float(v), ts, step) for k, v in values.items() if v is not None)

    def queue_tags(self, run_id: str, tags: Dict[str, Any]) -> None:
        self._tags.setdefault(run_id, {}).update({k: str(v) for k, v in tags.items()})

    WRITE_CHUNK = 25  # runs per transaction when many are flushed: a signal waits for one chunk at most

    def flush(self, run_id: Optional[str] = None, every: float = 0.0) -> None:
        """Write what is queued: for one run, or for all runs if `every` seconds have passed.
        On a SQL store, many runs' metrics and tags go in a few transactions (WRITE_CHUNK runs
        each) instead of one per run."""
        if run_id is None:
            if time.monotonic() - self._last_flush < every:
                return
            self._last_flush = time.monotonic()
        ids = [run_id] if run_id else list(set(self._metrics) | set(self._tags))
        if len(ids) > 1 and self._sql_store() is not None:
            try:
                for i in range(0, len(ids), self.WRITE_CHUNK):
                    self._write_sql(ids[i:i + self.WRITE_CHUNK])
                return
            except Exception:
                pass  # one by one below (what did not commit is still queued)
        for rid in ids:
            self._flush_one(rid)

    @uninterrupted
    def _flush_one(self, rid: str) -> None:
        metrics = self._metrics.pop(rid, [])
        tags = [RunTag(k, v) for k, v in self._tags.pop(rid, {}).items()]
        for i in range(0, max(len(metrics), 1), 1000):
            chunk = metrics[i:i + 1000]
            if chunk or tags:
                self.client.log_batch(rid, metrics=chunk, tags=tags)
                tags = []

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.log_bytes(run_id, text.encode(), artifact_file)

    @uninterrupted
    def log_bytes(self, run_id: str, blob: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(blob)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def log_array(self, run_id: str, array, artifact_file: str) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        self.log_bytes(run_id, buf.getvalue(), artifact_file)

    @uninterrupted
    def end(self, run_id: str, status: str = "FINISHED") -> None:
        if run_id in self.open_runs:
            try:
                self.flush(run_id)
            finally:  # a failed metric write must not leave the run RUNNING
                self.client.set_terminated(run_id, status)
                self.open_runs.remove(run_id)

    def end_all(self, status: str = "FAILED", reason: str = "") -> None:
        """Close every run still open, with ``reason`` as the tag ``ensemble.error``, in one
        batched write: one transaction on a SQL store (SQLite included), concurrent calls on a
        tracking server; closing 1000 runs one by one would take minutes. On a SQL store, the
        per-epoch metrics still queued (the last seconds' worth) are written after the runs are
        closed. Interrupts (a second Ctrl-C, SIGTERM) are held off until it is done."""
        import signal

        held = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                held[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass
        try:
            ids = [r for r in self.open_runs if r != self.parent_id] + (
                [self.parent_id] if self.parent_id in self.open_runs else [])
            if not ids:
                return
            if reason:
                for rid in ids:
                    self.queue_tags(rid, {names.TAG_ERROR: reason[:4000]})
            try:
                self._close_batched(ids, status)
            except Exception:
                if self._sql_store() is None:  # no batched close for this store: one by one, best effort
                    for rid in ids:
                        try:
                            self.end(rid, status)
                        except Exception:
                            pass
            self.open_runs = [r for r in self.open_runs if r not in ids]
            try:
                self.flush()
            except Exception:
                pass
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _sql_store(self):
        """The MLflow SQL store behind the client (SQLite included), or None."""
        if not hasattr(self, "_sql"):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = self.client._tracking_client.store
            self._sql = store if isinstance(store, SqlAlchemyStore) else None
        return self._sql

    def _close_batched(self, ids: List[str], status: str) -> None:
        from mlflow.store.tracking.rest_store import RestStore

        if self._sql_store() is not None:
            for attempt in range(3):  # a SQLite file another process writes to may stay locked for a while
                try:
                    self._write_sql(ids, status, metrics=False)
                    return
                except Exception:
                    if attempt == 2:
                        raise
                    time.sleep(0.5)
        store = self.client._tracking_client.store
        if not isinstance(store, RestStore):
            raise TrackingError(f"no batched close for {type(store).__name__}")
        from concurrent.futures import ThreadPoolExecutor

        work = [(rid, self._metrics.pop(rid, []), self._tags.pop(rid, {})) for rid in ids]

        def close(item) -> None:
            rid, metrics, tags = item
            try:
                for i in range(0, len(metrics), 1000):
                    self.client.log_batch(rid, metrics=metrics[i:i + 1000])
                if tags:
                    self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
            finally:
                self.client.set_terminated(rid, status)

        with ThreadPoolExecutor(max_workers=min(16, len(work))) as pool:
            for _ in pool.map(close, work):
                pass

    @uninterrupted
    def _write_sql(self, ids: List[str], status: Optional[str] = None, metrics: bool = True) -> None:
        """What is queued for these runs (their metrics unless ``metrics=False``, their tags),
        then, with ``status``, their status and end time: one transaction through the store's
        own SQLAlchemy session. Nothing leaves the queues unless it commits."""
        from mlflow.store.tracking.dbmodels.models import SqlMetric, SqlRun, SqlTag

        store = self._sql_store()
        end_time = _now_ms()
        with store.ManagedSessionMaker(read_only=False) as session:
            for rid in ids:
                rows, seen = [], set()
                for m in self._metrics.get(rid, []) if metrics else []:
                    if (m.key, m.timestamp, m.step, m.value) in seen:
                        continue
                    seen.add((m.key, m.timestamp, m.step, m.value))
                    is_nan, value = store.sanitize_metric_value(m.value)
                    rows.append(SqlMetric(run_uuid=rid, key=m.key, value=value, timestamp=m.timestamp,
                                          step=m.step, is_nan=is_nan))
                if rows:
                    session.add_all(rows)
                    store._update_latest_metrics_if_necessary(rows, session)
                for key, value in self._tags.get(rid, {}).items():
                    session.merge(SqlTag(run_uuid=rid, key=key, value=value))
            for i in range(0, len(ids) if status else 0, 500):
                session.query(SqlRun).filter(SqlRun.run_uuid.in_(ids[i:i + 500]), SqlRun.status == "RUNNING").update(
                    {SqlRun.status: status, SqlRun.end_time: end_time}, synchronize_session=False)
        for rid in ids:
            if metrics:
                self._metrics.pop(rid, None)
            self._tags.pop(rid, None)

    @staticmethod
    def member_table_csv(rows: List[Dict[str, Any]]) -> str:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue()


# -- is the store there? (preflight for submit; reads never create a store) -----
STORE_TIMEOUT_S = 5.0
_SQL_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class StoreNotFound(TrackingError, LookupError):
    """No tracking store at the URI (reading never creates one)."""


class ExperimentNotFound(TrackingError, LookupError):
    """No experiment of that name in the store."""


def check_store(uri: Optional[str] = None, *, create: bool, timeout: float = STORE_TIMEOUT_S) -> str:
    """Why the tracking store at ``uri`` cannot be used ('' when it can), decided within about
    ``timeout`` seconds and without creating anything.

    ``create=True`` (``ensemble submit``): the store may not exist yet but must be creatable: a
    SQLite file or a directory where one can be made, an installed database driver and a
    database server that accepts connections, an HTTP tracking server that answers.
    ``create=False`` (``ensemble runs``, the API): a local store (SQLite, a directory) must
    exist already."""
    uri = resolve_uri(uri)
    scheme = uri.split(":", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    try:
        if base == "sqlite":
            return _check_sqlite(uri, create, timeout)
        if base in ("http", "https"):
            return _check_server(uri, timeout)
        if base == "file":
            from urllib.parse import unquote, urlparse

            return _check_local_path(Path(unquote(urlparse(uri).path)), create, directory=True)
        if base in _SQL_PORTS:
            return _check_database(uri, base, timeout)
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.get_store_builder(uri)  # raises for a scheme MLflow has no store for
        return ""
    except Exception as exc:
        if base not in ("sqlite", "http", "https", "file", *_SQL_PORTS):
            return (f"unsupported tracking URI {uri!r}: use sqlite:///PATH, http(s)://HOST:PORT, "
                    "postgresql://..., mysql://..., mssql://... or a directory")
        return f"tracking store {uri}: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _creatable(path: Path) -> str:
    """'' if ``path`` (a file or directory that does not exist) could be created."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts)
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".ensemble-check-").cleanup()
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror or exc} in {ancestor}"
    return ""


def _check_local_path(path: Path, create: bool, directory: bool) -> str:
    if path.exists():
        if directory and not path.is_dir():
            return f"{path} is not a directory"
        if not directory and not path.is_file():
            return f"{path} is not a file"
        if create and not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return ""
    if not create:
        return f"no MLflow tracking store at {path} (nothing has been tracked there; `ensemble submit` creates it)"
    problem = _creatable(path)
    return f"tracking store: {problem}" if problem else ""


def _check_sqlite(uri: str, create: bool, timeout: float) -> str:
    import sqlite3

    raw = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    path = Path(raw.split("?", 1)[0]) if raw and raw != ":memory:" else None
    if path is None:  # an in-memory database: nothing to read back later
        return "" if create else f"{uri} is an in-memory database: there is nothing to read"
    problem = _check_local_path(path, create, directory=False)
    if problem or not path.exists():
        return problem
    with open(path, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        return f"{path} is not a SQLite database"
    if not head:
        return "" if create else f"{path} is empty: not an MLflow tracking store yet"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)  # read-only: creates nothing
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    if tables and "experiments" not in tables:
        return f"{path} is a SQLite database but not an MLflow tracking store"
    if not tables and not create:
        return f"{path} is empty: not an MLflow tracking store yet"
    return ""


def _check_server(uri: str, timeout: float) -> str:
    import socket
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError as exc:  # it answered: anything but a server error will do
        if exc.code >= 500:
            return f"the tracking server at {uri} answered {exc.code} {exc.reason}"
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.timeout) or "timed out" in str(reason):
            return f"the tracking server at {uri} did not answer within {timeout:g} s"
        return f"cannot reach the tracking server at {uri}: {getattr(reason, 'strerror', None) or reason}"
    return ""


def _check_database(uri: str, base: str, timeout: float) -> str:
    import socket

    from sqlalchemy.engine import make_url

    url = make_url(uri)
    try:
        dialect = url.get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()
    except ImportError as exc:
        return (f"tracking store {url.drivername}://...: its database driver is not installed ({exc}); "
                f"install it, or name an installed one (e.g. {base}+psycopg2://, {base}+pymysql://)")
    host = url.host or ("localhost" if "host" not in url.query else None)
    if host is None:  # a unix socket named in the query: nothing to dial here
        return ""
    port = url.port or _SQL_PORTS[base]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.timeout:
        return f"the tracking database at {host}:{port} did not answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach the tracking database at {host}:{port}: {exc.strerror or exc}"
    return ""


# -- reading (CLI `runs`, tests, the API) ------------------------------------
def client_for(uri: Optional[str] = None) -> MlflowClient:
    """A client for reading. A local store (SQLite, a directory) must exist: StoreNotFound (or
    TrackingError, for a file that is no store) otherwise; reading never creates a store."""
    uri = resolve_uri(uri)
    if uri.startswith(("sqlite:", "file:")):
        problem = check_store(uri, create=False)
        if problem:
            raise (StoreNotFound if problem.startswith("no MLflow tracking store") else TrackingError)(problem)
    return MlflowClient(tracking_uri=uri)


def recent_parent_runs(uri: Optional[str] = None, experiment: Optional[str] = None, limit: int = 20):
    """The newest parent runs (of ``experiment``, else of every experiment). ExperimentNotFound
    names the experiments there are."""
    client = client_for(uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ExperimentNotFound(f"no experiment {experiment!r} in {resolve_uri(uri)}; "
                                     f"experiments: {', '.join(names) if names else '(none)'}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    return client.search_runs(ids, filter_string="tags.`ensemble.kind` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=limit)


class RunNotFound(TrackingError, LookupError):
    """No run of that id in the store."""


def ensemble_page(uri: Optional[str] = None, run_id: Optional[str] = None) -> Optional[Dict[str, str]]:
    """What the UI should open: the ensemble of ``run_id`` (its parent run, or one of its member
    runs), else the newest finished ensemble in the store (the newest of any status when none
    finished); None when the store holds none (or does not
    exist and no run was asked for). A dict with ``experiment_id``, ``run_id`` (the parent),
    ``run_name``, ``ensemble_id`` and ``view`` (the key of its saved view, '' when the experiment
    has none, e.g. for an ensemble trained before views were written), plus ``run_ids`` and
    ``experiment_ids`` for an ensemble with members borrowed from other ensembles (grown, selected):
    its saved view filters by its own id, so the page lists these runs instead. RunNotFound for an
    unknown ``run_id``."""
    from ensemble_service import runs_view

    try:
        client = client_for(uri)
    except StoreNotFound:
        if run_id:
            raise
        return None
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RunNotFound(f"no run {run_id!r} in {resolve_uri(uri)}") from None
            raise
        if run.data.tags.get(names.TAG_KIND) == names.KIND_MEMBER and run.data.tags.get("mlflow.parentRunId"):
            run = client.get_run(run.data.tags["mlflow.parentRunId"])
        if run.data.tags.get(names.TAG_KIND) != names.KIND_PARENT:
            raise RunNotFound(f"run {run_id} is not an ensemble's parent or member run")
    else:
        # the newest ensemble that finished (one that was stopped or failed has no metrics to show),
        # else the newest of any status
        found = recent_parent_runs(uri, limit=50)
        if not found:
            return None
        run = next((r for r in found if r.info.status == "FINISHED"), found[0])
    ensemble_id = run.data.tags.get(names.TAG_ID, "")
    key = runs_view.view_key(ensemble_id) if ensemble_id else ""
    tags = client.get_experiment(run.info.experiment_id).tags or {}
    page = {"experiment_id": run.info.experiment_id, "run_id": run.info.run_id, "run_name": run.info.run_name or "",
            "ensemble_id": ensemble_id, "view": key if names.MLFLOW_VIEW_PREFIX + key in tags else ""}
    page.update(_borrowed_members(client, run, ensemble_id))
    return page


def _borrowed_members(client, parent, ensemble_id: str) -> Dict[str, Any]:
    """For an ensemble some of whose members are runs of other ensembles (``ensemble grow``'s reused
    members, ``ensemble select``'s picks, possibly in other experiments): every run to show (the
    parent, its own members, the borrowed ones) and their experiments. {} for any other ensemble."""
    from ensemble_service import runs_view

    tags = parent.data.tags
    borrowed = [r.split(":", 1)[0] for key in (names.TAG_REUSED_MEMBERS, names.TAG_SELECTED_MEMBERS)
                for r in (tags.get(key) or "").split(",") if r.strip()]
    if not borrowed:
        return {}
    own = [parent.info.run_id]
    if ensemble_id:
        own += [r.info.run_id for r in client.search_runs(
            [parent.info.experiment_id], runs_view.search_filter(ensemble_id), max_results=1000)
            if r.info.run_id != parent.info.run_id]
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    found = {r.info.run_id: r for r in client.search_runs(experiments, runs_view.runs_filter(borrowed),
                                                            max_results=1000)}
    found = [found[r] for r in dict.fromkeys(borrowed) if r in found]  # in member order
    return {"run_ids": list(dict.fromkeys(own + [r.info.run_id for r in found])),
            "experiment_ids": sorted({parent.info.experiment_id, *(r.info.experiment_id for r in found)})}


#: `mlflow ui` start-up and access logs say nothing to someone opening the UI: warnings and errors only
UI_SERVER_OPTIONS = "--log-level warning --no-access-log"


def ui_command(uri: Optional[str], host: str, port: int) -> List[str]:
    """The `mlflow ui` command line for this store (one web worker, warnings and errors only)."""
    uri = resolve_uri(uri)
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1", "--uvicorn-opts", UI_SERVER_OPTIONS]
    root = local_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


# -- reading tracked ensembles (grow, select, distill) ------------------------
class RunReader:
    """Reads runs and their artifacts from a store that exists (``client_for``): what ``ensemble grow``,
    ``select`` and ``distill`` build on. Artifacts are downloaded under one temporary directory,
    removed by :meth:`close` (or leaving the ``with`` block)."""

    def __init__(self, uri: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.client = client_for(self.uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="ensemble-runs-")
        self._count = 0

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def run(self, run_id: str):
        """The run ``run_id`` (RunNotFound when there is none)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(str(run_id))
        except MlflowException as exc:
            raise RunNotFound(f"no run {run_id!r} in {self.uri}") from exc

    def experiment_ids(self, experiments: List[str]) -> List[str]:
        """The ids of the experiments named (ExperimentNotFound names those there are)."""
        ids = []
        for name in experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                known = sorted(e.name for e in self.client.search_experiments())
                raise ExperimentNotFound(f"no experiment {name!r} in {self.uri}; "
                                         f"experiments: {', '.join(known) if known else '(none)'}")
            ids.append(exp.experiment_id)
        return ids

    def experiment_name(self, run) -> str:
        """The name of the experiment ``run`` belongs to."""
        return self.client.get_experiment(run.info.experiment_id).name

    def _search(self, experiment_ids: Optional[List[str]], filters: List[str]):
        ids = experiment_ids if experiment_ids is not None else [e.experiment_id for e in self.client.search_experiments()]
        if not ids:
            return []
        out, token = [], None
        while True:
            page = self.client.search_runs(ids, filter_string=" and ".join(filters), max_results=1000,
                                           page_token=token, order_by=["attributes.start_time ASC"])
            out.extend(page)
            token = page.token
            if not token:
                return out

    def parents(self, experiment_ids: Optional[List[str]] = None, sweep: Optional[str] = None):
        """FINISHED parent runs (of those experiments, else of every one; with that sweep tag), oldest first."""
        filters = [f"tags.`{names.TAG_KIND}` = '{names.KIND_PARENT}'", "attributes.status = 'FINISHED'"]
        if sweep is not None:
            filters.append(f"tags.`{names.TAG_SWEEP}` = '{_quote(sweep)}'")
        return self._search(experiment_ids, filters)

    def members(self, parent_run):
        """The FINISHED member runs nested under ``parent_run``, in member order."""
        found = self._search([parent_run.info.experiment_id], [
            f"tags.`mlflow.parentRunId` = '{_quote(parent_run.info.run_id)}'",
            f"tags.`{names.TAG_KIND}` = '{names.KIND_MEMBER}'", "attributes.status = 'FINISHED'"])
        return sorted(found, key=lambda r: int(r.data.tags.get(names.TAG_MEMBER_INDEX, 0)))

    def has_artifact(self, run_id: str, path: str) -> bool:
        folder = str(Path(path).parent)
        listed = self.client.list_artifacts(run_id, None if folder == "." else folder)
        return any(f.path == path for f in listed)

    def artifact(self, run_id: str, path: str) -> bytes:
        """The bytes of artifact ``path`` of run ``run_id`` (TrackingError when it is missing)."""
        self._count += 1
        dest = Path(self._tmp.name) / str(self._count)
        dest.mkdir()
        try:
            local = self.client.download_artifacts(run_id, path, str(dest))
            return Path(local).read_bytes()
        except Exception as exc:
            raise TrackingError(f"run {run_id} has no artifact {path} ({_one_line(exc)})") from None

    def array(self, run_id: str, path: str) -> np.ndarray:
        return np.load(io.BytesIO(self.artifact(run_id, path)), allow_pickle=False)

    def json(self, run_id: str, path: str) -> Any:
        return json.loads(self.artifact(run_id, path).decode())

    def text(self, run_id: str, path: str) -> str:
        return self.artifact(run_id, path).decode()


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")

"""All MLflow code: one parent run per ensemble, one nested run per member.

Layout in the tracking store (experiment ``tracking.experiment``):
- parent run (tags ``ensemble.strategy``, ``ensemble.data``, ``ensemble.model``,
  ``ensemble.id``, ``ensemble.kind=parent``): the resolved config as params and as
  ``config.yaml``; ensemble metrics (``ensemble_mean_test_acc`` ...); ``members.csv``
  and ``members.json`` (the member table); ``predictions/test_labels.npy``.
- member runs (tag ``mlflow.parentRunId``, ``ensemble.member_index``,
  ``ensemble.kind=member``): seed and architecture as params, per-epoch ``train_loss``,
  ``val_acc``, ``val_nll`` (step = epoch), final ``test_*`` metrics, the checkpoint
  ``checkpoint/member.pt`` (config + weights, a ``torch.load(weights_only=True)`` file)
  and ``predictions/{val,test}_probs.npy``.

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
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_METRICS = (
    "ensemble_mean_test_acc", "ensemble_vote_test_acc", "ensemble_weighted_test_acc",
    "ensemble_logit_mean_test_acc", "ensemble_mean_test_nll", "ensemble_mean_test_brier",
    "ensemble_mean_test_ece", "best_member_test_acc", "mean_member_test_acc",
    "disagreement", "oracle_test_acc",
)


class TrackingError(RuntimeError):
    pass


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


class EnsembleTracker:
    """Driver-side writer of one ensemble's runs."""

    def __init__(self, uri: Optional[str], experiment: str):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)
        self.parent_id: Optional[str] = None
        self.open_runs: List[str] = []
        self._metrics: Dict[str, List[Metric]] = {}   # buffered, written in one log_batch per run
        self._tags: Dict[str, Dict[str, str]] = {}
        self._last_flush = time.monotonic()

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        # "custom_model_development": the UI opens the experiment on its training runs, not the GenAI overview
        return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri),
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    # -- runs -------------------------------------------------------------
    def start_parent(self, run_name: str, config: Dict[str, Any], tags: Dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"ensemble.kind": "parent", **tags})
        self.parent_id = run.info.run_id
        self.open_runs.append(self.parent_id)
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_id, params=params[i:i + 100])
        import yaml

        self.log_text(self.parent_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        return self.parent_id

    def start_member(self, index: int, run_name: str, params: Dict[str, Any], tags: Dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={"mlflow.parentRunId": self.parent_id, "ensemble.kind": "member",
                  "ensemble.member_index": str(index), **tags},
        )
        rid = run.info.run_id
        self.open_runs.append(rid)
        self.client.log_batch(rid, params=[Param(k, v) for k, v in sorted(flatten(params).items())])
        return rid

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

    def flush(self, run_id: Optional[str] = None, every: float = 0.0) -> None:
        """Write what is queued: for one run, or for all runs if `every` seconds have passed."""
        if run_id is None:
            if time.monotonic() - self._last_flush < every:
                return
            self._last_flush = time.monotonic()
        for rid in [run_id] if run_id else list(set(self._metrics) | set(self._tags)):
            metrics = self._metrics.pop(rid, [])
            tags = [RunTag(k, v) for k, v in self._tags.pop(rid, {}).items()]
            for i in range(0, max(len(metrics), 1), 1000):
                chunk = metrics[i:i + 1000]
                if chunk or tags:
                    self.client.log_batch(rid, metrics=chunk, tags=tags)
                    tags = []

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.log_bytes(run_id, text.encode(), artifact_file)

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

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        if run_id in self.open_runs:
            try:
                self.flush(run_id)
            finally:  # a failed metric write must not leave the run RUNNING
                self.client.set_terminated(run_id, status)
                self.open_runs.remove(run_id)

    def end_all(self, status: str = "FAILED", reason: str = "") -> None:
        """Close every run still open (members first, then the parent)."""
        import signal

        # a second Ctrl-C or SIGTERM while closing would leave runs RUNNING: hold them off until done
        held = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                held[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass
        try:
            for rid in [r for r in self.open_runs if r != self.parent_id] + (
                    [self.parent_id] if self.parent_id in self.open_runs else []):
                if reason:
                    self.queue_tags(rid, {"ensemble.error": reason[:4000]})
                try:
                    self.end(rid, status)
                except Exception:  # closing is best effort; keep closing the others
                    pass
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    @staticmethod
    def member_table_csv(rows: List[Dict[str, Any]]) -> str:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue()


# -- reading (CLI `runs`, tests, the API) ------------------------------------
def client_for(uri: Optional[str] = None) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_uri(uri))


def recent_parent_runs(uri: Optional[str] = None, experiment: Optional[str] = None, limit: int = 20):
    client = client_for(uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    return client.search_runs(ids, filter_string="tags.`ensemble.kind` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=limit)


def member_runs(parent_run_id: str, uri: Optional[str] = None):
    client = client_for(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    return sorted(runs, key=lambda r: int(r.data.tags.get("ensemble.member_index", 0)))


def load_array(run_id: str, artifact_path: str, uri: Optional[str] = None) -> np.ndarray:
    client = client_for(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, artifact_path, tmp)
        return np.load(local, allow_pickle=False)


def ui_command(uri: Optional[str], host: str, port: int) -> List[str]:
    """The `mlflow ui` command line for this store."""
    uri = resolve_uri(uri)
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    root = local_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd

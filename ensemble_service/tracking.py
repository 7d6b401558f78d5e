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
from typing import Any, Dict, Iterable, List, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import logging  # noqa: E402

import mlflow  # noqa: E402

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

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri))

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
        ts = _now_ms()
        ms = [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def set_tags(self, run_id: str, tags: Dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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
            self.client.set_terminated(run_id, status)
            self.open_runs.remove(run_id)

    def end_all(self, status: str = "FAILED", reason: str = "") -> None:
        """Close every run still open (members first, then the parent)."""
        for rid in [r for r in self.open_runs if r != self.parent_id] + (
                [self.parent_id] if self.parent_id in self.open_runs else []):
            try:
                if reason:
                    self.set_tags(rid, {"ensemble.error": reason[:4000]})
                self.end(rid, status)
            except Exception:  # closing is best effort; keep closing the others
                pass

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
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    root = local_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd

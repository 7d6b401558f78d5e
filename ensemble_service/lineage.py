"""Ensembles and members tracked already, read back from MLflow: what ``ensemble grow``, ``select``
and ``distill`` build on.

- :func:`data_digest` identifies a data set and split (the labels of every split, their sizes, the
  input shape, the classes and the fitted preprocessing): the runner logs it in ``data.json``, and a
  member is only combined with members, or trained against a teacher, of the same digest.
- :class:`TrackedMember` is a finished member run with what the runner's steps need of a worker's
  result (index, seed, architecture, metrics, predictions, checkpoint), so the pipeline treats a
  member trained long ago like one trained now. Its checkpoint is read when it is first needed.
- :func:`tracked_ensemble` finds a registered ensemble's parent run; :func:`ensemble_members` its
  members (the member table of the parent run: a grown ensemble's table names the members it
  reused from older runs); :func:`ensemble_config` the resolved config it was trained with.
- :func:`gather_pool` collects member runs of experiments, a sweep or given runs for selection.

The MLflow calls are ``tracking.RunReader``'s; nothing here imports MLflow.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ensemble_service import names
from ensemble_service.config import ConfigError


# --------------------------------------------------------------------------- data identity


def data_digest(data) -> str:
    """sha256 of what makes a data set and split the same: input shape, classes, the fitted
    preprocessing and the labels of the train, validation and test splits, in order (a streamed data
    set's training labels are not on the driver: its training split counts by its size)."""
    h = hashlib.sha256()
    h.update(json.dumps({"input_shape": [int(s) for s in data.input_shape], "num_classes": int(data.num_classes),
                         "preprocessing": data.preprocessing}, sort_keys=True, default=str).encode())
    y_train = getattr(data, "y_train", None)
    if y_train is None:
        h.update(f"|train:{data.sizes()['train']}|".encode())
    for y in (() if y_train is None else (y_train,)) + (data.y_val, data.y_test):
        a = np.ascontiguousarray(np.asarray(y, dtype="<i8"))
        h.update(f"|{len(a)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _describe(info: Dict[str, Any]) -> str:
    sizes = info.get("sizes") or {}
    split = "/".join(str(sizes.get(k, "?")) for k in ("train", "val", "test"))
    return f"'{info.get('name', '?')}' ({split} train/val/test samples)"


def check_same_data(data, info: Dict[str, Any], test_labels: Optional[np.ndarray], what: str) -> None:
    """ConfigError unless ``data`` (just loaded) is the data set and split ``what`` was trained on:
    the digest in its data.json, or (runs logged before there was one) the split sizes and test labels."""
    digest = info.get("digest")
    if digest:
        same = digest == data_digest(data)
    else:
        same = (dict(info.get("sizes") or {}) == data.sizes() and test_labels is not None
                and np.array_equal(np.asarray(test_labels), data.y_test.numpy()))
    if not same:
        now = {"name": data.label, "sizes": data.sizes()}
        raise ConfigError(f"the data set differs from the one {what} was trained on: {_describe(info)} then, "
                          f"{_describe(now)} now (data set, split, labels or preprocessing); use the same data "
                          "settings (data.*) it was trained with")


# --------------------------------------------------------------------------- members


@dataclass
class TrackedMember:
    """A finished member run, shaped like a worker's result (``workers.state.MemberResult``) for the
    runner's steps. ``history`` holds only the epoch numbers (the epochs are in the run)."""
    run_id: str
    parent_run_id: str
    index: int
    seed: int
    architecture: str
    metrics: Dict[str, float]
    test_probs: torch.Tensor
    val_probs: Optional[torch.Tensor]
    extra: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    restarts: int = 0
    device: str = ""
    host: str = ""
    load_blob: Optional[Callable[[], bytes]] = field(default=None, repr=False)
    _blob: Optional[bytes] = field(default=None, repr=False)

    @property
    def weights(self) -> bytes:
        """The member checkpoint (``checkpoint/member.pt``), read once."""
        if self._blob is None:
            self._blob = self.load_blob()
        return self._blob

    @property
    def model(self) -> Dict[str, Any]:
        from ensemble_service.artifact import read_member

        return dict(read_member(self.weights)["model"])

    @property
    def role(self) -> str:
        return str(self.extra.get("role", "member"))

    def at(self, index: int) -> "TrackedMember":
        """The same member at another position (of a new ensemble)."""
        from dataclasses import replace

        return replace(self, index=int(index))


_INT_TAGS = {names.TAG_SAMPLE: "sample", names.TAG_CYCLE: "cycle", names.TAG_HEAD: "head",
             names.TAG_TRAJECTORY: "trajectory"}


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def load_member(reader, run, index: Optional[int] = None, val_labels: Optional[np.ndarray] = None,
                eager: bool = False) -> TrackedMember:
    """The member run ``run`` as a :class:`TrackedMember` (at ``index``, default its own). With the
    validation labels, ``val_acc``/``val_nll`` are those of its validation predictions (the model it
    ended with); else the run's last logged values. ``eager`` reads the checkpoint now."""
    from ensemble_service import metrics as m

    rid, tags, params, values = run.info.run_id, run.data.tags, run.data.params, run.data.metrics
    test_probs = torch.from_numpy(reader.array(rid, names.TEST_PROBS))
    val_probs = torch.from_numpy(reader.array(rid, names.VAL_PROBS))
    found = {k: float(values[k]) for k in (*names.FINAL_METRICS, names.VAL_ACC, names.VAL_NLL) if k in values}
    if val_labels is not None and len(val_labels) == len(val_probs):
        own = m.member_metrics(val_probs, torch.as_tensor(val_labels))
        found[names.VAL_ACC], found[names.VAL_NLL] = own["acc"], own["nll"]
    missing = [k for k in (names.TEST_ACC, names.TEST_NLL, names.VAL_ACC) if k not in found]
    if missing:
        raise ConfigError(f"member run {rid} has no {', '.join(missing)}: not a finished member")
    extra: Dict[str, Any] = {"role": tags.get(names.TAG_ROLE, "member")}
    for tag, key in _INT_TAGS.items():
        if tags.get(tag, "") not in ("", None):
            extra[key] = _int(tags[tag])
    epochs = _int(tags.get(names.TAG_COLLECTED_EPOCH, params.get("epochs", 0)))
    member = TrackedMember(
        run_id=rid, parent_run_id=tags.get("mlflow.parentRunId", ""),
        index=_int(tags.get(names.TAG_MEMBER_INDEX)) if index is None else int(index),
        seed=_int(params.get("seed")), architecture=tags.get(names.TAG_ARCHITECTURE) or params.get("architecture", "?"),
        metrics=found, test_probs=test_probs, val_probs=val_probs, extra=extra,
        history=[{"epoch": e} for e in range(1, epochs + 1)], train_seconds=float(values.get(names.TRAIN_SECONDS, 0.0)),
        restarts=_int(tags.get(names.TAG_RESTARTS)), device=tags.get(names.TAG_DEVICE, ""),
        host=tags.get(names.TAG_HOST, ""), load_blob=lambda: reader.artifact(rid, names.MEMBER_CHECKPOINT))
    if eager:
        member.weights  # noqa: B018  (read now: the reader's downloads go when it closes)
    return member


# --------------------------------------------------------------------------- ensembles


@dataclass
class TrackedEnsemble:
    """A registered ensemble version and its parent run."""
    name: str
    version: str
    parent: Any                          # the parent run (an MLflow Run)
    strategy: str
    info: Dict[str, Any]                 # data.json
    test_labels: Optional[np.ndarray]
    val_labels: Optional[np.ndarray]

    @property
    def ref(self) -> str:
        return f"{self.name}/versions/{self.version}"

    @property
    def run_id(self) -> str:
        return self.parent.info.run_id


def _optional_array(reader, run_id: str, path: str) -> Optional[np.ndarray]:
    return reader.array(run_id, path) if reader.has_artifact(run_id, path) else None


def tracked_ensemble(reader, ref: str) -> TrackedEnsemble:
    """The registered ensemble ``ref`` (name, name@alias, name/versions/N) and its parent run;
    ``registry.EnsembleNotFound`` when there is none."""
    from ensemble_service.registry import resolve_ensemble

    version = resolve_ensemble(reader.uri, ref)
    parent = reader.run(version["run_id"])
    rid = parent.info.run_id
    info = reader.json(rid, names.DATA_INFO) if reader.has_artifact(rid, names.DATA_INFO) else {}
    return TrackedEnsemble(name=version["name"], version=str(version["version"]), parent=parent,
                           strategy=parent.data.tags.get(names.TAG_STRATEGY, ""), info=info,
                           test_labels=_optional_array(reader, rid, names.TEST_LABELS),
                           val_labels=_optional_array(reader, rid, names.VAL_LABELS))


def ensemble_members(reader, ens: TrackedEnsemble, eager: bool = True) -> List[TrackedMember]:
    """The members of ``ens`` in member order, from its parent run's member table (which names the
    run of every member, those a grown ensemble reused from older runs included)."""
    rid = ens.run_id
    if not reader.has_artifact(rid, names.MEMBER_TABLE_JSON):
        raise ConfigError(f"{ens.ref} has no member table ({names.MEMBER_TABLE_JSON}) on its run {rid}")
    rows = sorted(reader.json(rid, names.MEMBER_TABLE_JSON), key=lambda r: int(r["member"]))
    return [load_member(reader, reader.run(row["run_id"]), int(row["member"]), ens.val_labels, eager=eager)
            for row in rows]


def ensemble_config(reader, parent) -> Dict[str, Any]:
    """The resolved config (``Config.to_dict()``) a parent run logged as config.yaml; for a selection
    (whose config.yaml holds the selection's settings), the config of its first member's ensemble."""
    import yaml

    rid = parent.info.run_id
    if parent.data.tags.get(names.TAG_STRATEGY) == names.STRATEGY_SELECTION:  # its config.yaml: the selection's
        rows = reader.json(rid, names.MEMBER_TABLE_JSON)
        member = reader.run(rows[0]["run_id"])
        return ensemble_config(reader, reader.run(member.data.tags["mlflow.parentRunId"]))
    if reader.has_artifact(rid, names.CONFIG_YAML):
        return yaml.safe_load(reader.text(rid, names.CONFIG_YAML))
    raise ConfigError(f"run {rid} has no {names.CONFIG_YAML}: its config is unknown")


# --------------------------------------------------------------------------- selection pools


@dataclass
class Pool:
    """Member runs of one data set and split, with that split's labels."""
    members: List[TrackedMember]                 # index = position in the pool
    val_labels: np.ndarray
    test_labels: np.ndarray
    info: Dict[str, Any]                         # data.json of the first parent
    parents: List[str]                           # their parent runs
    config: Dict[str, Any]                       # the first parent's resolved config
    skipped: List[str] = field(default_factory=list)   # one line per run left out, and why


def gather_pool(reader, experiments: List[str], runs: List[str], sweep: Optional[str]) -> Pool:
    """The FINISHED member runs of the FINISHED parent runs in ``experiments`` and with the sweep tag
    ``sweep``, and of ``runs`` (a parent run stands for its members). Parent runs without validation
    labels (logged before selection existed) are left out and said so; the rest must share one
    data digest (ConfigError naming them otherwise). ConfigError when nothing is left."""
    parents: Dict[str, Any] = {}
    direct: Dict[str, Any] = {}                      # member runs named by id
    if experiments:
        for p in reader.parents(reader.experiment_ids(experiments)):
            parents.setdefault(p.info.run_id, p)
    if sweep is not None:
        found = reader.parents(sweep=sweep)
        if not found:
            raise ConfigError(f"no finished ensemble has the sweep tag {sweep!r} ({names.TAG_SWEEP})")
        for p in found:
            parents.setdefault(p.info.run_id, p)
    for rid in runs:
        run = reader.run(rid)
        kind = run.data.tags.get(names.TAG_KIND)
        if kind == names.KIND_PARENT:
            parents.setdefault(run.info.run_id, run)
        elif kind == names.KIND_MEMBER:
            if run.info.status != "FINISHED":
                raise ConfigError(f"member run {rid} is {run.info.status}, not FINISHED")
            direct[run.info.run_id] = run
        else:
            raise ConfigError(f"run {rid} is neither an ensemble's parent run nor a member run")
    candidates: Dict[str, Any] = {}                  # member run id -> (run, parent id)
    for pid, p in parents.items():
        for m in reader.members(p):
            candidates.setdefault(m.info.run_id, (m, pid))
    for mid, m in direct.items():
        candidates.setdefault(mid, (m, m.data.tags.get("mlflow.parentRunId", "")))

    skipped: List[str] = []
    by_parent: Dict[str, Dict[str, Any]] = {}
    for pid in dict.fromkeys(pid for _, pid in candidates.values()):
        p = parents.get(pid) or reader.run(pid)
        if not reader.has_artifact(pid, names.VAL_LABELS) or not reader.has_artifact(pid, names.DATA_INFO):
            skipped.append(f"{pid}: no {names.VAL_LABELS} (logged before selection existed)")
            continue
        info = reader.json(pid, names.DATA_INFO)
        by_parent[pid] = {"run": p, "info": info, "val": reader.array(pid, names.VAL_LABELS)}
    if not by_parent:
        why = f" ({len(skipped)} ensembles predate validation labels)" if skipped else ""
        raise ConfigError(f"the pool is empty: no finished member runs found{why}")
    groups: Dict[str, List[str]] = {}
    for pid, d in by_parent.items():
        groups.setdefault(str(d["info"].get("digest") or f"no digest: {pid}"), []).append(pid)
    if len(groups) > 1:
        parts = [f"{_describe(by_parent[ps[0]]['info'])} x {len(ps)} ensembles" for ps in groups.values()]
        raise ConfigError(f"the pool mixes data sets or splits: {'; '.join(parts)}; a selection needs one "
                          "(narrow it with --runs, --sweep or --experiment)")
    first = next(iter(by_parent))
    val_labels = by_parent[first]["val"]
    members = []
    for mid, (run, pid) in candidates.items():
        if pid in by_parent:
            members.append(load_member(reader, run, len(members), val_labels))
    if not members:
        raise ConfigError("the pool is empty: no finished member runs found")
    return Pool(members=members, val_labels=val_labels, test_labels=reader.array(first, names.TEST_LABELS),
                info=by_parent[first]["info"], parents=list(by_parent), skipped=skipped,
                config=ensemble_config(reader, by_parent[first]["run"]))

"""``ensemble select``: an ensemble selected from member runs tracked already (Caruana et al. 2004),
e.g. the hyper-ensemble of a sweep (Wenzel et al. 2020: members of different hyperparameters).

The pool (``lineage.gather_pool``: member runs of experiments, of a sweep, or named; any strategies
and architectures, one data set and split) is searched by greedy forward selection with replacement
on the validation predictions (``selection.greedy_select``). Nothing is trained and no Ray starts.
The selection gets a parent run (tags ``ensemble.strategy=selection``, ``ensemble.selected_from``,
``ensemble.selected_members``; its settings as params and config.yaml) with

- ``ensemble_mean_val_nll``/``_acc`` (the selection), ``best_member_val_nll``/``_acc`` (the pool's
  best member), ``pool_mean_val_nll``/``_acc`` and ``pool_mean_test_nll``/``_acc`` (the whole pool
  averaged), ``pool_size``, ``selection_picks``, the greedy path (``selection_val_nll_at_k``, step k);
- the usual test metrics, size curve (along the picks) and plots of the selection, a member picked
  c times counting c times;
- the member table (each member's run, picks and weight), ``selection.json`` (pool, picks, path),
  ``data.json`` and the labels;

and is registered (a new version of ``--model-name``) with the members' pick shares as weights in
its manifest: serving combines them with those weights.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ensemble_service import metrics, names
from ensemble_service.config import ConfigError


@dataclass
class SelectResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    model_version: str
    members: List[Dict[str, Any]]          # the member table
    values: Dict[str, float]               # the parent run's metrics
    pool_size: int
    skipped: List[str] = field(default_factory=list)
    path_nll: List[float] = field(default_factory=list)
    best_step: int = 0


def _sources(experiments: List[str], runs: List[str], sweep: Optional[str]) -> str:
    parts = []
    if experiments:
        parts.append(f"experiments={','.join(experiments)}")
    if sweep:
        parts.append(f"sweep={sweep}")
    if runs:
        parts.append(f"runs={','.join(runs)}")
    return "; ".join(parts)


def select(*, experiments: List[str] = (), runs: List[str] = (), sweep: Optional[str] = None, size: int,
           metric: str = "val_nll", model_name: Optional[str] = None, uri: Optional[str] = None,
           experiment: Optional[str] = None, register: bool = True) -> SelectResult:
    """Select an ensemble of at most ``size`` picks from the pool and track and register it (see the
    module docstring). The selection's run goes to ``experiment`` (default: the first of
    ``experiments``, else the first pool ensemble's); the model to ``model_name`` (default: that
    experiment's name + ``-selected``). ConfigError (one line) for bad arguments or an empty or
    mixed pool, before any run is created."""
    from ensemble_service import lineage
    from ensemble_service.aggregation import mean
    from ensemble_service.runner import closing_runs, member_row, register_members, summarize, Observer
    from ensemble_service.selection import METRICS, SelectionError, greedy_select
    from ensemble_service.tracking import EnsembleTracker, RunReader

    experiments, runs = list(experiments or []), list(runs or [])
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--size must be at least 1, got {size}")
    if metric not in METRICS:
        raise ConfigError(f"unknown --metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if not experiments and not runs and sweep is None:
        raise ConfigError("give the pool: --experiment NAME, --runs RUN_ID or --sweep TAG (each may repeat)")
    if model_name is not None and not model_name.strip():
        raise ConfigError("--model-name must not be empty")
    t0 = time.perf_counter()
    with RunReader(uri) as reader:
        pool = lineage.gather_pool(reader, experiments, runs, sweep)
        val = torch.stack([m.val_probs for m in pool.members])
        y_val = torch.as_tensor(pool.val_labels)
        y_test = torch.as_tensor(pool.test_labels)
        try:
            sel = greedy_select(val, y_val, size, metric)
        except SelectionError as exc:
            raise ConfigError(str(exc)) from None
        counts = sel.counts                                  # pool position -> picks, in order of first pick
        position = {p: i for i, p in enumerate(counts)}      # pool position -> member index in the selection
        chosen = [pool.members[p].at(i) for p, i in position.items()]
        picks = [position[p] for p in sel.picks]
        weights = [counts[p] / len(sel.picks) for p in counts]
        for m in chosen:                                     # read now: the reader's downloads go when it closes
            m.weights  # noqa: B018
        where = experiment or (experiments[0] if experiments else reader.experiment_name(reader.run(pool.parents[0])))
        uri = reader.uri

    w = torch.tensor(weights, dtype=torch.float64)
    sel_val = (w[:, None, None] * torch.stack([m.val_probs for m in chosen]).to(torch.float64)).sum(0)
    pool_val, pool_test = val.to(torch.float64).mean(0), torch.stack([m.test_probs for m in pool.members]).mean(0)
    member_val_nll = [m.metrics[names.VAL_NLL] for m in pool.members]
    values = {
        names.ENSEMBLE_MEAN_VAL_NLL: metrics.nll(sel_val, y_val), names.ENSEMBLE_MEAN_VAL_ACC: metrics.accuracy(sel_val, y_val),
        names.BEST_MEMBER_VAL_NLL: min(member_val_nll),
        names.BEST_MEMBER_VAL_ACC: max(m.metrics[names.VAL_ACC] for m in pool.members),
        names.POOL_MEAN_VAL_NLL: metrics.nll(pool_val, y_val), names.POOL_MEAN_VAL_ACC: metrics.accuracy(pool_val, y_val),
        names.POOL_MEAN_TEST_NLL: metrics.nll(pool_test, y_test), names.POOL_MEAN_TEST_ACC: metrics.accuracy(pool_test, y_test),
        names.POOL_SIZE: len(pool.members), names.SELECTION_PICKS: len(sel.picks),
    }
    title = f"selection from {len(pool.members)} members on {pool.info.get('name', '?')}"
    summary = summarize(chosen, y_test, title, picks=picks)
    values.update(summary.metrics)
    table = []
    for m, c, wt in zip(chosen, counts.values(), weights):
        row = member_row(m, m.run_id, m.role)
        row.update(val_nll=m.metrics[names.VAL_NLL], picks=c, weight=round(wt, 6), parent_run_id=m.parent_run_id)
        table.append(row)
    details = {
        "metric": metric, "size": size, "best_step": sel.best_step, "path_nll": sel.path_nll, "path_acc": sel.path_acc,
        "picks": [pool.members[p].run_id for p in sel.picks],
        "members": [{"run_id": m.run_id, "picks": c, "weight": wt} for m, c, wt in zip(chosen, counts.values(), weights)],
        "pool": [{"run_id": m.run_id, "parent_run_id": m.parent_run_id, "architecture": m.architecture,
                  "val_nll": m.metrics[names.VAL_NLL], "val_acc": m.metrics[names.VAL_ACC],
                  "test_nll": m.metrics[names.TEST_NLL], "test_acc": m.metrics[names.TEST_ACC]} for m in pool.members],
        "skipped": pool.skipped,
    }
    model_name = model_name or f"{where}-selected"
    settings = {"select": {"size": size, "metric": metric, "experiments": experiments, "runs": runs, "sweep": sweep,
                           "model_name": model_name}}
    archs = sorted({m.architecture for m in chosen})
    tags = {names.TAG_STRATEGY: names.STRATEGY_SELECTION, names.TAG_DATA: str(pool.info.get("name", "")),
            names.TAG_MODEL: "+".join(archs), names.TAG_MEMBERS: str(len(chosen)),
            names.TAG_SELECTED_FROM: _sources(experiments, runs, sweep)[:7900],
            names.TAG_SELECTED_MEMBERS: ",".join(f"{m.run_id}:{c}" for m, c in zip(chosen, counts.values()))[:7900]}

    tracker = EnsembleTracker(uri, where)
    with closing_runs(tracker, Observer()):
        parent = tracker.start_parent(f"selection-{pool.info.get('name', 'data')}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      settings, tags)
        tracker.log_data(parent, pool.info, pool.test_labels, pool.val_labels)
        for k, (nll_k, acc_k) in enumerate(zip(sel.path_nll, sel.path_acc), start=1):
            tracker.queue_metrics(parent, {names.SELECTION_VAL_NLL_AT_K: nll_k, names.SELECTION_VAL_ACC_AT_K: acc_k},
                                  step=k)
        tracker.log_text(parent, json.dumps(details, indent=2), names.SELECTION_JSON)
        wall = time.perf_counter() - t0
        tracker.log_ensemble(parent, {**values, names.WALL_SECONDS: wall, names.MEMBERS_FINISHED: len(chosen)},
                             summary.curve, summary.plots, table, mean(summary.member_probs, w).numpy())
        model_version = ""
        if register:
            model_version = register_members(tracker, parent, model_name, chosen, names.STRATEGY_SELECTION,
                                             pool.info.get("class_names"), pool.info.get("preprocessing"), weights)
        tracker.end(parent, "FINISHED")
    return SelectResult(parent_run_id=parent, tracking_uri=tracker.uri, experiment=where, model_version=model_version,
                        members=table, values=values, pool_size=len(pool.members), skipped=pool.skipped,
                        path_nll=sel.path_nll, best_step=sel.best_step)

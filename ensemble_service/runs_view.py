"""How an ensemble reads in the MLflow UI: run descriptions, dataset inputs, the saved view of its
runs and the URL that opens it. Pure (no MLflow import): ``tracking.py`` writes what this returns.

The MLflow 3 UI keeps the state of an experiment's runs page (columns, their order and widths,
sort, filter, charts) in the browser, except for a *saved view*: an experiment tag
``mlflow.sharedViewState.<key>`` that the URL ``#/experiments/<id>/runs?viewStateShareKey=<key>``
applies, and that the page's "Views" menu lists by name. Each ensemble gets one, named after its
parent run: its parent and member runs as flat rows (a filter on ``ensemble.id``; sorted by
``test_acc``, which the parent carries for the ensemble too), the columns that tell them apart,
and charts of the members' ``val_acc`` per epoch, the accuracy-vs-size curve and ``test_acc``.
Rows can only be flattened by a filter or a sort: a saved view cannot expand a parent row
(MLflow leaves ``runsExpanded`` out of what a view carries). The UI's ``workflowType`` URL
parameter chooses the "Model training" pages over the GenAI ones (MLflow 3.17 shows the GenAI
pages to a browser that has not chosen, whatever the experiment's kind tag says).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence
from urllib.parse import urlencode

from ensemble_service import names

WORKFLOW = "machine_learning"   # the UI's "Model training" pages
#: the dataset splits logged as inputs, with MLflow's context names
SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))
_SAMPLE_ROWS = 4096              # rows hashed per split (evenly spaced) besides shapes and every label


def _column(kind: str, key: str) -> str:
    """The UI's column id (its "canonical sort key"): ``metrics.`test_acc```."""
    return f"{kind}.`{key}`"


METRIC_COLUMNS = [names.TEST_ACC, names.TEST_NLL]
TAG_COLUMNS = [names.TAG_MEMBER_INDEX, names.TAG_STRATEGY, names.TAG_ROLE, names.TAG_ARCHITECTURE]


# -- dataset inputs ---------------------------------------------------------------------------


def _digest(x, y) -> str:
    """A short fingerprint of one split: shapes, dtypes, every label and up to _SAMPLE_ROWS inputs."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps([list(x.shape), str(x.dtype), list(y.shape), str(y.dtype)]).encode())
    n = int(x.shape[0])
    rows = torch.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).long() if n else torch.zeros(0, dtype=torch.long)
    h.update(x[rows].contiguous().cpu().numpy().tobytes())
    h.update(y.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def dataset_inputs(data) -> List[Dict[str, Any]]:
    """One MLflow dataset input per split of a ``DataBundle``: ``name`` (the data set's label),
    ``digest``, ``context`` (train / validation / test), ``source_type``, ``source``, ``schema``
    and ``profile`` (JSON strings: the split's number of rows, input shape and classes)."""
    out = []
    stream = getattr(data, "stream", None)   # a streamed data set: no inputs (nor training labels) on the driver
    for split, context in SPLITS:
        x, y = getattr(data, f"x_{split}", None), getattr(data, f"y_{split}", None)
        rows = int(y.shape[0]) if y is not None else int(data.sizes()[split])
        if x is not None:
            digest = _digest(x, y)
        else:
            h = hashlib.sha256(json.dumps([getattr(stream, "uri", ""), [list(u) for u in getattr(stream, "units", ())],
                                           split, rows], default=str).encode())
            if y is not None:
                h.update(y.contiguous().cpu().numpy().tobytes())
            digest = h.hexdigest()[:10]
        shape = [-1, *[int(d) for d in data.input_shape]]
        schema = {"mlflow_tensorspec": {
            "features": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": shape}}]),
            "targets": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}])}}
        profile = {"split": split, "num_rows": rows, "input_shape": list(data.input_shape),
                   "num_classes": int(data.num_classes)}
        out.append({"name": data.label or data.name, "digest": digest, "context": context,
                    "source_type": "code", "source": json.dumps({"tags": {names.TAG_DATA: data.label or data.name}}),
                    "schema": json.dumps(schema), "profile": json.dumps(profile)})
    return out


# -- descriptions (markdown, MLflow's mlflow.note.content) ---------------------------------------


def member_description(index: int, members: int, strategy: str, architecture: str, seed: Any,
                       tags: Mapping[str, str], bagging: bool = False) -> str:
    """One line naming the member's place in its ensemble, its seed and role."""
    role = tags.get(names.TAG_ROLE, "member")
    where = [f"{k.split('.', 1)[1]} {tags[k]}" for k in (names.TAG_TRAJECTORY, names.TAG_CYCLE, names.TAG_HEAD,
                                                         names.TAG_SAMPLE) if tags.get(k, "") != ""]
    text = f"Member {index} of {members} of a `{strategy}` ensemble: {architecture}, seed {seed}, role `{role}`"
    if where:
        text += f" ({', '.join(where)})"
    if bagging:
        text += "; trained on a bootstrap resample of the training split"
    return text + "."


MAX_TABLE_ROWS = 50  # members listed in the parent's description (MLflow keeps 8000 characters of it)


def _f(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def parent_description(*, strategy: str, data: str, model: str, table: Sequence[Mapping[str, Any]],
                       metrics: Mapping[str, float], model_version: str = "", degraded: str = "") -> str:
    """The parent run's markdown summary: the ensemble against its best member, the member table and
    how to serve it."""
    best = max(table, key=lambda r: r[names.TEST_ACC]) if table else None
    lines = [f"**Ensemble of {len(table)} members** (`{strategy}`, {model} on {data})", ""]
    if degraded:
        lines += [f"*{degraded}*", ""]
    lines += ["| | test acc | test NLL |", "|---|---|---|",
              f"| ensemble (mean of the members' probabilities) | {_f(metrics.get(names.ENSEMBLE_MEAN_TEST_ACC))} "
              f"| {_f(metrics.get(names.ENSEMBLE_MEAN_TEST_NLL))} |"]
    if best is not None:
        lines.append(f"| best member (member {best['member']}) | {_f(best[names.TEST_ACC])} | {_f(best[names.TEST_NLL])} |")
    extra = [(label, metrics[key]) for label, key in (
        ("majority vote", names.ENSEMBLE_VOTE_TEST_ACC), ("mean member", names.MEAN_MEMBER_TEST_ACC),
        ("oracle (any member right)", names.ORACLE_TEST_ACC)) if key in metrics]
    if extra:
        lines += ["", "Test accuracy of " + ", ".join(f"{label} {_f(v)}" for label, v in extra) + "."]
    lines += ["", "| member | role | architecture | seed | val acc | test acc | test NLL |", "|---|---|---|---|---|---|---|"]
    for r in table[:MAX_TABLE_ROWS]:
        lines.append(f"| {r['member']} | {r.get('role') or 'member'} | {r.get('architecture', '')} | {r.get('seed', '')} "
                     f"| {_f(r.get(names.VAL_ACC))} | {_f(r.get(names.TEST_ACC))} | {_f(r.get(names.TEST_NLL))} |")
    if len(table) > MAX_TABLE_ROWS:
        lines.append(f"| ... | {len(table) - MAX_TABLE_ROWS} more members: the run's `{names.MEMBER_TABLE_CSV}` | | | | | |")
    if model_version:
        name, _, version = model_version.partition("/versions/")
        lines += ["", f"**Serve it**: registered as `{model_version}`; `ensemble serve`, then "
                      f"`POST /v1/ensembles/{name}/versions/{version}/predict`, or in Python "
                      f"`mlflow.pyfunc.load_model(\"models:/{name}/{version}\")`."]
    return "\n".join(lines)


# -- the saved view and its URL -----------------------------------------------------------------


def view_key(ensemble_id: str) -> str:
    """The saved view's key (the experiment tag is ``names.MLFLOW_VIEW_PREFIX + key``)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in ensemble_id)


def search_filter(ensemble_id: str) -> str:
    return f"tags.`{names.TAG_ID}` = '{ensemble_id.replace(chr(39), chr(39) * 2)}'"


def runs_filter(run_ids: Sequence[str]) -> str:
    """The runs ``run_ids`` (an ensemble whose members are runs of other ensembles: grown, selected)."""
    return "attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids if r.isalnum()) + ")"


# Sorting by anything but the start time lists nested runs as flat rows (MLflow nests children
# only under the default sort with no filter); the ensemble carries test_acc too, so it ranks among
# its members.
ORDER_BY = _column("metrics", names.TEST_ACC)


def _line(uuid: str, metric: str, title: str, runs: int) -> Dict[str, Any]:
    return {"uuid": uuid, "type": "LINE", "metricKey": metric, "selectedMetricKeys": [metric], "displayName": title,
            "metricSectionId": "ensemble", "runsCountToCompare": runs, "deleted": False, "isGenerated": False,
            "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "xAxisKey": "step",
            "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
            "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False,
            "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}}


def _bar(uuid: str, metric: str, title: str, runs: int) -> Dict[str, Any]:
    return {"uuid": uuid, "type": "BAR", "metricKey": metric, "displayName": title, "metricSectionId": "ensemble",
            "runsCountToCompare": runs, "deleted": False, "isGenerated": False}


def view_state(ensemble_id: str, members: int) -> Dict[str, Any]:
    """The runs page's state for one ensemble (search facets and UI state, as the UI serializes them)."""
    runs = max(10, members + 1)
    metrics = [_column("metrics", k) for k in METRIC_COLUMNS]
    first_tags = [_column("tags", k) for k in TAG_COLUMNS[:2]]     # member index, strategy
    other_tags = [_column("tags", k) for k in TAG_COLUMNS[2:]]     # role, architecture
    attributes = [_column("attributes", "Dataset"), _column("attributes", "Models")]
    columns = metrics + first_tags + attributes + other_tags
    # 1600 px wide, with the sidebar: the run name, Created, the metrics, member index, strategy, Dataset and
    # Models fit; role and architecture follow (the UI always shows Created and Duration)
    widths = {_column("attributes", "Run Name"): 190, "runDateAndNestInfo": 110,
              **{c: 140 for c in metrics}, first_tags[0]: 150, first_tags[1]: 120,
              attributes[0]: 190, attributes[1]: 150, other_tags[0]: 100, other_tags[1]: 130}
    sections = [{"uuid": "ensemble", "name": "Ensemble", "display": True, "isReordered": False, "deleted": False,
                 "isGenerated": False}]
    sections += [{"uuid": name.lower().replace(" ", "-"), "name": name, "display": False, "isReordered": False,
                  "deleted": False, "isGenerated": True} for name in ("Model metrics", "System metrics")]
    charts = [_line("members-val-acc", names.VAL_ACC, "members: val_acc per epoch", runs),
              _line("accuracy-vs-size", names.SIZE_CURVE_ACC, "ensemble: test accuracy of the first k members", runs),
              _bar("test-acc", names.TEST_ACC, "test_acc: the ensemble and each member", runs),
              _bar("test-nll", names.TEST_NLL, "test_nll: the ensemble and each member", runs)]
    return {"searchFilter": search_filter(ensemble_id), "orderByKey": ORDER_BY, "orderByAsc": False,
            "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": columns,
            "columnOrder": [_column("attributes", "Run Name"), "runDateAndNestInfo", *columns, "duration"],
            "columnWidths": widths, "runsHiddenMode": "SHOW_ALL", "compareRunCharts": charts,
            "compareRunSections": sections, "isAccordionReordered": True, "hideEmptyCharts": True,
            "useGroupedValuesInCharts": True, "groupBy": None, "groupsExpanded": {}, "viewMaximized": False,
            "runListHidden": False}


def saved_view(name: str, ensemble_id: str, members: int, created_ms: int) -> str:
    """The experiment tag's value: MLflow's saved-view envelope (the name the "Views" menu lists)."""
    return json.dumps({"name": name[:200], "createdAt": int(created_ms),
                       "state": json.dumps(view_state(ensemble_id, members), separators=(",", ":"))},
                      separators=(",", ":"))


def runs_url(base: str, experiment_id: Optional[str] = None, *, view: Optional[str] = None,
             ensemble_id: Optional[str] = None, charts: bool = False, run_ids: Sequence[str] = (),
             experiment_ids: Sequence[str] = ()) -> str:
    """The UI page to open: an experiment's runs with the saved view ``view``; without one, the
    runs of ``ensemble_id`` as flat rows sorted by test_acc (the UI's default columns); with
    ``run_ids``, those runs (of ``experiment_ids`` too: MLflow's page comparing experiments when
    there are several); without an experiment, the experiment list."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{urlencode({'workflowType': WORKFLOW})}"
    query: Dict[str, str] = {"workflowType": WORKFLOW}
    if run_ids:
        query.update(searchFilter=runs_filter(run_ids), orderByKey=ORDER_BY, orderByAsc="false")
    elif view:
        query["viewStateShareKey"] = view
    elif ensemble_id:
        query.update(searchFilter=search_filter(ensemble_id), orderByKey=ORDER_BY, orderByAsc="false")
    if charts:
        query["compareRunsMode"] = "CHART"
    experiments = sorted({str(experiment_id), *map(str, experiment_ids)})
    if run_ids and len(experiments) > 1:
        query = {"experiments": json.dumps(experiments, separators=(",", ":")), **query}
        return f"{base}/#/compare-experiments/s?{urlencode(query)}"
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"

"""The driver's pipeline: config -> data -> plan -> schedule -> collect -> metrics -> track -> register.

:func:`submit` is what ``ensemble submit`` runs, as a sequence of small steps:

1. :func:`load_data` and ``preflight.check``: the data set, every member's model built on its shape,
   the tracking store, the cluster address and resources; any problem is a ``ConfigError``
   before Ray starts or an MLflow run exists;
2. ``scheduler.connect`` (the embedded Ray, or a running cluster) and a feasibility check;
3. :func:`open_runs`: the parent run (config, data.json, test labels) and one nested run per member;
4. ``scheduler.run_tasks`` with a :class:`Collector` that turns worker events and results into
   MLflow writes (per-epoch metrics, a finished member's metrics and artifacts) and observer calls;
5. :func:`check_failures` (``cluster.min_members``), :func:`summarize` (the ensemble's metrics, size
   curve and plots: pure), ``tracker.log_ensemble``, :func:`register`.

The scheduler is a parameter (default: ``ensemble_service.scheduler``, the Ray code): a test can
drive the pipeline with one that runs the workers in-process. Whatever happens (a failed member,
Ctrl-C, SIGTERM, an exception) every run opened is closed as FINISHED, FAILED or KILLED.
"""
from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch

from ensemble_service import metrics, names, plots, recipes
from ensemble_service.aggregation import mean
from ensemble_service.config import Config, ConfigError, check_members, model_variants
from ensemble_service.data import DataBundle, DataError, describe, load
from ensemble_service.models import architecture
from ensemble_service.planning import EnsemblePlan, plan as make_plan
from ensemble_service.preflight import unschedulable

FLUSH_SECONDS = 2.0  # per-epoch metrics reach MLflow at most this late while members train


class EnsembleFailed(RuntimeError):
    """Training ran but the ensemble could not be completed (members failed)."""


@dataclass
class SubmitResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    members: List[Dict[str, Any]]
    ensemble: Dict[str, float]
    wall_seconds: float
    plan: EnsemblePlan = field(repr=False, default=None)
    degraded: str = ""          # non-empty when the ensemble finished with fewer members (cluster.min_members)
    model_version: str = ""     # "<name>/versions/<N>" in the MLflow Model Registry, when registered


class Observer:
    """Hooks for a front end (progress bars); all optional."""

    def loaded(self, description: str) -> None: ...
    def recipe(self, line: str) -> None: ...    # what the data set x model pair's recipe set (recipes.describe)
    def started(self, plan: EnsemblePlan, resources: Dict[str, Any]) -> None: ...
    def event(self, event: Dict[str, Any]) -> None: ...
    def member_done(self, row: Dict[str, Any]) -> None: ...
    def task_done(self, task: int, members: int) -> None: ...
    def task_failed(self, task: int, message: str) -> None: ...
    def interrupted(self, open_runs: int) -> None: ...  # before the open runs are closed as KILLED


# --------------------------------------------------------------------------- steps


def load_data(cfg: Config) -> DataBundle:
    """Load the data set and check every member's model against it (a forward pass on its input
    shape): any problem is a ConfigError, before Ray starts or an MLflow run exists."""
    try:
        bundle = load(cfg.data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    check_members(cfg, bundle.input_shape, bundle.num_classes)
    return bundle


def model_label(cfg: Config) -> str:
    return "+".join(sorted({architecture(ms.model) for ms in model_variants(cfg)}))


@dataclass
class Runs:
    """The ensemble's MLflow runs: the parent and one per member (member index -> run id)."""
    parent: str
    members: Dict[int, str]


def open_runs(tracker, cfg: Config, plan: EnsemblePlan, data: DataBundle) -> Runs:
    run_name = cfg.tracking.run_name or f"{cfg.strategy.name}-{data.name}-{plan.ensemble_id[:15]}"
    parent = tracker.start_parent(run_name, cfg.to_dict(), {
        names.TAG_STRATEGY: cfg.strategy.name, names.TAG_DATA: data.label, names.TAG_MODEL: model_label(cfg),
        names.TAG_ID: plan.ensemble_id, names.TAG_MEMBERS: str(len(plan.slots)),
        names.TAG_TASKS: str(len(plan.tasks)),
    })
    tracker.log_data(parent, {"name": data.label, "input_shape": list(data.input_shape),
                              "num_classes": data.num_classes, "class_names": data.class_names,
                              "sizes": data.sizes(), "preprocessing": data.preprocessing}, data.y_test.numpy())
    tasks = {t.index: t for t in plan.tasks}
    members = {}
    for slot in plan.slots:
        spec = tasks[slot.task]
        if spec.kind == "packed":  # the member's own spec (its seed and bagging)
            spec = next(m for m in spec.members if m.index == slot.index)
        members[slot.index] = tracker.start_member(
            slot.index, f"member-{slot.index}",
            {"seed": slot.seed, "architecture": slot.architecture, "model": spec.model,
             "bagging": getattr(spec, "bagging", False), "epochs": spec.epochs},
            {names.TAG_ARCHITECTURE: slot.architecture, **slot.tags})
    return Runs(parent, members)


class Collector:
    """The scheduler's callbacks: worker events and results become MLflow writes (queued per-epoch
    metrics; a finished member's metrics, tags and artifacts) and observer calls."""

    def __init__(self, tracker, runs: Runs, plan: EnsemblePlan, observer: Observer):
        self.tracker, self.runs, self.plan, self.observer = tracker, runs, plan, observer
        self.logged = {i: 0 for i in runs.members}          # member index -> last epoch logged
        self.open: Dict[int, List[int]] = {}                 # task index -> members still collecting epochs
        for slot in plan.slots:
            self.open.setdefault(slot.task, []).append(slot.index)
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.task_seconds: Dict[int, float] = {}             # a trajectory's or pack's members share one time

    def _epochs(self, index: int, records: List[Dict[str, Any]]) -> None:
        new = [r for r in records if r["epoch"] > self.logged[index]]
        if new:
            self.tracker.log_epochs(self.runs.members[index], new)
            self.logged[index] = int(new[-1]["epoch"])

    def on_event(self, event: Dict[str, Any]) -> None:
        members = self.open.get(event["task"], [])
        if event["type"] == "start":
            for i in members:
                self.tracker.queue_tags(self.runs.members[i], {
                    names.TAG_RESTARTS: event["restarts"], names.TAG_RESUMED_FROM: event["resumed_from"],
                    names.TAG_DEVICE: event["device"], names.TAG_NODE_ID: event.get("node_id", ""),
                    names.TAG_PID: event.get("pid", "")})
        elif event["type"] == "epoch":
            for i in members:  # a trajectory's epochs belong to the members it has not collected yet
                own = event.get("members", {}).get(i)  # a pack reports each member's own values
                self._epochs(i, [{**event, **own} if own else event])
        elif event["type"] == "collected" and event["member"] in members:
            members.remove(event["member"])
        self.observer.event(event)

    def on_result(self, spec, results) -> None:
        self.task_seconds[spec.index] = max(r.train_seconds for r in results)
        for r in results:
            rid = self.runs.members[r.index]
            self._epochs(r.index, r.history)
            self.tracker.log_member(rid, r, {
                names.TAG_RESTARTS: r.restarts, names.TAG_RESUMED_FROM: r.resumed_from, names.TAG_DEVICE: r.device,
                names.TAG_NODE_ID: r.extra.get("node_id", ""), names.TAG_HOST: r.host,
                names.TAG_COLLECTED_EPOCH: len(r.history)})
            self.rows[r.index] = member_row(r, rid, self.plan.slots[r.index].tags.get(names.TAG_ROLE, ""))
            self.observer.member_done(self.rows[r.index])
        self.observer.task_done(spec.index, len(results))

    def on_failure(self, failure) -> None:
        for i in failure.members:
            self.tracker.fail_member(self.runs.members[i], failure.message)
        self.observer.task_failed(failure.task, failure.message)


def member_row(r, run_id: str, role: str) -> Dict[str, Any]:
    """One row of the member table (printed by the CLI, logged as members.csv/json)."""
    return {"member": r.index, "architecture": r.architecture, "seed": r.seed, "role": role,
            "val_acc": r.metrics[names.VAL_ACC], "test_acc": r.metrics[names.TEST_ACC],
            "test_nll": r.metrics[names.TEST_NLL], "epochs": len(r.history),
            "train_seconds": round(r.train_seconds, 3), "restarts": r.restarts, "device": r.device, "run_id": run_id}


def check_failures(cfg: Config, plan: EnsemblePlan, results, failures) -> str:
    """'' when every task finished; a note when ``cluster.min_members`` lets the ensemble finish
    with fewer members; EnsembleFailed otherwise."""
    if not failures:
        return ""
    failed = ", ".join(f"task {f.task}: {f.message}" for f in sorted(failures, key=lambda f: f.task))
    need = cfg.cluster.min_members
    if need is None or len(results) < need:
        raise EnsembleFailed(f"{len(failures)} of {len(plan.tasks)} tasks failed ({failed})")
    return f"finished with {len(results)} of {len(plan.slots)} members (cluster.min_members={need}); failed: {failed}"


@dataclass
class Summary:
    """The ensemble on the test split, from its members' predictions (pure: no MLflow, no Ray)."""
    metrics: Dict[str, float]             # the parent run's metrics (names.PARENT_METRICS, names.QUALITY_METRICS)
    member_probs: torch.Tensor            # [M, B, C], members in index order
    curve: Dict[str, List[float]]         # the size curve: k, acc, nll
    plots: Dict[str, bytes]               # artifact path -> PNG
    temperature: Optional[float] = None   # fitted on the validation split (calibration=temperature)


def summarize(results, data: DataBundle, title: str, calibration: str = "temperature") -> Summary:
    """The ensemble's metrics on ``data``'s test split: accuracy under each aggregation, NLL, Brier,
    ECE, diversity, the size curve, and (``evaluation.quality``) its calibration and uncertainty."""
    from ensemble_service.evaluation import quality

    results = sorted(results, key=lambda r: r.index)
    targets = data.y_test
    member_probs = torch.stack([r.test_probs for r in results])
    m = metrics.ensemble_metrics(member_probs, targets, val_accuracies=[r.metrics[names.VAL_ACC] for r in results])
    values = {names.PARENT_METRIC_OF[k]: v for k, v in m.items() if k in names.PARENT_METRIC_OF}
    values[names.LAST_MEMBER_TEST_ACC] = results[-1].metrics[names.TEST_ACC]
    values[names.LAST_MEMBER_TEST_NLL] = results[-1].metrics[names.TEST_NLL]
    q = quality(results, data, calibration)
    values.update(q.metrics)
    curve = plots.size_curve(member_probs, targets)
    member_accs = [r.metrics[names.TEST_ACC] for r in results]
    best = max(range(len(results)), key=lambda i: member_accs[i])
    pngs = {names.PLOT_ACCURACY_VS_SIZE: plots.accuracy_vs_size_png(curve, member_accs, title),
            names.PLOT_RELIABILITY: plots.reliability_png(mean(member_probs), member_probs[best], targets, title,
                                                          calibrated=q.calibrated_probs, temperature=q.temperature)}
    return Summary(values, member_probs, curve, pngs, q.temperature)


def register(cfg: Config, tracker, parent: str, results, data: DataBundle, temperature: Optional[float] = None) -> str:
    """Register the ensemble (``tracking.register``) with its fitted temperature (None: none);
    ``<name>/versions/<N>`` or ''."""
    if not cfg.tracking.register:
        return ""
    from ensemble_service.registry import register_ensemble

    results = sorted(results, key=lambda r: r.index)
    registered = register_ensemble(
        tracker.uri, parent, cfg.tracking.model_name or cfg.tracking.experiment, [r.weights for r in results],
        [{"index": r.index, "architecture": r.architecture, "model": r.model, "metrics": r.metrics, "extra": r.extra}
         for r in results],
        strategy=cfg.strategy.name, class_names=data.class_names, preprocessing=data.preprocessing,
        temperature=temperature)
    tracker.log_metrics(parent, {names.REGISTRATION_SECONDS: registered.seconds})
    return f"{registered.name}/versions/{registered.version}"


@contextlib.contextmanager
def closing_runs(tracker, observer: Observer) -> Iterator[None]:
    """Every run still open when the body leaves early ends KILLED (Ctrl-C, SIGTERM) or FAILED."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI raises KeyboardInterrupt on it)
        try:
            observer.interrupted(len(tracker.open_runs))
        finally:
            tracker.end_all("KILLED", "interrupted")
        raise
    except BaseException as exc:
        tracker.end_all("FAILED", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise


# --------------------------------------------------------------------------- the pipeline


def submit(cfg: Config, observer: Optional[Observer] = None, *, scheduler=None) -> SubmitResult:
    """Train, track and register the ensemble ``cfg`` describes (see the module docstring)."""
    from ensemble_service import preflight
    from ensemble_service.tracking import EnsembleTracker

    if scheduler is None:
        from ensemble_service import scheduler
    observer = observer or Observer()
    t0 = time.perf_counter()
    plan = make_plan(cfg)
    preflight.check(cfg)                       # tracking store, cluster address, resources -> ConfigError
    data = load_data(cfg)                      # bad data -> ConfigError, before Ray and MLflow
    observer.loaded(describe(data))
    if cfg.recipe is not None:
        observer.recipe(recipes.describe(cfg.recipe))
    resources = scheduler.connect(cfg.cluster)
    problem = unschedulable(cfg, scheduler.node_resources())
    if problem:                                # a task no node can run would wait forever
        raise ConfigError(problem)
    observer.started(plan, resources)
    # matplotlib's first figure costs ~0.5 s (imports, fonts): pay it while the members train
    threading.Thread(target=plots.warm_up, daemon=True).start()

    tracker = EnsembleTracker(cfg.tracking.uri, cfg.tracking.experiment)
    with closing_runs(tracker, observer):
        runs = open_runs(tracker, cfg, plan, data)
        collector = Collector(tracker, runs, plan, observer)
        results, failures = scheduler.run_tasks(
            plan.tasks, data, cfg.cluster, on_event=collector.on_event, on_result=collector.on_result,
            on_failure=collector.on_failure, on_tick=lambda: tracker.flush(every=FLUSH_SECONDS))
        tracker.flush()
        degraded = check_failures(cfg, plan, results, failures)
        if degraded:
            tracker.set_tags(runs.parent, {names.TAG_DEGRADED: degraded[:4000]})
        summary = summarize(results, data, f"{cfg.strategy.name} on {data.label}", cfg.calibration)
        wall = time.perf_counter() - t0
        table = [collector.rows[i] for i in sorted(collector.rows)]
        tracker.log_ensemble(runs.parent, {
            **summary.metrics, names.WALL_SECONDS: wall, names.MEMBERS_FINISHED: len(results),
            names.MEMBERS_PLANNED: len(plan.slots), names.TRAIN_SECONDS_TOTAL: sum(collector.task_seconds.values()),
        }, summary.curve, summary.plots, table, mean(summary.member_probs).numpy())
        # a failed registration fails the run
        model_version = register(cfg, tracker, runs.parent, results, data, summary.temperature)
        tracker.end(runs.parent, "FINISHED")
    # the members' weights are in MLflow now; their resume checkpoints are not needed any more
    shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)
    return SubmitResult(parent_run_id=runs.parent, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                        members=table, ensemble=summary.metrics, wall_seconds=wall, plan=plan, degraded=degraded,
                        model_version=model_version)

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
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ensemble_service import metrics, names, plots, recipes, runs_view, storage
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


def parent_run_name(cfg: Config, plan: EnsemblePlan, data: DataBundle) -> str:
    return cfg.tracking.run_name or f"{cfg.strategy.name}-{data.name}-{plan.ensemble_id[:15]}"


def data_info(data: DataBundle) -> Dict[str, Any]:
    """data.json: what the ensemble was trained on, with the digest that identifies the data set and split."""
    from ensemble_service.lineage import data_digest

    return {"name": data.label, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "class_names": data.class_names, "sizes": data.sizes(), "preprocessing": data.preprocessing,
            "digest": data_digest(data)}


def open_runs(tracker, cfg: Config, plan: EnsemblePlan, data: DataBundle,
              tags: Optional[Dict[str, str]] = None) -> Runs:
    """The parent run (``tags`` added to, or replacing, its usual tags) and one run per planned member."""
    run_name = parent_run_name(cfg, plan, data)
    sweep = {names.TAG_SWEEP: cfg.tracking.sweep} if getattr(cfg.tracking, "sweep", None) else {}
    parent = tracker.start_parent(run_name, cfg.to_dict(), {
        names.TAG_STRATEGY: cfg.strategy.name, names.TAG_DATA: data.label, names.TAG_MODEL: model_label(cfg),
        names.TAG_ID: plan.ensemble_id, names.TAG_MEMBERS: str(len(plan.slots)),
        names.TAG_TASKS: str(len(plan.tasks)), **sweep, **(tags or {}),
    })
    tracker.log_data(parent, data_info(data), data.y_test.numpy(), data.y_val.numpy(),
                     datasets=runs_view.dataset_inputs(data))
    tasks = {t.index: t for t in plan.tasks}
    members = {}
    for slot in plan.slots:
        spec = tasks[slot.task]
        if spec.kind == "packed":  # the member's own spec (its seed and bagging)
            spec = next(m for m in spec.members if m.index == slot.index)
        bagging = bool(getattr(spec, "bagging", False))
        members[slot.index] = tracker.start_member(
            slot.index, f"member-{slot.index}",
            {"seed": slot.seed, "architecture": slot.architecture, "model": spec.model,
             "bagging": bagging, "epochs": spec.epochs},
            {names.TAG_ARCHITECTURE: slot.architecture, **slot.tags},
            description=runs_view.member_description(slot.index, len(plan.slots), cfg.strategy.name, slot.architecture,
                                                     slot.seed, slot.tags, bagging),
            sampling="bootstrap" if bagging else "")
    return Runs(parent, members)


class Collector:
    """The scheduler's callbacks: worker events and results become MLflow writes (queued per-epoch
    metrics; a finished member's metrics, tags and artifacts) and observer calls."""

    def __init__(self, tracker, runs: Runs, plan: EnsemblePlan, observer: Observer, keep_open=()):
        self.tracker, self.runs, self.plan, self.observer = tracker, runs, plan, observer
        self.keep_open = set(keep_open)   # members whose run stays open after its result (a student's)
        self.logged = {i: set() for i in runs.members}      # member index -> epochs logged
        self.open: Dict[int, List[int]] = {}                 # task index -> members still collecting epochs
        for slot in plan.slots:
            self.open.setdefault(slot.task, []).append(slot.index)
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.task_seconds: Dict[int, float] = {}             # a trajectory's or pack's members share one time

    def _epochs(self, index: int, records: List[Dict[str, Any]]) -> None:
        """Log the epochs not logged yet: a worker killed after its checkpoint but before that epoch's
        event arrived resumes at the next epoch, and the result's history fills the gap."""
        new = [r for r in records if int(r["epoch"]) not in self.logged[index]]
        if new:
            self.tracker.log_epochs(self.runs.members[index], new)
            self.logged[index].update(int(r["epoch"]) for r in new)

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
                names.TAG_COLLECTED_EPOCH: len(r.history)}, end=r.index not in self.keep_open)
            slot = next(s for s in self.plan.slots if s.index == r.index)
            self.rows[r.index] = member_row(r, rid, slot.tags.get(names.TAG_ROLE, ""))
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


def check_failures(cfg: Config, plan: EnsemblePlan, results, failures, reused: int = 0) -> str:
    """'' when every task finished; a note when ``cluster.min_members`` lets the ensemble finish
    with fewer members; EnsembleFailed otherwise. ``reused`` members (grow) count as finished."""
    if not failures:
        return ""
    failed = ", ".join(f"task {f.task}: {f.message}" for f in sorted(failures, key=lambda f: f.task))
    need = cfg.cluster.min_members
    finished, planned = reused + len(results), reused + len(plan.slots)
    if need is None or finished < need:
        raise EnsembleFailed(f"{len(failures)} of {len(plan.tasks)} tasks failed ({failed})")
    return f"finished with {finished} of {planned} members (cluster.min_members={need}); failed: {failed}"


@dataclass
class Summary:
    """The ensemble on the test split, from its members' predictions (pure: no MLflow, no Ray)."""
    metrics: Dict[str, float]             # the parent run's metrics (names.PARENT_METRICS, names.QUALITY_METRICS)
    member_probs: torch.Tensor            # [M, B, C], members in index order
    curve: Dict[str, List[float]]         # the size curve: k, acc, nll
    plots: Dict[str, bytes]               # artifact path -> PNG
    temperature: Optional[float] = None   # fitted on the validation split (calibration=temperature)


def summarize(results, targets: torch.Tensor, title: str, picks: Optional[List[int]] = None,
              data: Optional[DataBundle] = None, calibration: str = "none") -> Summary:
    """The ensemble of ``results`` (members in index order) on the test split (``targets``): accuracy
    under each aggregation, NLL, Brier, ECE, diversity, the size curve, and with ``data``
    (``evaluation.quality``) its calibration (``calibration``) and uncertainty. ``picks`` (``ensemble
    select``) are positions in that order, with repetitions, in the order they were picked: the
    ensemble is then the picks' (a member picked twice counts twice: its weight is its share of the
    picks), and the size curve follows the picks. ``member_probs`` stay one per distinct member."""
    results = sorted(results, key=lambda r: r.index)
    member_probs = torch.stack([torch.as_tensor(r.test_probs) for r in results])
    order = list(range(len(results))) if picks is None else list(picks)
    picked = member_probs[order]
    m = metrics.ensemble_metrics(picked, targets, val_accuracies=[results[i].metrics[names.VAL_ACC] for i in order])
    values = {names.PARENT_METRIC_OF[k]: v for k, v in m.items() if k in names.PARENT_METRIC_OF}
    values[names.LAST_MEMBER_TEST_ACC] = results[order[-1]].metrics[names.TEST_ACC]
    values[names.LAST_MEMBER_TEST_NLL] = results[order[-1]].metrics[names.TEST_NLL]
    temperature, calibrated = None, None
    if data is not None:
        from ensemble_service.evaluation import quality

        q = quality(results, data, calibration)
        values.update(q.metrics)
        temperature, calibrated = q.temperature, q.calibrated_probs
    curve = plots.size_curve(picked, targets)
    member_accs = [results[i].metrics[names.TEST_ACC] for i in order]
    best = max(order, key=lambda i: results[i].metrics[names.TEST_ACC])
    pngs = {names.PLOT_ACCURACY_VS_SIZE: plots.accuracy_vs_size_png(curve, member_accs, title),
            names.PLOT_RELIABILITY: plots.reliability_png(mean(picked), member_probs[best], targets, title,
                                                          calibrated=calibrated, temperature=temperature)}
    return Summary(values, member_probs, curve, pngs, temperature)


def register(cfg: Config, tracker, parent: str, results, data: DataBundle, temperature: Optional[float] = None) -> str:
    """Register the ensemble (``tracking.register``) with its fitted temperature (None: none);
    ``<name>/versions/<N>`` or ''."""
    if not cfg.tracking.register:
        return ""
    return register_members(tracker, parent, cfg.tracking.model_name or cfg.tracking.experiment, results,
                            cfg.strategy.name, data.class_names, data.preprocessing, temperature=temperature)


def register_members(tracker, parent: str, model_name: str, results, strategy: str, class_names, preprocessing,
                     weights: Optional[List[float]] = None, temperature: Optional[float] = None) -> str:
    """Register ``results`` (members in index order; ``weights``, one per member, go into the manifest
    and become the served ensemble's aggregation weights; ``temperature``, fitted on the validation
    split, scales the served probabilities) under ``model_name``; ``<name>/versions/<N>``."""
    from ensemble_service.registry import register_ensemble

    results = sorted(results, key=lambda r: r.index)
    infos = []
    for k, r in enumerate(results):
        info = {"index": r.index, "architecture": r.architecture, "model": r.model, "metrics": r.metrics,
                "extra": r.extra}
        if getattr(r, "run_id", ""):
            info["run_id"] = r.run_id
        if weights is not None:
            info["weight"] = float(weights[k])
        infos.append(info)
    registered = register_ensemble(tracker.uri, parent, model_name, [r.weights for r in results], infos,
                                   strategy=strategy, class_names=class_names, preprocessing=preprocessing,
                                   temperature=temperature)
    tracker.log_metrics(parent, {names.REGISTRATION_SECONDS: registered.seconds})
    return f"{registered.name}/versions/{registered.version}"


def overview(tracker, cfg: Config, plan: EnsemblePlan, data: DataBundle, parent: str, table, values: Dict[str, float],
             model_version: str, degraded: str) -> None:
    """The parent's description and the experiment's saved view of this ensemble (``runs_view``)."""
    text = runs_view.parent_description(strategy=cfg.strategy.name, data=data.label, model=model_label(cfg),
                                        table=table, metrics=values, model_version=model_version, degraded=degraded)
    tracker.log_overview(parent, text, runs_view.view_key(plan.ensemble_id),
                         runs_view.saved_view(parent_run_name(cfg, plan, data), plan.ensemble_id, len(table), int(time.time() * 1000)))
def remove_checkpoints(directory: str) -> None:
    """Delete the ensemble's resume checkpoints (a directory or an object-store prefix). The
    ensemble is tracked and registered by then: a store that refuses is not worth failing it."""
    try:
        storage.remove_tree(directory)
    except Exception:  # noqa: BLE001 - the run is finished; leftover checkpoints only cost space
        pass


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


@dataclass
class Reuse:
    """What an ensemble starts from (``ensemble grow``): finished members tracked already, which are
    members 0..n-1 of the new ensemble (not trained again: their checkpoints, predictions and
    runs are reused), the new parent run's extra tags, and the check that the data set loaded for
    the new members is the one they were trained on (a ConfigError otherwise)."""
    members: List[Any]                                  # lineage.TrackedMember, index 0..n-1
    tags: Dict[str, str] = field(default_factory=dict)
    check_data: Callable[[DataBundle], None] = lambda data: None


def submit(cfg: Config, observer: Optional[Observer] = None, *, scheduler=None,
           reuse: Optional[Reuse] = None) -> SubmitResult:
    """Train, track and register the ensemble ``cfg`` describes (see the module docstring). With
    ``reuse``, members 0..n-1 are ``reuse.members`` and only members n.. are trained."""
    from ensemble_service import preflight
    from ensemble_service.tracking import EnsembleTracker

    if scheduler is None:
        from ensemble_service import scheduler
    observer = observer or Observer()
    t0 = time.perf_counter()
    reused = sorted(reuse.members, key=lambda r: r.index) if reuse else []
    plan = make_plan(cfg, start=len(reused))
    preflight.check(cfg)                       # tracking store, cluster address, resources -> ConfigError
    data = load_data(cfg)                      # bad data -> ConfigError, before Ray and MLflow
    if reuse:
        reuse.check_data(data)
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
        runs = open_runs(tracker, cfg, plan, data, reuse.tags if reuse else None)
        collector = Collector(tracker, runs, plan, observer)
        for r in reused:
            collector.rows[r.index] = member_row(r, r.run_id, r.extra.get("role", "member"))
        results, failures = scheduler.run_tasks(
            plan.tasks, data, cfg.cluster, on_event=collector.on_event, on_result=collector.on_result,
            on_failure=collector.on_failure, on_tick=lambda: tracker.flush(every=FLUSH_SECONDS))
        tracker.flush()
        degraded = check_failures(cfg, plan, results, failures, reused=len(reused))
        if degraded:
            tracker.set_tags(runs.parent, {names.TAG_DEGRADED: degraded[:4000]})
        results = reused + list(results)
        summary = summarize(results, data.y_test, f"{cfg.strategy.name} on {data.label}", data=data,
                            calibration=cfg.calibration)
        wall = time.perf_counter() - t0
        table = [collector.rows[i] for i in sorted(collector.rows)]
        tracker.log_ensemble(runs.parent, {
            **summary.metrics, names.WALL_SECONDS: wall, names.MEMBERS_FINISHED: len(results),
            names.MEMBERS_PLANNED: len(reused) + len(plan.slots),
            names.TRAIN_SECONDS_TOTAL: sum(collector.task_seconds.values()),
        }, summary.curve, summary.plots, table, mean(summary.member_probs).numpy())
        # a failed registration fails the run
        model_version = register(cfg, tracker, runs.parent, results, data, summary.temperature)
        overview(tracker, cfg, plan, data, runs.parent, table, summary.metrics, model_version, degraded)
        tracker.end(runs.parent, "FINISHED")
    # the members' weights are in MLflow now; their resume checkpoints are not needed any more
    if not cfg.cluster.keep_checkpoints:
        remove_checkpoints(plan.checkpoint_dir)
    return SubmitResult(parent_run_id=runs.parent, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                        members=table, ensemble=summary.metrics, wall_seconds=wall, plan=plan, degraded=degraded,
                        model_version=model_version)

"""The driver: config -> plan -> data -> scheduler -> results -> metrics -> tracking.

``submit`` is what ``ensemble submit`` runs. It validates before it starts anything,
creates the MLflow runs (parent first, one nested run per member), lets the scheduler
train the members on Ray, writes each member's metrics as they arrive, then the
ensemble's metrics on the parent. Whatever happens (a failed member, Ctrl-C, an
exception), every run it opened is closed as FINISHED, FAILED or KILLED.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ensemble_service import metrics, plots
from ensemble_service.aggregation import mean
from ensemble_service.config import Config, ConfigError, check_members
from ensemble_service.data import DataBundle, DataError, describe, load
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
    def started(self, plan: EnsemblePlan, resources: Dict[str, Any]) -> None: ...
    def event(self, event: Dict[str, Any]) -> None: ...
    def member_done(self, row: Dict[str, Any]) -> None: ...
    def task_done(self, task: int, members: int) -> None: ...
    def task_failed(self, task: int, message: str) -> None: ...
    def interrupted(self, open_runs: int) -> None: ...  # before the open runs are closed as KILLED


def load_data(cfg: Config) -> DataBundle:
    """Load the data set and check every member's model against it (a forward pass on its input
    shape): any problem is a ConfigError, before Ray starts or an MLflow run exists."""
    try:
        bundle = load(cfg.data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    check_members(cfg, bundle.input_shape, bundle.num_classes)
    return bundle


def parent_metrics(member_probs: torch.Tensor, targets: torch.Tensor, val_accs: List[float]) -> Dict[str, float]:
    """The parent run's ensemble metrics, from the members' test probabilities [M, B, C]."""
    m = metrics.ensemble_metrics(member_probs, targets, val_accuracies=val_accs)
    return {
        "ensemble_mean_test_acc": m["mean_acc"],
        "ensemble_vote_test_acc": m["vote_acc"],
        "ensemble_weighted_test_acc": m["weighted_acc"],
        "ensemble_logit_mean_test_acc": m["logit_mean_acc"],
        "ensemble_mean_test_nll": m["mean_nll"],
        "ensemble_mean_test_brier": m["mean_brier"],
        "ensemble_mean_test_ece": m["mean_ece"],
        "best_member_test_acc": m["best_member_acc"],
        "mean_member_test_acc": m["mean_member_acc"],
        "disagreement": m["disagreement"],
        "oracle_test_acc": m["oracle_acc"],
    }


def model_label(cfg: Config) -> str:
    from ensemble_service.config import model_variants
    from ensemble_service.models import architecture

    return "+".join(sorted({architecture(ms.model) for ms in model_variants(cfg)}))


def submit(cfg: Config, observer: Optional[Observer] = None) -> SubmitResult:
    from ensemble_service import preflight, scheduler
    from ensemble_service.tracking import EnsembleTracker

    observer = observer or Observer()
    t0 = time.perf_counter()
    plan = make_plan(cfg)
    preflight.check(cfg)                       # tracking store, cluster address, resources -> ConfigError
    data = load_data(cfg)                      # bad data -> ConfigError, before Ray and MLflow
    observer.loaded(describe(data))
    resources = scheduler.connect(cfg.cluster)
    problem = unschedulable(cfg, scheduler.node_resources())
    if problem:                                # a task no node can run would wait forever
        raise ConfigError(problem)
    observer.started(plan, resources)
    # matplotlib's first figure costs ~0.5 s (imports, fonts): pay it while the members train
    threading.Thread(target=plots.warm_up, daemon=True).start()

    tracker = EnsembleTracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_name = cfg.tracking.run_name or f"{cfg.strategy.name}-{data.name}-{plan.ensemble_id[:15]}"
    try:
        parent = tracker.start_parent(run_name, cfg.to_dict(), {
            "ensemble.strategy": cfg.strategy.name, "ensemble.data": data.label,
            "ensemble.model": model_label(cfg), "ensemble.id": plan.ensemble_id,
            "ensemble.members": str(len(plan.slots)), "ensemble.tasks": str(len(plan.tasks)),
        })
        tracker.log_array(parent, data.y_test.numpy(), "predictions/test_labels.npy")
        tracker.log_text(parent, json.dumps({"name": data.label, "input_shape": list(data.input_shape),
                                             "num_classes": data.num_classes, "class_names": data.class_names,
                                             "sizes": data.sizes(), "preprocessing": data.preprocessing}, indent=2),
                         "data.json")
        runs: Dict[int, str] = {}
        logged: Dict[int, int] = {}           # member index -> last epoch logged
        open_members: Dict[int, List[int]] = {}  # task index -> members still collecting epochs
        tasks = {t.index: t for t in plan.tasks}
        for slot in plan.slots:
            spec = tasks[slot.task]
            if spec.kind == "packed":  # the member's own spec (its seed and bagging)
                spec = next(m for m in spec.members if m.index == slot.index)
            runs[slot.index] = tracker.start_member(
                slot.index, f"member-{slot.index}",
                {"seed": slot.seed, "architecture": slot.architecture, "model": spec.model,
                 "bagging": getattr(spec, "bagging", False), "epochs": spec.epochs},
                {"ensemble.architecture": slot.architecture, **slot.tags},
            )
            logged[slot.index] = 0
            open_members.setdefault(slot.task, []).append(slot.index)

        def log_epochs(index: int, records: List[Dict[str, Any]]) -> None:
            for rec in records:
                if rec["epoch"] > logged[index]:
                    values = {k: rec[k] for k in ("train_loss", "val_acc", "val_nll", "lr") if k in rec}
                    tracker.queue_metrics(runs[index], values, step=int(rec["epoch"]))
                    logged[index] = int(rec["epoch"])

        def on_event(event: Dict[str, Any]) -> None:
            task = event["task"] if "task" in event else event["member"]
            members = open_members.get(task, [])
            if event["type"] == "start":
                for i in members:
                    tracker.queue_tags(runs[i], {"ensemble.restarts": event["restarts"],
                                               "ensemble.resumed_from_epoch": event["resumed_from"],
                                               "ensemble.device": event["device"],
                                               "ensemble.node_id": event["node_id"],
                                               "ensemble.pid": event["pid"]})
            elif event["type"] == "epoch":
                for i in members:           # a trajectory's epochs belong to the members it has not collected yet
                    own = event.get("members", {}).get(i)  # a pack reports each member's own values
                    log_epochs(i, [{**event, **own} if own else event])
            elif event["type"] == "collected" and event["member"] in members:
                members.remove(event["member"])
            observer.event({**event, "task": task})

        rows: Dict[int, Dict[str, Any]] = {}
        task_seconds: Dict[int, float] = {}   # a trajectory's or pack's members share one training time

        def on_result(spec, results) -> None:
            task_seconds[spec.index] = max(r.train_seconds for r in results)
            for r in results:
                rid = runs[r.index]
                log_epochs(r.index, r.history)
                final = {k: v for k, v in r.metrics.items() if k.startswith("test_")}  # val_* are per-epoch series
                tracker.queue_metrics(rid, {**final, "train_seconds": r.train_seconds})
                tracker.queue_tags(rid, {"ensemble.restarts": r.restarts,
                                       "ensemble.resumed_from_epoch": r.resumed_from,
                                       "ensemble.device": r.device, "ensemble.node_id": r.extra.get("node_id", ""),
                                       "ensemble.host": r.host, "ensemble.collected_epoch": len(r.history)})
                tracker.log_bytes(rid, r.weights, "checkpoint/member.pt")
                tracker.log_array(rid, r.val_probs.numpy(), "predictions/val_probs.npy")
                tracker.log_array(rid, r.test_probs.numpy(), "predictions/test_probs.npy")
                tracker.end(rid, "FINISHED")
                rows[r.index] = {
                    "member": r.index, "architecture": r.architecture, "seed": r.seed,
                    "role": plan.slots[r.index].tags.get("ensemble.role", ""),
                    "val_acc": r.metrics["val_acc"], "test_acc": r.metrics["test_acc"],
                    "test_nll": r.metrics["test_nll"], "epochs": len(r.history),
                    "train_seconds": round(r.train_seconds, 3), "restarts": r.restarts,
                    "device": r.device, "run_id": rid,
                }
                observer.member_done(rows[r.index])
            observer.task_done(spec.index, len(results))

        def on_failure(f) -> None:
            for i in f.members:
                tracker.set_tags(runs[i], {"ensemble.error": f.message[:4000]})
                tracker.end(runs[i], "FAILED")
            observer.task_failed(f.task, f.message)

        results, failures = scheduler.run_tasks(
            plan.tasks, data, cfg.cluster, on_event=on_event, on_result=on_result, on_failure=on_failure,
            on_tick=lambda: tracker.flush(every=FLUSH_SECONDS))
        tracker.flush()

        degraded = ""
        if failures:
            failed = ", ".join(f"task {f.task}: {f.message}" for f in sorted(failures, key=lambda f: f.task))
            need = cfg.cluster.min_members
            if need is None or len(results) < need:
                raise EnsembleFailed(f"{len(failures)} of {len(plan.tasks)} tasks failed ({failed})")
            degraded = (f"finished with {len(results)} of {len(plan.slots)} members (cluster.min_members={need}); "
                        f"failed: {failed}")
            tracker.set_tags(parent, {"ensemble.degraded": degraded[:4000]})

        results.sort(key=lambda r: r.index)
        member_probs = torch.stack([r.test_probs for r in results])
        ens = parent_metrics(member_probs, data.y_test, [r.metrics["val_acc"] for r in results])
        last = results[-1].metrics
        ens.update(last_member_test_acc=last["test_acc"], last_member_test_nll=last["test_nll"])
        wall = time.perf_counter() - t0
        train_total = sum(task_seconds.values())
        tracker.log_metrics(parent, {**ens, "wall_seconds": wall, "members_finished": len(results),
                                     "members_planned": len(plan.slots),
                                     "train_seconds_total": train_total})
        log_curves_and_plots(tracker, parent, member_probs, data.y_test, results, cfg)
        table = [rows[i] for i in sorted(rows)]
        tracker.log_text(parent, tracker.member_table_csv(table), "members.csv")
        tracker.log_text(parent, json.dumps(table, indent=2), "members.json")
        tracker.log_array(parent, mean(member_probs).numpy(), "predictions/ensemble_mean_test_probs.npy")
        if cfg.tracking.register:  # before the parent ends: a failed registration fails the run
            from ensemble_service.registry import register_ensemble

            registered = register_ensemble(
                tracker.uri, parent, cfg.tracking.model_name or cfg.tracking.experiment,
                [r.weights for r in results],
                [{"index": r.index, "architecture": r.architecture, "model": r.model,
                  "metrics": r.metrics, "extra": r.extra} for r in results],
                strategy=cfg.strategy.name, class_names=data.class_names, preprocessing=data.preprocessing)
            tracker.log_metrics(parent, {"registration_seconds": registered.seconds})
            model_version = f"{registered.name}/versions/{registered.version}"
        else:
            model_version = ""
        tracker.end(parent, "FINISHED")
        # the members' weights are in MLflow now; their resume checkpoints are not needed any more
        shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)
        return SubmitResult(parent_run_id=parent, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                            members=table, ensemble=ens, wall_seconds=wall, plan=plan, degraded=degraded,
                            model_version=model_version)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI raises KeyboardInterrupt on it)
        try:
            observer.interrupted(len(tracker.open_runs))
        finally:
            tracker.end_all("KILLED", "interrupted")
        raise
    except BaseException as exc:
        tracker.end_all("FAILED", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise


def log_curves_and_plots(tracker, parent: str, member_probs: torch.Tensor, targets: torch.Tensor,
                         results, cfg: Config) -> None:
    """Size curve (metric per k, step k) and the two PNGs on the parent run."""
    curve = plots.size_curve(member_probs, targets)
    for k, acc, nll in zip(curve["k"], curve["acc"], curve["nll"]):
        tracker.queue_metrics(parent, {"ensemble_mean_test_acc_at_k": acc, "ensemble_mean_test_nll_at_k": nll}, step=k)
    tracker.flush(parent)
    title = f"{cfg.strategy.name} on {cfg.data.name}"  # noqa
    member_accs = [r.metrics["test_acc"] for r in results]
    tracker.log_bytes(parent, plots.accuracy_vs_size_png(curve, member_accs, title), "plots/accuracy_vs_size.png")
    best = max(range(len(results)), key=lambda i: member_accs[i])
    tracker.log_bytes(parent, plots.reliability_png(mean(member_probs), member_probs[best], targets, title),
                      "plots/reliability.png")

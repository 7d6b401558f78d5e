"""The driver: config -> plan -> data -> scheduler -> results -> metrics -> tracking.

``submit`` is what ``ensemble submit`` runs. It validates before it starts anything,
creates the MLflow runs (parent first, one nested run per member), lets the scheduler
train the members on Ray, writes each member's metrics as they arrive, then the
ensemble's metrics on the parent. Whatever happens (a failed member, Ctrl-C, an
exception), every run it opened is closed as FINISHED, FAILED or KILLED.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ensemble_service import metrics
from ensemble_service.config import Config, ConfigError
from ensemble_service.data import DataBundle, DataError, load_dataset
from ensemble_service.planning import EnsemblePlan, plan as make_plan


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


class Observer:
    """Hooks for a front end (progress bars); all optional."""

    def started(self, plan: EnsemblePlan, resources: Dict[str, Any]) -> None: ...
    def event(self, event: Dict[str, Any]) -> None: ...
    def member_done(self, row: Dict[str, Any]) -> None: ...
    def member_failed(self, index: int, message: str) -> None: ...


def load_data(cfg: Config) -> DataBundle:
    try:
        return load_dataset(
            cfg.data.name, root=cfg.data.root, download=cfg.data.download,
            val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
            split_seed=cfg.data.split_seed, synthetic=asdict(cfg.data.synthetic),
        )
    except DataError as exc:
        raise ConfigError(str(exc)) from None


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
    if cfg.strategy.models:
        return "+".join(sorted({m.name for m in cfg.strategy.models}))
    return cfg.model.name


def submit(cfg: Config, observer: Optional[Observer] = None) -> SubmitResult:
    from ensemble_service import scheduler
    from ensemble_service.tracking import EnsembleTracker

    observer = observer or Observer()
    t0 = time.perf_counter()
    plan = make_plan(cfg)
    data = load_data(cfg)                      # bad data -> ConfigError, before Ray and MLflow
    resources = scheduler.connect(cfg.cluster)
    if cfg.cluster.address is None and resources.get("CPU", 0) < cfg.cluster.cpus_per_member:
        raise ConfigError(f"cluster.cpus_per_member={cfg.cluster.cpus_per_member} but the cluster has "
                          f"{resources.get('CPU', 0):g} CPUs")
    if cfg.cluster.gpus_per_member > 0 and resources.get("GPU", 0) <= 0:
        raise ConfigError("cluster.gpus_per_member > 0 but the Ray cluster has no GPUs")
    observer.started(plan, resources)

    tracker = EnsembleTracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_name = cfg.tracking.run_name or f"{cfg.strategy.name}-{cfg.data.name}-{plan.ensemble_id[:15]}"
    try:
        parent = tracker.start_parent(run_name, cfg.to_dict(), {
            "ensemble.strategy": cfg.strategy.name, "ensemble.data": cfg.data.name,
            "ensemble.model": model_label(cfg), "ensemble.id": plan.ensemble_id,
            "ensemble.members": str(len(plan.members)),
        })
        tracker.log_array(parent, data.y_test.numpy(), "predictions/test_labels.npy")
        runs: Dict[int, str] = {}
        logged: Dict[int, int] = {}
        for spec in plan.members:
            runs[spec.index] = tracker.start_member(
                spec.index, f"member-{spec.index}",
                {"seed": spec.seed, "architecture": spec.architecture, "model": spec.model,
                 "bagging": spec.bagging, "epochs": spec.epochs},
                {"ensemble.architecture": spec.architecture},
            )
            logged[spec.index] = 0

        def log_epochs(index: int, records: List[Dict[str, Any]]) -> None:
            for rec in records:
                if rec["epoch"] > logged[index]:
                    tracker.log_metrics(runs[index], {k: rec[k] for k in ("train_loss", "val_acc", "val_nll")},
                                        step=int(rec["epoch"]))
                    logged[index] = int(rec["epoch"])

        def on_event(event: Dict[str, Any]) -> None:
            i = event["member"]
            if event["type"] == "start":
                tracker.set_tags(runs[i], {"ensemble.restarts": event["restarts"],
                                           "ensemble.resumed_from_epoch": event["resumed_from"],
                                           "ensemble.device": event["device"], "ensemble.node_id": event["node_id"]})
            elif event["type"] == "epoch":
                log_epochs(i, [event])
            observer.event(event)

        rows: Dict[int, Dict[str, Any]] = {}

        def on_result(r) -> None:
            rid = runs[r.index]
            log_epochs(r.index, r.history)
            final = {k: v for k, v in r.metrics.items() if k.startswith("test_")}  # val_* are per-epoch series
            tracker.log_metrics(rid, {**final, "train_seconds": r.train_seconds})
            tracker.set_tags(rid, {"ensemble.restarts": r.restarts, "ensemble.resumed_from_epoch": r.resumed_from,
                                   "ensemble.device": r.device, "ensemble.node_id": r.extra.get("node_id", ""),
                                   "ensemble.host": r.host})
            tracker.log_bytes(rid, r.weights, "checkpoint/member.pt")
            tracker.log_array(rid, r.val_probs.numpy(), "predictions/val_probs.npy")
            tracker.log_array(rid, r.test_probs.numpy(), "predictions/test_probs.npy")
            tracker.end(rid, "FINISHED")
            row = {"member": r.index, "architecture": r.architecture, "seed": r.seed,
                   "val_acc": r.metrics["val_acc"], "test_acc": r.metrics["test_acc"],
                   "test_nll": r.metrics["test_nll"], "epochs": len(r.history),
                   "train_seconds": round(r.train_seconds, 3), "restarts": r.restarts,
                   "device": r.device, "run_id": rid}
            rows[r.index] = row
            observer.member_done(row)

        def on_failure(f) -> None:
            tracker.set_tags(runs[f.index], {"ensemble.error": f.message[:4000]})
            tracker.end(runs[f.index], "FAILED")
            observer.member_failed(f.index, f.message)

        results, failures = scheduler.run_members(
            plan.members, data, cfg.cluster, on_event=on_event, on_result=on_result, on_failure=on_failure)

        if failures:
            failed = ", ".join(f"member {f.index}: {f.message}" for f in sorted(failures, key=lambda f: f.index))
            raise EnsembleFailed(f"{len(failures)} of {len(plan.members)} members failed ({failed})")

        results.sort(key=lambda r: r.index)
        member_probs = torch.stack([r.test_probs for r in results])
        ens = parent_metrics(member_probs, data.y_test, [r.metrics["val_acc"] for r in results])
        wall = time.perf_counter() - t0
        tracker.log_metrics(parent, {**ens, "wall_seconds": wall, "members_finished": len(results),
                                     "member_train_seconds_total": sum(r.train_seconds for r in results)})
        table = [rows[i] for i in sorted(rows)]
        tracker.log_text(parent, tracker.member_table_csv(table), "members.csv")
        import json

        tracker.log_text(parent, json.dumps(table, indent=2), "members.json")
        tracker.log_array(parent, metrics_mean_probs(member_probs).numpy(), "predictions/ensemble_mean_test_probs.npy")
        tracker.end(parent, "FINISHED")
        return SubmitResult(parent_run_id=parent, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                            members=table, ensemble=ens, wall_seconds=wall, plan=plan)
    except KeyboardInterrupt:
        tracker.end_all("KILLED", "interrupted")
        raise
    except BaseException as exc:
        tracker.end_all("FAILED", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise


def metrics_mean_probs(member_probs: torch.Tensor) -> torch.Tensor:
    from ensemble_service.aggregation import mean

    return mean(member_probs)

"""``ensemble distill``: one student trained against a registered ensemble's soft targets
(Hinton et al. 2015), the way the ensemble becomes cheap to serve.

The student's config is the ensemble's own resolved config (its data set and split, trainer,
optimizer, cluster, tracking) with the user's overrides (``model=...``, ``trainer.*``,
``optimizer.*``) and one member. Two Ray tasks run side by side through the scheduler: the student
(``workers.student``: temperature T, mixed with the hard labels by alpha) and, unless turned off,
the baseline: the same architecture, seed, optimizer and epochs trained alone on the labels
(``workers.member``), so the report compares like with like.

MLflow: the student has its own top-level run in the ensemble's experiment (tags
``ensemble.kind=student``, ``ensemble.role=student``, ``ensemble.distilled_from`` = the ensemble's
parent run, ``ensemble.distilled_from_version``; its config, T and alpha as params; per-epoch
metrics; ``test_acc``, ``test_nll``, ``test_brier``, ``test_ece``; its checkpoint and predictions;
``teacher_test_*``, ``baseline_test_*``, the forward times and ``forward_time_ratio``
(teacher / student), and ``distillation.json``). The baseline is a run nested under it (role
``baseline``). The student is registered under ``--model-name`` (default: the ensemble's name +
``-distilled``) as an ensemble of one, served like any other.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ensemble_service import names, storage
from ensemble_service.config import Config, ConfigError, check_override

# measured on mnist1d (5 CNN1D members -> one CNN1D, 100 epochs): T=2, alpha=0.5 gave the student a test
# NLL of 0.541 against 0.593 with T=4, alpha=0.9 (alone: 0.699); the defaults of `ensemble distill`
DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5


@dataclass
class DistillPlan:
    cfg: Config
    teacher_ref: str
    teacher_run: str
    teacher_name: str
    teacher_info: Dict[str, Any]
    teacher_test_labels: Any
    blobs: List[bytes]
    records: List[Dict[str, Any]]
    temperature: float
    alpha: float
    baseline: bool


@dataclass
class DistillResult:
    run_id: str
    tracking_uri: str
    experiment: str
    model_version: str
    comparison: Dict[str, Dict[str, float]]    # teacher / student / baseline -> acc, nll, ece, forward_seconds
    forward_time_ratio: float
    wall_seconds: float
    members: List[Dict[str, Any]] = field(default_factory=list)


def prepare(ref: str, overrides: List[str] = (), uri: Optional[str] = None, *,
            temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
            model_name: Optional[str] = None, baseline: bool = True) -> DistillPlan:
    """Resolve the teacher and the student's config. ConfigError (one line) for bad input,
    ``registry.EnsembleNotFound`` for an unknown ensemble; nothing is created."""
    import math

    from ensemble_service import artifact, lineage
    from ensemble_service.overrides import resolved_config
    from ensemble_service.registry import download_ensemble, resolve_ensemble
    from ensemble_service.tracking import RunReader

    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"--temperature must be a positive number, got {temperature}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1] (the soft targets' share of the loss), got {alpha}")
    if model_name is not None and not model_name.strip():
        raise ConfigError("--model-name must not be empty")
    for o in overrides:
        check_override(o)  # a malformed one is told before the store is read
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "strategy" or key.startswith("strategy."):
            raise ConfigError(f"{o}: a student is one model; give its model=..., trainer.* and optimizer.* instead")
        if key in ("tracking.model_name", "tracking.uri", "tracking.register"):
            raise ConfigError(f"{o}: use --model-name and --tracking-uri")
    with RunReader(uri) as reader:
        ens = lineage.tracked_ensemble(reader, ref)
        base = lineage.ensemble_config(reader, ens.parent)
        with tempfile.TemporaryDirectory(prefix="ensemble-teacher-") as tmp:
            local = download_ensemble(reader.uri, resolve_ensemble(reader.uri, ens.ref), tmp)
            try:
                blobs, records, _ = artifact.read_ensemble_dir(local)
            except artifact.ArtifactError as exc:
                raise ConfigError(f"{ens.ref}: {exc}") from None
        uri = reader.uri
    cfg = resolved_config(base, overrides, {
        "strategy": {"name": "independent", "members": 1}, "tracking.uri": uri, "tracking.register": True,
        "tracking.model_name": model_name or f"{ens.name}-distilled", "tracking.sweep": None,
        "cluster.pack": 1, "cluster.min_members": None})
    return DistillPlan(cfg=cfg, teacher_ref=ens.ref, teacher_run=ens.run_id, teacher_name=ens.name,
                       teacher_info=ens.info, teacher_test_labels=ens.test_labels, blobs=blobs, records=records,
                       temperature=float(temperature), alpha=float(alpha), baseline=bool(baseline))


def _specs(p: DistillPlan, checkpoint_dir: str):
    from ensemble_service.config import member_settings
    from ensemble_service.planning import MemberSpec, MemberSlot, StudentSpec

    cfg = p.cfg
    ms = member_settings(cfg)[0]
    student = StudentSpec(index=0, seed=cfg.trainer.seed, model=dict(ms.model), optimizer=dict(ms.optimizer),
                          epochs=ms.epochs, batch_size=ms.batch_size, device=cfg.trainer.device,
                          checkpoint_path=storage.join(checkpoint_dir, "student.ckpt"),
                          teacher_blobs=tuple(p.blobs), teacher_records=tuple(p.records),
                          temperature=p.temperature, alpha=p.alpha)
    tasks, slots = [student], [MemberSlot(0, 0, student.seed, student.architecture, {names.TAG_ROLE: names.ROLE_STUDENT})]
    if p.baseline:
        base = MemberSpec(index=1, seed=cfg.trainer.seed, model=dict(ms.model), optimizer=dict(ms.optimizer),
                          epochs=ms.epochs, batch_size=ms.batch_size, bagging=False, device=cfg.trainer.device,
                          checkpoint_path=storage.join(checkpoint_dir, "baseline.ckpt"))
        tasks.append(base)
        slots.append(MemberSlot(1, 1, base.seed, base.architecture, {names.TAG_ROLE: names.ROLE_BASELINE}))
    return tasks, slots


def run(p: DistillPlan, observer=None, *, scheduler=None) -> DistillResult:
    """Train the student (and the baseline), track, register (see the module docstring)."""
    from ensemble_service import lineage, preflight
    from ensemble_service.planning import EnsemblePlan, checkpoint_root, ensemble_id
    from ensemble_service.runner import (
        Collector, EnsembleFailed, Observer, Runs, closing_runs, data_info, load_data, register_members,
        remove_checkpoints,
    )
    from ensemble_service.tracking import EnsembleTracker

    if scheduler is None:
        from ensemble_service import scheduler
    observer = observer or Observer()
    t0 = time.perf_counter()
    cfg = p.cfg
    preflight.check(cfg)
    data = load_data(cfg)
    lineage.check_same_data(data, p.teacher_info, p.teacher_test_labels, p.teacher_ref)
    from ensemble_service.data import describe

    observer.loaded(describe(data))
    eid = ensemble_id(cfg)
    ckdir = storage.join(checkpoint_root(cfg), eid)
    tasks, slots = _specs(p, ckdir)
    plan = EnsemblePlan(ensemble_id=eid, strategy=names.STRATEGY_DISTILLED, data=data.label, tasks=tasks, slots=slots,
                        checkpoint_dir=ckdir, keep_checkpoints=cfg.cluster.keep_checkpoints)
    resources = scheduler.connect(cfg.cluster)
    problem = preflight.unschedulable(cfg, scheduler.node_resources())
    if problem:
        raise ConfigError(problem)
    observer.started(plan, resources)

    student_spec = tasks[0]
    tracker = EnsembleTracker(cfg.tracking.uri, cfg.tracking.experiment)
    with closing_runs(tracker, observer):
        settings = {**cfg.to_dict(), "distill": {"teacher": p.teacher_ref, "temperature": p.temperature,
                                                 "alpha": p.alpha, "baseline": p.baseline}}
        student_run = tracker.start_parent(
            cfg.tracking.run_name or f"student-{student_spec.architecture}-{data.name}-{eid[:15]}", settings, {
                names.TAG_KIND: names.KIND_STUDENT, names.TAG_ROLE: names.ROLE_STUDENT,
                names.TAG_STRATEGY: names.STRATEGY_DISTILLED, names.TAG_DATA: data.label,
                names.TAG_MODEL: student_spec.architecture, names.TAG_ARCHITECTURE: student_spec.architecture,
                names.TAG_MEMBERS: "1", names.TAG_ID: eid, names.TAG_DISTILLED_FROM: p.teacher_run,
                names.TAG_DISTILLED_FROM_VERSION: p.teacher_ref})
        tracker.log_data(student_run, data_info(data), data.y_test.numpy(), data.y_val.numpy())
        members = {0: student_run}
        if p.baseline:
            members[1] = tracker.start_member(1, "baseline", {
                "seed": tasks[1].seed, "architecture": tasks[1].architecture, "model": tasks[1].model,
                "epochs": tasks[1].epochs}, {names.TAG_ROLE: names.ROLE_BASELINE,
                                             names.TAG_ARCHITECTURE: tasks[1].architecture})
        collector = Collector(tracker, Runs(student_run, members), plan, observer, keep_open={0})
        results, failures = scheduler.run_tasks(
            tasks, data, cfg.cluster, on_event=collector.on_event, on_result=collector.on_result,
            on_failure=collector.on_failure, on_tick=lambda: tracker.flush(every=2.0))
        tracker.flush()
        if failures:
            failed = ", ".join(f"{'student' if f.task == 0 else 'baseline'}: {f.message}" for f in failures)
            raise EnsembleFailed(f"distillation failed ({failed})")
        by_index = {r.index: r for r in results}
        student = by_index[0]
        x = student.extra
        comparison = {
            "teacher": {"acc": x["teacher_test_acc"], "nll": x["teacher_test_nll"], "ece": x["teacher_test_ece"],
                        "forward_seconds": x["teacher_forward_seconds"], "members": x["teacher_members"]},
            "student": {"acc": student.metrics[names.TEST_ACC], "nll": student.metrics[names.TEST_NLL],
                        "ece": student.metrics[names.TEST_ECE], "forward_seconds": x["student_forward_seconds"]},
        }
        values = {names.TEACHER_TEST_ACC: x["teacher_test_acc"], names.TEACHER_TEST_NLL: x["teacher_test_nll"],
                  names.TEACHER_TEST_ECE: x["teacher_test_ece"],
                  names.TEACHER_FORWARD_SECONDS: x["teacher_forward_seconds"],
                  names.STUDENT_FORWARD_SECONDS: x["student_forward_seconds"],
                  names.FORWARD_TIME_RATIO: x["teacher_forward_seconds"] / max(x["student_forward_seconds"], 1e-12)}
        if 1 in by_index:
            b = by_index[1]
            comparison["baseline"] = {"acc": b.metrics[names.TEST_ACC], "nll": b.metrics[names.TEST_NLL],
                                      "ece": b.metrics[names.TEST_ECE]}
            values.update({names.BASELINE_TEST_ACC: b.metrics[names.TEST_ACC],
                           names.BASELINE_TEST_NLL: b.metrics[names.TEST_NLL],
                           names.BASELINE_TEST_ECE: b.metrics[names.TEST_ECE]})
        wall = time.perf_counter() - t0
        tracker.log_metrics(student_run, {**values, names.WALL_SECONDS: wall})
        tracker.log_text(student_run, json.dumps({
            "teacher": p.teacher_ref, "temperature": p.temperature, "alpha": p.alpha, "comparison": comparison,
            "forward_time_ratio": values[names.FORWARD_TIME_RATIO]}, indent=2), names.DISTILLATION_JSON)
        model_version = register_members(tracker, student_run, cfg.tracking.model_name, [student],
                                         names.STRATEGY_DISTILLED, data.class_names, data.preprocessing)
        tracker.end(student_run, "FINISHED")
    if not cfg.cluster.keep_checkpoints:
        remove_checkpoints(ckdir)
    return DistillResult(run_id=student_run, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                         model_version=model_version, comparison=comparison,
                         forward_time_ratio=values[names.FORWARD_TIME_RATIO], wall_seconds=wall,
                         members=[collector.rows[i] for i in sorted(collector.rows)])


def distill(ref: str, overrides: List[str] = (), uri: Optional[str] = None, observer=None, *, scheduler=None,
            **options: Any) -> DistillResult:
    """``prepare`` then ``run``."""
    return run(prepare(ref, list(overrides), uri, **options), observer, scheduler=scheduler)

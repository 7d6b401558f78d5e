"""Resolved config -> plain, picklable specs of the work to schedule.

Nothing here knows Ray or MLflow. A ``MemberSpec`` is everything one Ray task needs
to train one member: plain Python values only (the Hydra config never leaves the
driver).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ensemble_service import storage
from ensemble_service.config import Config, ConfigError, member_settings
from ensemble_service.models import architecture as model_architecture
from ensemble_service.strategies import STRATEGIES


@dataclass(frozen=True)
class MemberSpec:
    index: int                  # position in the ensemble, 0..N-1
    seed: int                   # trainer.seed + index
    model: Dict[str, Any]       # the model's `_target_` spec (a plain dict)
    optimizer: Dict[str, Any]   # the optimizer's `_target_` + `_partial_` spec
    epochs: int
    batch_size: int
    bagging: bool
    device: str                 # auto | cpu | cuda
    checkpoint_path: str        # absolute path or object-store URI; the worker resumes from it when it exists
    precision: str = "fp32"     # fp32 | bf16 (trainer.precision)
    channels_last: bool = False # trainer.channels_last
    schedule: str = "constant"  # trainer.schedule: the learning rate per iteration (ensemble_service/schedules.py)
    warmup_epochs: int = 0      # trainer.warmup_epochs

    @property
    def architecture(self) -> str:
        return _architecture(self.model)

    @property
    def kind(self) -> str:
        return "member"


def _architecture(m: Dict[str, Any]) -> str:
    return model_architecture(m)


@dataclass(frozen=True)
class TrajectorySpec:
    """One training trajectory that yields several members (snapshot, SWA, FGE, heads, MC dropout)."""
    index: int                      # trajectory index t (0..T-1)
    strategy: str                   # "snapshot" | "swa" | "fge" | "heads" | "mc_dropout"
    seed: int                       # trainer.seed + t
    model: Dict[str, Any]
    optimizer: Dict[str, Any]
    epochs: int
    batch_size: int
    params: Dict[str, Any]          # the strategy's keys (cycles, use_last, swa_start, ...)
    member_indices: Tuple[int, ...] # ensemble-wide indices of the members it yields, in order
    device: str
    checkpoint_path: str
    precision: str = "fp32"
    channels_last: bool = False

    @property
    def architecture(self) -> str:
        return _architecture(self.model)

    @property
    def kind(self) -> str:
        return "trajectory"


@dataclass(frozen=True)
class PackedSpec:
    """K independent members of one architecture trained in one task as one stacked model
    (cluster.pack=K): each keeps its own seed, data order (or bootstrap sample) and run."""
    index: int                          # task index
    members: Tuple[MemberSpec, ...]     # same model/optimizer/epochs/batch_size; own seed, bagging, checkpoint
    checkpoint_path: str                # the pack's own checkpoint (all members' state)

    @property
    def member_indices(self) -> Tuple[int, ...]:
        return tuple(m.index for m in self.members)

    @property
    def kind(self) -> str:
        return "packed"

    @property
    def architecture(self) -> str:
        return self.members[0].architecture

    @property
    def epochs(self) -> int:
        return self.members[0].epochs

    @property
    def model(self) -> Dict[str, Any]:
        return self.members[0].model

    @property
    def seed(self) -> int:
        return self.members[0].seed


@dataclass(frozen=True)
class MemberSlot:
    """One member of the ensemble as known before training: where it comes from."""
    index: int                      # 0..N-1, the order used for aggregation and size curves
    task: int                       # index of the task (MemberSpec or TrajectorySpec) that yields it
    seed: int
    architecture: str
    tags: Dict[str, str]            # ensemble.trajectory, ensemble.cycle, ensemble.role, ...


@dataclass
class EnsemblePlan:
    ensemble_id: str
    strategy: str
    data: str
    tasks: List[Any] = field(default_factory=list)      # MemberSpec | TrajectorySpec, one Ray task each
    slots: List[MemberSlot] = field(default_factory=list)
    checkpoint_dir: str = ""
    keep_checkpoints: bool = False  # cluster.keep_checkpoints: else removed once the ensemble ends, however it ends


def ensemble_id(cfg: Config) -> str:
    """A fresh id per submission: time, config hash, process and a random part, so re-submitting
    (even from one process within a second) never resumes the checkpoints another run kept
    (cluster.keep_checkpoints)."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}-{os.getpid()}-{secrets.token_hex(3)}"


def checkpoint_root(cfg: Config) -> str:
    """cluster.storage, else ENSEMBLE_STORAGE, else ./.ensemble/checkpoints: an absolute path
    (resolved on the driver) or an object-store URI (``s3://bucket/prefix``, ``gs://...``; see
    ``ensemble_service.storage``). On a multi-machine cluster a local path must be one every node
    mounts (a member resumes on any node); an object store needs no shared mount."""
    try:
        return storage.root(cfg.cluster.storage)
    except storage.StorageError as exc:
        raise ConfigError(str(exc)) from None


def plan(cfg: Config, *, ensemble: Optional[str] = None, start: int = 0) -> EnsemblePlan:
    """The tasks and member slots of ``cfg``. ``start`` > 0 (``ensemble grow``): members 0..start-1
    exist already; only members ``start``..``strategy.members``-1 are planned, with the indices,
    seeds (``trainer.seed`` + index) and architectures (``strategy.models`` cycled) they have in
    the whole ensemble."""
    eid = ensemble or ensemble_id(cfg)
    ckdir = storage.join(checkpoint_root(cfg), eid)
    if STRATEGIES.get(cfg.strategy.name).trajectory:
        if start:
            raise ValueError(f"strategy={cfg.strategy.name} trains trajectories: its members cannot be planned from {start}")
        return _plan_trajectories(cfg, eid, ckdir)
    members = [
        MemberSpec(
            index=i,
            seed=cfg.trainer.seed + i,
            model=dict(ms.model),
            optimizer=dict(ms.optimizer),
            epochs=ms.epochs,
            batch_size=ms.batch_size,
            bagging=cfg.strategy.bagging,
            device=cfg.trainer.device,
            checkpoint_path=storage.join(ckdir, f"member_{i:03d}.ckpt"),
            precision=cfg.trainer.precision, channels_last=cfg.trainer.channels_last,
            schedule=cfg.trainer.schedule,
            warmup_epochs=cfg.trainer.warmup_epochs,
        )
        for i, ms in enumerate(member_settings(cfg)) if i >= start
    ]
    tasks: List[Any] = list(members)
    if cfg.cluster.pack > 1:
        tasks = pack_members(members, cfg.cluster.pack, ckdir)
    task_of = {i: t.index for t in tasks for i in getattr(t, "member_indices", (t.index,))}
    slots = [MemberSlot(index=m.index, task=task_of[m.index], seed=m.seed, architecture=m.architecture,
                        tags={"ensemble.role": "member"}) for m in members]
    return EnsemblePlan(ensemble_id=eid, strategy=cfg.strategy.name, data=cfg.data.name,
                        tasks=tasks, slots=slots, checkpoint_dir=ckdir,
                        keep_checkpoints=cfg.cluster.keep_checkpoints)


def pack_members(members: List[MemberSpec], k: int, ckdir: str) -> List[Any]:
    """Group members with the same model, optimizer, epochs, batch size and schedule into PackedSpecs of at
    most k (a group of one stays a plain MemberSpec). A task's id (its `index`) is its first member's index, so ids
    of packs and of single members never collide."""
    groups: Dict[str, List[MemberSpec]] = {}
    for m in members:
        shared = [m.model, m.optimizer, m.epochs, m.batch_size, m.device, m.schedule, m.warmup_epochs]
        groups.setdefault(json.dumps(shared, sort_keys=True, default=str), []).append(m)
    tasks: List[Any] = []
    for group in groups.values():
        for start in range(0, len(group), k):
            chunk = group[start:start + k]
            if len(chunk) == 1:
                tasks.append(chunk[0])
            else:
                first = chunk[0].index
                tasks.append(PackedSpec(index=first, members=tuple(chunk),
                                        checkpoint_path=storage.join(ckdir, f"pack_{first:03d}.ckpt")))
    return tasks


def _plan_trajectories(cfg: Config, eid: str, ckdir: str) -> EnsemblePlan:
    strategy = STRATEGIES.get(cfg.strategy.name)
    per = strategy.member_tags(cfg.strategy)
    params = strategy.params(cfg.strategy, cfg.trainer.epochs)
    tasks: List[TrajectorySpec] = []
    slots: List[MemberSlot] = []
    for t in range(getattr(cfg.strategy, "trajectories", 1)):
        indices = tuple(range(t * len(per), (t + 1) * len(per)))
        spec = TrajectorySpec(
            index=t, strategy=cfg.strategy.name, seed=cfg.trainer.seed + t, model=dict(cfg.model),
            optimizer=dict(cfg.optimizer), epochs=cfg.trainer.epochs, batch_size=cfg.trainer.batch_size,
            params=dict(params), member_indices=indices, device=cfg.trainer.device,
            checkpoint_path=storage.join(ckdir, f"trajectory_{t:03d}.ckpt"),
            precision=cfg.trainer.precision, channels_last=cfg.trainer.channels_last,
        )
        tasks.append(spec)
        for i, tags in zip(indices, per):
            slots.append(MemberSlot(index=i, task=t, seed=spec.seed, architecture=spec.architecture,
                                    tags={"ensemble.trajectory": str(t), **tags}))
    return EnsemblePlan(ensemble_id=eid, strategy=cfg.strategy.name, data=cfg.data.name,
                        tasks=tasks, slots=slots, checkpoint_dir=ckdir,
                        keep_checkpoints=cfg.cluster.keep_checkpoints)


@dataclass(frozen=True)
class StudentSpec:
    """One student distilled from an ensemble (``ensemble distill``): trained on the training split
    against the teacher's soft targets at ``temperature``, mixed with the hard labels by ``alpha``
    (``workers.student``). The teacher travels as its member checkpoints and manifest records
    (their ``weight``, where the ensemble has weights, weights its members)."""
    index: int                          # task index (and member index of the student: 0)
    seed: int
    model: Dict[str, Any]
    optimizer: Dict[str, Any]
    epochs: int
    batch_size: int
    device: str
    checkpoint_path: str
    teacher_blobs: Tuple[bytes, ...]
    teacher_records: Tuple[Dict[str, Any], ...]
    temperature: float
    alpha: float

    @property
    def architecture(self) -> str:
        return _architecture(self.model)

    @property
    def member_indices(self) -> Tuple[int, ...]:
        return (self.index,)

    @property
    def kind(self) -> str:
        return "student"

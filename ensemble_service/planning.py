"""Resolved config -> plain, picklable specs of the work to schedule.

Nothing here knows Ray or MLflow. A ``MemberSpec`` is everything one Ray task needs
to train one member: plain Python values only (the Hydra config never leaves the
driver).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ensemble_service.config import Config, ModelConfig


@dataclass(frozen=True)
class MemberSpec:
    index: int                  # position in the ensemble, 0..N-1
    seed: int                   # trainer.seed + index
    model: Dict[str, Any]       # ModelConfig as a dict (name, batchnorm, dropout, init, activation, depth, width)
    optimizer: Dict[str, Any]   # OptimizerConfig as a dict
    epochs: int
    batch_size: int
    bagging: bool
    device: str                 # auto | cpu | cuda
    checkpoint_path: str        # absolute; the worker resumes from it when it exists

    @property
    def architecture(self) -> str:
        return _architecture(self.model)


def _architecture(m: Dict[str, Any]) -> str:
    depth = f"{m['depth']}" if m.get("depth") and m["name"] in ("vgg", "resnet") else ""
    return f"{m['name']}{depth}"


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

    @property
    def architecture(self) -> str:
        return _architecture(self.model)


@dataclass
class EnsemblePlan:
    ensemble_id: str
    strategy: str
    data: str
    members: List[MemberSpec] = field(default_factory=list)
    checkpoint_dir: str = ""


def ensemble_id(cfg: Config) -> str:
    """A fresh id per submission: config hash + time, so re-submitting never resumes stale checkpoints."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}-{os.getpid()}"


def checkpoint_root(cfg: Config) -> Path:
    root = cfg.cluster.storage or os.path.join(os.getcwd(), ".ensemble", "checkpoints")
    return Path(root).expanduser().resolve()


def member_models(cfg: Config) -> List[ModelConfig]:
    """The architecture of each member: strategy.models cycled, or `model` for all."""
    n = cfg.strategy.members
    if cfg.strategy.models:
        return [cfg.strategy.models[i % len(cfg.strategy.models)] for i in range(n)]
    return [cfg.model] * n


def plan(cfg: Config, *, ensemble: Optional[str] = None) -> EnsemblePlan:
    eid = ensemble or ensemble_id(cfg)
    ckdir = checkpoint_root(cfg) / eid
    members = [
        MemberSpec(
            index=i,
            seed=cfg.trainer.seed + i,
            model=asdict(m),
            optimizer=asdict(cfg.optimizer),
            epochs=cfg.trainer.epochs,
            batch_size=cfg.trainer.batch_size,
            bagging=cfg.strategy.bagging,
            device=cfg.trainer.device,
            checkpoint_path=str(ckdir / f"member_{i:03d}.ckpt"),
        )
        for i, m in enumerate(member_models(cfg))
    ]
    return EnsemblePlan(
        ensemble_id=eid, strategy=cfg.strategy.name, data=cfg.data.name,
        members=members, checkpoint_dir=str(ckdir),
    )

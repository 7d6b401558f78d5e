"""What ``ensemble submit`` checks before anything starts: no Ray, no MLflow run, no data set
loaded or generated.

- the tracking store: reachable, writable, its driver installed (``tracking.check_store``,
  a few seconds at most: MLflow itself would retry an unreachable server for minutes);
- the checkpoint storage (``storage.check``): a local directory that can be made, or an object
  store (s3://, gs://) where a small object is written, read back and deleted;
- the cluster address, when one is joined (``scheduler.check_address``: found, answering,
  a Ray cluster; Ray itself would retry for minutes);
- resources, for the embedded cluster: what it would have (``scheduler.embedded_resources``,
  as Ray resolves it) must fit one task, or the task would wait forever. A joined cluster's
  nodes are known only once connected: the runner checks those with ``unschedulable`` too.

Each failure is a ConfigError: one line, exit 2.
"""
from __future__ import annotations

from typing import Dict, List

from ensemble_service import storage
from ensemble_service.config import Config, ConfigError
from ensemble_service.planning import checkpoint_root

ADDRESS_TIMEOUT_S = 5.0


def unschedulable(cfg: Config, nodes: List[Dict[str, float]]) -> str:
    """Why no node with these resources could run one task ('' if one can): such a task would
    wait forever."""
    c = cfg.cluster
    if any(n.get("CPU", 0) >= c.cpus_per_member and n.get("GPU", 0) >= c.gpus_per_member for n in nodes):
        return ""
    have = ", ".join(f"{n.get('CPU', 0):g} CPUs/{n.get('GPU', 0):g} GPUs" for n in nodes) or "no nodes"
    return (f"no Ray node can run a member with cluster.cpus_per_member={c.cpus_per_member:g} and "
            f"cluster.gpus_per_member={c.gpus_per_member:g} (nodes: {have})")


def check(cfg: Config) -> None:
    """Raise ConfigError (one line) for the first problem found; the cheapest checks go first."""
    from ensemble_service import scheduler
    from ensemble_service.tracking import check_store

    address = scheduler.join_address(cfg.cluster)
    if not scheduler.joining_existing_cluster() and not address:
        problem = unschedulable(cfg, [scheduler.embedded_resources(cfg.cluster)])
        if problem:
            raise ConfigError(problem)
    problem = check_store(cfg.tracking.uri, create=True)
    if problem:
        raise ConfigError(problem)
    problem = storage.check(checkpoint_root(cfg))
    if problem:
        raise ConfigError(problem)
    if address and not scheduler.is_connected():
        problem = scheduler.check_address(address, timeout=ADDRESS_TIMEOUT_S)
        if problem:
            raise ConfigError(problem if cfg.cluster.address else f"RAY_ADDRESS={address}: {problem}")

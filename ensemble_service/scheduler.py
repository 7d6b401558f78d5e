"""The Ray code: one task per member, gathered as they finish; the only module (with
jobs.py) that imports Ray.

- ``connect(cluster)`` starts an embedded local Ray cluster when ``cluster.address`` is
  null (reusing one already started in this process), otherwise connects to it.
- ``run_members`` puts the data set in the object store once, submits one task per
  member with ``num_cpus``/``num_gpus`` from the cluster config and
  ``max_retries=cluster.max_retries`` (a worker process that dies is re-run, and the
  member resumes from its last checkpoint), then waits on the tasks and hands each
  result or failure to the caller as it arrives. Per-epoch events travel from the
  workers through a small inbox actor that the driver drains while it waits, so the
  driver (not the workers) writes to MLflow and draws the progress bars.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray

from workers.member import MemberError, MemberResult, train_member

POLL_SECONDS = 0.25


def ray_env_defaults() -> None:
    """These machines have no internet: no usage stats; auth mode set explicitly."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def connect(cluster) -> Dict[str, Any]:
    """Start or join Ray; returns the cluster's resources."""
    ray_env_defaults()
    if not ray.is_initialized():
        if cluster.address:
            ray.init(address=cluster.address, log_to_driver=True)
        else:
            ray.init(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                     include_dashboard=False, log_to_driver=True)
    return dict(ray.cluster_resources())


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


@ray.remote(num_cpus=0)
class _Inbox:
    """Where workers drop per-epoch events; the driver drains it."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def put(self, event: Dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> List[Dict[str, Any]]:
        out, self.events = self.events, []
        return out


def _member_task(spec, data, inbox) -> MemberResult:
    t_start = time.time()
    ctx = ray.get_runtime_context()
    cpus = ctx.get_assigned_resources().get("CPU", 1.0)
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]

    def report(event: Dict[str, Any]) -> None:
        inbox.put.remote({**event, "node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": gpu_ids})

    result = train_member(spec, data, num_threads=max(1, int(cpus)), gpu_assigned=bool(gpu_ids), report=report)
    result.extra.update(node_id=ctx.get_node_id(), pid=os.getpid(), gpu_ids=gpu_ids, cpus=cpus,
                        t_start=t_start, t_end=time.time())
    return result


_remote_member = ray.remote(_member_task)


@dataclass
class MemberFailure:
    index: int
    message: str


def _failure_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MemberError):
        return str(cause)
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "the worker process died and max_retries was exhausted"
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return "cancelled"
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def run_members(
    specs: Sequence, data, cluster, *,
    on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
    on_result: Optional[Callable[[MemberResult], None]] = None,
    on_failure: Optional[Callable[[MemberFailure], None]] = None,
) -> tuple[List[MemberResult], List[MemberFailure]]:
    """Run one Ray task per spec; results come back in completion order."""
    on_event = on_event or (lambda e: None)
    inbox = _Inbox.remote()
    data_ref = ray.put(data)  # once, not once per member
    task = _remote_member.options(
        num_cpus=cluster.cpus_per_member, num_gpus=cluster.gpus_per_member,
        max_retries=cluster.max_retries, retry_exceptions=False,
    )
    pending = {task.remote(spec, data_ref, inbox): spec for spec in specs}
    results: List[MemberResult] = []
    failures: List[MemberFailure] = []

    def drain() -> None:
        for event in ray.get(inbox.drain.remote()):
            on_event(event)

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            drain()
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayError, MemberError) as exc:
                    failure = MemberFailure(spec.index, _failure_message(exc))
                    failures.append(failure)
                    if on_failure:
                        on_failure(failure)
                    continue
                results.append(result)
                if on_result:
                    on_result(result)
        drain()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(inbox)
    return results, failures

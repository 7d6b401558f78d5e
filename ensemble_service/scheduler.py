"""The Ray code: one task per member, gathered as they finish; the only module (with
jobs.py) that imports Ray.

- ``connect(cluster)`` starts a private embedded Ray cluster when ``cluster.address`` is
  null (``ray.init(address="local")``: never whichever cluster ``ray start`` last recorded on
  the machine), joins ``cluster.address`` (``auto``, ``HOST:PORT``, ``ray://...``) or, for a
  job's driver, ``RAY_ADDRESS``; a cluster already connected in this process is reused.
  ``shutdown()`` stops an embedded cluster with every process it started.
- ``check_address`` and ``embedded_resources`` answer, before Ray starts, whether the
  cluster address answers and what an embedded cluster would have (preflight.py asks).
- ``run_tasks`` puts the data set in the object store once, submits one task per
  independent member, per trajectory (snapshot/SWA/FGE/heads/MC dropout) or per pack of
  members (cluster.pack) with ``num_cpus``/``num_gpus`` from the cluster config and
  ``max_retries=cluster.max_retries`` (a worker process that dies is re-run, and the
  member resumes from its last checkpoint), then waits on the tasks and hands each
  result or failure to the caller as it arrives. Per-epoch events travel from the
  workers through a small inbox actor that the driver drains while it waits, so the
  driver (not the workers) writes to MLflow and draws the progress bars.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray

from ensemble_service.environment import service_env_defaults
from workers.member import train_member
from workers.packed import train_packed
from workers.state import MemberError, MemberResult
from workers.student import train_student
from workers.trajectory import train_trajectory

POLL_SECONDS = 1.0  # longest the driver waits for worker events before it wakes up anyway


def join_address(cluster) -> Optional[str]:
    """The cluster connect() joins: cluster.address, else RAY_ADDRESS (set by Ray for a job's
    driver); None means a private embedded cluster."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the process's SIGTERM handler with sys.exit and adds a native handler
    that prints a stack dump: put the Python handler back (the caller's, else Ray's), which
    also removes the native one."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main:
            handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)


def connect(cluster, logging_level: int = logging.WARNING) -> Dict[str, Any]:
    """Start or join Ray; returns the cluster's resources.

    cluster.address (or RAY_ADDRESS, which Ray sets for a job's driver) joins that cluster;
    neither starts a private embedded one (``address="local"``) with cluster.num_cpus /
    cluster.num_gpus / cluster.object_store_memory. ``logging_level``: of Ray's own logger in
    this process (warnings: its "Started a local Ray instance" line is not the user's; the
    service prints the cluster it got).
    """
    service_env_defaults()
    if not ray.is_initialized():
        address = join_address(cluster)
        with _keep_sigterm_handler():
            if address:
                ray.init(address=address, log_to_driver=True, logging_level=logging_level)
            else:
                ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                         object_store_memory=getattr(cluster, "object_store_memory", None),
                         include_dashboard=False, log_to_driver=True, logging_level=logging_level)
    return dict(ray.cluster_resources())


def is_connected() -> bool:
    """True while this process is connected to a Ray cluster (embedded or joined)."""
    return ray.is_initialized()


def joining_existing_cluster() -> bool:
    """True when connect() would join a running cluster (already connected, or RAY_ADDRESS set)."""
    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def embedded_resources(cluster) -> Dict[str, float]:
    """CPU and GPU of the embedded cluster connect() would start, as Ray itself resolves them
    (cgroup CPU limits, CUDA_VISIBLE_DEVICES), without starting it."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus).resolve(is_head=True)
        return {"CPU": float(spec.num_cpus), "GPU": float(spec.num_gpus or 0)}
    except Exception:  # Ray's private helper moved: the same rules from public information
        import torch

        cpus = cluster.num_cpus if cluster.num_cpus is not None else (os.cpu_count() or 1)
        gpus = cluster.num_gpus if cluster.num_gpus is not None else torch.cuda.device_count()
        return {"CPU": float(cpus), "GPU": float(gpus)}


# The client connection preface of HTTP/2 and an empty SETTINGS frame: a gRPC server (Ray's GCS,
# the Ray Client server) answers with its own SETTINGS frame (type 4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_address(address: str, timeout: float = 5.0) -> str:
    """Why connect() could not join the Ray cluster at ``address`` ('' when it answers): found
    (``auto``), reachable within ``timeout`` seconds, and speaking gRPC. Ray's own connect
    retries for minutes on an address that does not answer."""
    what = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            address = get_ray_address_from_environment("auto", None)
        except Exception as exc:  # ConnectionError: no running cluster found
            return f"cluster.address=auto found no running Ray cluster on this machine ({_first_line(exc)})"
        what = f"auto ({address})"
    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return f"cluster.address={what!r} is not HOST:PORT, auto, ray://HOST:PORT or http://HOST:8265 (Jobs API)"
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return ""
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        return f"the Ray cluster at {what} did not answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach the Ray cluster at {what}: {exc.strerror or exc}"
    if len(head) < 9 or head[3] != 4:
        return (f"{what} answers, but not as a Ray cluster: give its GCS address (HOST:6379 by default), "
                "or http://HOST:8265 to submit through its Jobs API")
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def node_resources() -> List[Dict[str, float]]:
    """CPU and GPU of each alive node (for feasibility checks)."""
    return [{"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
            for n in ray.nodes() if n.get("Alive")]


def _started_processes() -> list:
    """The processes of the Ray node this process started (none when it joined a cluster), with
    all their descendants: the raylet starts ray::DashboardAgent and ray::RuntimeEnvAgent."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    try:
        import psutil  # Ray ships it (ray/thirdparty_files)

        procs = {}
        for infos in list(getattr(node, "all_processes", {}).values()):
            for info in infos:
                try:
                    root = psutil.Process(info.process.pid)
                    for p in [root, *root.children(recursive=True)]:
                        procs[p.pid] = p
                except psutil.Error:
                    continue
        procs.pop(os.getpid(), None)
        return list(procs.values())
    except Exception:
        return []


def shutdown(grace: float = 1.0) -> None:
    """Disconnect from Ray. An embedded cluster that this process started is stopped with every
    process it started: ray.shutdown stops the raylet and the GCS, but the raylet's agents then
    block for a minute or more reporting its death to the GCS that is gone, orphaned; what is
    still running ``grace`` seconds later is killed."""
    _INBOX.clear()
    if not ray.is_initialized():
        return
    started = _started_processes()
    ray.shutdown()
    if started:
        import psutil

        _, alive = psutil.wait_procs(started, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


@ray.remote(num_cpus=0)
class _Inbox:
    """Where workers drop per-epoch events. ``drain`` answers as soon as there are events
    (or after ``timeout``), so the driver neither polls nor misses them."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def put(self, event: Dict[str, Any]) -> None:
        self.events.append(event)
        self.arrived.set()

    async def drain(self, timeout: float) -> List[Dict[str, Any]]:
        if not self.events:
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        out, self.events = self.events, []
        self.arrived.clear()
        return out

    async def wake(self) -> None:
        """End a waiting drain now (the driver is done waiting for tasks)."""
        self.arrived.set()


_INBOX: Dict[str, Any] = {}


def _inbox():
    """One inbox actor per driver and Ray session: starting an actor is a new Python process
    (~1 s of CPU that the members would otherwise lose), so it is paid once."""
    session = ray.get_runtime_context().get_job_id()
    actor = _INBOX.get(session)
    if actor is None:
        actor = _INBOX[session] = _Inbox.remote()
    else:
        ray.get(actor.drain.remote(0.0))  # leftovers of an earlier run in this driver
    return actor


def _task(spec, data, inbox, run_token: str) -> List[MemberResult]:
    """One Ray task: one independent member (MemberSpec), one trajectory (TrajectorySpec), a pack of
    members (PackedSpec) or a distilled student (StudentSpec)."""
    t_start = time.time()
    ctx = ray.get_runtime_context()
    cpus = ctx.get_assigned_resources().get("CPU", 1.0)
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    node_id = ctx.get_node_id()

    def report(event: Dict[str, Any]) -> None:
        inbox.put.remote({**event, "node_id": node_id, "pid": os.getpid(), "gpu_ids": gpu_ids, "run": run_token})

    train = {"member": train_member, "trajectory": train_trajectory, "packed": train_packed,
             "student": train_student}[spec.kind]
    out = train(spec, data, num_threads=max(1, int(cpus)), gpu_assigned=bool(gpu_ids), report=report)
    results = out if isinstance(out, list) else [out]
    for r in results:
        r.extra.update(node_id=node_id, pid=os.getpid(), gpu_ids=gpu_ids, cpus=cpus,
                       t_start=t_start, t_end=time.time())
    return results


_remote_task = ray.remote(_task)


@dataclass
class TaskFailure:
    task: int
    members: List[int]
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


def task_members(spec) -> List[int]:
    return list(spec.member_indices) if hasattr(spec, "member_indices") else [spec.index]


def run_tasks(
    specs: Sequence, data, cluster, *,
    on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
    on_result: Optional[Callable[[Any, List[MemberResult]], None]] = None,
    on_failure: Optional[Callable[[TaskFailure], None]] = None,
    on_tick: Optional[Callable[[], None]] = None,
) -> tuple[List[MemberResult], List[TaskFailure]]:
    """Run one Ray task per spec; each task's members come back as soon as it finishes.

    ``on_event`` gets each worker event as it arrives, ``on_result``/``on_failure`` each task's
    outcome, and ``on_tick`` runs after every wake-up (the caller flushes buffered writes there)."""
    on_event = on_event or (lambda e: None)
    inbox = _inbox()
    data_ref = ray.put(data)  # once, not once per task
    task = _remote_task.options(
        num_cpus=cluster.cpus_per_member, num_gpus=cluster.gpus_per_member,
        max_retries=cluster.max_retries, retry_exceptions=False,
    )
    run_token = uuid.uuid4().hex  # events of an earlier run in this driver arriving late are ignored
    pending = {task.remote(spec, data_ref, inbox, run_token): spec for spec in specs}
    results: List[MemberResult] = []
    failures: List[TaskFailure] = []

    events = inbox.drain.remote(POLL_SECONDS)
    try:
        while pending:
            ready, _ = ray.wait([events, *pending], num_returns=1)
            if events in ready:
                for event in ray.get(events):
                    if event.get("run") == run_token:
                        on_event(event)
                events = inbox.drain.remote(POLL_SECONDS)
            for ref in ready:
                if ref not in pending:
                    continue
                spec = pending.pop(ref)
                try:
                    members = ray.get(ref)
                except (ray.exceptions.RayError, MemberError) as exc:
                    failure = TaskFailure(spec.index, task_members(spec), _failure_message(exc))
                    failures.append(failure)
                    if on_failure:
                        on_failure(failure)
                    continue
                results.extend(members)
                if on_result:
                    on_result(spec, members)
            if on_tick:
                on_tick()
        inbox.wake.remote()
        for event in ray.get(events) + ray.get(inbox.drain.remote(0.0)):
            if event.get("run") == run_token:
                on_event(event)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results, failures


"""Dynamic batching: concurrent predict requests to one ensemble share one forward.

Each request is a :class:`Job`: its raw inputs and its options (method, weights, return_members
and whatever else ``Ensemble.predict`` takes, see :func:`predict_options`). :func:`run_jobs` runs a
list of jobs as one forward: every job's inputs are preprocessed on their own (a bad request fails
alone, with its own 422), the prepared rows are stacked, the members run once on the stack, and
the member logits are split back and combined with each job's options
(``Ensemble.predict(MemberLogits(...), **options)``, once for all the jobs that share options).
Rows never influence each other in an
ensemble's eval-mode forward, so a batched answer equals the unbatched one (up to float32
rounding where BLAS picks another kernel for another batch size: the labels and agreement are
the same; probabilities agree to ~1e-7). MC-dropout ensembles are not stacked across requests:
their seeded masks depend on a row's position in the batch.

:class:`Batcher` (``ensemble serve``) runs one ensemble's forwards on its own worker thread, in
arrival order. When the thread is free, it takes the first waiting request and every request
queued behind it, up to ``max_rows`` rows in all. When the ensemble is under concurrent load
(its previous forward served several requests), it also waits up to ``wait_s`` after the
first request for more to arrive; a lone client never waits. With ``enabled=False`` every
request runs alone. The Ray Serve deployment (``api/ray_serve.py``) batches with
``serve.batch`` instead and calls the same :func:`run_jobs`.

On the event loop (``await Batcher.predict``) requests are gathered per loop iteration: every
request whose handler reached the batcher in one iteration is handed over together (one wake-up
of the thread). A *lone* request (nothing else gathered, the thread idle with nothing queued,
and the last batch not a stacked one) whose forward is expected to take at most ``inline_s``
(from the last forward's time per row; unknown at first, so the first forward always uses the
thread) runs right there on the event loop instead: handing a ~1 ms forward to another thread
and waking the loop again costs ~0.3-0.5 ms on a small machine (``bench/bench_endpoint.py``).
The loop is blocked for at most about ``inline_s``; requests that arrive meanwhile are gathered
in the next iteration and, being several, go to the thread stacked. ``inline_s=0`` turns this off.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

import torch

from ensemble_service.serving import Ensemble, MemberLogits, Prediction

__all__ = ["Job", "Batcher", "run_jobs", "predict_options", "rows"]

_IDLE_EXIT_S = 30.0  # a worker thread with nothing to do for this long exits (a new one starts on demand)


def rows(inputs: Any) -> int:
    """Items in a request's raw inputs (an array's first dimension, a list's length)."""
    shape = getattr(inputs, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    try:
        return len(inputs)
    except TypeError:
        return 1


def predict_options(fields: Dict[str, Any]) -> Dict[str, Any]:
    """The request fields ``Ensemble.predict`` takes as keyword arguments (a request field that it
    does not take, e.g. one only the route reads, stays out)."""
    return {k: v for k, v in fields.items() if k in _PREDICT_PARAMS}


_PREDICT_PARAMS = frozenset(p for p in inspect.signature(Ensemble.predict).parameters if p not in ("self", "x"))


@dataclass
class Job:
    inputs: Any
    options: Dict[str, Any]
    rows: int = 0
    arrived: float = field(default_factory=time.monotonic)
    future: Optional[Future] = None             # Batcher.submit's answer (from any thread)
    waiter: Optional["asyncio.Future"] = None   # Batcher.predict's answer, resolved on its event loop

    def start(self) -> bool:
        """Mark the job as being served; False when its caller has cancelled it."""
        if self.waiter is not None:
            return not self.waiter.done()
        return self.future is None or self.future.set_running_or_notify_cancel()

    def __post_init__(self) -> None:
        self.rows = self.rows or rows(self.inputs)


Outcome = Union[Prediction, BaseException]


def run_jobs(ensemble: Ensemble, jobs: List[Job]) -> List[Outcome]:
    """Each job's Prediction, or the exception that job raised, in order; one forward for all
    (one per job for an ensemble that is not :attr:`~Ensemble.batchable`, or for a single job).

    Jobs with the same options are combined in one ``Ensemble.predict`` call on their rows' logits
    and its answer split back (``Prediction.rows``); if that call fails (e.g. one request's outputs
    cannot be combined), each of those jobs is combined on its own, so the error stays its own."""
    if len(jobs) == 1 or not ensemble.batchable:
        return [_guard(lambda j=j: ensemble.predict(j.inputs, **j.options)) for j in jobs]
    out: List[Optional[Outcome]] = [None] * len(jobs)
    groups: Dict[str, List[Tuple[int, torch.Tensor]]] = {}  # same options -> (job index, prepared rows)
    for i, job in enumerate(jobs):
        try:
            t = ensemble.prepare(job.inputs)
        except BaseException as exc:  # this request's inputs are bad: it fails alone
            out[i] = exc
            continue
        groups.setdefault(_options_key(job.options), []).append((i, t))
    prepared = [item for group in groups.values() for item in group]  # stacked group by group
    if not prepared:
        return out  # type: ignore[return-value]
    try:
        z = ensemble.forward(torch.cat([t for _, t in prepared]) if len(prepared) > 1 else prepared[0][1])
    except BaseException as exc:
        for i, _ in prepared:
            out[i] = exc
        return out  # type: ignore[return-value]
    start = 0
    for group in groups.values():
        sizes = [len(t) for _, t in group]
        zg = z[:, start:start + sum(sizes)]
        start += sum(sizes)
        options = jobs[group[0][0]].options
        combined = _guard(lambda: ensemble.predict(MemberLogits(zg), **options)) if len(group) > 1 else None
        at = 0
        for (i, _), n in zip(group, sizes):
            if isinstance(combined, Prediction):
                out[i] = combined.rows(at, at + n)
            else:
                out[i] = _guard(lambda zi=zg[:, at:at + n], o=jobs[i].options: ensemble.predict(MemberLogits(zi), **o))
            at += n
    return out  # type: ignore[return-value]


def _options_key(options: Dict[str, Any]) -> str:
    return repr(sorted(options.items()))


def _guard(fn) -> Outcome:
    try:
        return fn()
    except BaseException as exc:
        return exc


class Batcher:
    """One ensemble's forwards, run on its own worker thread, with concurrent requests stacked.

    ``submit`` returns a ``concurrent.futures.Future`` of the request's :class:`Prediction`."""

    def __init__(self, ensemble: Ensemble, name: str = "ensemble", max_rows: int = 1024, wait_s: float = 0.002,
                 enabled: bool = True, inline_s: float = 0.0):
        self.ensemble, self.name = ensemble, name
        self.max_rows, self.wait_s = max(1, int(max_rows)), max(0.0, float(wait_s))
        self.enabled = bool(enabled) and ensemble.batchable
        self.inline_s = max(0.0, float(inline_s))
        self._queue: Deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._busy = False             # the last forward served several requests: wait for more
        self._running = False          # the thread is running a forward
        self._row_s: Optional[float] = None   # seconds per row of the last forward (None: none yet)
        self._gathered: List[Job] = []  # requests gathered on the event loop in this iteration
        self.batches = 0               # forwards run and requests served (tests, benchmarks)
        self.requests = 0
        self.inline = 0                # of which run on the event loop

    def submit(self, inputs: Any, options: Dict[str, Any]) -> Future:
        job = Job(inputs, dict(options), future=Future())
        self._enqueue([job])
        return job.future

    def _enqueue(self, jobs: List[Job]) -> None:
        with self._cv:
            self._queue.extend(jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"ensemble-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()

    async def predict(self, inputs: Any, options: Dict[str, Any]) -> Prediction:
        """The Prediction for ``inputs``, from the event loop (see the module docstring)."""
        loop = asyncio.get_running_loop()
        job = Job(inputs, dict(options), waiter=loop.create_future())
        if not self._gathered:
            loop.call_soon(self._flush)
        self._gathered.append(job)
        return await job.waiter

    def _flush(self) -> None:
        """Hand this loop iteration's requests over: a lone cheap one runs here, the rest go to the thread."""
        jobs, self._gathered = self._gathered, []
        if len(jobs) == 1 and self._may_inline(jobs[0]):
            job = jobs[0]
            if job.start():
                self.inline += 1
                try:
                    self._serve([job], on_loop=True)
                except BaseException as exc:  # run_jobs keeps a request's errors its own; this is a bug
                    if not job.waiter.done():
                        job.waiter.set_exception(exc)
            return
        self._enqueue(jobs)

    def _may_inline(self, job: Job) -> bool:
        row_s = self._row_s
        if not self.inline_s or row_s is None or self._busy or row_s * max(job.rows, 1) > self.inline_s:
            return False
        with self._cv:
            return not self._running and not self._queue

    def _take(self) -> Optional[List[Job]]:
        """The next batch (None: idle too long, the thread exits)."""
        with self._cv:
            while not self._queue:
                if not self._cv.wait(_IDLE_EXIT_S) and not self._queue:
                    self._thread = None
                    return None
            first = self._queue.popleft()
            self._running = True
            batch, total = [first], first.rows
            if not self.enabled:
                return batch
            deadline = first.arrived + self.wait_s if self._busy else 0.0
            while total < self.max_rows:
                if self._queue:
                    if total + self._queue[0].rows > self.max_rows:
                        break
                    job = self._queue.popleft()
                    batch.append(job)
                    total += job.rows
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            jobs = [j for j in batch if j.start()]  # skip cancelled requests
            self._busy = len(batch) > 1
            if not jobs:
                with self._cv:
                    self._running = False
                continue
            try:
                outcomes = self._forward(jobs)
            except BaseException as exc:  # run_jobs keeps a request's errors its own; this is a bug
                outcomes = [exc] * len(jobs)
            finally:
                with self._cv:  # idle before the answers wake the loop: its next lone request may run inline
                    self._running = False
            self._resolve(jobs, outcomes)

    def _serve(self, jobs: List[Job], on_loop: bool = False) -> None:
        """One forward for ``jobs`` (already running), their answers resolved."""
        self._resolve(jobs, self._forward(jobs), on_loop)

    def _forward(self, jobs: List[Job]) -> List[Outcome]:
        """Each job's outcome from one forward (``run_jobs``), timed."""
        self.batches += 1
        self.requests += len(jobs)
        start = time.perf_counter()
        outcomes = run_jobs(self.ensemble, jobs)
        self._row_s = (time.perf_counter() - start) / max(1, sum(j.rows for j in jobs))
        return outcomes

    @staticmethod
    def _resolve(jobs: List[Job], outcomes: List[Outcome], on_loop: bool = False) -> None:
        """Hand each job its outcome: a job from :meth:`predict` on its event loop (directly when
        ``on_loop``), one from :meth:`submit` through its Future."""
        for job, outcome in zip(jobs, outcomes):
            if job.waiter is not None:
                if on_loop:
                    _settle(job.waiter, outcome)
                else:
                    job.waiter.get_loop().call_soon_threadsafe(_settle, job.waiter, outcome)
            elif job.future is not None:
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)


def _settle(waiter: "asyncio.Future", outcome: Outcome) -> None:
    if waiter.done():  # the request was cancelled (its client went away)
        return
    if isinstance(outcome, BaseException):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)

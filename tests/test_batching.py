"""Dynamic batching (issue 13): concurrent requests to one ensemble share a forward and get the
answers they would get alone; a bad request fails alone; MC-dropout ensembles are never stacked."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ensemble_service.api.batching import Batcher, Job, predict_options, run_jobs
from ensemble_service.artifact import member_record
from ensemble_service.serving import Ensemble, ServingError
from test_api import store  # noqa: F401  (fixture)
from test_serving import _mc_records, blob_of

REQUESTS = [  # different methods, weights, sizes and options
    {"rows": 1, "method": "mean", "weights": None, "return_members": False},
    {"rows": 3, "method": "vote", "weights": None, "return_members": True},
    {"rows": 2, "method": "weighted", "weights": [1.0, 0.0, 2.0], "return_members": False},
    {"rows": 5, "method": "logit_mean", "weights": None, "return_members": False},
    {"rows": 1, "method": "weighted", "weights": None, "return_members": True},
    {"rows": 4, "method": "mean", "weights": [3.0, 1.0, 1.0], "return_members": False},
]


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    blobs = [blob_of("mlp", 0), blob_of("mlp", 1), blob_of("lenet", 2)]
    records = [member_record(i, model={"name": n}, metrics={"val_acc": 0.7 + 0.1 * i})
               for i, n in enumerate(["mlp", "mlp", "lenet"])]
    return Ensemble.from_blobs(blobs, records)


def _jobs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for r in REQUESTS:
        x = torch.rand(r["rows"], 64, generator=g) * 16  # flattened [rows, 64]
        jobs.append(Job(x.numpy(), {k: v for k, v in r.items() if k != "rows"}))
    return jobs


def assert_same(got, expected) -> None:
    """The batched answer against the one the request gets alone: the same labels and agreement;
    probabilities equal up to float32 rounding (BLAS may pick another kernel for another batch size)."""
    assert got.labels.tolist() == expected.labels.tolist()
    assert got.agreement.tolist() == expected.agreement.tolist()
    np.testing.assert_allclose(got.probabilities.numpy(), expected.probabilities.numpy(), rtol=1e-6, atol=1e-7)
    if expected.member_probs is None:
        assert got.member_probs is None
    else:
        np.testing.assert_allclose(got.member_probs.numpy(), expected.member_probs.numpy(), rtol=1e-6, atol=1e-7)


def test_run_jobs_equals_each_request_alone(ensemble):
    jobs = _jobs()
    calls = []
    forward = ensemble.forward
    ensemble.forward = lambda t: calls.append(len(t)) or forward(t)
    try:
        outcomes = run_jobs(ensemble, jobs)
    finally:
        del ensemble.forward
    assert calls == [sum(r["rows"] for r in REQUESTS)]  # one forward for every row of every request
    for job, got in zip(jobs, outcomes):
        assert_same(got, ensemble.predict(job.inputs, **job.options))
    # the members' logits of the stacked forward, split back, are each request's logits
    z = ensemble.forward(torch.cat([ensemble.prepare(j.inputs) for j in jobs]))
    start = 0
    for job in jobs:
        np.testing.assert_allclose(z[:, start:start + job.rows].numpy(), ensemble.logits(job.inputs).numpy(),
                                   rtol=1e-5, atol=1e-6)
        start += job.rows


def test_a_bad_request_fails_alone(ensemble):
    jobs = _jobs()
    jobs[1] = Job(np.zeros((2, 5), np.float32), {"method": "mean"})          # wrong shape
    jobs[3] = Job(np.zeros((1, 64), np.float32), {"method": "median"})      # unknown method
    jobs[4] = Job(np.zeros((1, 64), np.float32), {"method": "mean", "weights": [1, -1, 1]})
    outcomes = run_jobs(ensemble, jobs)
    assert isinstance(outcomes[1], ServingError) and outcomes[1].field == "inputs"
    assert isinstance(outcomes[3], ServingError) and outcomes[3].field == "method"
    assert isinstance(outcomes[4], ServingError) and outcomes[4].field == "weights"
    for i in (0, 2, 5):
        assert_same(outcomes[i], ensemble.predict(jobs[i].inputs, **jobs[i].options))


def _counting(ensemble, fail_over_rows=None):
    calls = []
    predict = ensemble.predict

    def counted(x, **options):
        rows = x.z.shape[1] if hasattr(x, "z") else len(x)
        calls.append(rows)
        if fail_over_rows is not None and rows > fail_over_rows:
            raise ServingError("the members' outputs for these inputs cannot be combined", "inputs")
        return predict(x, **options)

    ensemble.predict = counted
    return calls


def test_jobs_with_the_same_options_are_combined_once(ensemble):
    g = torch.Generator().manual_seed(5)
    same = {"method": "mean", "weights": None, "return_members": True}
    jobs = [Job((torch.rand(n, 64, generator=g) * 16).numpy(), dict(same)) for n in (1, 2, 1, 3)]
    jobs += [Job((torch.rand(2, 64, generator=g) * 16).numpy(), {**same, "method": "vote"}),
             Job((torch.rand(1, 64, generator=g) * 16).numpy(), {**same, "weights": [1.0, 2.0, 3.0]})]
    calls = _counting(ensemble)
    try:
        outcomes = run_jobs(ensemble, jobs)
    finally:
        del ensemble.predict
    assert calls == [7, 2, 1]  # the four 'mean' jobs in one call, then one call per other option set
    for job, got in zip(jobs, outcomes):
        assert_same(got, ensemble.predict(job.inputs, **job.options))


def test_a_failing_combination_is_retried_per_job(ensemble):
    jobs = [Job(np.full((n, 64), 3.0, np.float32), {"method": "mean"}) for n in (1, 1, 1)]
    calls = _counting(ensemble, fail_over_rows=1)
    try:
        outcomes = run_jobs(ensemble, jobs)
    finally:
        del ensemble.predict
    assert calls == [3, 1, 1, 1]
    for job, got in zip(jobs, outcomes):
        assert_same(got, ensemble.predict(job.inputs, **job.options))


def test_prediction_rows_slices_every_field_along_its_batch_axis(ensemble):
    x = (torch.rand(5, 64, generator=torch.Generator().manual_seed(9)) * 16).numpy()
    whole = ensemble.predict(x, "vote", return_members=True)
    part = whole.rows(1, 3)
    assert torch.equal(part.labels, whole.labels[1:3]) and torch.equal(part.agreement, whole.agreement[1:3])
    assert torch.equal(part.probabilities, whole.probabilities[1:3])
    assert torch.equal(part.member_probs, whole.member_probs[:, 1:3])


def test_mc_dropout_ensembles_are_not_stacked():
    mc = Ensemble.from_blobs([blob_of("mlp", 0, dropout=0.5)] * 3, _mc_records(3))
    assert not mc.batchable
    jobs = _jobs()
    for job, got in zip(jobs, run_jobs(mc, jobs)):
        alone = mc.predict(job.inputs, **job.options)  # seeded masks: exactly the same answer
        assert got.labels.tolist() == alone.labels.tolist()
        assert torch.equal(got.probabilities, alone.probabilities)


def test_batcher_stacks_requests_that_wait(ensemble):
    """While a forward runs, arriving requests queue; the next forward takes them all."""
    batcher = Batcher(ensemble, "t", max_rows=1024, wait_s=0.0)
    gate, started = threading.Event(), threading.Event()
    forward = ensemble.forward

    def held(t):
        started.set()
        assert gate.wait(10)
        return forward(t)

    ensemble.forward = held
    try:
        first = batcher.submit(np.zeros((1, 64), np.float32), {"method": "mean"})
        assert started.wait(10)
        jobs = _jobs(1)
        futures = [batcher.submit(j.inputs, j.options) for j in jobs]
        gate.set()
        results = [f.result(10) for f in futures]
        first.result(10)
    finally:
        del ensemble.forward
    assert (batcher.batches, batcher.requests) == (2, 1 + len(jobs))  # the six waiting requests: one forward
    for job, got in zip(jobs, results):
        assert_same(got, ensemble.predict(job.inputs, **job.options))


def test_batcher_respects_max_rows_and_disabled(ensemble):
    # rows 1 | 1 3 2 5 1 4 waiting: at most 8 rows a forward, in arrival order -> 1 | 1+3+2 | 5+1 | 4
    for enabled, max_rows, expected in ((True, 8, [1, 6, 6, 4]), (False, 1024, [1] + [r["rows"] for r in REQUESTS])):
        batcher = Batcher(ensemble, "t", max_rows=max_rows, wait_s=0.0, enabled=enabled)
        gate = threading.Event()
        forward = ensemble.forward
        sizes = []
        ensemble.forward = lambda t: (gate.wait(10), sizes.append(len(t)), forward(t))[2]
        try:
            first = batcher.submit(np.zeros((1, 64), np.float32), {"method": "mean"})
            time.sleep(0.05)
            futures = [batcher.submit(j.inputs, j.options) for j in _jobs(2)]
            gate.set()
            [f.result(10) for f in [first, *futures]]
        finally:
            del ensemble.forward
        assert sizes == expected and batcher.batches == len(expected), (enabled, sizes)


def test_batcher_waits_only_under_concurrent_load(ensemble):
    batcher = Batcher(ensemble, "t", max_rows=1024, wait_s=0.5)
    t0 = time.monotonic()
    for _ in range(3):  # a lone client: never waits
        batcher.submit(np.zeros((1, 64), np.float32), {"method": "mean"}).result(10)
    assert time.monotonic() - t0 < 0.5 and batcher.batches == 3


def test_predict_options_are_what_ensemble_predict_takes():
    assert predict_options({"method": "vote", "weights": None, "return_members": True, "inputs": [1],
                            "something_else": 1}) == {"method": "vote", "weights": None, "return_members": True}


def test_failed_forward_fails_every_request_in_it(ensemble):
    jobs = _jobs()

    def broken(t):
        raise RuntimeError("device lost")

    ensemble.forward = broken
    try:
        outcomes = run_jobs(ensemble, jobs)
    finally:
        del ensemble.forward
    assert all(isinstance(o, RuntimeError) for o in outcomes)


@pytest.mark.slow
def test_concurrent_http_requests_share_a_forward_and_get_their_unbatched_answers(store):
    """Different requests sent at once to a real uvicorn server: while one forward runs, the others
    queue and then share one forward; every answer equals that request's unbatched answer."""
    import httpx
    import uvicorn

    from ensemble_service.api import Settings, create_app
    from test_api import _free_port

    app = create_app(store["uri"], Settings(preload=True, batch_wait_ms=0))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    le = app.state.store.get("alpha")
    ens, batcher = le.ensemble, le.batcher
    gate, started = threading.Event(), threading.Event()
    forward = ens.forward

    def held(t):
        started.set()
        assert gate.wait(20)
        return forward(t)

    url = f"http://127.0.0.1:{port}/v1/ensembles/alpha/predict"
    bodies = [{"inputs": (torch.rand(r["rows"], 64, generator=torch.Generator().manual_seed(i)) * 3).tolist(),
               **{k: v for k, v in r.items() if k != "rows"}} for i, r in enumerate(REQUESTS)]
    answers = [None] * len(bodies)

    def send(i):
        with httpx.Client(timeout=30) as c:
            answers[i] = c.post(url, json=bodies[i])

    ens.forward = held
    try:
        first = threading.Thread(target=send, args=(0,))
        first.start()
        assert started.wait(20)
        before = (batcher.batches, batcher.requests)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(1, len(bodies))]
        for t in threads:
            t.start()
        while len(batcher._queue) < len(threads):  # every other request is waiting for the forward
            assert time.monotonic() < deadline + 30
            time.sleep(0.01)
        gate.set()
        for t in [first, *threads]:
            t.join(30)
    finally:
        del ens.forward
        server.should_exit = True
        thread.join(10)
    assert (batcher.batches - before[0], batcher.requests - before[1]) == (1, len(threads))
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        alone = ens.predict(np.asarray(body["inputs"]), **{k: v for k, v in body.items() if k != "inputs"})
        got = r.json()
        assert got["labels"] == alone.labels.tolist() and got["agreement"] == alone.agreement.tolist()
        np.testing.assert_allclose(got["probabilities"], alone.probabilities.numpy(), rtol=1e-6, atol=1e-7)
        assert ("members" in got) == body["return_members"]


# ----------------------------------------------------------------- requests from the event loop


def _loop_requests(batcher: Batcher, items, gap: bool):
    """Run ``items`` ((inputs, options) pairs) through ``batcher.predict`` on one event loop: one
    after another (``gap``: each awaited before the next starts) or all in one loop iteration."""
    import asyncio

    async def go():
        if gap:
            return [await batcher.predict(x, o) for x, o in items]
        return await asyncio.gather(*(batcher.predict(x, o) for x, o in items), return_exceptions=True)

    return asyncio.run(go())


def test_a_lone_cheap_request_runs_on_the_event_loop_with_the_same_answer(ensemble):
    jobs = _jobs(3)
    b = Batcher(ensemble, "t", inline_s=10.0)
    got = _loop_requests(b, [(j.inputs, j.options) for j in jobs], gap=True)
    # the first forward has no timing yet: it goes to the thread; every later lone one runs inline
    assert (b.batches, b.requests, b.inline) == (len(jobs), len(jobs), len(jobs) - 1)
    for job, pred in zip(jobs, got):
        alone = ensemble.predict(job.inputs, **job.options)
        assert torch.equal(pred.labels, alone.labels)
        assert torch.allclose(pred.probabilities, alone.probabilities, atol=1e-6)


def test_requests_gathered_in_one_loop_iteration_share_the_threads_forward(ensemble):
    jobs = _jobs(4)
    b = Batcher(ensemble, "t", inline_s=10.0)
    _loop_requests(b, [(jobs[0].inputs, jobs[0].options)], gap=True)   # a timing exists now
    got = _loop_requests(b, [(j.inputs, j.options) for j in jobs], gap=False)
    assert b.inline == 0 and b.batches == 2 and b.requests == 1 + len(jobs)  # all six in one forward
    for job, pred in zip(jobs, got):
        assert torch.equal(pred.labels, ensemble.predict(job.inputs, **job.options).labels)


def test_inline_is_off_at_zero_and_for_forwards_expected_to_take_longer(ensemble):
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32) * 16
    off = Batcher(ensemble, "t", inline_s=0.0)
    _loop_requests(off, [(x, {"method": "mean"})] * 3, gap=True)
    assert (off.batches, off.inline) == (3, 0)
    tight = Batcher(ensemble, "t", inline_s=1e-9)   # any forward takes longer than a nanosecond
    _loop_requests(tight, [(x, {"method": "mean"})] * 3, gap=True)
    assert (tight.batches, tight.inline) == (3, 0)


def test_a_bad_lone_request_on_the_event_loop_fails_with_its_own_error(ensemble):
    b = Batcher(ensemble, "t", inline_s=10.0)
    good = np.zeros((1, 64), np.float32)
    bad = np.zeros((2, 5), np.float32)
    got = _loop_requests(b, [(good, {"method": "mean"})], gap=True)
    assert got[0].labels.shape == (1,)
    got = _loop_requests(b, [(bad, {"method": "mean"})], gap=False)
    assert b.inline == 1 and isinstance(got[0], ServingError)

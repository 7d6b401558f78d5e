"""The served ensemble's forward (serving.Ensemble.forward) against its members run one after another.

- forward_<arch>_batch<B>: 5 members of one architecture (MLP of the endpoint benchmark on 1x8x8,
  LeNet on 1x28x28, ResNet-8 width 16 on 3x32x32; seeded, untrained: the cost is the same), logits
  of a batch of B rows: Ensemble.forward, as `ensemble serve`, `ensemble predict` and the test-split
  evaluation run it (A), against `torch.stack([m(x) for m in members])` on the same modules (B,
  what a user writes by hand, and what torchensemble's VotingClassifier does); `vmapped_s` is the
  members' stacked weights under torch.func.vmap (what the service ran for every batch before
  serving.LOOP_MIN_BATCH), timed in the same alternation, and `path` which one A took.
- softmax_c<C>_rows<R>: the members' probabilities from their logits, aggregation.softmax (A: over a
  classes-first copy on the CPU below 16 classes and from 128 rows) against torch.softmax(dim=-1)
  (B), for 2 and 10 classes over 320 rows (5 members x 64) and 5,120 rows (5 x 1,024).
Each timing is many calls in a row (about 0.2 s), medians of 5 alternating runs; in-process, torch
on BENCH_THREADS threads (default 1). Usage: python bench/bench_forward.py [--quick]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import print_table, save  # noqa: E402

from ensemble_service import aggregation  # noqa: E402
from ensemble_service.artifact import member_blob  # noqa: E402
from ensemble_service.models import create_model  # noqa: E402
from ensemble_service.serving import Ensemble  # noqa: E402

MEMBERS = 5
CASES = [("mlp", (1, 8, 8), {}, (1, 64, 256)), ("lenet", (1, 28, 28), {}, (1, 64, 256)),
         ("resnet", (3, 32, 32), {"width": 16}, (1, 64, 256))]


def ensemble(name, shape, opts) -> Ensemble:
    blobs = []
    for i in range(MEMBERS):
        torch.manual_seed(i)
        blobs.append(member_blob({"name": name, **opts}, shape, 10, create_model(name, shape, 10, **opts)))
    return Ensemble.from_blobs(blobs)


def per_call(fn, budget_s: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 >= budget_s:
            return (time.perf_counter() - t0) / n


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    budget, runs = (0.05, 3) if quick else (0.2, 5)
    entries = {}
    for name, shape, opts, batches in CASES:
        ens = ensemble(name, shape, opts)
        group, modules = ens.groups[0], [m.module for m in ens.members]
        for b in batches if not quick else batches[:2]:
            x = torch.randn(b, *shape)
            sides = {"a": lambda: ens.forward(x), "b": lambda: torch.stack([m(x) for m in modules]),
                     "vmapped": lambda: group._vmapped(group.params, group.buffers, x)}
            times = {k: [] for k in sides}
            with torch.inference_mode():
                for fn in sides.values():
                    fn()
                for _ in range(runs):
                    for k, fn in sides.items():
                        times[k].append(per_call(fn, budget))
                diff = float((ens.forward(x) - sides["b"]()).abs().max())
            a_s, b_s, v_s = (statistics.median(times[k]) for k in ("a", "b", "vmapped"))
            entries[f"forward_{name}_batch{b}"] = {
                "a_s": round(a_s, 7), "b_s": round(b_s, 7), "ratio": round(a_s / b_s, 4),
                "a_runs": [round(t, 7) for t in times["a"]], "b_runs": [round(t, 7) for t in times["b"]],
                "a": f"Ensemble.forward, {MEMBERS} {name} members, batch {b}",
                "b": "the same members one after another (torch.stack of each module's logits)",
                "vmapped_s": round(v_s, 7), "vmapped_vs_loop": round(v_s / b_s, 4),
                "path": "loop" if group.use_loop(x) else "vmapped", "max_abs_diff": diff,
                "threads": torch.get_num_threads()}
            print(f"{name:7} batch {b:4}: forward {a_s * 1e3:8.3f} ms ({entries[f'forward_{name}_batch{b}']['path']}), "
                  f"loop {b_s * 1e3:8.3f} ms, vmapped {v_s * 1e3:8.3f} ms; max |diff| {diff:.1e}", flush=True)
    for c in (2, 10):
        for rows in (320, 5120):
            z = torch.randn(5, rows // 5, c, generator=torch.Generator().manual_seed(0)) * 4
            times = {"a": [], "b": []}
            for _ in range(runs):
                times["a"].append(per_call(lambda: aggregation.softmax(z), budget / 4))
                times["b"].append(per_call(lambda: torch.softmax(z, dim=-1), budget / 4))
            a_s, b_s = statistics.median(times["a"]), statistics.median(times["b"])
            entries[f"softmax_c{c}_rows{rows}"] = {
                "a_s": round(a_s, 8), "b_s": round(b_s, 8), "ratio": round(a_s / b_s, 4),
                "a_runs": [round(t, 8) for t in times["a"]], "b_runs": [round(t, 8) for t in times["b"]],
                "a": f"aggregation.softmax of [5, {rows // 5}, {c}] logits", "b": "torch.softmax(dim=-1), the same",
                "max_abs_diff": float((aggregation.softmax(z) - torch.softmax(z, dim=-1)).abs().max())}
            print(f"softmax {c:2} classes x {rows:5} rows: {a_s * 1e6:7.1f} us vs torch.softmax {b_s * 1e6:7.1f} us",
                  flush=True)
    print_table(entries)
    if not quick:
        save(entries)


if __name__ == "__main__":
    main()

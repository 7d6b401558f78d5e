"""`make bench`: every benchmark in one run, one results file, one table.

Runs each bench script as its own process (one after another, so they never compete for the
2 cores), merges their entries into bench/results.json and prints the table. Every entry is
{"a_s", "b_s", "ratio" = a_s / b_s, "a", "b", ...}: A and B timed alternately in the same
run, medians of at least 3. Usage: python bench/run_all.py [--quick]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import RESULTS, print_table, save  # noqa: E402

SCRIPTS = ["bench_service.py", "bench_strategies.py", "bench_packed.py", "bench_forward.py", "bench_endpoint.py"]
# entry -> (the most its ratio A/B may be, the issue that set it)
TARGETS = {"vs_torchensemble": (0.5, 6), "scaling_4_members": (0.56, 6), "service_overhead": (1.1, 6),
           "snapshot_cost": (1.05, 6), "packed_vs_loop": (0.33, 6),
           "endpoint_npy_vs_inprocess_batch64": (1.3, 13), "endpoint_vs_inprocess_batch64": (3.0, 13),
           "endpoint_throughput_batched": (0.5, 13)}  # batched wall time per request <= half the unbatched
ZERO_ERRORS = ("endpoint_throughput", "endpoint_throughput_batched", "endpoint_throughput_batched_npy",
               "endpoint_ray_serve")


def main() -> int:
    quick = [a for a in sys.argv[1:] if a == "--quick"]
    if RESULTS.exists():
        RESULTS.unlink()  # this run's numbers only
    t0 = time.perf_counter()
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        args = [sys.executable, str(HERE / script)]
        args += [str(HERE / "results_endpoint.json")] if script == "bench_endpoint.py" else quick
        if subprocess.run(args).returncode != 0:
            failed.append(script)
    endpoint = HERE / "results_endpoint.json"
    if endpoint.exists():
        data = json.loads(endpoint.read_text())
        save({r["name"]: {k: v for k, v in r.items() if k != "name"} for r in data["results"] if "a_s" in r})
    entries = json.loads(RESULTS.read_text())["entries"] if RESULTS.exists() else {}
    print(f"\n== all entries ({time.perf_counter() - t0:.0f} s), written to {RESULTS}")
    print_table(entries)
    print("\ntargets, ratio A/B:")
    for name, (target, issue) in TARGETS.items():
        e = entries.get(name)
        verdict = "missing" if e is None else ("met" if e["ratio"] <= target else f"missed by {e['ratio'] - target:+.3f}")
        ratio = "" if e is None else f"{e['ratio']:.3f}"
        print(f"  {name:36} <= {target:<5} {ratio:>8}  {verdict}  (issue {issue})")
    for name in ZERO_ERRORS:
        e = entries.get(name)
        if e is not None:
            print(f"  {name:36} {e['requests_per_s']:.0f} requests/s, p99 {e['p99_ms']:.1f} ms, {e['errors']} errors"
                  f"  {'met' if e['errors'] == 0 else 'missed'} (0 errors)")
        else:
            print(f"  {name:36} missing")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

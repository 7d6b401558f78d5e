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

SCRIPTS = ["bench_service.py", "bench_strategies.py", "bench_packed.py", "bench_endpoint.py"]
TARGETS = {"vs_torchensemble": 0.5, "scaling_4_members": 0.56, "service_overhead": 1.1, "snapshot_cost": 1.05,
           "packed_vs_loop": 0.33, "endpoint_vs_inprocess_batch64": 1.3}


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
    print("\ntargets (issue 6), ratio A/B:")
    for name, target in TARGETS.items():
        e = entries.get(name)
        verdict = "missing" if e is None else ("met" if e["ratio"] <= target else f"missed by {e['ratio'] - target:+.3f}")
        print(f"  {name:28} <= {target:<5} {'' if e is None else e['ratio']:>8}  {verdict}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

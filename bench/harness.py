"""Timing harness shared by the benchmarks: A and B timed alternately, medians, ratios.

Every entry is {"a_s", "b_s", "ratio" = a_s / b_s, "a", "b", ...extra}: both sides are
measured in the same run, alternating A, B, A, B, ... so machine noise hits both alike.
Timings live here, never in tests.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch

RESULTS = Path(__file__).resolve().parent / "results.json"


def machine() -> Dict[str, Any]:
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(), "platform": platform.platform()}


def alternate(a: Callable[[], Any], b: Callable[[], Any], repeats: int = 3, warmup: bool = True) -> Dict[str, Any]:
    """Time a and b alternately `repeats` times each (after one untimed warm-up of each)."""
    if warmup:
        a(), b()
    ta, tb, out_a, out_b = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_a = a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = b()
        tb.append(time.perf_counter() - t0)
    a_s, b_s = statistics.median(ta), statistics.median(tb)
    return {"a_s": round(a_s, 4), "b_s": round(b_s, 4), "ratio": round(a_s / b_s, 4),
            "a_runs": [round(x, 4) for x in ta], "b_runs": [round(x, 4) for x in tb],
            "a_out": out_a, "b_out": out_b}


def entry(timing: Dict[str, Any], a: str, b: str, **extra: Any) -> Dict[str, Any]:
    e = {k: v for k, v in timing.items() if not k.endswith("_out")}
    e.update(a=a, b=b, **extra)
    return e


def save(entries: Dict[str, Dict[str, Any]], path: Path = RESULTS) -> None:
    """Merge entries into bench/results.json (other benchmarks' entries are kept)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("entries", {}).update(entries)
    data["machine"] = machine()
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path.write_text(json.dumps(data, indent=2))


def print_table(entries: Dict[str, Dict[str, Any]]) -> None:
    print(f"{'entry':28} {'A s':>9} {'B s':>9} {'A/B':>7}  A vs B")
    for name, e in entries.items():
        print(f"{name:28} {e['a_s']:9.3f} {e['b_s']:9.3f} {e['ratio']:7.3f}  {e['a']}  vs  {e['b']}")

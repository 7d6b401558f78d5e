"""GPU smoke test and short benchmark, for a machine with one CUDA GPU.

Trains members through the real scheduler (Ray tasks, fractional GPUs) and the real
worker (CUDA training), and prints/writes what it measured:
  1. 8 ResNet-18 members with cluster.gpus_per_member=1 (one at a time on the GPU) vs
     0.25 (four packed on the GPU at once): wall-time ratio, the GPU ids Ray assigned,
     and the most members that ran at once;
  2. one member trained in-process on CUDA vs on all CPU threads: seconds per epoch ratio.
Usage: python bench/gpu_smoke.py [out.json]
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from ensemble_service import scheduler  # noqa: E402
from ensemble_service.config import ClusterConfig  # noqa: E402
from ensemble_service.data import load_dataset  # noqa: E402
from ensemble_service.planning import MemberSpec  # noqa: E402
from workers.member import train_member  # noqa: E402

MODEL = {"name": "resnet", "depth": 18, "width": 16, "batchnorm": True, "dropout": 0.0,
         "init": "kaiming", "activation": "relu"}
OPT = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}


def specs(n: int, epochs: int, tag: str, device: str = "auto"):
    return [MemberSpec(index=i, seed=i, model=MODEL, optimizer=OPT, epochs=epochs, batch_size=128,
                       bagging=False, device=device, checkpoint_path=f"/tmp/gpu_smoke/{tag}/m{i}.ckpt")
            for i in range(n)]


def max_overlap(results) -> int:
    points = sorted([(r.extra["t_start"], 1) for r in results] + [(r.extra["t_end"], -1) for r in results],
                    key=lambda p: (p[0], p[1]))
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "gpu_smoke.json"
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpus": os.cpu_count()}
    print(json.dumps(report), flush=True)
    data = load_dataset("synthetic", synthetic={"n_train": 4096, "n_val": 512, "n_test": 512, "num_classes": 10,
                                                "input_shape": [3, 32, 32]})
    resources = scheduler.connect(ClusterConfig(num_cpus=8, num_gpus=None))
    report["ray_resources"] = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    print("ray:", report["ray_resources"], flush=True)

    runs = {}
    for frac in (1.0, 0.25):
        cluster = ClusterConfig(cpus_per_member=1, gpus_per_member=frac, max_retries=0)
        t0 = time.perf_counter()
        results, failures = scheduler.run_tasks(specs(8, 3, f"g{frac}"), data, cluster)
        wall = time.perf_counter() - t0
        assert not failures, failures
        runs[frac] = {
            "wall_s": round(wall, 2), "max_concurrent": max_overlap(results),
            "devices": sorted({r.device for r in results}),
            "gpu_ids": sorted({",".join(r.extra["gpu_ids"]) for r in results}),
            "mean_test_acc": round(sum(r.metrics["test_acc"] for r in results) / len(results), 4),
            "member_train_s": [round(r.train_seconds, 2) for r in results],
        }
        print(f"gpus_per_member={frac}:", json.dumps(runs[frac]), flush=True)
    report["fractional_gpus"] = {
        "a": "8 members, gpus_per_member=0.25", "b": "8 members, gpus_per_member=1",
        "a_s": runs[0.25]["wall_s"], "b_s": runs[1.0]["wall_s"],
        "ratio": round(runs[0.25]["wall_s"] / runs[1.0]["wall_s"], 3), "runs": {str(k): v for k, v in runs.items()},
    }
    scheduler.shutdown()

    # one member in-process: CUDA vs CPU (all threads), 1 epoch each, after a warm-up epoch
    timing = {}
    for device, threads in (("cuda", 1), ("cpu", os.cpu_count() or 1)):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        spec = specs(1, 1, f"single-{device}", device=device)[0]
        train_member(spec, data, num_threads=threads, gpu_assigned=device == "cuda")  # warm-up
        os.remove(spec.checkpoint_path)
        t0 = time.perf_counter()
        r = train_member(spec, data, num_threads=threads, gpu_assigned=device == "cuda")
        timing[device] = {"epoch_s": round(time.perf_counter() - t0, 3), "threads": threads, "device": r.device}
    if "cuda" in timing:
        report["cuda_vs_cpu_one_epoch"] = {"a": "1 epoch on CUDA", "b": f"1 epoch on CPU ({timing['cpu']['threads']} threads)",
                                           "a_s": timing["cuda"]["epoch_s"], "b_s": timing["cpu"]["epoch_s"],
                                           "ratio": round(timing["cuda"]["epoch_s"] / timing["cpu"]["epoch_s"], 4)}
    print(json.dumps(report, indent=2), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

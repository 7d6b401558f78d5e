"""GPU smoke test and short benchmark, for a machine with one CUDA GPU.

Trains members through the real scheduler (Ray tasks, fractional GPUs) and the real
worker (CUDA training), and prints/writes what it measured:
  1. 8 ResNet-18 members with cluster.gpus_per_member=1 (one at a time on the GPU) vs
     0.25 (four packed on the GPU at once): wall-time ratio, the GPU ids Ray assigned,
     and the most members that ran at once;
  2. one member trained in-process on CUDA vs on all CPU threads: seconds per epoch ratio;
  3. every trajectory strategy (snapshot, SWA, FGE, heads, MC dropout) trained on CUDA;
  4. 8 MLP members packed in one task (torch.func) vs the same 8 one after another, on CUDA.
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
    data = load_dataset("synthetic", **{"n_train": 4096, "n_val": 512, "n_test": 512, "num_classes": 10,
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
    if torch.cuda.is_available():
        report["trajectories_cuda"] = trajectories_on_cuda(data)
        report["packed_vs_loop_cuda"] = packed_on_cuda()
    print(json.dumps(report, indent=2), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)


def trajectories_on_cuda(data):
    from ensemble_service.planning import TrajectorySpec
    from workers.trajectory import train_trajectory

    params = {"snapshot": ({"cycles": 3, "use_last": None}, 3, 6), "swa": ({"swa_start": 4, "swa_lr": 0.01}, 2, 6),
              "fge": ({"pretrain_epochs": 2, "cycles": 2, "cycle_epochs": 2, "lr1": 0.05, "lr2": 0.0005}, 2, 6),
              "heads": ({"heads": 4}, 4, 4), "mc_dropout": ({"samples": 5}, 5, 4)}
    out = {}
    for name, (p, n, epochs) in params.items():
        model = {**MODEL, "dropout": 0.2} if name == "mc_dropout" else MODEL
        spec = TrajectorySpec(index=0, strategy=name, seed=0, model=model, optimizer=OPT, epochs=epochs, batch_size=128,
                              params=p, member_indices=tuple(range(n)), device="cuda",
                              checkpoint_path=f"/tmp/gpu_smoke/traj_{name}.ckpt")
        t0 = time.perf_counter()
        members = train_trajectory(spec, data, gpu_assigned=True)
        out[name] = {"members": len(members), "devices": sorted({m.device for m in members}),
                     "test_acc": [round(m.metrics["test_acc"], 4) for m in members],
                     "wall_s": round(time.perf_counter() - t0, 2)}
        print(name, out[name], flush=True)
    return out


def packed_on_cuda():
    from ensemble_service.planning import PackedSpec
    from workers.packed import train_packed

    digits = load_dataset("digits")
    mlp = {"name": "mlp", "depth": 2, "width": 128, "batchnorm": False, "dropout": 0.0, "init": "default",
           "activation": "relu"}
    adam = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}
    n = iter(range(10**6))

    def members():
        return [MemberSpec(index=i, seed=i, model=mlp, optimizer=adam, epochs=20, batch_size=64, bagging=False,
                           device="cuda", checkpoint_path=f"/tmp/gpu_smoke/p{next(n)}.ckpt") for i in range(8)]

    def packed():
        return train_packed(PackedSpec(index=0, members=tuple(members()), checkpoint_path=f"/tmp/gpu_smoke/pk{next(n)}.ckpt"),
                            digits, gpu_assigned=True)

    def loop():
        return [train_member(m, digits, gpu_assigned=True) for m in members()]

    packed(), loop()  # warm-up
    ta, tb = [], []
    for _ in range(3):
        t0 = time.perf_counter(); a = packed(); ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); b = loop(); tb.append(time.perf_counter() - t0)
    a_s, b_s = sorted(ta)[1], sorted(tb)[1]
    out = {"a": "8 MLP members packed in one task on CUDA, 20 epochs", "b": "the same 8 one after another on CUDA",
           "a_s": round(a_s, 3), "b_s": round(b_s, 3), "ratio": round(a_s / b_s, 3),
           "a_mean_test_acc": round(sum(r.metrics["test_acc"] for r in a) / 8, 4),
           "b_mean_test_acc": round(sum(r.metrics["test_acc"] for r in b) / 8, 4)}
    print("packed_vs_loop_cuda", out, flush=True)
    return out


if __name__ == "__main__":
    main()

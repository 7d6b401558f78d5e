"""GPU throughput: how close a member trained through the service gets to a bare PyTorch loop.

A CIFAR-10-shaped synthetic set (50,000 x 3 x 32 x 32, 10 classes; 5,000 validation images),
ResNet-18 (the project's `model=resnet model.depth=18 model.width=64`), SGD, batch 128, 2 epochs,
on one CUDA GPU. It measures, on the same GPU in one run:

1. one member through the service (`ensemble_service.runner.submit`: embedded Ray, the worker,
   MLflow) vs the same loop written bare in a fresh process (data on the GPU, per epoch a shuffled
   pass and a validation pass, like the worker): images/s of both, and the ratio of the member's
   training seconds to the bare loop's (target <= 1.1); the submit's wall time besides;
2. 4 members with `cluster.gpus_per_member=0.25` (sharing the GPU) vs the same 4 with
   `gpus_per_member=1` (one after another), through the scheduler and worker: the training spans'
   ratio (target <= 0.6);
3. the options, one member each, through the scheduler and worker, with the bare loop alongside:
   `trainer.precision=bf16`, `trainer.channels_last=true`, both; their speed-ups over fp32;
4. the data kept on the GPU (what the worker does with an in-memory set: the training split is
   moved to the member's device once) vs copied from pinned host memory batch by batch, in the
   bare loop: the speed-up of keeping it there.

Writes bench/gpu_throughput_<card>.json (the card's name in the file and its name).
Usage: python bench/gpu_throughput.py [--out FILE] [--smoke] [--steps one_member,shared_gpu,options,data_on_gpu]
(--smoke: a tiny version that runs anywhere, on the CPU too, to check the script itself; --steps: only
these steps, in this order; the bare fp32 loop always runs. On an H200 all four took over 8 minutes:
one_member ~2 min with the cluster's start, shared_gpu ~2 min, options ~3 min, data_on_gpu ~0.5 min.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"n_train": 50000, "n_val": 5000, "n_test": 5000, "width": 64, "epochs": 2, "batch": 128, "members": 4}
SMOKE = {"n_train": 512, "n_val": 128, "n_test": 128, "width": 8, "epochs": 1, "batch": 64, "members": 2}
TARGETS = {"service_vs_bare": 1.1, "shared_vs_sequential": 0.6}
STEPS = ("one_member", "shared_gpu", "options", "data_on_gpu")


def overrides(size, tmp: str, *extra: str):
    return ["data=synthetic", f"data.n_train={size['n_train']}", f"data.n_val={size['n_val']}",
            f"data.n_test={size['n_test']}", "data.input_shape=[3,32,32]", "data.num_classes=10",
            "model=resnet", "model.depth=18", f"model.width={size['width']}", "model.batchnorm=true",
            "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", f"trainer.epochs={size['epochs']}",
            f"trainer.batch_size={size['batch']}", "cluster.cpus_per_member=1", "cluster.gpus_per_member=1",
            "cluster.max_retries=0", f"cluster.storage={tmp}/ck", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            "tracking.register=false", "tracking.experiment=gpu-throughput", *extra]


# --------------------------------------------------------------------------- the bare loop


def bare(size: dict, precision: str, channels_last: bool, data_on_gpu: bool) -> dict:
    """The worker's loop without the service: same model, optimizer, data, batches, validation."""
    import torch
    import torch.nn.functional as F

    from ensemble_service.config import load_config
    from ensemble_service.data import load
    from ensemble_service.models import build_model
    from ensemble_service.optimizers import build_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides(size, tmp))
    data = load(cfg.data)
    torch.set_num_threads(1)  # what the worker sets for cluster.cpus_per_member=1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(dict(cfg.model), data.input_shape, data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), dict(cfg.optimizer))
    x = data.x_train.to(device) if data_on_gpu else data.x_train.pin_memory() if device.type == "cuda" else data.x_train
    y = data.y_train.to(device) if data_on_gpu else data.y_train
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bs, n = cfg.trainer.batch_size, len(x)
    train_s = val_s = 0.0
    for _ in range(cfg.trainer.epochs):
        sync()
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        perm = perm.to(device) if data_on_gpu else perm
        total = torch.zeros((), device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = x[idx], y[idx]
            if not data_on_gpu:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(yb)
        float(total)
        sync()
        t1 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(data.x_val), 1024):
                model(data.x_val[i:i + 1024].to(device)).float().cpu()
        sync()
        train_s += t1 - t0
        val_s += time.perf_counter() - t1
    images = n * cfg.trainer.epochs
    return {"train_s": round(train_s, 3), "val_s": round(val_s, 3), "seconds": round(train_s + val_s, 3),
            "images_per_s": round(images / train_s, 1), "device": str(device)}


def bare_in_fresh_process(size: dict, precision="fp32", channels_last=False, data_on_gpu=True) -> dict:
    """The bare loop in a new Python process: a cold CUDA context, like a Ray worker's."""
    args = [sys.executable, __file__, "--bare", json.dumps([size, precision, channels_last, data_on_gpu])]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- through the service


def span(results) -> float:
    return max(r.extra["t_end"] for r in results) - min(r.extra["t_start"] for r in results)


def scheduled(size: dict, tmp: str, *extra: str):
    """Members through the scheduler and the worker (Ray tasks, the GPU Ray assigns), no MLflow."""
    from ensemble_service import runner, scheduler
    from ensemble_service.config import load_config
    from ensemble_service.planning import plan

    cfg = load_config(overrides(size, tmp, *extra))
    data = runner.load_data(cfg)
    results, failures = scheduler.run_tasks(plan(cfg).tasks, data, cfg.cluster)
    if failures:
        raise RuntimeError(f"members failed: {failures}")
    return results


def member_figures(results, size) -> dict:
    r = results[0]
    images = size["n_train"] * size["epochs"]
    return {"train_seconds": round(r.train_seconds, 3), "images_per_s_incl_val": round(images / r.train_seconds, 1),
            "device": r.device, "test_acc": round(r.metrics["test_acc"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output JSON (default bench/gpu_throughput_<card>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on the CPU too")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated steps to run, of: {', '.join(STEPS)} (default: all)")
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = [x.strip() for x in args.steps.split(",") if x.strip()]
    if not steps or set(steps) - set(STEPS):
        ap.error(f"--steps takes some of: {', '.join(STEPS)}")
    if args.bare:
        size, precision, channels_last, on_gpu = json.loads(args.bare)
        print(json.dumps(bare(size, precision, channels_last, on_gpu)))
        return

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no CUDA GPU here; run on a machine with one (or --smoke to check the script on the CPU)")
    size = SMOKE if args.smoke else FULL
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"gpu": card, "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
              "smoke": bool(args.smoke),
              "setup": {"data": f"synthetic {size['n_train']} x 3 x 32 x 32, 10 classes, {size['n_val']} val",
                        "model": f"resnet depth 18 width {size['width']} (batchnorm)", "optimizer": "sgd lr 0.05 m 0.9",
                        "epochs": size["epochs"], "batch_size": size["batch"]}}

    def show(key, value):
        report[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)

    from ensemble_service import scheduler
    from ensemble_service.config import ClusterConfig

    show("bare_fp32", bare_in_fresh_process(size))
    scheduler.connect(ClusterConfig(num_cpus=min(8, os.cpu_count() or 1), num_gpus=None if not args.smoke else 1))
    with tempfile.TemporaryDirectory() as tmp:
        run = {"one_member": step_one_member, "shared_gpu": step_shared_gpu, "options": step_options,
               "data_on_gpu": step_data_on_gpu}
        for step in steps:
            run[step](size, tmp, report, show)
    scheduler.shutdown()

    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    out = Path(args.out) if args.out else ROOT / "bench" / f"gpu_throughput_{slug}{'_smoke' if args.smoke else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def step_one_member(size, tmp, report, show) -> None:
    """1. one member through the whole service (config, Ray, MLflow) vs the bare loop."""
    from ensemble_service import runner
    from ensemble_service.config import load_config

    t0 = time.perf_counter()
    result = runner.submit(load_config(overrides(size, tmp, "strategy.members=1")))
    wall = time.perf_counter() - t0
    member = result.members[0]
    images = size["n_train"] * size["epochs"]
    service = {"train_seconds": member["train_seconds"], "images_per_s_incl_val": round(images / member["train_seconds"], 1),
               "submit_wall_s": round(wall, 2), "device": member["device"]}
    b = report["bare_fp32"]
    show("one_member", {"service": service, "bare": b,
                        "ratio_service_to_bare": round(member["train_seconds"] / b["seconds"], 3),
                        "target": TARGETS["service_vs_bare"],
                        "met": member["train_seconds"] / b["seconds"] <= TARGETS["service_vs_bare"],
                        "note": "both: train + a validation pass per epoch, cold process; "
                                "bare images_per_s counts training steps only"})


def step_shared_gpu(size, tmp, report, show) -> None:
    """2. members sharing the GPU vs one after another."""
    k = size["members"]
    shared = scheduled(size, tmp, f"strategy.members={k}", "cluster.gpus_per_member=0.25")
    sequential = scheduled(size, tmp, f"strategy.members={k}", "cluster.gpus_per_member=1")
    ratio = span(shared) / span(sequential)
    show("shared_gpu", {"members": k, "shared_span_s": round(span(shared), 2),
                        "sequential_span_s": round(span(sequential), 2), "ratio": round(ratio, 3),
                        "target": TARGETS["shared_vs_sequential"], "met": ratio <= TARGETS["shared_vs_sequential"],
                        "images_per_s_shared": round(k * size["n_train"] * size["epochs"] / span(shared), 1),
                        "images_per_s_sequential": round(k * size["n_train"] * size["epochs"] / span(sequential), 1)})


def step_options(size, tmp, report, show) -> None:
    """3. precision and memory format, one member each, through the scheduler and in the bare loop."""
    b = report["bare_fp32"]
    fp32 = member_figures(scheduled(size, tmp, "strategy.members=1"), size)
    options = {"fp32": {"service": fp32, "bare": b}}
    for name, extra, bare_args in (("bf16", ["trainer.precision=bf16"], ("bf16", False)),
                                   ("channels_last", ["trainer.channels_last=true"], ("fp32", True)),
                                   ("bf16+channels_last", ["trainer.precision=bf16", "trainer.channels_last=true"],
                                    ("bf16", True))):
        svc = member_figures(scheduled(size, tmp, "strategy.members=1", *extra), size)
        bb = bare_in_fresh_process(size, *bare_args)
        options[name] = {"service": svc, "bare": bb,
                         "speedup_service": round(fp32["train_seconds"] / svc["train_seconds"], 3),
                         "speedup_bare": round(b["seconds"] / bb["seconds"], 3)}
        print(f"options.{name}: {json.dumps(options[name])}", flush=True)
    show("options", options)


def step_data_on_gpu(size, tmp, report, show) -> None:
    """4. the data on the GPU (what the worker does) vs copied from pinned host memory per batch."""
    b = report["bare_fp32"]
    host = bare_in_fresh_process(size, data_on_gpu=False)
    show("data_on_gpu", {"on_gpu": b, "from_pinned_host_memory": host,
                         "speedup": round(host["train_s"] / b["train_s"], 3)})


if __name__ == "__main__":
    main()

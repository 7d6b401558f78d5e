"""Issue 14's figures: a selected hyper-ensemble against its pool, and a distilled student against
its teacher and the same architecture trained alone, through the service's own pipeline (embedded
Ray, MLflow in a temporary SQLite store).

    .venv/bin/python bench/bench_lineage.py [--quick] [--out FILE.json]

1. select: three ensembles of different architectures on digits (MLP, LeNet, ResNet-18 width 8),
   4 members each; ``ensemble select --experiment`` over their 12 members (val NLL, at most 20
   picks): the selection's validation NLL against the pool's best member and the whole pool
   averaged, and the test figures.
2. distill: a 5-member CNN1D ensemble on mnist1d (40 epochs); ``ensemble distill`` into one CNN1D
   (100 epochs, T=2, alpha=0.5: the defaults) with its baseline (the same architecture, seed and
   epochs on the labels only): test accuracy, NLL and ECE of teacher, student and baseline, and the forward-time ratio
   (teacher / student over the test split, best of 3, measured in the student's task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from ensemble_service import names, scheduler
    from ensemble_service.config import load_config
    from ensemble_service.distill import distill
    from ensemble_service.hyperensemble import select
    from ensemble_service.runner import submit

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer epochs")
    ap.add_argument("--out", default="")
    ap.add_argument("--root", default="", help="where mnist1d is cached (default: a temporary directory)")
    args = ap.parse_args()
    digits_epochs, m1d_epochs, student_epochs = (3, 5, 10) if args.quick else (15, 40, 100)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        common = [f"tracking.uri={uri}", f"cluster.storage={tmp}/ck", "cluster.num_cpus=2", "trainer.device=cpu"]
        t0 = time.perf_counter()
        try:
            for model in (["model=mlp"], ["model=lenet"], ["model=resnet", "model.width=8"]):
                submit(load_config(["data=digits", *model, "strategy.members=4", f"trainer.epochs={digits_epochs}",
                                    "tracking.experiment=pool", "tracking.register=false", *common]))
            res = select(experiments=["pool"], size=20, metric="val_nll", uri=uri)
            v = res.values
            out["select"] = {
                "pool_size": res.pool_size, "picks_kept": res.best_step,
                "selected": {r["architecture"] + f"#{r['member']}": r["picks"] for r in res.members},
                "val_nll": {"selection": v[names.ENSEMBLE_MEAN_VAL_NLL], "best_member": v[names.BEST_MEMBER_VAL_NLL],
                            "pool_mean": v[names.POOL_MEAN_VAL_NLL]},
                "test_nll": {"selection": v[names.ENSEMBLE_MEAN_TEST_NLL], "pool_mean": v[names.POOL_MEAN_TEST_NLL]},
                "test_acc": {"selection": v[names.ENSEMBLE_MEAN_TEST_ACC], "pool_mean": v[names.POOL_MEAN_TEST_ACC],
                             "best_selected_member": v[names.BEST_MEMBER_TEST_ACC]},
                "test_ece": {"selection": v[names.ENSEMBLE_MEAN_TEST_ECE]},
            }
            print(json.dumps(out["select"], indent=2), flush=True)
            root = args.root or f"{tmp}/data"
            teacher = submit(load_config(["data=mnist1d", f"data.root={root}", "model=cnn1d", "strategy.members=5",
                                          f"trainer.epochs={m1d_epochs}", "tracking.experiment=kd", *common]))
            kd = distill("kd", [f"trainer.epochs={student_epochs}"], uri)
            out["distill"] = {"teacher_members": 5, "teacher_epochs": m1d_epochs, "student_epochs": student_epochs,
                              "comparison": kd.comparison,
                              "forward_time_ratio": kd.forward_time_ratio,
                              "teacher_parent_metrics_nll": teacher.ensemble[names.ENSEMBLE_MEAN_TEST_NLL]}
            print(json.dumps(out["distill"], indent=2), flush=True)
        finally:
            scheduler.shutdown()
        out["wall_seconds"] = time.perf_counter() - t0
        out["load_average"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

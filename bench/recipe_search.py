"""Try training settings for one data set x model pair: how the recipes in conf/recipe/ were found.

Each candidate is a string of Hydra overrides (``"optimizer=sgd optimizer.lr=0.1 trainer.epochs=30
trainer.schedule=cosine"``) composed over ``data=D model=M ~recipe`` exactly as ``ensemble submit``
composes them. Its members are trained in this process, one after the other, with the member
worker of ``ensemble submit`` (``workers/member.py``: same model, optimizer, seeds, data order),
without Ray or MLflow. Candidates are compared on the **validation** split (members' accuracy and
NLL, and the mean ensemble's); the test split is left for ``bench/quality.py``.

    .venv/bin/python bench/recipe_search.py digits mlp --members 2 \\
        "optimizer=adam trainer.epochs=30" "optimizer=sgd optimizer.lr=0.1 trainer.epochs=30 trainer.schedule=cosine"

One JSON line per candidate goes to stdout (and to ``--log``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def try_candidate(data: str, model: str, overrides: list, members: int, threads: int = 1) -> dict:
    import torch

    from ensemble_service import metrics
    from ensemble_service.config import load_config
    from ensemble_service.planning import plan
    from ensemble_service.runner import load_data
    from workers.member import train_member

    torch.set_num_threads(threads)
    cfg = load_config([f"data={data}", f"model={model}", "~recipe", f"strategy.members={members}",
                       "cluster.pack=1", *overrides])
    bundle = load_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.cluster.storage = tmp
        t0 = time.perf_counter()
        results = [train_member(spec, bundle, num_threads=threads) for spec in plan(cfg).tasks]
        seconds = time.perf_counter() - t0
    val = torch.stack([r.val_probs for r in results])
    test = torch.stack([r.test_probs for r in results])
    return {
        "pair": f"{data}_{model}", "overrides": overrides, "members": members, "seconds": round(seconds, 1),
        "val_acc": [round(r.metrics["val_acc"], 4) for r in results],
        "val_nll": [round(r.metrics["val_nll"], 4) for r in results],
        "ens_val_acc": round(metrics.accuracy(val.mean(0), bundle.y_val), 4),
        "ens_val_nll": round(metrics.nll(val.mean(0), bundle.y_val), 4),
        # printed for the record only; recipes are chosen on the validation numbers
        "test_acc": [round(r.metrics["test_acc"], 4) for r in results],
        "ens_test_acc": round(metrics.accuracy(test.mean(0), bundle.y_test), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("candidates", nargs="+", help="one string of Hydra overrides per candidate")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=str(ROOT / "bench" / "recipe_search.jsonl"))
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for cand in args.candidates:
        row = try_candidate(args.data, args.model, cand.split(), args.members, args.threads)
        line = json.dumps(row)
        print(line, flush=True)
        with open(args.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

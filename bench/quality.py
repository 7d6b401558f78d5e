"""``make quality``: what a plain ``ensemble submit data=D model=M strategy.members=5`` gives on every
built-in data set x model pair, with the pair's recipe (conf/recipe/), checked against the floors.

For each pair it runs the service's own pipeline (``config.load_config`` with exactly those three
overrides, then ``runner.submit`` on an embedded Ray cluster, MLflow in a temporary SQLite file,
registration off) and records one member's and the 5-member ensemble's test accuracy and NLL (the
first member, and the worst, best and mean of the five), the ensemble's temperature and calibrated
NLL/ECE, its OOD AUROCs, and the wall time. Floors:

* every member at least the published single-model accuracy where one exists (:data:`PUBLISHED`);
* the ensemble's test NLL below its best member's (the lowest member NLL): the ensemble as served,
  i.e. temperature-scaled where ``calibration=temperature`` (the default) fitted a temperature; the
  table gives the unscaled mean's NLL too. Where every member and
  the ensemble classify every test item right with NLLs below :data:`SEPARABLE_NLL` (the bundled
  ``synthetic`` blobs: 48 test items, separable), the NLLs differ in the fourth decimal and this
  floor is reported as not applicable rather than passed or missed (the best member is right on
  every item with an NLL below it; so is the ensemble).

A pair whose data is not on disk (mnist, fashion_mnist, cifar10 without ``data.root`` holding them)
is listed as not measured, saying why. On a machine with a CUDA GPU each member gets a quarter of one.

Writes ``bench/quality.json`` and ``bench/quality.md`` (the table in README.md) and prints the
table; exits 1 when a measured pair misses a floor.

    .venv/bin/python bench/quality.py                       # every pair
    .venv/bin/python bench/quality.py --pairs digits_mlp mnist1d_cnn1d
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASETS = ("digits", "mnist1d", "synthetic", "mnist", "fashion_mnist", "cifar10")
MODELS = ("mlp", "lenet", "alexnet", "vgg", "resnet", "cnn1d")
MEMBERS = 5
#: published single-model test accuracy (Greydanus 2020, MNIST-1D, table 1)
PUBLISHED = {"mnist1d_cnn1d": 0.94, "mnist1d_mlp": 0.68}
#: below this, every member's and the ensemble's test NLL say "certain and right": the NLL floor does not apply
SEPARABLE_NLL = 0.002


def applicable_pairs():
    """Every built-in (data, model) whose model fits the data's input shape, with the reason otherwise."""
    from ensemble_service.config import ConfigError, load_config

    out = []
    for d in DATASETS:
        for m in MODELS:
            try:
                load_config([f"data={d}", f"model={m}"], check_files=False)
            except ConfigError:
                continue  # e.g. cnn1d on images, lenet on signals
            out.append((d, m))
    return out


def data_missing(data: str) -> str:
    """'' when the data set is on disk (or generated offline), else why not."""
    from ensemble_service import data as data_mod
    from ensemble_service.config import load_config

    cfg = load_config([f"data={data}"], check_files=False)
    try:
        data_mod.check(cfg.data)
    except data_mod.DataError as exc:
        return str(exc)
    return ""


def measure(data: str, model: str, tmp: str, gpu: bool) -> dict:
    from ensemble_service import names, runner
    from ensemble_service.config import load_config
    from ensemble_service.recipes import describe

    plain = [f"data={data}", f"model={model}", f"strategy.members={MEMBERS}"]
    extra = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.experiment=quality", f"cluster.storage={tmp}/ck",
             "tracking.register=false"]
    if gpu:
        extra += ["cluster.gpus_per_member=0.25"]
    cfg = load_config(plain + extra)
    t0 = time.perf_counter()
    result = runner.submit(cfg)
    wall = time.perf_counter() - t0
    e, members = result.ensemble, sorted(result.members, key=lambda r: r["member"])
    accs, nlls = [r["test_acc"] for r in members], [r["test_nll"] for r in members]
    floor = PUBLISHED.get(f"{data}_{model}")
    # the ensemble as `ensemble serve` and the pyfunc model answer: scaled by its temperature when it has one
    served_nll = e.get(names.ENSEMBLE_CALIBRATED_TEST_NLL, e[names.ENSEMBLE_MEAN_TEST_NLL])
    return {
        "pair": f"{data}_{model}", "command": "ensemble submit " + " ".join(plain), "recipe": describe(cfg.recipe),
        "members": len(members),
        "member_acc": accs[0], "member_nll": nlls[0],
        "member_acc_min": min(accs), "member_acc_mean": sum(accs) / len(accs), "member_acc_max": max(accs),
        "member_nll_min": min(nlls), "member_nll_mean": sum(nlls) / len(nlls),
        "ensemble_acc": e[names.ENSEMBLE_MEAN_TEST_ACC], "ensemble_nll": e[names.ENSEMBLE_MEAN_TEST_NLL],
        "ensemble_ece": e[names.ENSEMBLE_MEAN_TEST_ECE],
        "temperature": e.get(names.ENSEMBLE_TEMPERATURE), "calibrated_nll": e.get(names.ENSEMBLE_CALIBRATED_TEST_NLL),
        "calibrated_ece": e.get(names.ENSEMBLE_CALIBRATED_TEST_ECE),
        "ood_auroc_entropy": e.get(names.OOD_AUROC_ENTROPY), "ood_auroc_mi": e.get(names.OOD_AUROC_MI),
        "train_seconds_total": sum(r["train_seconds"] for r in members), "wall_seconds": wall,
        "published_acc": floor, "served_nll": served_nll,
    }


def with_floors(r: dict) -> dict:
    """``r`` (a measured pair) with its floor verdicts: ``floor_member_acc`` (None: no published
    figure) and ``floor_ensemble_nll`` (None: the best member is already right on every test item
    with an NLL under SEPARABLE_NLL, as is the ensemble, so there is nothing for it to improve)."""
    separable = (r["member_acc_min"] == 1.0 and r["ensemble_acc"] == 1.0 and r["member_nll_min"] < SEPARABLE_NLL)
    return {**r, "floor_member_acc": None if r["published_acc"] is None else r["member_acc_min"] >= r["published_acc"],
            "floor_ensemble_nll": None if separable else r["served_nll"] < r["member_nll_min"]}


def _f(v, digits=4):
    return "" if v is None else f"{v:.{digits}f}"


def table(rows) -> str:
    head = ("| pair | recipe | member acc (first; min-max of 5) | member NLL (first; best) | ensemble acc | "
            "ensemble NLL (mean) | T | served NLL (at T) | OOD AUROC (H / MI) | floors | time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['pair']} | | not measured: {r['skipped']} | | | | | | | | |")
            continue
        floors = []
        if r["floor_member_acc"] is not None:
            floors.append(f"members >= {r['published_acc']:.2f}: {'yes' if r['floor_member_acc'] else 'NO'}")
        if r["floor_ensemble_nll"] is None:
            floors.append(f"NLL: n/a (all right, best member's NLL < {SEPARABLE_NLL})")
        else:
            floors.append(f"served NLL < best member's: {'yes' if r['floor_ensemble_nll'] else 'NO'}")
        recipe = r["recipe"].split(": ", 1)[1] if ": " in r["recipe"] else r["recipe"]
        lines.append(
            f"| {r['pair']} | {recipe} | {_f(r['member_acc'])} ({_f(r['member_acc_min'])}-{_f(r['member_acc_max'])}) | "
            f"{_f(r['member_nll'])}; {_f(r['member_nll_min'])} | {_f(r['ensemble_acc'])} | {_f(r['ensemble_nll'])} | "
            f"{_f(r['temperature'], 2)} | {_f(r['calibrated_nll'])} | {_f(r['ood_auroc_entropy'], 3)} / "
            f"{_f(r['ood_auroc_mi'], 3)} | {'; '.join(floors)} | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="*", help="only these pairs (data_model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "quality.json"))
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: re-judge the floors of the pairs in --out and rewrite it and its table")
    args = ap.parse_args()
    if args.table_only:
        report = json.loads(Path(args.out).read_text())
        report["pairs"] = [r if "skipped" in r else with_floors(r) for r in report["pairs"]]
        return write(report, args.out, report["total_seconds"])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from ensemble_service import scheduler

    gpu = torch.cuda.is_available()
    rows, t0 = [], time.perf_counter()
    try:
        for data, model in applicable_pairs():
            pair = f"{data}_{model}"
            if args.pairs and pair not in args.pairs:
                continue
            missing = data_missing(data)
            if missing:
                rows.append({"pair": pair, "skipped": f"data not on disk ({missing.split(';')[0]})"})
                print(f"{pair}: not measured: {rows[-1]['skipped']}", flush=True)
                continue
            with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
                rows.append(with_floors(measure(data, model, tmp, gpu)))
            r = rows[-1]
            print(f"{pair}: members {r['member_acc_min']:.4f}-{r['member_acc_max']:.4f} (NLL best "
                  f"{r['member_nll_min']:.4f}), ensemble {r['ensemble_acc']:.4f} (NLL {r['ensemble_nll']:.4f}), "
                  f"{r['wall_seconds']:.0f} s", flush=True)
    finally:
        scheduler.shutdown()
    total = time.perf_counter() - t0
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name(0)}"
                                                                           if gpu else ", no GPU"),
              "torch": torch.__version__, "members": MEMBERS, "total_seconds": total, "pairs": rows}
    return write(report, args.out, total)


def write(report: dict, out: str, total: float) -> int:
    """Write the report and its table (``out`` and ``out`` with .md); print the table; 1 when a floor is missed."""
    rows = report["pairs"]
    measured = [r for r in rows if "skipped" not in r]
    failed = [r["pair"] for r in measured if r["floor_ensemble_nll"] is False or r["floor_member_acc"] is False]
    report["floors_missed"] = failed
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    md = table(rows)
    Path(out).with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"{len(measured)} pairs measured, {len(rows) - len(measured)} not measured, {total:.0f} s in all; "
          f"floors missed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

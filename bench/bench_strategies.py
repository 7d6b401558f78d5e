"""Cost of the cheap ensembles against what they replace, measured in one run.

- snapshot_cost: a snapshot ensemble (T=1, M=5) of cnn1d on mnist1d, 50 epochs (A), vs one
  single run of the same 50 epochs with the same SGD settings (B); plus each one's test NLL
  and the snapshot ensemble's NLL against its own last snapshot.
- heads_cost: 5 classifier heads on one shared backbone trained together (A) vs 5
  independent members of the same model and epochs trained back to back (B).
Both in-process on one thread (no Ray): they measure the training itself.
Usage: python bench/bench_strategies.py [--quick]
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import alternate, entry, print_table, save  # noqa: E402

from ensemble_service import metrics  # noqa: E402
from ensemble_service.aggregation import mean  # noqa: E402
from ensemble_service.data import load_dataset  # noqa: E402
from ensemble_service.planning import MemberSpec, TrajectorySpec  # noqa: E402
from workers.member import train_member  # noqa: E402
from workers.trajectory import train_trajectory  # noqa: E402

MODEL = {"name": "cnn1d", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
         "depth": None, "width": None}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", root=os.environ.get("ENSEMBLE_DATA", "./data"))
    epochs = 10 if quick else 50
    tmp = tempfile.mkdtemp()
    counter = iter(range(10**6))

    def snapshot():
        spec = TrajectorySpec(index=0, strategy="snapshot", seed=0, model=MODEL, optimizer=SGD, epochs=epochs,
                              batch_size=64, params={"cycles": 5, "use_last": None}, member_indices=tuple(range(5)),
                              device="cpu", checkpoint_path=f"{tmp}/s{next(counter)}.ckpt")
        return train_trajectory(spec, data)

    def single():
        spec = MemberSpec(index=0, seed=0, model=MODEL, optimizer=SGD, epochs=epochs, batch_size=64, bagging=False,
                          device="cpu", checkpoint_path=f"{tmp}/m{next(counter)}.ckpt")
        return train_member(spec, data)

    t = alternate(snapshot, single)
    members = t["a_out"]
    ens = mean(torch.stack([m.test_probs for m in members]))
    snap = entry(t, f"snapshot ensemble T=1 M=5, cnn1d on mnist1d, {epochs} epochs (in-process, 1 thread)",
                 f"one single run, same {epochs} epochs and SGD settings",
                 ensemble_test_nll=round(metrics.nll(ens, data.y_test), 4),
                 last_snapshot_test_nll=round(members[-1].metrics["test_nll"], 4),
                 single_run_test_nll=round(t["b_out"].metrics["test_nll"], 4),
                 ensemble_test_acc=round(metrics.accuracy(ens, data.y_test), 4),
                 single_run_test_acc=round(t["b_out"].metrics["test_acc"], 4))

    head_epochs = 6 if quick else 30
    adam = {"name": "adam", "lr": 0.003, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}

    def heads():
        spec = TrajectorySpec(index=0, strategy="heads", seed=0, model=MODEL, optimizer=adam, epochs=head_epochs,
                              batch_size=64, params={"heads": 5}, member_indices=tuple(range(5)), device="cpu",
                              checkpoint_path=f"{tmp}/h{next(counter)}.ckpt")
        return train_trajectory(spec, data)

    def independent():
        return [train_member(MemberSpec(index=i, seed=i, model=MODEL, optimizer=adam, epochs=head_epochs,
                                        batch_size=64, bagging=False, device="cpu",
                                        checkpoint_path=f"{tmp}/i{next(counter)}.ckpt"), data) for i in range(5)]

    t = alternate(heads, independent)

    def ens_acc(rs):
        return round(metrics.accuracy(mean(torch.stack([r.test_probs for r in rs])), data.y_test), 4)

    head = entry(t, f"5 heads on one cnn1d backbone, {head_epochs} epochs (in-process, 1 thread)",
                 f"5 independent cnn1d members, {head_epochs} epochs each, back to back",
                 heads_ensemble_test_acc=ens_acc(t["a_out"]), independent_ensemble_test_acc=ens_acc(t["b_out"]))
    entries = {"snapshot_cost": snap, "heads_cost": head}
    print_table(entries)
    for name, e in entries.items():
        print(name, {k: v for k, v in e.items() if k.endswith(("nll", "acc"))})
    save(entries)


if __name__ == "__main__":
    main()

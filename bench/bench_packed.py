"""Packed members (cluster.pack=K) against the same members trained one after another.

- packed_vs_loop: 8 MLP members (depth 2, width 128) on digits, Adam 1e-3, batch 64, 20 epochs,
  trained as one stacked model in one task with ``workers.packed.train_packed`` (A) vs the same 8
  MemberSpecs trained one after another with ``workers.member.train_member`` in one process (B);
  plus each side's mean member test accuracy and the largest test-probability difference
  between a packed member and its solo twin. Both in-process on one thread (no Ray): they measure
  the training itself (checkpoints and per-epoch validation included on both sides).
Usage: python bench/bench_packed.py [--quick]
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import alternate, entry, print_table, save  # noqa: E402

from ensemble_service.data import load_dataset  # noqa: E402
from ensemble_service.planning import MemberSpec, PackedSpec  # noqa: E402
from workers.member import train_member  # noqa: E402
from workers.packed import train_packed  # noqa: E402

MODEL = {"name": "mlp", "batchnorm": False, "dropout": 0.0, "init": "default", "activation": "relu",
         "depth": 2, "width": 128}
ADAM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}
K = 8


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    data = load_dataset("digits")
    epochs = 5 if quick else 20
    tmp = tempfile.mkdtemp()
    counter = iter(range(10**6))

    def members():
        run = next(counter)
        return [MemberSpec(index=i, seed=i, model=MODEL, optimizer=ADAM, epochs=epochs, batch_size=64,
                           bagging=False, device="cpu", checkpoint_path=f"{tmp}/r{run}_m{i}.ckpt")
                for i in range(K)]

    def packed():
        return train_packed(PackedSpec(index=0, members=tuple(members()),
                                       checkpoint_path=f"{tmp}/p{next(counter)}.ckpt"), data)

    def loop():
        return [train_member(m, data) for m in members()]

    t = alternate(packed, loop)
    a, b = t["a_out"], t["b_out"]
    acc = lambda rs: round(sum(r.metrics["test_acc"] for r in rs) / len(rs), 4)  # noqa: E731
    diff = max(float((x.test_probs - y.test_probs).abs().max()) for x, y in zip(a, b))
    entries = {"packed_vs_loop": entry(
        t, f"{K} mlp members (depth 2, width 128) packed in one task, digits, Adam 1e-3, batch 64, "
           f"{epochs} epochs (in-process, 1 thread)",
        f"the same {K} members trained one after another with train_member",
        members=K, epochs=epochs, a_mean_test_acc=acc(a), b_mean_test_acc=acc(b),
        max_test_prob_diff=round(diff, 8), target_ratio=0.33)}
    print_table(entries)
    e = entries["packed_vs_loop"]
    print(f"mean member test acc: packed {e['a_mean_test_acc']}, loop {e['b_mean_test_acc']}; "
          f"max |test_probs packed - solo| = {diff:.2e}")
    if not quick:
        save(entries)


if __name__ == "__main__":
    main()

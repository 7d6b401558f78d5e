"""The service against doing it by hand, measured side by side in one run (warm Ray cluster).

- vs_torchensemble: 5 MLPs on digits, 50 epochs each, batch 64, Adam 1e-3, through
  `ensemble submit`'s code path (Ray tasks, MLflow logging) (A) vs torchensemble's
  VotingClassifier with its defaults (n_jobs=None, cuda=False) (B); plus each one's test accuracy.
- scaling_4_members: 4 cnn1d members on mnist1d as 4 Ray tasks on 2 CPUs (A) vs the same 4
  trainings back to back in a bare PyTorch loop (B). 2 cores give at best 0.5.
- service_overhead: one member through the service, Ray task and MLflow logging included (A),
  vs the same bare loop (B).
Usage: python bench/bench_service.py [--quick]
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import alternate, entry, print_table, save  # noqa: E402

from ensemble_service import metrics, scheduler  # noqa: E402
from ensemble_service.config import ClusterConfig, load_config  # noqa: E402
from ensemble_service.data import load_dataset  # noqa: E402
from ensemble_service.models import create_model  # noqa: E402
from ensemble_service.planning import MemberSpec  # noqa: E402
from ensemble_service.runner import submit  # noqa: E402

DATA_ROOT = os.environ.get("ENSEMBLE_DATA", "./data")
MLP = {"name": "mlp", "depth": 2, "width": 128}
CNN = {"name": "cnn1d"}


def bare_loop(model_cfg, data, epochs: int, batch_size: int, seed: int, lr: float = 1e-3) -> torch.nn.Module:
    """What one writes by hand: the same model, batches and optimizer, nothing else."""
    torch.manual_seed(seed)
    opts = {k: v for k, v in model_cfg.items() if k != "name"}
    model = create_model(model_cfg["name"], data.input_shape, data.num_classes, **opts)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=order)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    uri = f"sqlite:///{tmp}/mlflow.db"
    scheduler.connect(ClusterConfig(num_cpus=2))
    counter = iter(range(10**6))
    entries = {}

    # -- vs_torchensemble ----------------------------------------------------------------
    epochs = 10 if quick else 50
    digits = load_dataset("digits")

    def service_digits(pack: int = 1):
        cfg = load_config([f"cluster.pack={pack}", "data=digits", "model=mlp", "model.depth=2", "model.width=128",
                           "strategy.members=5",
                           f"trainer.epochs={epochs}", "trainer.batch_size=64", "optimizer=adam", "optimizer.lr=0.001",
                           "cluster.cpus_per_member=1", f"tracking.uri={uri}", "tracking.experiment=bench",
                           "tracking.register=false", f"cluster.storage={tmp}/ck{next(counter)}"])
        return submit(cfg)

    def torchensemble_digits():
        from torch.utils.data import DataLoader, TensorDataset
        from torchensemble import VotingClassifier

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = create_model("mlp", digits.input_shape, digits.num_classes, depth=2, width=128)

            def forward(self, x):
                return self.net(x)

        loader = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True)
        ens = VotingClassifier(estimator=Net, n_estimators=5, cuda=False)
        ens.set_optimizer("Adam", lr=1e-3)
        ens.fit(loader, epochs=epochs, save_model=False, log_interval=10**9)
        with torch.no_grad():
            probs = ens(digits.x_test)
        return metrics.accuracy(probs, digits.y_test)

    import logging

    logging.getLogger("torchensemble").setLevel(logging.WARNING)
    for name, pack, how in (("vs_torchensemble", 3, "cluster.pack=3: 2 Ray tasks of 3 and 2 packed members"),
                            ("vs_torchensemble_unpacked", 1, "one Ray task per member, 2 at a time")):
        t = alternate(lambda: service_digits(pack), torchensemble_digits)
        entries[name] = entry(
            t, f"5 MLPs on digits, {epochs} epochs, batch 64, Adam 1e-3, through the service ({how}; MLflow runs)",
            "torchensemble.VotingClassifier, same MLP and settings (n_jobs=None, cuda=False)",
            a_test_acc=round(t["a_out"].ensemble["ensemble_mean_test_acc"], 4), b_test_acc=round(t["b_out"], 4))

    # -- scaling_4_members ---------------------------------------------------------------
    mnist1d = load_dataset("mnist1d", root=DATA_ROOT)
    ep = 5 if quick else 20
    opt = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}

    def four_tasks():
        specs = [MemberSpec(index=i, seed=i, model={**CNN}, optimizer=opt, epochs=ep, batch_size=64, bagging=False,
                            device="cpu", checkpoint_path=f"{tmp}/s{next(counter)}.ckpt") for i in range(4)]
        results, failures = scheduler.run_tasks(specs, mnist1d, ClusterConfig(cpus_per_member=1, max_retries=0))
        assert not failures, failures
        return results

    def four_bare():
        return [bare_loop(CNN, mnist1d, ep, 64, seed=i) for i in range(4)]

    t = alternate(four_tasks, four_bare)
    entries["scaling_4_members"] = entry(t, f"4 cnn1d members on mnist1d, {ep} epochs: 4 Ray tasks on 2 CPUs",
                                         "the same 4 trainings back to back in a bare PyTorch loop (1 thread)")

    # -- service_overhead ----------------------------------------------------------------
    ep_one = 15 if quick else 60

    def one_member_service():
        cfg = load_config(["data=mnist1d", "model=cnn1d", "strategy.members=1", f"trainer.epochs={ep_one}",
                           "trainer.batch_size=64", "optimizer=adam", "optimizer.lr=0.001", f"data.root={DATA_ROOT}",
                           f"tracking.uri={uri}", "tracking.experiment=bench", "tracking.register=false",
                           f"cluster.storage={tmp}/o{next(counter)}"])
        return submit(cfg)

    t = alternate(one_member_service, lambda: bare_loop(CNN, mnist1d, ep_one, 64, seed=0))
    entries["service_overhead"] = entry(
        t, f"one cnn1d member on mnist1d, {ep_one} epochs, through the service (config, Ray task, per-epoch "
           "validation and checkpoint, MLflow runs, metrics, artifacts, plots)", "the same training in a bare PyTorch loop",
        fixed_overhead_s=round(t["a_s"] - t["b_s"], 3))
    print_table(entries)
    print("vs_torchensemble test accuracy:", entries["vs_torchensemble"]["a_test_acc"], "(service) vs",
          entries["vs_torchensemble"]["b_test_acc"], "(torchensemble);",
          "service overhead:", entries["service_overhead"]["fixed_overhead_s"], "s per submission")
    save(entries)
    scheduler.shutdown()


if __name__ == "__main__":
    main()

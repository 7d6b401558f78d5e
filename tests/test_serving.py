"""ensemble_service.serving: members rebuilt from blobs, stacked (vmap) forwards, MC dropout, on-disk layout.

Also holds the helpers the API / registry tests share (`Spec`, `train_members`, `blob_of`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_service import aggregation
from ensemble_service.artifact import ArtifactError, member_blob, member_record, read_member
from ensemble_service.data import load_dataset
from ensemble_service.models import create_model
from ensemble_service.serving import LOOP_MIN_BATCH, Ensemble, ServingError, as_input_tensor
from workers.member import train_member

SHAPES = {"mlp": (1, 8, 8), "lenet": (1, 8, 8), "alexnet": (1, 8, 8), "vgg": (1, 8, 8), "resnet": (1, 8, 8),
          "cnn1d": (1, 40)}
SMALL = {"mlp": {"width": 16, "depth": 1}, "alexnet": {"width": 4}, "vgg": {"width": 4}, "resnet": {"width": 4},
         "cnn1d": {"width": 8}, "lenet": {}}


# --------------------------------------------------------------------------- shared helpers


@dataclass
class Spec:
    """What workers.member.train_member reads from a planning.MemberSpec."""

    index: int
    seed: int
    model: dict
    checkpoint_path: str
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 0.01})
    epochs: int = 1
    batch_size: int = 32
    bagging: bool = False
    device: str = "cpu"
    schedule: str = "constant"
    warmup_epochs: int = 0

    @property
    def architecture(self) -> str:
        return self.model["name"]


def synthetic_data(num_classes: int = 3, input_shape=(1, 8, 8)):
    return load_dataset("synthetic", num_classes=num_classes, input_shape=list(input_shape), n_train=64, n_val=32,
                        n_test=32)


def train_members(tmp: Path, models, data=None, seed0: int = 0):
    """Train one tiny member per model config (1 epoch) in-process; MemberResults."""
    data = data or synthetic_data()
    out = []
    for i, m in enumerate(models):
        spec = Spec(index=i, seed=seed0 + i, model=dict(m), checkpoint_path=str(tmp / f"ckpt-{seed0}-{i}.pt"))
        out.append(train_member(spec, data))
    return out


def infos(results):
    """register_ensemble's member_info from MemberResults (what the runner passes)."""
    return [{"index": r.index, "architecture": r.architecture, "model": r.model, "metrics": r.metrics,
             "extra": r.extra} for r in results]


def blob_of(name: str, seed: int, *, num_classes: int = 3, randomize_bn: bool = True, **opts) -> bytes:
    torch.manual_seed(seed)
    cfg = {"name": name, **SMALL.get(name, {}), **opts}
    model = create_model(cfg["name"], SHAPES[name], num_classes, **{k: v for k, v in cfg.items() if k != "name"})
    if randomize_bn:
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return member_blob(cfg, SHAPES[name], num_classes, model)


def close(got, expected) -> None:
    """Equal up to float32 rounding (BLAS may pick another kernel from one call to the next)."""
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=1e-6, atol=1e-7)


def finished_parent(uri: str, experiment: str, metrics: dict) -> str:
    """A FINISHED parent run with these metrics, as a submit leaves it, to register ensembles under."""
    from ensemble_service import tracking

    tr = tracking.EnsembleTracker(uri, experiment)
    parent = tr.start_parent("parent", {"strategy": {"name": "independent"}},
                             {"ensemble.data": "synthetic", "ensemble.strategy": "independent"})
    tr.log_metrics(parent, metrics)
    tr.end(parent, "FINISHED")
    return parent


def loop_logits(blobs, x):
    """The reference: each member rebuilt by hand and run in a Python loop."""
    outs = []
    for blob in blobs:
        ckpt = torch.load(io.BytesIO(blob), weights_only=True)
        cfg = {k: v for k, v in ckpt["model"].items() if k != "name"}
        m = create_model(ckpt["model"]["name"], ckpt["input_shape"], ckpt["num_classes"], **cfg)
        m.load_state_dict(ckpt["state_dict"])
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    return torch.stack(outs)


# --------------------------------------------------------------------------- stacked forward


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("rows", [5, LOOP_MIN_BATCH + 3])
def test_stacked_forward_equals_member_loop(name, batchnorm, rows):
    blobs = [blob_of(name, s, batchnorm=batchnorm) for s in range(3)]
    ens = Ensemble.from_blobs(blobs)
    assert [g["kind"] for g in ens.describe_groups()] == ["stacked"]
    x = torch.randn(rows, *SHAPES[name])
    torch.testing.assert_close(ens.logits(x), loop_logits(blobs, x), rtol=1e-4, atol=1e-5)
    group = ens.groups[0]
    with torch.inference_mode():  # whichever path ran, the vmapped one gives the same logits
        torch.testing.assert_close(group(x), group._vmapped(group.params, group.buffers, x), rtol=1e-5, atol=1e-6)


def test_on_the_cpu_a_group_runs_vmapped_only_for_small_batches_of_convolutional_members():
    conv = Ensemble.from_blobs([blob_of("lenet", s) for s in range(3)]).groups[0]
    dense = Ensemble.from_blobs([blob_of("mlp", s) for s in range(3)]).groups[0]
    rows = lambda n, device="cpu": torch.empty(n, 1, 8, 8, device=device)  # noqa: E731
    assert (conv.convolutional, dense.convolutional) == (True, False)
    assert [conv.use_loop(rows(n)) for n in (1, LOOP_MIN_BATCH - 1, LOOP_MIN_BATCH, 1000)] == [False, False, True, True]
    assert [dense.use_loop(rows(n)) for n in (1, LOOP_MIN_BATCH, 1000)] == [True, True, True]
    # any other device (CUDA; here the meta device stands in for it) keeps the vmapped forward
    assert not conv.use_loop(rows(1000, "meta")) and not dense.use_loop(rows(1, "meta"))
    ran = []
    vmapped = conv._vmapped
    conv._vmapped = lambda *a: ran.append(a[2].shape[0]) or vmapped(*a)
    with torch.inference_mode():
        conv(torch.randn(4, 1, 8, 8)), conv(torch.randn(LOOP_MIN_BATCH, 1, 8, 8))
    assert ran == [4]


def test_groups_by_architecture_and_keeps_member_order():
    blobs = [blob_of("mlp", 0), blob_of("lenet", 1), blob_of("mlp", 2), blob_of("mlp", 3, width=8),
             blob_of("lenet", 4, batchnorm=True)]
    ens = Ensemble.from_blobs(blobs)
    groups = {(g["architecture"], tuple(g["members"])): g["kind"] for g in ens.describe_groups()}
    assert groups == {("mlp", (0, 2)): "stacked", ("lenet", (1,)): "single", ("mlp", (3,)): "single",
                      ("lenet", (4,)): "single"}
    assert ens.architectures() == {"mlp": 3, "lenet": 2}
    x = torch.randn(7, 1, 8, 8)
    torch.testing.assert_close(ens.logits(x), loop_logits(blobs, x), rtol=1e-4, atol=1e-5)


def test_identical_blobs_still_run_as_separate_members():
    blob = blob_of("mlp", 0)
    ens = Ensemble.from_blobs([blob, blob, blob_of("mlp", 1)])
    x = torch.randn(4, 64)
    z = ens.logits(x)
    torch.testing.assert_close(z[0], z[1])
    assert ens.describe_groups()[0]["members"] == [0, 1, 2]


def test_large_batches_are_chunked():
    ens = Ensemble.from_blobs([blob_of("mlp", s) for s in range(2)])
    x = torch.randn(2100, 64)
    torch.testing.assert_close(ens.logits(x), loop_logits([blob_of("mlp", s) for s in range(2)], x.view(-1, 1, 8, 8)),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("method", aggregation.METHODS)
def test_predict_equals_library_aggregation(method):
    blobs = [blob_of("mlp", s) for s in range(4)]
    records = [member_record(i, "mlp", metrics={"val_acc": 0.5 + 0.1 * i}) for i in range(4)]
    ens = Ensemble.from_blobs(blobs, records)
    x = torch.randn(9, 1, 8, 8)
    z = loop_logits(blobs, x)
    weights = aggregation.weights_from_accuracy([0.5, 0.6, 0.7, 0.8]) if method == "weighted" else None
    ref = aggregation.aggregate(z, method=method, kind="logits", weights=weights)
    got = ens.predict(x, method, return_members=True)
    assert torch.equal(got.labels, ref.labels)
    torch.testing.assert_close(got.probabilities, ref.probabilities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.agreement, ref.agreement)
    torch.testing.assert_close(got.member_probs, z.softmax(-1), rtol=1e-5, atol=1e-6)
    member_labels = got.member_probs.argmax(-1)
    torch.testing.assert_close(got.agreement, (member_labels == got.labels).float().mean(0))


def test_explicit_weights_and_bad_weights():
    ens = Ensemble.from_blobs([blob_of("mlp", s) for s in range(3)])
    x = torch.randn(3, 64)
    z = ens.logits(x)
    ref = aggregation.aggregate(z, "mean", kind="logits", weights=[1.0, 0.0, 3.0])
    torch.testing.assert_close(ens.predict(x, "mean", weights=[1.0, 0.0, 3.0]).probabilities, ref.probabilities)
    for bad in ([1.0, -1.0, 1.0], [1.0, 2.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 1.0]):
        with pytest.raises(ServingError) as e:
            ens.predict(x, "weighted", weights=bad)
        assert e.value.field == "weights"
    with pytest.raises(ServingError) as e:
        ens.predict(x, "median")
    assert e.value.field == "method"
    # without validation accuracies "weighted" falls back to uniform weights
    torch.testing.assert_close(ens.predict(x, "weighted").probabilities, ens.predict(x, "mean").probabilities)


@pytest.mark.parametrize("method", aggregation.METHODS)
def test_an_ensembles_own_weights_apply_to_every_method_unless_the_caller_gives_others(method):
    blobs = [blob_of("mlp", s) for s in range(3)]
    own = [0.5, 0.25, 0.25]   # a selection's pick shares (ensemble select)
    records = [member_record(i, "mlp", metrics={"val_acc": 0.9}, weight=w) for i, w in enumerate(own)]
    ens = Ensemble.from_blobs(blobs, records)
    x = torch.randn(5, 64)
    z = loop_logits(blobs, x)
    ref = aggregation.aggregate(z, method=method, kind="logits", weights=own)
    torch.testing.assert_close(ens.predict(x, method).probabilities, ref.probabilities, rtol=1e-5, atol=1e-6)
    given = aggregation.aggregate(z, method=method, kind="logits", weights=[0.0, 1.0, 1.0])
    torch.testing.assert_close(ens.predict(x, method, weights=[0.0, 1.0, 1.0]).probabilities, given.probabilities,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ArtifactError, match="weight must be a finite number >= 0"):
        member_record(0, "mlp", weight=-1.0)


# --------------------------------------------------------------------------- inputs


def test_inputs_full_or_flattened_shape():
    ens = Ensemble.from_blobs([blob_of("lenet", 0), blob_of("lenet", 1)])
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(ens.logits(x), ens.logits(x.reshape(3, 64)))
    torch.testing.assert_close(ens.logits(x), ens.logits(x.numpy()))
    torch.testing.assert_close(ens.logits(x), ens.logits(x.tolist()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, fragment", [
    ([[1.0, 2.0]], "shape"),
    ([], "empty batch"),
    ([[1.0] * 64, [1.0] * 63], "ragged"),
    ([[float("nan")] * 64], "NaN"),
    ([[float("inf")] * 64], "NaN"),
    ([[1e39] * 64], "NaN"),            # overflows float32
    ([["a"] * 64], "numbers"),
    ([[True] * 64], "real numbers"),
    (3.0, "batch"),
    (None, "missing"),
    ([[{"a": 1}] * 64], "numbers"),
])
def test_bad_inputs_raise_serving_error_naming_the_field(bad, fragment):
    ens = Ensemble.from_blobs([blob_of("mlp", 0)])
    with pytest.raises(ServingError) as e:
        ens.predict(bad)
    assert e.value.field == "inputs"
    assert fragment in str(e.value)


def test_as_input_tensor_accepts_dataframes():
    pd = pytest.importorskip("pandas")
    x = torch.randn(4, 6)
    torch.testing.assert_close(as_input_tensor(pd.DataFrame(x.numpy())), x)


# --------------------------------------------------------------------------- MC dropout


def _mc_records(n, seeds=None):
    return [member_record(s, "mlp", extra={"role": "mc_sample", "sample": s,
                                           "sample_seed": (seeds or [1000 + k for k in range(n)])[s]})
            for s in range(n)]


def test_mc_dropout_members_are_seeded_stochastic_passes():
    blob = blob_of("mlp", 0, dropout=0.5)
    ens = Ensemble.from_blobs([blob] * 4, _mc_records(4))
    assert ens.describe_groups() == [{"kind": "mc_dropout", "architecture": "mlp", "members": [0, 1, 2, 3]}]
    x = torch.randn(6, 64)
    state = torch.get_rng_state()
    z1, z2 = ens.logits(x), ens.logits(x)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.testing.assert_close(z1, z2)  # same seeds, same answer
    assert not torch.allclose(z1[0], z1[1])  # different samples differ
    # pass s == a manual pass with dropout on after torch.manual_seed(seed_s)
    ckpt = read_member(blob)
    m = create_model("mlp", (1, 8, 8), 3, **{k: v for k, v in ckpt["model"].items() if k != "name"})
    m.load_state_dict(ckpt["state_dict"])
    m.train()
    torch.manual_seed(1002)
    with torch.no_grad():
        torch.testing.assert_close(z1[2], m(x.view(6, 1, 8, 8)))
    assert not any(mod.training for mod in ens.members[0].module.modules())  # back in eval mode


def test_mc_dropout_matches_the_trajectory_worker():
    from ensemble_service.models import derive_seed
    from ensemble_service.strategies import mc_dropout_logits
    from workers.state import forward_batches

    blob = blob_of("mlp", 0, dropout=0.3, batchnorm=True)
    seeds = [derive_seed(7, "mc_dropout", s) for s in range(3)]
    ens = Ensemble.from_blobs([blob] * 3, _mc_records(3, seeds))
    ckpt = read_member(blob)
    m = create_model("mlp", (1, 8, 8), 3, **{k: v for k, v in ckpt["model"].items() if k != "name"})
    m.load_state_dict(ckpt["state_dict"])
    x = torch.randn(5, 1, 8, 8)
    ref = mc_dropout_logits(m, x, 3, 7, lambda mod, inputs: forward_batches(mod, inputs, torch.device("cpu")))
    torch.testing.assert_close(ens.logits(x), ref)


def test_mixed_mc_and_stacked_members():
    mc = blob_of("mlp", 0, dropout=0.5)
    plain = [blob_of("mlp", 1), blob_of("mlp", 2)]
    records = [member_record(0, "mlp"), *_mc_records(2), member_record(3, "mlp")]
    records[1]["index"], records[2]["index"] = 1, 2
    ens = Ensemble.from_blobs([plain[0], mc, mc, plain[1]], records)
    kinds = sorted((g["kind"], tuple(g["members"])) for g in ens.describe_groups())
    assert kinds == [("mc_dropout", (1, 2)), ("stacked", (0, 3))]
    x = torch.randn(3, 64)
    z = ens.logits(x)
    torch.testing.assert_close(z[[0, 3]], loop_logits(plain, x.view(3, 1, 8, 8)), rtol=1e-4, atol=1e-5)


def test_members_must_agree_on_shape_and_classes():
    with pytest.raises(ServingError, match="disagree"):
        Ensemble.from_blobs([blob_of("mlp", 0), blob_of("mlp", 1, num_classes=4)])
    with pytest.raises(ServingError, match="at least one"):
        Ensemble.from_blobs([])


def test_trained_members_reproduce_their_test_logits(tmp_path):
    data = synthetic_data()
    results = train_members(tmp_path, [{"name": "mlp", "width": 16, "depth": 1}] * 2 + [{"name": "lenet"}], data)
    ens = Ensemble.from_blobs([r.weights for r in results], [member_record(**i) for i in infos(results)])
    ref = torch.stack([r.test_logits for r in results])
    torch.testing.assert_close(ens.logits(data.x_test), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- CUDA (runs where a GPU is)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ensemble_matches_cpu():
    blobs = [blob_of("resnet", s, batchnorm=True) for s in range(3)] + [blob_of("lenet", 3), blob_of("lenet", 4)]
    mc = blob_of("mlp", 9, dropout=0.5)
    records = [member_record(i, None) for i in range(5)] + _mc_records(3)
    for k, r in enumerate(records):
        r["index"] = k
    all_blobs = blobs + [mc] * 3
    cpu = Ensemble.from_blobs(all_blobs, records)
    gpu = Ensemble.from_blobs(all_blobs, records, device="cuda")
    x = torch.randn(33, 1, 8, 8)
    zc, zg = cpu.logits(x), gpu.logits(x)
    assert zg.device.type == "cpu" and zg.shape == (8, 33, 3)
    # deterministic members agree with the CPU (TF32 convolutions allowed: loose tolerance)
    torch.testing.assert_close(zg[:5], zc[:5], rtol=2e-2, atol=2e-3)
    # MC-dropout members: seeded on the GPU generator; the same answer every time, RNG untouched
    state = torch.cuda.get_rng_state()
    torch.testing.assert_close(gpu.logits(x)[5:], zg[5:])
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert not torch.allclose(zg[5], zg[6])
    for method in aggregation.METHODS:
        p = gpu.predict(x, method, return_members=True)
        assert p.labels.device.type == "cpu" and p.probabilities.shape == (33, 3)
        torch.testing.assert_close(p.probabilities.sum(-1), torch.ones(33), rtol=1e-5, atol=1e-5)

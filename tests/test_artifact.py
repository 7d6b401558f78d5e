"""ensemble_service.artifact: member records, the member checkpoint, the ensemble directory (manifest,
member files, class names, preprocessing, the user's code) and that nothing in it is ever unpickled."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ensemble_service import artifact
from ensemble_service.artifact import ArtifactError, member_record, read_member, write_ensemble_dir
from ensemble_service.serving import Ensemble, ServingError, load_ensemble_dir
from test_serving import _mc_records, blob_of


def test_member_record_mc_seed_sources():
    assert member_record(0, extra={"role": "mc_sample", "sample": 1, "sample_seed": 9, "mc_seed": 5})["sample_seed"] == 9
    from_base = [member_record(s, extra={"role": "mc_sample", "sample": s, "mc_seed": 5})["sample_seed"] for s in range(3)]
    assert len(set(from_base)) == 3  # one seed per pass, never shared
    derived = member_record(0, extra={"role": "mc_sample", "sample": 2}, blob_meta={"mc_dropout": {"seed": 3}})
    from ensemble_service.models import derive_seed

    assert derived["sample_seed"] == derive_seed(3, "mc_dropout", 2)
    assert from_base[1] == derive_seed(5, "mc_dropout", 1)
    with pytest.raises(ArtifactError):
        member_record(0, extra={"role": "mc_sample", "sample": 2})
    with pytest.raises(ArtifactError):
        member_record(0, extra={"role": "mc_sample", "mc_seed": 4})
    rec = member_record(4, "mlp", {"name": "mlp"}, {"val_acc": 0.5, "bad": float("nan"), "flag": True})
    assert rec == {"index": 4, "role": "member", "architecture": "mlp", "model": {"name": "mlp"},
                   "metrics": {"val_acc": 0.5}}


def test_write_and_load_ensemble_dir_round_trip(tmp_path):
    mc = blob_of("mlp", 0, dropout=0.5)
    blobs = [blob_of("lenet", 1), mc, mc, mc]
    records = [member_record(0, "lenet", metrics={"val_acc": 0.9})] + _mc_records(3)
    for k in range(1, 4):
        records[k]["index"] = k
    manifest = write_ensemble_dir(tmp_path / "ens", blobs, records, {"strategy": "mixed", "name": "x"})
    assert manifest["num_members"] == 4 and manifest["input_shape"] == [1, 8, 8] and manifest["num_classes"] == 3
    assert len(list((tmp_path / "ens" / "members").iterdir())) == 2  # MC samples share one file
    on_disk = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert on_disk["members"][1]["file"] == on_disk["members"][3]["file"]
    loaded = load_ensemble_dir(tmp_path / "ens")
    direct = Ensemble.from_blobs(blobs, records)
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded.logits(x), direct.logits(x))
    assert loaded.meta["strategy"] == "mixed"
    assert [m.record["index"] for m in loaded.members] == [0, 1, 2, 3]


def test_manifest_cannot_point_outside_its_directory(tmp_path):
    write_ensemble_dir(tmp_path / "ens", [blob_of("mlp", 0)], [member_record(0, "mlp")])
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    manifest["members"][0]["file"] = "../../etc/passwd"
    (tmp_path / "ens" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServingError, match="outside"):
        load_ensemble_dir(tmp_path / "ens")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_blobs_are_never_unpickled():
    buf = io.BytesIO()
    torch.save({"model": {"name": "mlp"}, "input_shape": [1], "num_classes": 2, "state_dict": {}, "x": _Evil()}, buf)
    with pytest.raises(ArtifactError, match="cannot read member checkpoint"):
        read_member(buf.getvalue())
    with pytest.raises(ArtifactError):
        read_member(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="lacks"):
        buf = io.BytesIO()
        torch.save({"model": {"name": "mlp"}}, buf)
        read_member(buf.getvalue())


def test_class_names_and_preprocessing_travel_in_the_manifest(tmp_path):
    from ensemble_service.data.preprocess import Pipeline

    pipeline = Pipeline((64,), [{"op": "divide", "by": 16.0}, {"op": "reshape", "shape": [1, 8, 8]}])
    meta = {"class_names": ["a", "b", "c"], "preprocessing": pipeline.to_dict()}
    write_ensemble_dir(tmp_path / "ens", [blob_of("mlp", 0)], [member_record(0, "mlp")], meta)
    loaded = load_ensemble_dir(tmp_path / "ens")
    assert loaded.class_names == ["a", "b", "c"] and loaded.pipeline.raw_shape == (64,)
    raw = torch.arange(128, dtype=torch.float32).view(2, 64)
    torch.testing.assert_close(loaded.logits(raw), Ensemble.from_blobs([blob_of("mlp", 0)]).logits(raw / 16))
    with pytest.raises(ArtifactError, match="2 class names for 3 classes"):
        write_ensemble_dir(tmp_path / "bad", [blob_of("mlp", 0)], [member_record(0, "mlp")], {"class_names": ["a", "b"]})


def _user_module(folder, name="usernet", body="import torch\nclass Net(torch.nn.Linear):\n    pass\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(body)
    return folder


def test_user_code_finds_the_users_modules_not_installed_ones(tmp_path, monkeypatch):
    _user_module(tmp_path / "proj")
    pkg = tmp_path / "proj" / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    for name in ("usernet", "userpkg", "userpkg.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # this test's own modules, not another test's
    found = artifact.user_code([{"_target_": "usernet.Net"}, {"_target_": "userpkg.nets.Net",
                                "act": {"_target_": "torch.nn.ReLU"}}, {"_target_": "ensemble_service.models.create_model"}])
    assert found == {"usernet": tmp_path / "proj" / "usernet.py", "userpkg": pkg}  # torch, ours: not shipped
    staged = artifact.stage_code(tmp_path / "code", found)
    assert staged == ["usernet", "userpkg"] and (tmp_path / "code" / "userpkg" / "nets.py").is_file()


def test_an_ensemble_with_user_code_loads_where_the_module_is_not_importable(tmp_path):
    """Written here with the module importable; read in a fresh process elsewhere, where it is not."""
    from ensemble_service.artifact import member_blob

    proj = _user_module(tmp_path / "proj", body=textwrap.dedent("""
        import torch
        class Tiny(torch.nn.Module):
            def __init__(self, input_shape, num_classes):
                super().__init__()
                self.fc = torch.nn.Linear(input_shape[0], num_classes)
            def forward(self, x):
                return self.fc(x)
    """))
    sys.path.insert(0, str(proj))
    sys.modules.pop("usernet", None)
    try:
        import usernet

        torch.manual_seed(0)
        net = usernet.Tiny((4,), 3)
        spec = {"_target_": "usernet.Tiny"}
        blob = member_blob(spec, (4,), 3, net)
        write_ensemble_dir(tmp_path / "ens", [blob], [member_record(0, "Tiny", spec)],
                           code=artifact.user_code([spec]))
        expected = net(torch.ones(2, 4)).softmax(-1).tolist()
    finally:
        sys.path.remove(str(proj))
        sys.modules.pop("usernet", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, sys, torch; from ensemble_service.serving import load_ensemble_dir; "
            f"e = load_ensemble_dir({str(tmp_path / 'ens')!r}); "
            "print(json.dumps(e.predict(torch.ones(2, 4)).probabilities.tolist())); "
            "print(sys.modules['usernet'].__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    probs, origin = proc.stdout.strip().splitlines()[-2:]
    torch.testing.assert_close(torch.tensor(json.loads(probs)), torch.tensor(expected), rtol=0, atol=1e-6)
    assert "ensemble-code-" in origin and str(proj) not in origin  # the shipped copy

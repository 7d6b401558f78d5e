"""How an ensemble reads in the MLflow UI (ensemble_service.runs_view): the saved view checked against
the installed MLflow UI's own bundle (the fields it keeps from a view, the URL parameters it reads),
the URLs, the descriptions and the dataset inputs, with hand-computed expectations."""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
import torch

from ensemble_service import names, runs_view
from ensemble_service.data.base import DataBundle

BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


def js_list(*starting: str) -> list:
    """The JavaScript string array of the installed MLflow UI that starts with ``starting``."""
    pattern = re.compile(r'\[' + re.escape(",".join(json.dumps(s) for s in starting)) + r'(?:,"[A-Za-z]+")*\]')
    for path in sorted(BUNDLE.glob("*.js")):
        found = pattern.findall(path.read_text(errors="replace"))
        if found:
            return json.loads(found[0])
    raise AssertionError(f"no array starting with {starting!r} in {BUNDLE}")


@pytest.fixture(scope="module")
def bundle_text() -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(BUNDLE.glob("*.js")))


def test_the_view_carries_only_what_the_ui_keeps_from_a_saved_view(bundle_text):
    state = runs_view.view_state("20260101-000000-abc", members=5)
    ui_fields = js_list("selectedColumns", "columnOrder")   # what the runs page persists
    facets = js_list("searchFilter", "orderByKey")          # sort and filter
    dropped = js_list("runsExpanded", "runsPinned")         # what a shared view leaves out (row expansion among them)
    assert "columnOrder" in ui_fields and "orderByKey" in facets and "runsExpanded" in dropped
    assert set(state) <= set(ui_fields) | set(facets)
    assert not set(state) & set(dropped)
    # what the URL and the tag are called in this MLflow version
    for text in ('"viewStateShareKey"', '"mlflow.sharedViewState."', '"workflowType"', 'MACHINE_LEARNING="machine_learning"',
                 '"compareRunsMode"', 'e+".`"+t+"`"'):
        assert text in bundle_text, text


def test_the_view_shows_one_ensemble_flat_sorted_by_test_acc_with_its_columns():
    state = runs_view.view_state("it's-7", members=12)
    assert state["searchFilter"] == "tags.`ensemble.id` = 'it''s-7'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`test_acc`", False)
    assert state["selectedColumns"] == [
        "metrics.`test_acc`", "metrics.`test_nll`", "tags.`ensemble.member_index`", "tags.`ensemble.strategy`",
        "attributes.`Dataset`", "attributes.`Models`", "tags.`ensemble.role`", "tags.`ensemble.architecture`"]
    assert state["columnOrder"][:4] == ["attributes.`Run Name`", "runDateAndNestInfo", "metrics.`test_acc`",
                                        "metrics.`test_nll`"]
    assert state["runsHiddenMode"] == "SHOW_ALL"
    charts = state["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in charts] == [
        ("LINE", names.VAL_ACC), ("LINE", names.SIZE_CURVE_ACC), ("BAR", names.TEST_ACC), ("BAR", names.TEST_NLL)]
    assert {c["runsCountToCompare"] for c in charts} == {13}
    sections = {s["uuid"]: s for s in state["compareRunSections"]}
    assert {c["metricSectionId"] for c in charts} == {"ensemble"} and sections["ensemble"]["display"]
    assert [s["name"] for s in state["compareRunSections"]] == ["Ensemble", "Model metrics", "System metrics"]


def test_the_saved_view_is_mlflows_envelope():
    value = runs_view.saved_view("independent-digits-1", "e-1", 3, 1700000000123)
    envelope = json.loads(value)
    assert envelope["name"] == "independent-digits-1" and envelope["createdAt"] == 1700000000123
    assert json.loads(envelope["state"]) == runs_view.view_state("e-1", 3)
    assert len(value) < 20000  # MLflow's limit on an experiment tag's value
    assert runs_view.view_key("2026/01 a:b") == "2026-01-a-b"


def test_urls():
    def parts(url):
        split = urlsplit(url)
        path, _, query = split.fragment.partition("?")
        return f"{split.scheme}://{split.netloc}{split.path}", path, {k: v[0] for k, v in parse_qs(query).items()}

    assert parts(runs_view.runs_url("http://127.0.0.1:5000/", "3", view="k-1")) == (
        "http://127.0.0.1:5000/", "/experiments/3/runs", {"workflowType": "machine_learning", "viewStateShareKey": "k-1"})
    assert parts(runs_view.runs_url("http://h:1", "3", view="k", charts=True))[2]["compareRunsMode"] == "CHART"
    assert parts(runs_view.runs_url("http://h:1", "3", ensemble_id="e'1"))[2] == {
        "workflowType": "machine_learning", "searchFilter": "tags.`ensemble.id` = 'e''1'",
        "orderByKey": "metrics.`test_acc`", "orderByAsc": "false"}
    assert parts(runs_view.runs_url("http://h:1", "3"))[2] == {"workflowType": "machine_learning"}
    assert parts(runs_view.runs_url("http://h:1")) == ("http://h:1/", "/experiments", {"workflowType": "machine_learning"})


TABLE = [{"member": 0, "architecture": "mlp", "seed": 7, "role": "member", "val_acc": 0.9, "test_acc": 0.8125,
          "test_nll": 0.5},
         {"member": 1, "architecture": "lenet", "seed": 8, "role": "member", "val_acc": 0.95, "test_acc": 0.875,
          "test_nll": 0.25}]


def test_parent_description():
    text = runs_view.parent_description(
        strategy="independent", data="digits", model="lenet+mlp", table=TABLE, model_version="demo/versions/4",
        metrics={names.ENSEMBLE_MEAN_TEST_ACC: 0.90625, names.ENSEMBLE_MEAN_TEST_NLL: 0.3, names.ORACLE_TEST_ACC: 0.96875})
    lines = text.splitlines()
    assert lines[0] == "**Ensemble of 2 members** (`independent`, lenet+mlp on digits)"
    assert "| ensemble (mean of the members' probabilities) | 0.9062 | 0.3000 |" in lines
    assert "| best member (member 1) | 0.8750 | 0.2500 |" in lines
    assert "Test accuracy of oracle (any member right) 0.9688." in lines
    assert "| 0 | member | mlp | 7 | 0.9000 | 0.8125 | 0.5000 |" in lines
    assert "| 1 | member | lenet | 8 | 0.9500 | 0.8750 | 0.2500 |" in lines
    assert "`POST /v1/ensembles/demo/versions/4/predict`" in lines[-1] and '"models:/demo/4"' in lines[-1]
    degraded = runs_view.parent_description(strategy="s", data="d", model="m", table=TABLE[:1], metrics={},
                                            degraded="finished with 1 of 2 members")
    assert "*finished with 1 of 2 members*" in degraded and "Serve it" not in degraded


def test_a_large_ensemble_lists_its_first_members_and_points_at_the_table():
    table = [{**TABLE[0], "member": i} for i in range(1000)]
    text = runs_view.parent_description(strategy="independent", data="d", model="mlp", table=table,
                                        metrics={names.ENSEMBLE_MEAN_TEST_ACC: 0.5}, model_version="m/versions/1")
    assert len(text) < 8000 and "| 49 | member |" in text and "| 50 | member |" not in text
    assert "| ... | 950 more members: the run's `members.csv` |" in text and text.splitlines()[-1].startswith("**Serve it**")


def test_member_description():
    assert runs_view.member_description(2, 5, "independent", "mlp", 44, {names.TAG_ROLE: "member"}, bagging=True) == (
        "Member 2 of 5 of a `independent` ensemble: mlp, seed 44, role `member`; "
        "trained on a bootstrap resample of the training split.")
    assert runs_view.member_description(3, 4, "snapshot", "cnn1d", 1, {
        names.TAG_ROLE: "snapshot", names.TAG_TRAJECTORY: "1", names.TAG_CYCLE: "0"}) == (
        "Member 3 of 4 of a `snapshot` ensemble: cnn1d, seed 1, role `snapshot` (trajectory 1, cycle 0).")


def bundle(seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = {s: torch.rand(n, 1, 4, 4, generator=g) for s, n in (("train", 30), ("val", 10), ("test", 12))}
    y = {s: torch.randint(0, 3, (len(x[s]),), generator=g) for s in x}
    return DataBundle("toy", (1, 4, 4), 3, x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], label="toy")


def test_dataset_inputs_name_digest_split_and_shape():
    inputs = runs_view.dataset_inputs(bundle())
    assert [(d["name"], d["context"]) for d in inputs] == [("toy", "train"), ("toy", "validation"), ("toy", "test")]
    assert [json.loads(d["profile"]) for d in inputs] == [
        {"split": s, "num_rows": n, "input_shape": [1, 4, 4], "num_classes": 3} for s, n in (("train", 30), ("val", 10), ("test", 12))]
    spec = json.loads(json.loads(inputs[0]["schema"])["mlflow_tensorspec"]["features"])
    assert spec == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 4, 4]}}]
    digests = [d["digest"] for d in inputs]
    assert len(set(digests)) == 3 and all(len(d) == 10 for d in digests)
    assert [d["digest"] for d in runs_view.dataset_inputs(bundle())] == digests      # the same data, the same digest
    changed = bundle()
    changed.y_val[0] = (changed.y_val[0] + 1) % 3                                     # one label differs
    again = [d["digest"] for d in runs_view.dataset_inputs(changed)]
    assert again[0] == digests[0] and again[2] == digests[2] and again[1] != digests[1]

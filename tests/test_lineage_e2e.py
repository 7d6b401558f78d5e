"""Sweep, select, distill and grow through the `ensemble` command on the session's Ray cluster."""
from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ensemble_service import names
from ensemble_service.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_a_two_by_two_sweep_its_hyper_ensemble_a_student_and_growth(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"tracking.uri={uri}", "tracking.experiment=hyper", f"cluster.storage={tmp_path}/ck",
              "data=synthetic", "strategy.members=2", "trainer.epochs=2", "trainer.batch_size=16"]
    res = runner.invoke(app, ["submit", "--multirun", "model=mlp,lenet", "optimizer.lr=0.01,0.003", *common])
    assert res.exit_code == 0, res.output
    tag = re.search(r"sweep tag: (sweep-\S+)", res.output).group(1)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hyper").experiment_id
    parents = client.search_runs([exp], f"tags.`{names.TAG_SWEEP}` = '{tag}'")
    assert len(parents) == 4 and {p.info.status for p in parents} == {"FINISHED"}
    combos = sorted((p.data.tags[names.TAG_MODEL], p.data.params["optimizer.lr"]) for p in parents)
    assert combos == [("lenet", "0.003"), ("lenet", "0.01"), ("mlp", "0.003"), ("mlp", "0.01")]

    res = runner.invoke(app, ["select", "--sweep", tag, "--size", "6", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "Selected from a pool of 8 members" in res.output and "registered model: hyper-selected/versions/1" in res.output
    sel = client.search_runs([exp], f"tags.`{names.TAG_STRATEGY}` = '{names.STRATEGY_SELECTION}'")[0]
    m = sel.data.metrics
    assert m[names.POOL_SIZE] == 8
    assert m[names.ENSEMBLE_MEAN_VAL_NLL] <= min(m[names.BEST_MEMBER_VAL_NLL], m[names.POOL_MEAN_VAL_NLL]) + 1e-12
    assert sel.data.tags[names.TAG_SELECTED_FROM] == f"sweep={tag}"

    # the selection (weighted) as the teacher of a student on Ray
    res = runner.invoke(app, ["distill", "hyper-selected", "model=mlp", "+model.width=8", "trainer.epochs=2",
                              "--tracking-uri", uri, "--temperature", "2", "--alpha", "0.5"])
    assert res.exit_code == 0, res.output
    assert "registered model: hyper-selected-distilled/versions/1" in res.output
    student = client.search_runs([exp], f"tags.`{names.TAG_KIND}` = '{names.KIND_STUDENT}'")[0]
    assert student.info.status == "FINISHED" and student.data.tags[names.TAG_DISTILLED_FROM] == sel.info.run_id
    assert student.data.metrics[names.TEACHER_TEST_NLL] == pytest.approx(m[names.ENSEMBLE_MEAN_TEST_NLL], abs=1e-5)

    # one of the sweep's ensembles grown by one member on Ray
    res = runner.invoke(app, ["grow", "hyper/versions/1", "--members", "1", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "registered model: hyper/versions/5" in res.output
    grown = client.search_runs([exp], f"tags.`{names.TAG_GROWN_FROM_VERSION}` = 'hyper/versions/1'")[0]
    assert grown.data.tags[names.TAG_MEMBERS] == "3" and names.TAG_SWEEP not in grown.data.tags
    table = json.loads(open(client.download_artifacts(grown.info.run_id, names.MEMBER_TABLE_JSON, str(tmp_path))).read())
    assert [r["seed"] for r in table] == [0, 1, 2]
    assert not client.search_runs([exp], "attributes.status != 'FINISHED'")

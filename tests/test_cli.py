"""The `ensemble` command: --help, bad input without Ray or MLflow, and subprocess exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble_service.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["submit"], ["runs"], ["ui"]])
def test_help(cmd):
    result = runner.invoke(app, cmd + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


BAD = [
    ["data=nope"], ["model=nope"], ["strategy=nope"], ["optimizer=nope"], ["strategy.members=0"],
    ["optimizer.lr=-1"], ["trainer.epochs"], ["data=cifar10", "data.root=/does/not/exist"],
    ["model=vgg", "model.depth=7"], ["cluster.gpus_per_member=-1"],
]


@pytest.mark.parametrize("overrides", BAD, ids=[" ".join(b) for b in BAD])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import ray

    ray_was_up = ray.is_initialized()
    result = runner.invoke(app, ["submit", *overrides, f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.db").exists()      # no MLflow store touched, so no run
    assert ray.is_initialized() == ray_was_up  # submit started no Ray


def test_subprocess_bad_input_is_exit_2_on_stderr(tmp_path):
    exe = Path(sys.executable).parent / "ensemble"
    proc = subprocess.run([str(exe), "submit", "data=imagenet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown data 'imagenet'; choose one of: arrays, cifar10, csv, custom, digits, fashion_mnist, image_folder, mnist, mnist1d, synthetic" in proc.stderr
    assert not list(tmp_path.iterdir())  # no mlflow.db, no checkpoints

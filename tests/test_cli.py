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
    assert "unknown data 'imagenet'; choose one of: arrays, cifar10, csv, custom, digits, fashion_mnist, image_folder, mnist, mnist1d, parquet, synthetic" in proc.stderr
    assert not list(tmp_path.iterdir())  # no mlflow.db, no checkpoints


# -- `ensemble runs` reads, and only reads --------------------------------------------------


def test_runs_on_a_missing_store_says_so_and_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/nonexistent/dir/x.db"
    result = runner.invoke(app, ["runs", "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: no MLflow tracking store at {tmp_path}/nonexistent/dir/x.db")
    assert "no ensembles yet" not in result.output
    assert list(tmp_path.iterdir()) == []


def _store_with_parents(tmp_path, n: int = 2) -> str:
    from ensemble_service.tracking import EnsembleTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for k in range(n):
        t = EnsembleTracker(uri, "listed")
        p = t.start_parent(f"independent-digits-20261128-05350{k}", {"strategy": {"name": "independent"}},
                           {"ensemble.strategy": "independent", "ensemble.data": "digits",
                            "ensemble.model": "mlp+lenet", "ensemble.members": "5"})
        t.log_metrics(p, {"ensemble_mean_test_acc": 0.9712 + k / 10000, "ensemble_vote_test_acc": 0.96,
                          "best_member_test_acc": 0.95, "ensemble_mean_test_nll": 0.1234})
        t.end(p)
    return uri


def test_runs_names_an_unknown_experiment(tmp_path):
    uri = _store_with_parents(tmp_path, 1)
    result = runner.invoke(app, ["runs", "--tracking-uri", uri, "--experiment", "nope"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: no experiment 'nope' in {uri}; experiments: Default, listed"


@pytest.mark.parametrize("width", [80, 100, 200])
def test_runs_fits_the_terminal_width(tmp_path, monkeypatch, width):
    from rich.console import Console

    import ensemble_service.cli as cli

    uri = _store_with_parents(tmp_path)
    monkeypatch.setattr(cli, "console", Console(width=width, force_terminal=True, color_system=None))
    result = runner.invoke(app, ["runs", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= width
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name("listed").experiment_id]):
        row = next(line for line in lines if run.info.run_id in line)  # one line per ensemble
        acc = f"{run.data.metrics['ensemble_mean_test_acc']:.4f}"
        assert "FINISHED" in row and acc in row, row
        if width >= 200:
            assert run.info.run_name in row and "mlp+lenet" in row and "0.1234" in row
    if width < 200:
        assert "hidden (terminal too narrow): " in result.output


def test_runs_into_a_pipe_shows_every_column(tmp_path, monkeypatch):
    from rich.console import Console

    import ensemble_service.cli as cli

    uri = _store_with_parents(tmp_path)
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))
    result = runner.invoke(app, ["runs", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "FINISHED" in line]
    assert len(rows) == 2 and all("independent-digits-2026112" in r and "0.1234" in r for r in rows)
    assert "hidden" not in result.output


def test_ui_on_a_port_in_use_exits_2(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                     "(another server is using it; choose one with --port)")
    assert list(tmp_path.iterdir()) == []

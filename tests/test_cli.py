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


def test_top_level_help_lists_each_command_on_one_line():
    """The commands panel shows a one-line summary per command, not a command's whole first
    paragraph with its docstring line breaks (which wrapped raggedly)."""
    result = CliRunner().invoke(app, ["--help"], terminal_width=80, env={"COLUMNS": "80"})  # a plain terminal
    assert result.exit_code == 0
    panel = result.output.split("Commands", 1)[1]
    rows = [line.strip("│ ").strip() for line in panel.splitlines() if line.startswith("│")]
    names = [r.split()[0] for r in rows if r]
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names == commands, rows  # one row each: no continuation lines


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


USAGE = [
    (["serve", "--port", "abc"], "error: Invalid value for '--port': Input should be a valid integer, unable to parse "
                                 "string as an integer (see `ensemble serve --help`)"),
    (["predict"], "error: Missing argument 'name' (see `ensemble predict --help`)"),
    (["runs", "--bogus"], "error: No such option: --bogus (see `ensemble runs --help`)"),
    (["nosuch"], "error: No such command 'nosuch' (see `ensemble --help`)"),
    (["grow", "x"], "error: Missing option '--members' / '-k' (see `ensemble grow --help`)"),
]


def test_usage_errors_are_one_line_exit_2():
    """click's usage errors (missing argument, unknown option or command, bad option value): one line
    on stderr naming the command's --help, not click's boxed usage text."""
    code = ("import sys, subprocess\n"
            "from ensemble_service.cli import main\n"
            "sys.argv = ['ensemble'] + sys.argv[1:]\n"
            "main()\n")
    for args, line in USAGE:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (2, line, ""), args
    proc = subprocess.run([sys.executable, "-c", code, "runs", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Usage: ensemble runs" in proc.stdout and proc.stderr == ""


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


@pytest.mark.parametrize("extra", [[], ["--ray"]])
def test_serve_on_a_port_in_use_exits_2_before_saying_it_serves(tmp_path, extra):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                     *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                     "(another server is using it; choose one with --port)")


def test_error_lines_keep_their_brackets(monkeypatch):
    """Rich markup must not eat a message's [batch, 8, 8]: the shape is what the user needs."""
    import io

    import typer
    from rich.console import Console

    import ensemble_service.cli as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=out, width=400))
    with pytest.raises(typer.Exit):
        cli.fail("inputs has shape [3, 30]; this ensemble takes raw inputs [batch, 8, 8] or [batch, 64] [/]")
    assert out.getvalue() == "error: inputs has shape [3, 30]; this ensemble takes raw inputs [batch, 8, 8] or " \
                             "[batch, 64] [/]\n"


# -- the user's own model and data: every problem is one line, exit 2, nothing started -----------


USER_MODULE = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, input_shape, num_classes, hidden=8):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, hidden), torch.nn.ReLU(),
                                      torch.nn.Linear(hidden, num_classes))
    def forward(self, x):
        return self.fc(x)

class Raises(torch.nn.Module):
    def __init__(self, num_classes):
        raise RuntimeError("no weights file found")

def returns_int(num_classes):
    return 3

def bad_loader():
    return "not data"
'''


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usermod", raising=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), np.arange(40) % 2
    np.savez(tmp_path / "good.npz", x=x, y=y)
    np.savez(tmp_path / "no_y.npz", x=x)
    np.savez(tmp_path / "frac.npz", x=x, y=y + 0.5)
    np.savez(tmp_path / "nan.npz", x=np.where(np.arange(160).reshape(40, 4) == 7, np.nan, x), y=y)
    np.savez(tmp_path / "one_class.npz", x=x, y=np.zeros(40, dtype=int))
    np.savez(tmp_path / "short.npz", x=x, y=y[:30])
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,,y\n" + "".join(f"{i},{i},{'xy'[i % 2]}\n" for i in range(20)))
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (4, 4), color=i * 40).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    monkeypatch.chdir(tmp_path)
    return tmp_path


USER_BAD = [
    (["model._target_=nosuchpkg.Net"], "model._target_=nosuchpkg.Net: no module named 'nosuchpkg'"),
    (["model._target_=usermod.Nope"], "model._target_=usermod.Nope: usermod has no attribute 'Nope'"),
    (["model._target_=usermod.returns_int"], "returned a int, not a torch.nn.Module"),
    (["model._target_=usermod.Raises"], "model._target_=usermod.Raises raised RuntimeError: no weights file found"),
    (["model._target_=usermod.Net", "+model.hiden=3"], "unexpected keyword argument 'hiden'"),
    (["data=digits", "model._target_=usermod.Net"], "a forward pass on a batch of shape [2, 1, 8, 8]"),
    (["data=arrays", "data.path=missing.npz"], "data.path=missing.npz: no such file"),
    (["data=arrays", "data.path=no_y.npz"], "has 'x' but no 'y'"),
    (["data=arrays", "data.path=frac.npz"], "must hold integer class labels 0..C-1"),
    (["data=arrays", "data.path=nan.npz"], "NaN or infinite"),
    (["data=arrays", "data.path=one_class.npz"], "at least 2"),
    (["data=arrays", "data.path=short.npz"], "x has 40 rows but y has 30 labels"),
    (["data=csv", "data.path=t.csv", "data.target=nope"], "data.target='nope' is not a column of t.csv"),
    (["data=csv", "data.path=t.csv", "data.target=label"], "missing values (first: line 3, column 'b')"),
    (["data=image_folder", "data.root=imgs"], "broken.png is not an image Pillow can read"),
    (["data._target_=usermod.bad_loader"], "returned a str"),
]


@pytest.mark.parametrize("overrides,needle", USER_BAD, ids=[" ".join(o) for o, _ in USER_BAD])
def test_bad_user_models_and_data_exit_2_with_one_line_and_leave_no_run(overrides, needle, user_project):
    import ray

    ray_was_up = ray.is_initialized()
    if not any(o.startswith("data") for o in overrides):
        overrides = ["data=arrays", "data.path=good.npz", *overrides]
    result = runner.invoke(app, ["submit", *overrides, f"tracking.uri=sqlite:///{user_project}/m.db"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not (user_project / "m.db").exists() and ray.is_initialized() == ray_was_up
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ensembles(tmp_path):
    """An older ensemble with a saved view (one member) and a newer one without (as before views existed)."""
    import time

    from ensemble_service import names
    from ensemble_service.tracking import EnsembleTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = {}
    for eid, view in (("e-old", True), ("e-new", False)):
        tr = EnsembleTracker(uri, "ui")
        ids[eid] = tr.start_parent(f"run-{eid}", {}, {names.TAG_ID: eid, names.TAG_STRATEGY: "independent"})
        ids[f"{eid}/member"] = tr.start_member(0, "member-0", {}, {})
        if view:
            tr.log_overview(ids[eid], "summary", eid, '{"name": "x", "createdAt": 1, "state": "{}"}')
        tr.end_all("FINISHED")
        time.sleep(0.01)
    return uri, tr.experiment_id, ids


def test_ui_pages_open_the_newest_ensemble_or_the_one_asked_for(tmp_path):
    from mlflow.tracking import MlflowClient

    from ensemble_service import names
    from ensemble_service.cli import ui_pages

    uri, exp, ids = _two_ensembles(tmp_path)
    runs = f"http://h:1/#/experiments/{exp}/runs?workflowType=machine_learning"
    newest = ui_pages(uri, "http://h:1", None, None)
    assert newest[0] == (f"open {runs}&searchFilter=tags.%60ensemble.id%60+%3D+%27e-new%27"
                         "&orderByKey=metrics.%60test_acc%60&orderByAsc=false")
    assert newest[1] == f"  ensemble run-e-new (parent run {ids['e-new']}): the ensemble and one row per member"
    assert "&compareRunsMode=CHART" in newest[2] and "no saved view" in newest[3]
    by_member = ui_pages(uri, "http://h:1", None, ids["e-old/member"])
    assert by_member[0] == f"open {runs}&viewStateShareKey=e-old" and ids["e-old"] in by_member[1]
    assert by_member[2] == f"  its charts: {runs}&viewStateShareKey=e-old&compareRunsMode=CHART" and len(by_member) == 3
    client = MlflowClient(uri)
    client.create_registered_model("ens", tags={names.TAG_KIND: names.KIND_ENSEMBLE})
    client.create_model_version("ens", "file:///nowhere", run_id=ids["e-old"])
    assert ui_pages(uri, "http://h:1", "ens", None) == by_member
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ui_pages(f"sqlite:///{empty}/mlflow.db", "http://h:1", None, None) == [
        "open http://h:1/#/experiments?workflowType=machine_learning (no ensemble yet: run `ensemble submit`)"]
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--run", "0123abc"], "error: no run '0123abc' in sqlite:///"),
    (["--ensemble", "nope"], "error: no registered ensemble 'nope'"),
    (["--run", "x", "--ensemble", "y"], "error: give --ensemble or --run, not both"),
])
def test_ui_names_an_unknown_run_or_ensemble(tmp_path, args, message):
    uri, _, ids = _two_ensembles(tmp_path)
    result = runner.invoke(app, ["ui", "--port", str(_free_port()), "--tracking-uri", uri, *args])
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ui_on_a_run_outside_any_ensemble_says_so(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, exp, _ = _two_ensembles(tmp_path)
    other = MlflowClient(uri).create_run(exp).info.run_id
    result = runner.invoke(app, ["ui", "--port", str(_free_port()), "--tracking-uri", uri, "--run", other])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: run {other} is not an ensemble's parent or member run"), result.output


def test_an_error_found_after_the_config_prints_one_line_on_stderr_and_nothing_on_stdout(tmp_path):
    """Found by preflight (checkpoint storage under a file): no empty progress display on stdout."""
    import subprocess

    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([str(Path(sys.executable).parent / "ensemble"), "submit", "data=synthetic",
                           f"cluster.storage={tmp_path}/afile/ck", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "is a file, not a directory" in proc.stderr


def test_ui_opens_the_newest_finished_ensemble_not_a_newer_stopped_one(tmp_path):
    import time

    from ensemble_service import names
    from ensemble_service.cli import ui_pages
    from ensemble_service.tracking import EnsembleTracker

    uri, exp, ids = _two_ensembles(tmp_path)
    time.sleep(0.01)
    tr = EnsembleTracker(uri, "ui")
    killed = tr.start_parent("run-e-killed", {}, {names.TAG_ID: "e-killed", names.TAG_STRATEGY: "independent"})
    tr.end_all("KILLED")
    lines = ui_pages(uri, "http://h:1", None, None)
    assert f"(parent run {ids['e-new']})" in lines[1] and killed not in " ".join(lines)
    assert f"(parent run {killed})" in ui_pages(uri, "http://h:1", None, killed)[1]   # asked for: still opened


def test_sigterm_while_ray_starts_is_reported_as_sigterm(capsys):
    """While ray.init runs, Ray's own SIGTERM handler is in place and calls sys.exit(15): the
    command still says SIGTERM and exits 143 (it said SIGINT, 130)."""
    import signal

    import typer

    from ensemble_service import cli as cli_module

    def work(observer):
        raise SystemExit(signal.SIGTERM)

    with pytest.raises(typer.Exit) as exit_info:
        cli_module._on_ray(None, work)
    assert exit_info.value.exit_code == 143
    assert "interrupted by SIGTERM; no MLflow run had been created" in capsys.readouterr().err


def test_the_consoles_tables_keep_brackets_too():
    """A member's error text in the result table ("FAILED: ... shape [2, 10]") is the user's own text."""
    from rich.table import Table

    import ensemble_service.cli as cli

    table = Table()
    table.add_column("member")
    table.add_row("FAILED: logits of shape [batch, num_classes] = [2, 10]")
    with cli.console.capture() as cap:
        cli.console.print(table)
    assert "[batch, num_classes] = [2, 10]" in cap.get()

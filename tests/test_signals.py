"""`ensemble submit` as a user runs it, in its own process and its own Ray temp dir: the embedded
cluster is private, and SIGTERM or Ctrl-C ends it in seconds with every MLflow run KILLED and no
Ray process left behind (the process group, i.e. the session the command was started in, is
checked through /proc: nothing is killed by name)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MANY = ["strategy=mc_dropout", "model.dropout=0.5", "strategy.samples=100", "trainer.epochs=5000",
        "tracking.register=false"]


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_session(sid: int) -> list[str]:
    """The processes of session ``sid`` (everything a command started with start_new_session=True
    started, Ray's daemons and agents included), as 'pid name'."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    found.append(f"{d.name} {(d / 'comm').read_text().strip()}")
            except OSError:
                pass
    return found


def checkpoints(tmp_path: Path) -> list[str]:
    """The files under the submissions' cluster.storage."""
    return sorted(str(p) for p in (tmp_path / "ckpt").rglob("*") if p.is_file())


class Submit:
    """`ensemble submit` in its own session, with a private Ray temp dir; output in files."""

    def __init__(self, tmp_path: Path, overrides: list[str], ray_current_cluster: str | None = None):
        self.dir = tmp_path
        self.db = tmp_path / "mlflow.db"
        self.ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's sockets need a short path
        if ray_current_cluster:  # what `ray start` records for ray.init() to find
            (Path(self.ray_tmp) / "ray").mkdir()
            (Path(self.ray_tmp) / "ray" / "ray_current_cluster").write_text(ray_current_cluster)
        env = dict(os.environ, RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        self.out, self.err = open(tmp_path / "out", "w"), open(tmp_path / "err", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "ensemble"), "submit", *overrides, f"tracking.uri=sqlite:///{self.db}",
             "tracking.experiment=signals", f"cluster.storage={tmp_path}/ckpt"],
            cwd=tmp_path, env=env, stdout=self.out, stderr=self.err, start_new_session=True)

    def stdout(self) -> str:
        return (self.dir / "out").read_text()

    def stderr(self) -> str:
        return (self.dir / "err").read_text()

    def training(self) -> bool:
        """True once a member has logged an epoch (read-only: the store is never created here)."""
        if not self.db.exists():
            return False
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                return con.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0] > 0
            finally:
                con.close()
        except sqlite3.Error:
            return False

    def wait_training(self, timeout: float = 300) -> None:
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, self.stdout() + self.stderr()
            if self.training():
                return
            time.sleep(0.5)
        raise AssertionError(f"no epoch logged within {timeout} s: {self.stdout()} {self.stderr()}")

    def runs(self):
        client = MlflowClient(f"sqlite:///{self.db}")
        exp = client.get_experiment_by_name("signals")
        return client.search_runs([exp.experiment_id], max_results=1000)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid_name in in_session(self.proc.pid):  # never leave anything of a failed test behind
            try:
                os.kill(int(pid_name.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        self.out.close()
        self.err.close()


@pytest.fixture
def submits():
    started: list[Submit] = []
    yield started
    for s in started:
        s.close()


def test_embedded_cluster_is_private_and_gone_after_a_run(tmp_path, submits):
    """cluster.address null: a new local cluster, although `ray start` recorded one (dead here)."""
    s = Submit(tmp_path, ["data=synthetic", "strategy.members=1", "trainer.epochs=1", "tracking.register=false"],
               ray_current_cluster=f"127.0.0.1:{closed_port()}")
    submits.append(s)
    s.proc.wait(timeout=300)
    assert s.proc.returncode == 0, s.stdout() + s.stderr()
    assert "Failed to connect" not in s.stderr()
    assert "Started a local Ray instance" not in s.stderr()  # Ray's INFO line; the service says which cluster
    assert "Ray cluster with " in s.stdout()
    assert [r.info.status for r in s.runs()] == ["FINISHED", "FINISHED"]
    assert in_session(s.proc.pid) == []


def test_sigterm_kills_every_run_in_seconds_and_leaves_no_ray_process(tmp_path, submits):
    s = Submit(tmp_path, MANY)
    submits.append(s)
    s.wait_training()
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=60)
    seconds = time.perf_counter() - t0
    print(f"SIGTERM -> exit: {seconds:.2f} s")
    assert s.proc.returncode == 128 + signal.SIGTERM, s.stderr()
    err = s.stderr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted by SIGTERM; its 101 MLflow runs were marked KILLED"], err
    assert "SIGTERM received" not in err and "Traceback" not in err and "logging.cc" not in err
    runs = s.runs()
    assert len(runs) == 101 and {r.info.status for r in runs} == {"KILLED"}
    assert all(r.data.tags.get("ensemble.error") == "interrupted" for r in runs)
    assert in_session(s.proc.pid) == []
    assert seconds < 30
    assert checkpoints(tmp_path) == []  # no submission resumes them: they would only pile up


def test_ctrl_c_is_acknowledged_at_once(tmp_path, submits):
    s = Submit(tmp_path, MANY)
    submits.append(s)
    s.wait_training()
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGINT)
    acknowledged = None
    while s.proc.poll() is None or acknowledged is None:
        if acknowledged is None and "SIGINT: stopping; marking 101 MLflow runs KILLED" in s.stdout():
            acknowledged = time.perf_counter() - t0
        if s.proc.poll() is not None and acknowledged is None:
            break
        assert time.perf_counter() - t0 < 60
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    print(f"SIGINT -> feedback: {acknowledged} s, exit: {seconds:.2f} s")
    assert acknowledged is not None and acknowledged < 5, s.stdout()
    assert s.proc.returncode == 128 + signal.SIGINT, s.stderr()
    assert {r.info.status for r in s.runs()} == {"KILLED"}
    assert in_session(s.proc.pid) == []
    assert checkpoints(tmp_path) == []

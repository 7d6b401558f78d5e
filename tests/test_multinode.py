"""What docker-compose.yml starts, as plain processes on loopback: a Ray head (`ray start
--head`, dashboard + Jobs API), a second Ray node (`ray start --address`, its own temp dir,
ports and resources), an S3-compatible object store (moto's server mode, where compose runs
MinIO) and `mlflow server` with a SQL backend and its artifact proxy in front of that store. The
nodes share no checkpoint directory: checkpoints go to the object store (s3://checkpoints/...),
with the settings compose gives its Ray nodes (AWS_ENDPOINT_URL and the AWS_* credentials). A
job goes in through the CLI and the Jobs API; a worker is SIGKILLed mid-member and resumes from
its S3 checkpoint; the registered model loads from the S3-backed artifact store; a job is cancelled.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
S3_ENV: dict = {}          # the object store's endpoint and credentials, set by the `stack` fixture
CHECKPOINTS, ARTIFACTS = "checkpoints", "mlflow"    # the buckets (compose's minio-init makes `mlflow`)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def env() -> dict:
    e = dict(os.environ)
    e.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", MLFLOW_DISABLE_TELEMETRY="true",
             MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
             PATH=f"{BIN}:{e.get('PATH', '')}", PYTHONUNBUFFERED="1", **S3_ENV)
    e.pop("RAY_ADDRESS", None)
    return e


def node_env() -> dict:
    """A Ray node started as `.venv/bin/ray start` from a shell where the virtualenv is not activated:
    neither `python` nor the project's console scripts are on its PATH."""
    e = env()
    e["PATH"] = os.pathsep.join(p for p in e["PATH"].split(os.pathsep) if p and Path(p).resolve() != BIN.resolve())
    return e


def kill_processes_under(path: str) -> None:
    """Stop the Ray processes of one node (their command lines name its temp dir) and everything
    they started: the raylet's agents rename themselves (ray::DashboardAgent, ray::RuntimeEnvAgent)
    and would outlive it. Never `ray stop`, which would stop every Ray on the machine."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    roots = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            ppid = int((pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid_dir.name))
        if path in cmd:
            roots.append(int(pid_dir.name))
    victims, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in victims and pid != me:
            victims.add(pid)
            todo.extend(children.get(pid, []))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def node_ports(p: list[int]) -> list[str]:
    return [f"--dashboard-agent-listen-port={p[0]}", f"--dashboard-agent-grpc-port={p[1]}",
            f"--runtime-env-agent-port={p[2]}", f"--metrics-export-port={p[3]}", f"--node-manager-port={p[4]}",
            f"--object-manager-port={p[5]}"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("stack")
    S3_ENV.update(s3_server.env)
    for bucket in (CHECKPOINTS, ARTIFACTS):
        s3_server.create_bucket(bucket)
    ports = free_ports(17)
    gcs, dash, mlflow_port, client_port = ports[:4]
    # short paths: Ray's unix sockets live under the temp dir and must fit in 107 bytes
    head_dir, worker_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp")
    started = []
    try:
        mlflow_log = open(root / "mlflow.log", "w")
        mlflow_proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", f"s3://{ARTIFACTS}", "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
            env=env(), stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(mlflow_proc)
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                        f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        "--num-cpus=1", f"--temp-dir={head_dir}", "--disable-usage-stats",
                        f"--ray-client-server-port={client_port}", "--resources={\"head\": 1}",
                        *node_ports(ports[4:10])], env=node_env(), check=True, timeout=120,
                       stdout=subprocess.DEVNULL)
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", f"--temp-dir={worker_dir}", "--disable-usage-stats",
                        "--resources={\"worker_node\": 1}", *node_ports(ports[10:16])],
                        env=node_env(), check=True, timeout=120, stdout=subprocess.DEVNULL)
        uri = f"http://127.0.0.1:{mlflow_port}"
        import urllib.request

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{uri}/health", timeout=2).read().strip() == b"OK"
            except OSError:
                return False

        wait_for(healthy, 60, "mlflow server /health")
        yield {"address": f"http://127.0.0.1:{dash}", "tracking": uri, "root": root, "s3": s3_server}
    finally:
        S3_ENV.clear()
        for proc in started:  # the server's whole process group: mlflow forks uvicorn workers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        kill_processes_under(worker_dir)
        kill_processes_under(head_dir)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ensemble"), *args], env=env(), capture_output=True, text=True, timeout=timeout)


def experiment_runs(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("ensemble.kind") == "parent"]
    members = sorted((r for r in runs if r.data.tags.get("ensemble.kind") == "member"),
                     key=lambda r: int(r.data.tags["ensemble.member_index"]))
    return parents, members


TRAIN = ["data=synthetic", "data.n_train=4000", "data.input_shape=[1,16,16]", "model=mlp",
         "model.depth=1", "model.width=32", "trainer.batch_size=8", "cluster.cpus_per_member=1"]


EPOCHS = 40   # long enough that a member seen mid-way (metrics reach MLflow up to ~2 s late) is still training when killed


def test_job_on_two_nodes_survives_a_killed_worker_and_resumes_from_s3(stack):
    from workers.state import load_checkpoint

    client = MlflowClient(stack["tracking"])
    s3 = stack["s3"]
    overrides = [*TRAIN, "strategy.members=2", f"trainer.epochs={EPOCHS}", f"tracking.uri={stack['tracking']}",
                 "tracking.experiment=multinode", f"cluster.storage=s3://{CHECKPOINTS}/multinode",
                 "cluster.max_retries=2"]
    proc = subprocess.Popen([str(BIN / "ensemble"), "submit", "--address", stack["address"], "--wait", *overrides],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def training_member():  # mid-member: an epoch done, far from the last, its process alive
            _, members = experiment_runs(client, "multinode")
            for m in members:
                done = len(client.get_metric_history(m.info.run_id, "train_loss"))
                pid = m.data.tags.get("ensemble.pid")
                if pid and 1 <= done <= EPOCHS // 5 and m.info.status == "RUNNING" and Path(f"/proc/{pid}").exists():
                    return m
            return None

        victim = wait_for(training_member, 180, "a member that has finished an epoch", poll=0.2)
        os.kill(int(victim.data.tags["ensemble.pid"]), signal.SIGKILL)
        # what the killed member left in the object store: its last checkpoint, nothing on a node's disk
        index = int(victim.data.tags["ensemble.member_index"])
        keys = [k for k in s3.keys(CHECKPOINTS, "multinode/") if k.endswith(f"member_{index:03d}.ckpt")]
        assert len(keys) == 1, s3.keys(CHECKPOINTS, "multinode/")
        with _s3_environment():
            left = load_checkpoint(f"s3://{CHECKPOINTS}/{keys[0]}")
        assert left["epoch"] >= 1 and left["identity"]["member"] == index
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "submitted job" in out and "SUCCEEDED" in out
    parents, members = experiment_runs(client, "multinode")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(members) == 2 and all(m.info.status == "FINISHED" for m in members)   # no duplicate run
    killed = next(m for m in members if m.info.run_id == victim.info.run_id)
    assert int(killed.data.tags["ensemble.restarts"]) >= 1
    assert int(killed.data.tags["ensemble.resumed_from_epoch"]) == left["epoch"]     # from its last S3 checkpoint
    assert sorted(h.step for h in client.get_metric_history(killed.info.run_id, "train_loss")) == list(
        range(1, EPOCHS + 1))
    # both nodes trained (the killed member's retry may have gone to either node: its checkpoint is in S3)
    assert len({victim.data.tags["ensemble.node_id"], *(m.data.tags["ensemble.node_id"] for m in members)}) == 2
    # checkpoints are removed once the ensemble is registered (pyarrow may leave an empty "dir/" marker)
    assert [k for k in s3.keys(CHECKPOINTS, "multinode/") if not k.endswith("/")] == []
    # artifacts went through the server's proxy into the object store
    assert "checkpoint/member.pt" in {a.path for a in client.list_artifacts(killed.info.run_id, "checkpoint")}
    stored = s3.keys(ARTIFACTS)
    assert any(k.endswith(f"{killed.info.run_id}/artifacts/checkpoint/member.pt") for k in stored), stored[:20]
    assert any(k.endswith("/MLmodel") for k in stored)

    # the registered model loads from the S3-backed store (through the proxy: no S3 credentials here)
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(stack["tracking"])
    try:
        model = mlflow.pyfunc.load_model("models:/multinode@latest")
    finally:
        mlflow.set_tracking_uri(None)
    probs = model.predict(np.zeros((3, 1, 16, 16), dtype=np.float32))
    assert probs.shape[0] == 3 and np.allclose(probs.sum(-1), 1.0, atol=1e-5)

    listing = cli("jobs", "--address", stack["address"])
    assert listing.returncode == 0 and "SUCCEEDED" in listing.stdout


class _s3_environment:
    """This process's AWS_* variables pointing at the test's object store, for the block's duration."""

    def __enter__(self):
        self.before = {k: os.environ.get(k) for k in S3_ENV}
        os.environ.update(S3_ENV)

    def __exit__(self, *exc):
        for k, v in self.before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_users_project_runs_as_the_job_on_a_head_started_from_the_virtualenv(stack, tmp_path):
    """The job uploads the user's directory (their model module and data file), ships this package,
    and runs with the head's own Python although the head's PATH has no `python` of the project."""
    import numpy as np

    project = tmp_path / "my_project"
    project.mkdir()
    (project / "mymod.py").write_text(
        "import math, torch\n"
        "class MyNet(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_classes, hidden=8):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), hidden),\n"
        "                                       torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    np.savez(project / "X.npz", x=(rng.normal(size=(300, 6)) + y[:, None]).astype("float32"), y=y)
    import shutil

    on_path = shutil.which("python", path=node_env()["PATH"])  # the head's `python`: not the project's
    assert on_path is None or Path(on_path).resolve() != Path(sys.executable).resolve()
    proc = subprocess.run([str(BIN / "ensemble"), "submit", "--address", stack["address"], "--wait",
                           "data=arrays", "data.path=X.npz", "model._target_=mymod.MyNet", "+model.hidden=16",
                           "strategy.members=2", "trainer.epochs=3", f"tracking.uri={stack['tracking']}",
                           "tracking.experiment=users-project", "tracking.model_name=users-project",
                           f"cluster.storage=s3://{CHECKPOINTS}/users-project"],
                          cwd=project, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout and "arrays:X.npz" in proc.stdout
    client = MlflowClient(stack["tracking"])
    parents, members = experiment_runs(client, "users-project")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [m.data.params["architecture"] for m in members] == ["MyNet", "MyNet"]
    assert client.get_registered_model("users-project").name == "users-project"


def test_a_sweep_on_a_remote_cluster_is_one_job_per_combination_with_one_sweep_tag(stack):
    from ensemble_service import names

    proc = cli("submit", "--multirun", "--address", stack["address"], "--wait", "data=digits", "model=mlp",
               "strategy.members=2", "trainer.epochs=1,2", "cluster.cpus_per_member=1",
               f"tracking.uri={stack['tracking']}", "tracking.experiment=remote-sweep", "tracking.sweep=rs1",
               "tracking.model_name=remote-sweep", f"cluster.storage=s3://{CHECKPOINTS}/remote-sweep", timeout=400)
    if proc.returncode != 0:  # the failed job's own log says why
        import re

        failed = re.findall(r"job (raysubmit_\w+) FAILED", proc.stdout)
        logs = "".join(cli("logs", j, "--address", stack["address"]).stdout[-3000:] for j in failed)
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-1000:] + logs)
    assert proc.stdout.count("submitted job ") == 2 and proc.stdout.count(" SUCCEEDED") == 2, proc.stdout
    client = MlflowClient(stack["tracking"])
    parents, members = experiment_runs(client, "remote-sweep")
    assert len(parents) == 2 and len(members) == 4
    assert {p.info.status for p in parents} == {"FINISHED"}
    assert {p.data.tags[names.TAG_SWEEP] for p in parents} == {"rs1"}
    epochs = sorted(int(p.data.params["trainer.epochs"]) for p in parents)
    assert epochs == [1, 2]


def test_cancelled_job_leaves_runs_killed(stack):
    client = MlflowClient(stack["tracking"])
    overrides = [*TRAIN, "strategy.members=2", "trainer.epochs=200", f"tracking.uri={stack['tracking']}",
                 "tracking.experiment=cancelled", f"cluster.storage=s3://{CHECKPOINTS}/cancelled"]
    sub = cli("submit", "--address", stack["address"], *overrides)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.split("submitted job ")[1].split()[0]

    def member_training():
        _, members = experiment_runs(client, "cancelled")
        return any(client.get_metric_history(m.info.run_id, "train_loss") for m in members)

    wait_for(member_training, 180, "the job's members to train")
    assert cli("status", job_id, "--address", stack["address"]).stdout.strip() == "RUNNING"
    cancelled = cli("cancel", job_id, "--address", stack["address"])
    assert cancelled.returncode == 0 and "stop requested" in cancelled.stdout
    wait_for(lambda: cli("status", job_id, "--address", stack["address"]).stdout.strip() == "STOPPED", 60,
             "the job to stop")

    def all_closed():
        parents, members = experiment_runs(client, "cancelled")
        statuses = [r.info.status for r in parents + members]
        return statuses if statuses and "RUNNING" not in statuses else None

    statuses = wait_for(all_closed, 30, "the runs to be closed")
    assert set(statuses) == {"KILLED"}
    logs = cli("logs", job_id, "--address", stack["address"])
    assert logs.returncode == 0 and "Running entrypoint" in logs.stdout


def test_bad_input_is_rejected_before_submission(stack):
    result = cli("submit", "--address", stack["address"], "strategy.members=0")
    assert result.returncode == 2
    assert "strategy.members must be at least 1" in result.stderr and "submitted job" not in result.stdout
    unknown = cli("status", "raysubmit_nope", "--address", stack["address"])
    assert unknown.returncode == 1 and unknown.stderr.startswith("error:")


def test_token_auth_cluster_needs_the_token_and_the_cli_sends_it(tmp_path):
    """A head started with RAY_AUTH_MODE=token: the CLI passes RAY_AUTH_TOKEN; without it, a clear error."""
    ports = free_ports(10)
    head_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    token_env = dict(env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="ensemble-test-token-0123456789abcdef")
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
                        f"--dashboard-port={ports[1]}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        "--num-cpus=1", f"--temp-dir={head_dir}", "--disable-usage-stats",
                        f"--ray-client-server-port={ports[2]}", *node_ports(ports[3:9])],
                       env=token_env, check=True, timeout=120, stdout=subprocess.DEVNULL)
        address = f"http://127.0.0.1:{ports[1]}"

        def jobs(environment):
            return subprocess.run([str(BIN / "ensemble"), "jobs", "--address", address], env=environment,
                                  capture_output=True, text=True, timeout=120)

        with_token = dict(env(), RAY_AUTH_TOKEN=token_env["RAY_AUTH_TOKEN"])
        with_token.pop("RAY_AUTH_MODE")          # the CLI sets token mode itself when a token is given
        ok = wait_for(lambda: (r := jobs(with_token)).returncode == 0 and r, 60, "the Jobs API with the token")
        assert f"Jobs at {address}" in ok.stdout
        refused = jobs(env())                    # no token
        assert refused.returncode == 1
        assert refused.stderr.startswith("error:") and refused.stderr.count("\n") == 1
        assert "Traceback" not in refused.stderr
    finally:
        kill_processes_under(head_dir)

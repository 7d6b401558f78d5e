"""docker-compose.yml validated without Docker: structure, health checks, dependencies, and
every command checked against the real CLI it calls (ensemble, ray, mlflow)."""
from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import typer
import yaml

from ensemble_service.cli import app

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OUR_IMAGE_SERVICES = ["mlflow", "ray-head", "ray-worker", "api"]


def test_the_services_are_there():
    assert set(SERVICES) == {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker", "api"}


def test_one_pinned_image_built_from_the_dockerfile():
    images = {SERVICES[s]["image"] for s in OUR_IMAGE_SERVICES}
    assert images == {"ensemble-service:0.1.0"}
    for s in OUR_IMAGE_SERVICES:
        assert SERVICES[s]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert ":" in base and not base.endswith(":latest")
    for name, svc in SERVICES.items():  # third-party images pinned too
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
    for path in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / path).exists(), path


def test_health_checks_and_dependencies_are_consistent():
    for name, svc in SERVICES.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in SERVICES, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy but it has no healthcheck"
            else:
                assert cond["condition"] == "service_completed_successfully" and SERVICES[dep].get("restart") == "no"
    for name in ("postgres", "minio", "mlflow", "ray-head", "ray-worker", "api"):
        assert "healthcheck" in SERVICES[name], name
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert SERVICES["api"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def published(svc: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in svc.get("ports", [])}


def test_ports_match_commands_and_health_checks():
    head = SERVICES["ray-head"]
    assert option(head["command"], "--dashboard-port") == "8265" and 8265 in published(head)
    assert "8265" in " ".join(head["healthcheck"]["test"])
    gcs_port = option(head["command"], "--port")
    assert option(SERVICES["ray-worker"]["command"], "--address") == f"ray-head:{gcs_port}"
    mlflow_cmd = SERVICES["mlflow"]["command"]
    assert 5000 in published(SERVICES["mlflow"]) and option(mlflow_cmd, "--port") == "5000"
    assert "localhost:5000/health" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])
    assert "@postgres:5432/" in option(mlflow_cmd, "--backend-store-uri")
    assert option(mlflow_cmd, "--artifacts-destination") == "s3://mlflow" and "--serve-artifacts" in mlflow_cmd
    assert "local/mlflow" in " ".join(SERVICES["minio-init"]["command"])  # the bucket the server writes to
    api_cmd = SERVICES["api"]["command"]
    assert option(api_cmd, "--port") == "8000" and 8000 in published(SERVICES["api"])
    assert "localhost:8000/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert option(api_cmd, "--tracking-uri") == "http://mlflow:5000"


def test_the_mlflow_server_accepts_the_host_its_clients_use():
    allowed = option(SERVICES["mlflow"]["command"], "--allowed-hosts").split(",")
    uris = {svc.get("environment", {}).get("MLFLOW_TRACKING_URI") for svc in SERVICES.values()}
    uris |= {option(SERVICES["api"]["command"], "--tracking-uri")}
    for uri in filter(None, uris):
        host = uri.split("://", 1)[1].rstrip("/")
        assert host in allowed, f"{host} is not in the mlflow server's --allowed-hosts"


def test_ray_services_have_shm_and_the_worker_reserves_a_gpu():
    for name in ("ray-head", "ray-worker"):
        assert SERVICES[name]["shm_size"]
        assert "checkpoints:/checkpoints" in SERVICES[name]["volumes"][0]
    devices = SERVICES["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert option(SERVICES["ray-worker"]["command"], "--num-gpus") == "1"


def test_ensemble_commands_parse_with_the_real_cli():
    command = typer.main.get_command(app)
    for name in OUR_IMAGE_SERVICES:
        cmd = SERVICES[name]["command"]
        if cmd[0] != "ensemble":
            continue
        sub = command.commands[cmd[1]]           # a real subcommand
        with sub.make_context(cmd[1], list(cmd[2:])) as ctx:  # its options parse
            assert ctx.params
    with pytest.raises(Exception, match="No such option"):  # the check is real: a wrong option fails
        command.commands["serve"].make_context("serve", ["--no-such-option"])


@lru_cache(maxsize=None)
def help_text(*args: str) -> str:
    out = subprocess.run([str(BIN / args[0]), *args[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("service", ["mlflow", "ray-head", "ray-worker"])
def test_third_party_commands_use_real_options(service):
    cmd = SERVICES[service]["command"]
    text = help_text(cmd[0], cmd[1])
    for token in cmd[2:]:
        if token.startswith("--"):
            assert re.search(rf"(^|\s){re.escape(token)}(\s|,|=|$)", text, re.M), f"{service}: {token} is not an option"


def test_healthcheck_commands_exist_in_the_image():
    assert SERVICES["ray-worker"]["healthcheck"]["test"][1:3] == ["ray", "status"]
    assert "--address" in help_text("ray", "status")

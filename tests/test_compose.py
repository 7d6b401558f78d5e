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
    assert SERVICES["ray-head"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
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
        assert "volumes" not in SERVICES[name]      # no shared checkpoint volume: checkpoints live in MinIO
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


# --------------------------------------------------------------------------- nothing open by default
# `docker compose` interpolates ${VAR}, ${VAR:-default}, ${VAR:?error} (and the forms without ':')
# from the environment and .env before it starts anything; `interpolate` does the same here.

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_KEYS?$|ACCESS_KEY", re.I)
REQUIRED_REF = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
CONSOLE = yaml.safe_load((ROOT / "docker-compose.minio-console.yml").read_text())
ENV_EXAMPLE = ROOT / ".env.example"


class Refused(Exception):
    """`docker compose up` would stop here: a required variable is unset or empty."""


def interpolate(value, env: dict, missing: set | None = None):
    """``value`` (any YAML node) as compose sees it with ``env``; names of unset required variables
    go to ``missing`` (compose refuses to start when there is any)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, val = m.group("op"), m.group("arg"), env.get(name)
        unset = val is None or (val == "" and op and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if unset else val
        if op in ("?", ":?"):
            if unset:
                if missing is None:
                    raise Refused(f"{name}: {arg}")
                missing.add(name)
                return ""
            return val
        if op in ("+", ":+"):
            return "" if unset else arg
        return val or ""

    return _VAR.sub(sub, value)


def env_example() -> dict:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def example_secrets() -> dict:
    """.env.example with every empty value filled in, as an operator would."""
    return {k: v or f"{k.lower()}-0123456789abcdef" for k, v in env_example().items()}


def environments(doc: dict):
    """(where, mapping) for every environment block, in services and x- extension fields."""
    for name, node in doc.items():
        if name.startswith("x-") and isinstance(node, dict):
            if isinstance(node.get("environment"), dict):
                yield name, node["environment"]
            elif all(isinstance(v, (str, int, float, bool)) for v in node.values()):
                yield name, node
    for name, svc in (doc.get("services") or {}).items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        yield name, env


def literal_secrets(doc: dict) -> list[str]:
    """Every credential written in the file: a secret-named variable that is not ``${VAR:?...}``
    (a default is a literal too), and user:password@ in any URI."""
    found = []
    for where, env in environments(doc):
        for key, value in env.items():
            if SECRET_KEY.search(key) and not REQUIRED_REF.match(str(value)):
                found.append(f"{where}: {key}={value}")

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for v in node:
                walk(v, where)
        elif isinstance(node, str):
            for m in re.finditer(r"://([^/@\s:]+):([^/@\s]+)@", node):
                if not m.group(2).startswith(("${", "$$")):
                    found.append(f"{where}: {m.group(0)}")
    walk(doc, "")
    return found


def open_ports(doc: dict, env: dict) -> list[str]:
    """Published ports that listen on more than loopback with ``env``."""
    found = []
    for name, svc in (doc.get("services") or {}).items():
        if svc.get("network_mode") == "host":
            found.append(f"{name}: network_mode host")
        for port in interpolate(svc.get("ports", []), env):
            if isinstance(port, dict):  # long syntax
                host_ip = port.get("host_ip", "")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0].strip("[]") if len(parts) == 3 else ""
            if not (host_ip == "localhost" or re.match(r"^127\.\d+\.\d+\.\d+$|^::1$", host_ip)):
                found.append(f"{name}: {port}")
    return found


def ray_auth_problems(doc: dict, env: dict) -> list[str]:
    found = []
    for name in ("ray-head", "ray-worker"):
        svc_env = (doc["services"][name].get("environment") or {})
        if interpolate(svc_env.get("RAY_AUTH_MODE"), env) != "token":
            found.append(f"{name}: RAY_AUTH_MODE is {svc_env.get('RAY_AUTH_MODE')!r}, not token by default")
        if not REQUIRED_REF.match(str(svc_env.get("RAY_AUTH_TOKEN"))):
            found.append(f"{name}: RAY_AUTH_TOKEN does not come from the environment")
    return found


def resolved_env(service: str, env: dict) -> dict:
    return interpolate(SERVICES[service].get("environment") or {}, env)


def yaml_strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from yaml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from yaml_strings(v)
    elif isinstance(node, str):
        yield node


def test_interpolation_follows_compose():
    env = {"A": "a", "E": ""}
    assert interpolate("${A} $A ${B:-d} ${E:-d} ${E-d} $${A} ${A:+set}", env) == "a a d d  ${A} set"
    missing = set()
    assert interpolate(["${B:?needed}", "${E:?needed}", "${A:?needed}"], env, missing) == ["", "", "a"]
    assert missing == {"B", "E"}
    with pytest.raises(Refused, match="B: needed"):
        interpolate("${B:?needed}", env)


def test_no_literal_secret_in_the_files():
    assert literal_secrets(COMPOSE) == [] and literal_secrets(CONSOLE) == []
    # the check is real: a password, a default for a secret, a password in a URI are all caught
    bad = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bad["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "mlflow"
    bad["services"]["api"]["environment"]["ENSEMBLE_API_KEYS"] = "${ENSEMBLE_API_KEYS:-changeme}"
    bad["services"]["mlflow"]["command"][5] = "postgresql://mlflow:mlflow@postgres:5432/mlflow"
    bad["services"]["ray-worker"]["environment"] = dict(bad["x-ray-env"], RAY_AUTH_TOKEN="token-in-the-file")
    found = literal_secrets(bad)
    assert [f.split(":")[0] for f in found] == ["postgres", "ray-worker", "api", ".services.mlflow.command"], found
    # the MLflow auth configuration the image carries holds no password either
    ini = (ROOT / "docker" / "mlflow-auth.ini").read_text()
    assert not re.search(r"^\s*admin_password\s*=", ini, re.M) and not re.search(r"://[^/@\s]+:[^/@\s]+@", ini)


def test_up_refuses_to_start_without_the_secrets():
    missing = set()
    interpolate(COMPOSE, {}, missing)
    required = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAY_AUTH_TOKEN", "ENSEMBLE_API_KEYS", "CHECKPOINTS_ACCESS_KEY",
                "CHECKPOINTS_SECRET_KEY"}
    assert missing == required
    # .env.example names every variable the file reads, and copied as it is, it still does not start
    seen_names = {m.group("name") or m.group("bare") for text in yaml_strings([COMPOSE, CONSOLE])
                  for m in _VAR.finditer(text) if m.group(0) != "$$"}
    assert seen_names - {"ENSEMBLE_BIND_ADDRESS"} == set(env_example())
    assert "ENSEMBLE_BIND_ADDRESS" in ENV_EXAMPLE.read_text()
    still_missing = set()
    interpolate(COMPOSE, env_example(), still_missing)
    assert still_missing == required - {"MINIO_ROOT_USER", "CHECKPOINTS_ACCESS_KEY"}
    with_secrets = set()
    interpolate(COMPOSE, example_secrets(), with_secrets)
    assert with_secrets == set()
    # .env holds them and git never sees it
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_published_ports_bind_to_loopback_unless_one_variable_says_otherwise():
    env = example_secrets()
    assert open_ports(COMPOSE, env) == [] and open_ports(CONSOLE, env) == []
    published_ports = {name: published(svc) for name, svc in SERVICES.items() if svc.get("ports")}
    assert published_ports == {"mlflow": {5000}, "ray-head": {8265}, "api": {8000}}  # no Postgres, MinIO
    assert published(CONSOLE["services"]["minio"]) == {9001}  # the console: only with the extra file
    everywhere = dict(env, ENSEMBLE_BIND_ADDRESS="0.0.0.0")
    assert len(open_ports(COMPOSE, everywhere)) == 3 and len(open_ports(CONSOLE, everywhere)) == 1
    # the check is real: the short form without an address, the long form without host_ip, host networking
    bad = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bad["services"]["api"]["ports"] = ["8000:8000"]
    bad["services"]["mlflow"]["ports"] = [{"target": 5000, "published": 5000}]
    bad["services"]["postgres"]["network_mode"] = "host"
    assert len(open_ports(bad, env)) == 3


def test_ray_token_auth_is_on_by_default():
    env = example_secrets()
    assert ray_auth_problems(COMPOSE, env) == []
    for name in ("ray-head", "ray-worker"):
        ray_env = resolved_env(name, env)
        assert ray_env["RAY_AUTH_MODE"] == "token" and ray_env["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]
    # nothing else turns it off, and the API and MLflow containers do not get the token
    assert all("RAY_AUTH_MODE" not in resolved_env(s, env) or resolved_env(s, env)["RAY_AUTH_MODE"] == "token"
               for s in SERVICES)
    assert "RAY_AUTH_TOKEN" not in resolved_env("api", env) and "RAY_AUTH_TOKEN" not in resolved_env("mlflow", env)
    # the head's health check uses a path Ray's token auth leaves open (/api/version needs the token)
    assert "/api/gcs_healthz" in " ".join(SERVICES["ray-head"]["healthcheck"]["test"])
    bad = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bad["x-ray-env"]["RAY_AUTH_MODE"] = "${RAY_AUTH_MODE:-disabled}"
    bad["services"]["ray-worker"]["environment"] = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ""}
    assert ray_auth_problems(bad, env) == [
        "ray-head: RAY_AUTH_MODE is '${RAY_AUTH_MODE:-disabled}', not token by default",
        "ray-worker: RAY_AUTH_TOKEN does not come from the environment"]


def test_mlflow_needs_a_login_and_its_clients_have_one(monkeypatch):
    env = example_secrets()
    cmd = SERVICES["mlflow"]["command"]
    assert option(cmd, "--app-name") == "basic-auth"
    server = resolved_env("mlflow", env)
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert server["PGPASSWORD"] == env["POSTGRES_PASSWORD"] == resolved_env("postgres", env)["POSTGRES_PASSWORD"]
    assert (server["AWS_ACCESS_KEY_ID"], server["AWS_SECRET_ACCESS_KEY"]) == (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
    # the auth configuration is the file the image carries (Dockerfile: COPY docker ./docker, WORKDIR /app)
    assert server["MLFLOW_AUTH_CONFIG_PATH"] == "/app/docker/mlflow-auth.ini"
    assert re.search(r"^COPY docker \./docker$", (ROOT / "Dockerfile").read_text(), re.M)
    assert re.search(r"^WORKDIR /app$", (ROOT / "Dockerfile").read_text(), re.M)
    # every client of the server signs in as the admin the server creates
    for name in ("api", "ray-head", "ray-worker"):
        client_env = resolved_env(name, env)
        assert client_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert client_env["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
        assert client_env["MLFLOW_TRACKING_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"]
        # artifacts go through the server's proxy: no client holds the artifact store's credentials
        assert env["MINIO_ROOT_PASSWORD"] not in client_env.values()
    assert "AWS_SECRET_ACCESS_KEY" not in resolved_env("api", env)
    # the container MLflow reads the configuration from: a database password nowhere in the file
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ROOT / "docker" / "mlflow-auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.admin_password is None and config.database_uri == "postgresql://mlflow@postgres:5432/mlflow"
    assert option(cmd, "--backend-store-uri") == config.database_uri  # the same database, its own tables


def test_minio_credentials_and_console():
    env = example_secrets()
    assert "ports" not in SERVICES["minio"] and "--console-address" in SERVICES["minio"]["command"]
    init = interpolate(SERVICES["minio-init"], env)
    assert init["environment"] == {"MINIO_ROOT_USER": env["MINIO_ROOT_USER"], "MINIO_ROOT_PASSWORD": env["MINIO_ROOT_PASSWORD"],
                                   "CHECKPOINTS_ACCESS_KEY": env["CHECKPOINTS_ACCESS_KEY"],
                                   "CHECKPOINTS_SECRET_KEY": env["CHECKPOINTS_SECRET_KEY"]}
    # the container's shell expands them: the command line compose holds has no credential
    assert '"$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"' in init["command"][0]


def test_checkpoints_go_to_minio_as_their_own_user():
    """The Ray nodes write resume checkpoints to MinIO's `checkpoints` bucket (no shared volume),
    signed in as a user whose policy allows that bucket only; minio-init makes both."""
    import json

    env = example_secrets()
    for name in ("ray-head", "ray-worker"):
        node = resolved_env(name, env)
        assert node["ENSEMBLE_STORAGE"] == "s3://checkpoints" and node["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert (node["AWS_ACCESS_KEY_ID"], node["AWS_SECRET_ACCESS_KEY"]) == (
            env["CHECKPOINTS_ACCESS_KEY"], env["CHECKPOINTS_SECRET_KEY"])
        assert node["AWS_SECRET_ACCESS_KEY"] != env["MINIO_ROOT_PASSWORD"]
    assert option(SERVICES["minio"]["command"], "--address") == ":9000"
    init = interpolate(SERVICES["minio-init"], env)
    script = init["command"][0]
    assert "mc mb --ignore-existing local/mlflow local/checkpoints" in script
    mount, _, inside = init["volumes"][0].partition(":")
    inside = inside.rsplit(":ro", 1)[0]
    assert f"mc admin policy create local checkpoints {inside}" in script
    assert 'mc admin user add local "$CHECKPOINTS_ACCESS_KEY" "$CHECKPOINTS_SECRET_KEY"' in script
    assert 'policy attach local checkpoints --user "$CHECKPOINTS_ACCESS_KEY"' in script
    assert init["environment"]["CHECKPOINTS_SECRET_KEY"] == env["CHECKPOINTS_SECRET_KEY"]
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0       # the shell parses it
    policy = json.loads((ROOT / mount).read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::checkpoints", "arn:aws:s3:::checkpoints/*"}
    assert all(st["Effect"] == "Allow" and all(a.startswith("s3:") for a in st["Action"]) for st in policy["Statement"])


def test_the_nodes_storage_settings_reach_an_s3_server(s3_server, monkeypatch):
    """The variables compose gives the Ray nodes are the ones the service reads: with them (the
    endpoint pointed at this machine's S3 server instead of minio:9000), checkpoints are written."""
    from ensemble_service import storage

    node = resolved_env("ray-worker", example_secrets())
    for key in ("ENSEMBLE_STORAGE", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, node[key])
    for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    s3_server.create_bucket("checkpoints")
    root = storage.root(None)
    assert root == "s3://checkpoints" and storage.check(root) == ""
    storage.write_bytes(storage.join(root, "e1", "member_000.ckpt"), b"weights")
    assert "e1/member_000.ckpt" in s3_server.keys("checkpoints")
    storage.remove_tree(storage.join(root, "e1"))


def test_the_api_container_serves_only_with_its_keys(monkeypatch):
    """The api service's command and environment through the real `ensemble serve`: it starts
    (on 0.0.0.0 inside its container) because the keys are there, and refuses (exit 2) without."""
    import uvicorn
    from typer.testing import CliRunner

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: seen.update(app=application, **kw))
    env = example_secrets()
    cmd = SERVICES["api"]["command"]
    for key, value in resolved_env("api", env).items():
        monkeypatch.setenv(key, value)
    r = CliRunner().invoke(app, [*cmd[1:], "--no-preload"])
    assert r.exit_code == 0, r.output
    assert seen["host"] == "0.0.0.0" and seen["app"].state.settings.api_keys == (env["ENSEMBLE_API_KEYS"],)
    monkeypatch.delenv("ENSEMBLE_API_KEYS")
    seen.clear()
    r = CliRunner().invoke(app, [*cmd[1:], "--no-preload"])
    assert r.exit_code == 2 and "no API key is set" in r.output and not seen


# --------------------------------------------------------------------------- the same, running
# What the mlflow and ray-head services start, as plain processes on loopback (no Docker engine
# here): the compose command and environment, with only what needs Docker swapped (SQLite for
# Postgres, a directory for MinIO, free ports, 127.0.0.1 for 0.0.0.0).


def _swap(cmd: list, **values) -> list:
    out = list(cmd)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = str(value)
    return out


@pytest.mark.slow
def test_the_mlflow_service_refuses_strangers_and_serves_its_clients(tmp_path, monkeypatch):
    import base64
    import configparser
    import json
    import os
    import signal
    import urllib.error
    import urllib.request

    from fastapi.testclient import TestClient

    from ensemble_service import registry
    from ensemble_service.api import Settings, create_app
    from test_multinode import env as plain_env, free_ports, wait_for
    from test_serving import blob_of, finished_parent

    secrets = example_secrets()
    ini = configparser.ConfigParser()
    ini.read(ROOT / "docker" / "mlflow-auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path}/basic_auth.db"
    with open(tmp_path / "auth.ini", "w") as f:
        ini.write(f)
    server_env = dict(plain_env(), **resolved_env("mlflow", secrets))
    server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "auth.ini")
    port = free_ports(1)[0]
    cmd = _swap(SERVICES["mlflow"]["command"], backend_store_uri=f"sqlite:///{tmp_path}/mlflow.db",
                artifacts_destination=tmp_path / "artifacts", host="127.0.0.1", port=port,
                allowed_hosts=f"127.0.0.1:{port},localhost:{port}")
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:], "--workers", "1"], env=server_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def basic(auth) -> str:
        return "Basic " + base64.b64encode(":".join(auth).encode()).decode()

    def status(path: str, auth=None) -> int:
        req = urllib.request.Request(uri + path)
        if auth:
            req.add_header("Authorization", basic(auth))
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    try:
        # the service's health check: open
        health = SERVICES["mlflow"]["healthcheck"]["test"][-1]
        assert "localhost:5000/health'" in health
        wait_for(lambda: status("/health") == 200, 90, "the mlflow server's /health")
        search = "/api/2.0/mlflow/experiments/search?max_results=5"
        admin = (server_env["MLFLOW_AUTH_ADMIN_USERNAME"], server_env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert status(search) == 401 and status("/") == 401
        assert status(search, (admin[0], "a-wrong-password-123")) == 401
        assert status(search, admin) == 200
        # the API's container environment signs it in: register an ensemble, serve it behind its key
        api_env = resolved_env("api", secrets)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", api_env["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", api_env["MLFLOW_TRACKING_PASSWORD"])
        parent = finished_parent(uri, "compose-auth", {"ensemble_mean_test_acc": 0.5})
        registry.register_ensemble(uri, parent, "alpha", [blob_of("mlp", 0)], [{"index": 0, "architecture": "mlp"}],
                                   "independent")
        key = api_env["ENSEMBLE_API_KEYS"]
        with TestClient(create_app(uri, Settings(api_keys=(key,)))) as c:
            r = c.post("/v1/ensembles/alpha/predict", json={"inputs": [[0.5] * 64]},
                       headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and len(r.json()["labels"]) == 1
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-wrong-password-123")  # without its login: 503, not data
        with TestClient(create_app(uri, Settings(api_keys=(key,)))) as c:
            r = c.get("/v1/ensembles", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 503 and "tracking store unavailable" in r.json()["detail"]
        # rotating the admin password as README's Security section says
        new = "a-new-admin-password-456"
        req = urllib.request.Request(uri + "/api/2.0/mlflow/users/update-password", method="PATCH",
                                     data=json.dumps({"username": admin[0], "password": new,
                                                      "current_password": admin[1]}).encode(),
                                     headers={"content-type": "application/json",
                                              "Authorization": basic(admin)})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        assert status(search, admin) == 401 and status(search, (admin[0], new)) == 200
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        log.close()


@pytest.mark.slow
def test_the_ray_head_service_needs_its_token_but_its_health_check_does_not(tmp_path):
    import os
    import signal
    import tempfile
    import urllib.error
    import urllib.request

    from test_multinode import env as plain_env, free_ports, kill_processes_under, node_ports, wait_for

    secrets = example_secrets()
    head_env = dict(plain_env(), **resolved_env("ray-head", secrets))
    assert head_env["RAY_AUTH_MODE"] == "token"
    ports = free_ports(10)
    cmd = _swap([c for c in SERVICES["ray-head"]["command"] if c != "--block"], port=ports[0],
                dashboard_port=ports[1], dashboard_host="127.0.0.1")
    head_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")

    def status(path: str, token=None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{ports[1]}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    # its own process group: some of Ray's processes (the client server, renamed agents) do not
    # name the temp dir on their command line
    start = subprocess.Popen([str(BIN / "ray"), *cmd[1:], "--node-ip-address=127.0.0.1", f"--temp-dir={head_dir}",
                              f"--ray-client-server-port={ports[2]}", "--disable-usage-stats", *node_ports(ports[3:9])],
                             env=head_env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert start.wait(timeout=120) == 0, "ray start --head failed"
        health = re.search(r"localhost:8265(/[^']*)'", SERVICES["ray-head"]["healthcheck"]["test"][-1]).group(1)
        wait_for(lambda: status(health) == 200, 60, "the head's health check without a token")
        assert status("/api/jobs/") == 401 and status("/api/version") == 401
        assert status("/api/jobs/", "not-the-token-0123456789") in (401, 403)
        assert status("/api/jobs/", secrets["RAY_AUTH_TOKEN"]) == 200
    finally:
        try:
            os.killpg(start.pid, signal.SIGKILL)
        except OSError:
            pass
        kill_processes_under(head_dir)

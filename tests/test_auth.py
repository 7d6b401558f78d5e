"""Nothing open by default: the API's keys (every route, a real uvicorn, `ensemble serve` and
`ensemble predict`), CORS, the guarantees that hold with or without keys (weights-only
checkpoints, no unpickling, request limits), and what the CLI says about open addresses."""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from ensemble_service import registry
from ensemble_service.api import Settings, create_app
from ensemble_service.api.auth import (
    ApiKeyMiddleware, address_host, check_keys, is_loopback, redact_uri, split_list,
)
from ensemble_service.cli import app as cli_app
from ensemble_service.artifact import member_record
from ensemble_service.serving import Ensemble
from test_serving import blob_of, finished_parent, synthetic_data

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"
ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    uri = f"sqlite:///{tmp}/mlflow.db"
    blobs = [blob_of("mlp", 0), blob_of("mlp", 1)]
    info = [{"index": i, "architecture": "mlp"} for i in range(2)]
    registry.register_ensemble(uri, finished_parent(uri, "auth", {"ensemble_mean_test_acc": 0.5}), "alpha",
                               blobs, info, "independent")
    x = synthetic_data().x_test[:4]
    expected = Ensemble.from_blobs(blobs, [member_record(i, "mlp") for i in range(2)]).predict(x, "mean")
    return {"uri": uri, "tmp": tmp, "x": x.reshape(len(x), -1).tolist(), "labels": expected.labels.tolist()}


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store["uri"], Settings(alias_ttl_s=60, api_keys=(KEY_A, KEY_B)))) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def protected_requests(store):
    """One request per route of the app, each of which would answer 200 with a key."""
    return [("GET", "/v1/ensembles", None), ("GET", "/v1/ensembles/alpha", None),
            ("GET", "/v1/ensembles/alpha/versions/1", None),
            ("POST", "/v1/ensembles/alpha/predict", {"inputs": store["x"]}),
            ("POST", "/v1/aggregate", {"predictions": [[[0.7, 0.3]], [[0.4, 0.6]]]})]


# --------------------------------------------------------------------------- the API's keys


def test_every_route_but_health_and_docs_needs_a_key(client, store):
    requests = protected_requests(store)
    # the list covers every route the app has: a new route is checked here (and protected by default)
    routes = {(m, r.path) for r in client.app.routes for m in getattr(r, "methods", ()) or ()}
    documented = {("GET", "/healthz"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"),
                  ("GET", "/openapi.json"), ("HEAD", "/docs"), ("HEAD", "/docs/oauth2-redirect"), ("HEAD", "/redoc"),
                  ("HEAD", "/openapi.json")}
    covered = {("GET", "/v1/ensembles"), ("GET", "/v1/ensembles/{name}"), ("POST", "/v1/ensembles/{name}/predict"),
               ("POST", "/v1/aggregate")}
    assert {r for r in routes if r not in documented} <= covered | {("GET", "/v1/ensembles/{name:path}"),
                                                                     ("POST", "/v1/ensembles/{name:path}/predict")}
    for method, path, body in requests:
        for headers, problem in (({}, "missing API key: send 'Authorization: Bearer <key>'"), (bearer("wrong-key-0123456789"), "invalid API key"),
                                 (bearer(KEY_A[:-1]), "invalid API key"), (bearer(KEY_A + "x"), "invalid API key"),
                                 ({"Authorization": f"Basic {KEY_A}"}, "expected 'Authorization: Bearer <key>'"),
                                 ({"Authorization": "Bearer "}, "expected 'Authorization: Bearer <key>'")):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            # one line, the API's error format, nothing about which keys exist
            assert r.json() == {"detail": f"authorization: {problem}", "field": "authorization"}
            assert r.headers["www-authenticate"].startswith("Bearer")
        for key in (KEY_A, KEY_B):  # several keys: each one works (rotation without downtime)
            r = client.request(method, path, json=body, headers=bearer(key))
            assert r.status_code == 200, (method, path, r.text)
        r = client.request(method, path, json=body, headers={"authorization": f"bearer   {KEY_B}  "})
        assert r.status_code == 200  # the scheme is case-insensitive, spaces around the key do not matter


def test_open_paths_answer_without_a_key(client, store):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    # the schema declares the bearer key, so /docs has an Authorize button; every protected operation lists 401
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer",
        "description": "One of the server's API keys (ensemble serve --api-key / ENSEMBLE_API_KEYS)."}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            if path == "/healthz":
                assert "security" not in op
            else:
                assert op["security"] == [{"apiKey": []}] and "401" in op["responses"], path


def test_predict_with_the_key_equals_the_ensemble(client, store):
    r = client.post("/v1/ensembles/alpha/predict", json={"inputs": store["x"]}, headers=bearer(KEY_A))
    assert r.status_code == 200 and r.json()["labels"] == store["labels"]


def test_no_keys_means_no_check(store):
    with TestClient(create_app(store["uri"], Settings())) as c:
        assert c.post("/v1/ensembles/alpha/predict", json={"inputs": store["x"]}).status_code == 200


def test_an_unauthenticated_body_is_not_read(client):
    """The key is checked before the body limit: no key, no 8 MiB read; with a key the limit holds."""
    big = b"x" * (9 * 1024 * 1024)
    r = client.post("/v1/aggregate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/aggregate", content=big, headers={"content-type": "application/json", **bearer(KEY_A)})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_request_limits_hold_with_keys(store):
    settings = Settings(max_batch_items=2, max_members=2, alias_ttl_s=60, api_keys=(KEY_A,))
    with TestClient(create_app(store["uri"], settings)) as c:
        r = c.post("/v1/ensembles/alpha/predict", json={"inputs": store["x"][:3]}, headers=bearer(KEY_A))
        assert r.status_code == 422 and "limit of 2" in r.json()["detail"]
        r = c.post("/v1/aggregate", json={"predictions": [[[0.5, 0.5]]] * 3}, headers=bearer(KEY_A))
        assert r.status_code == 422 and "3 members exceed the limit of 2" in r.json()["detail"]


def test_request_bodies_are_never_unpickled_with_a_key(client, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for path in ("/v1/aggregate", "/v1/ensembles/alpha/predict"):
        for ctype in ("application/json", "application/octet-stream", "application/python-pickle"):
            r = client.post(path, content=pickle.dumps(Evil()), headers={"content-type": ctype, **bearer(KEY_A)})
            assert 400 <= r.status_code < 500
    assert not marker.exists()


def test_a_registered_artifact_is_never_unpickled(tmp_path):
    """The server rebuilds members from weights-only checkpoints: a registered version whose member
    file (and the pyfunc model's own files) hold a pickle that would run code is refused with a 503."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = finished_parent(uri, "evil", {"ensemble_mean_test_acc": 0.5})
    registry.register_ensemble(uri, parent, "evil", [blob_of("mlp", 0)], [{"index": 0, "architecture": "mlp"}],
                               "independent")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    members = [p for p in tmp_path.rglob("members/*.pt")]
    assert members, "the registered member checkpoint is on disk"
    for p in members:  # a checkpoint with a code-running object next to its weights
        buf = io.BytesIO()
        torch.save({"model": {"name": "mlp"}, "input_shape": [1, 8, 8], "num_classes": 3, "state_dict": {},
                    "x": Evil()}, buf)
        p.write_bytes(buf.getvalue())
    for p in tmp_path.rglob("*.pkl"):  # and every pickle MLflow keeps with the model
        p.write_bytes(pickle.dumps(Evil()))
    with TestClient(create_app(uri, Settings(api_keys=(KEY_A,)))) as c:
        r = c.post("/v1/ensembles/evil/predict", json={"inputs": [[0.5] * 64]}, headers=bearer(KEY_A))
    assert r.status_code == 503 and "cannot be loaded" in r.json()["detail"]
    assert not marker.exists()


# --------------------------------------------------------------------------- CORS


def test_cors_is_off_unless_origins_are_named(store):
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with TestClient(create_app(store["uri"], Settings(api_keys=(KEY_A,)))) as c:
        r = c.get("/v1/ensembles", headers={"Origin": "https://app.example.com", **bearer(KEY_A)})
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        assert c.options("/v1/aggregate", headers=preflight).status_code == 401
    settings = Settings(api_keys=(KEY_A,), cors_origins=("https://app.example.com",))
    with TestClient(create_app(store["uri"], settings)) as c:
        r = c.options("/v1/aggregate", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/ensembles", headers={"Origin": "https://app.example.com", **bearer(KEY_A)})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.get("/v1/ensembles", headers={"Origin": "https://evil.example.com", **bearer(KEY_A)})
        assert "access-control-allow-origin" not in r.headers
        r = c.options("/v1/aggregate", headers=dict(preflight, Origin="https://evil.example.com"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        # a browser's call without the key is still refused, with the CORS header so the page can read why
        r = c.get("/v1/ensembles", headers={"Origin": "https://app.example.com"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example.com"


def test_settings_from_env_keys_and_origins(monkeypatch):
    monkeypatch.setenv("ENSEMBLE_API_KEYS", f" {KEY_A},{KEY_B} ,")
    monkeypatch.setenv("ENSEMBLE_SERVE_CORS_ORIGINS", "https://a.example.com, https://b.example.com")
    s = Settings.from_env()
    assert s.api_keys == (KEY_A, KEY_B)
    assert s.cors_origins == ("https://a.example.com", "https://b.example.com")
    assert KEY_A not in repr(s)  # keys never end up in a log line that prints the settings
    assert Settings.from_env(api_keys=(KEY_B,)).api_keys == (KEY_B,)  # the command line wins


def test_key_rules(tmp_path):
    assert split_list("a, b,,c\nd") == ("a", "b", "c", "d") and split_list(None) == ()
    assert check_keys([KEY_A, KEY_B]) is None
    assert "API key 2 of 2 has 5 characters; use at least 16" in check_keys([KEY_A, "short"])
    assert "short" not in check_keys([KEY_A, "short"])  # never the key itself
    assert "printable ASCII" in check_keys(["0123456789abcdef ghi"])
    with pytest.raises(ValueError):
        ApiKeyMiddleware(None, [])
    with pytest.raises(ValueError, match="use at least 16"):
        create_app(f"sqlite:///{tmp_path}/mlflow.db", Settings(api_keys=("short",)))


def test_addresses():
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", "", None):
        assert not is_loopback(host), host
    assert address_host("http://10.0.0.5:8265") == "10.0.0.5"
    assert address_host("ray://head.example.com:10001") == "head.example.com"
    assert address_host("10.0.0.5:6379") == "10.0.0.5" and address_host("[::1]:6379") == "::1"
    assert address_host("auto") is None and address_host(None) is None
    assert redact_uri("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_healthz_never_shows_a_password(tmp_path):
    uri = f"postgresql://mlflow:s3cret-password@127.0.0.1:{free_port()}/mlflow"
    with TestClient(create_app(uri, Settings())) as c:
        body = c.get("/healthz").json()
    assert "s3cret-password" not in json.dumps(body) and body["tracking_uri"].endswith(":***@" + uri.split("@")[1])


# --------------------------------------------------------------------------- ensemble serve / predict


@pytest.fixture
def fake_uvicorn(monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: seen.update(app=application, **kw))
    monkeypatch.delenv("ENSEMBLE_API_KEYS", raising=False)
    return seen


def test_serve_on_all_interfaces_without_a_key_exits_2(store, fake_uvicorn):
    for host in ("0.0.0.0", "10.1.2.3", "::", "myhost.example.com"):
        r = runner.invoke(cli_app, ["serve", "--host", host, "--tracking-uri", store["uri"], "--no-preload"])
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: --host") and r.output.count("\n") == 1 and "--insecure" in r.output
    assert "app" not in fake_uvicorn  # nothing was served


def test_serve_loopback_needs_no_key(store, fake_uvicorn):
    r = runner.invoke(cli_app, ["serve", "--tracking-uri", store["uri"], "--no-preload"])
    assert r.exit_code == 0, r.output
    assert fake_uvicorn["host"] == "127.0.0.1" and fake_uvicorn["app"].state.settings.api_keys == ()
    assert "with no API key" in r.output


def test_serve_with_keys_from_the_environment_or_options(store, fake_uvicorn, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_API_KEYS", f"{KEY_A},{KEY_B}")
    r = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--tracking-uri", store["uri"], "--no-preload"])
    assert r.exit_code == 0, r.output
    assert fake_uvicorn["app"].state.settings.api_keys == (KEY_A, KEY_B) and "with 2 API key(s)" in r.output
    assert KEY_A not in r.output and KEY_B not in r.output
    with TestClient(fake_uvicorn["app"]) as c:
        assert c.get("/v1/ensembles").status_code == 401
        assert c.get("/v1/ensembles", headers=bearer(KEY_B)).status_code == 200
    monkeypatch.delenv("ENSEMBLE_API_KEYS")
    r = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--api-key", KEY_A, "--cors-origin",
                                "https://app.example.com", "--tracking-uri", store["uri"], "--no-preload"])
    assert r.exit_code == 0, r.output
    s = fake_uvicorn["app"].state.settings
    assert s.api_keys == (KEY_A,) and s.cors_origins == ("https://app.example.com",)


@pytest.mark.parametrize("args, fragment", [
    (["--api-key", "short"], "has 5 characters; use at least 16"),
    (["--api-key", KEY_A, "--cors-origin", "*"], "'*' is not accepted"),
    (["--api-key", KEY_A, "--cors-origin", "https://app.example.com/path"], "is not an origin"),
])
def test_serve_bad_keys_and_origins_exit_2(store, fake_uvicorn, args, fragment):
    r = runner.invoke(cli_app, ["serve", *args, "--tracking-uri", store["uri"], "--no-preload"])
    assert r.exit_code == 2 and fragment in r.output and r.output.count("\n") == 1, r.output
    assert "short" not in r.output  # a key is never printed, not even a bad one


def test_serve_insecure_is_said_loudly(store, fake_uvicorn):
    r = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--insecure", "--tracking-uri", store["uri"],
                                "--no-preload"])
    assert r.exit_code == 0, r.output
    assert "WARNING: --insecure: serving WITHOUT authentication on 0.0.0.0:8000" in r.output
    assert fake_uvicorn["host"] == "0.0.0.0" and fake_uvicorn["app"].state.settings.api_keys == ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(store):
    import uvicorn

    port = free_port()
    app = create_app(store["uri"], Settings(preload=True, api_keys=(KEY_A, KEY_B)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_real_server_and_the_predict_command(live_server, store, tmp_path, monkeypatch):
    """Over real HTTP: 401 without or with a wrong key, 200 with it, /healthz open; `ensemble
    predict` sends ENSEMBLE_API_KEY."""
    import httpx

    body = {"inputs": store["x"]}
    with httpx.Client(base_url=live_server, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/v1/ensembles/alpha/predict", json=body).status_code == 401
        assert http.post("/v1/ensembles/alpha/predict", json=body, headers=bearer("nope-0123456789abcdef")).status_code == 401
        r = http.post("/v1/ensembles/alpha/predict", json=body, headers=bearer(KEY_A))
        assert r.status_code == 200 and r.json()["labels"] == store["labels"]
    np.save(tmp_path / "x.npy", np.asarray(store["x"], dtype=np.float32))
    args = ["predict", "alpha", str(tmp_path / "x.npy"), "--url", live_server]
    monkeypatch.delenv("ENSEMBLE_API_KEY", raising=False)
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 2 and r.output.startswith("error: 401: authorization: missing API key")
    assert "set ENSEMBLE_API_KEY" in r.output and r.output.count("\n") == 1
    monkeypatch.setenv("ENSEMBLE_API_KEY", "wrong-key-0123456789")
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 2 and "401: authorization: invalid API key (check ENSEMBLE_API_KEY)" in r.output
    monkeypatch.setenv("ENSEMBLE_API_KEY", KEY_B)
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 0, r.output
    assert [int(v) for v in r.output.split()] == store["labels"]


# --------------------------------------------------------------------------- the CLI's warnings, secrets at home


def _non_loopback_ip() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            ip = ""
    if not ip or is_loopback(ip) or ip == "0.0.0.0":
        pytest.skip("this machine has no non-loopback IPv4 address")
    return ip


def test_submit_warns_once_about_a_remote_cluster_without_a_token(monkeypatch):
    """A Jobs API on another machine, no token: one warning line, then the (refused) submission."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    address = f"http://{_non_loopback_ip()}:{free_port()}"  # nothing listens there: refused at once
    args = ["submit", "--address", address, "data=synthetic", "strategy.members=1"]
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.strip().splitlines() if not line.startswith("recipe synthetic_mlp:")]
    assert lines[0] == (f"warning: submitting to {address} without a Ray token (set RAY_AUTH_TOKEN); a cluster "
                        f"that takes jobs without one runs anyone's code")
    assert len(lines) == 2 and lines[1].startswith("error:")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-0123456789abcdef")  # with a token: no warning
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 1 and "warning" not in r.output
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    loopback = f"http://127.0.0.1:{free_port()}"  # this machine: no warning either
    r = runner.invoke(cli_app, ["submit", "--address", loopback, "data=synthetic", "strategy.members=1"])
    assert r.exit_code == 1 and "warning" not in r.output


def test_ui_binds_loopback_and_says_how_to_tunnel(monkeypatch, tmp_path):
    import subprocess

    calls = []

    class FakeServer:  # the UI's server process, without starting one
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            self.pid, self.stderr = 0, iter(())

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    port = free_port()
    r = runner.invoke(cli_app, ["ui", "--port", str(port), "--tracking-uri", uri])
    assert r.exit_code == 0, r.output
    assert calls[0][calls[0].index("--host") + 1] == "127.0.0.1"
    assert f"ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}" in r.output and "warning" not in r.output
    r = runner.invoke(cli_app, ["ui", "--host", "0.0.0.0", "--port", str(port), "--tracking-uri", uri])
    assert r.exit_code == 0 and "warning: the MLflow UI has no login" in r.output and "ssh -N" not in r.output


def test_the_job_upload_leaves_dot_env_at_home(tmp_path):
    """`ensemble submit --address` uploads the project directory: .env (every secret of the stack)
    stays out of the package Ray builds with the job's excludes."""
    from ray._private.runtime_env.packaging import _zip_files

    from ensemble_service import jobs

    project = tmp_path / "project"
    (project / "conf").mkdir(parents=True)
    (project / "conf" / "config.yaml").write_text("a: 1\n")
    (project / ".env").write_text("RAY_AUTH_TOKEN=secret\n")
    (project / ".env.example").write_text("RAY_AUTH_TOKEN=\n")
    _zip_files(str(project), jobs.EXCLUDES, str(tmp_path / "job.zip"), include_gitignore=False)
    names = {Path(n).name for n in zipfile.ZipFile(tmp_path / "job.zip").namelist()}
    assert "config.yaml" in names and ".env.example" in names and ".env" not in names


def test_a_working_directory_too_big_to_zip_is_told_in_the_users_terms():
    """Python's zipfile refuses a file of 2 GiB or more in the job's package with "File size too
    large, try using force_zip64": the submission's error names the working directory and what to do."""
    import inspect

    from ensemble_service import jobs

    raised = 'raise RuntimeError("File size too large, try using force_zip64")'
    assert raised in inspect.getsource(zipfile)  # the text the mapping looks for is zipfile's own
    message = jobs._upload_problem(RuntimeError("File size too large, try using force_zip64"), "/home/u/proj")
    assert message.startswith("the working directory /home/u/proj (uploaded as the job's working_dir) holds a file "
                              "of 2 GiB or more;") and ".rayignore" in message
    assert jobs._upload_problem(ValueError("Package size (600MiB) exceeds the maximum size of 512MiB. To exclude\n"
                                           "more"), "/p") == "Package size (600MiB) exceeds the maximum size of 512MiB. To exclude"

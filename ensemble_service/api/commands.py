"""The `ensemble serve` and `ensemble predict` commands (registered on the CLI's Typer app).

    ensemble serve [--host] [--port] [--tracking-uri]     the HTTP API under uvicorn
    ensemble predict NAME FILE [--method] [--url]         labels of a registered ensemble for FILE

`serve` takes API keys from ``--api-key`` or ENSEMBLE_API_KEYS (comma-separated) and refuses a
non-loopback ``--host`` without one (exit 2) unless ``--insecure``; `predict` sends
ENSEMBLE_API_KEY as ``Authorization: Bearer ...``.

FILE is a ``.npy`` array (read with ``allow_pickle=False``) or a ``.json`` file holding either
the inputs (a nested list) or a request object (``{"inputs": ..., "method": ...}``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

DEFAULT_URL = "http://127.0.0.1:8000"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _load_inputs(path: Path) -> Dict[str, Any]:
    from ensemble_service.cli import fail

    if not path.is_file():
        fail(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        try:
            frame = pd.read_csv(path, sep="," if suffix == ".csv" else "\t")
        except Exception as exc:
            fail(f"cannot read {path} as CSV: {' '.join(str(exc).split())[:200]}")
        # rows as {column: value}: the ensemble picks its feature columns by name (others are ignored)
        return {"inputs": json.loads(frame.to_json(orient="records"))}
    if suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            fail(f"cannot read {path} as a NumPy array: {str(exc).splitlines()[0]}")
        if arr.dtype.kind not in "biuf":
            fail(f"{path} holds {arr.dtype} values; inputs must be numbers")
        return {"inputs": arr.astype("float64").tolist()}
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read {path} as JSON: {str(exc).splitlines()[0]}")
        if isinstance(data, dict):
            if "inputs" not in data:
                fail(f"{path} is a JSON object without 'inputs'")
            return dict(data)
        if isinstance(data, list):
            return {"inputs": data}
        fail(f"{path} must hold a list of inputs or an object with 'inputs'")
    fail(f"unsupported file type {suffix or '(none)'!r}: use .npy, .json, .csv or image files")
    raise AssertionError  # unreachable


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    device: str = typer.Option("cpu", help="Where members run: cpu, cuda or auto."),
    preload: bool = typer.Option(True, help="Load every registered ensemble's latest version at startup."),
    max_body_bytes: Optional[int] = typer.Option(None, min=1, help="Larger request bodies get 413 (default 8 MiB)."),
    max_batch_items: Optional[int] = typer.Option(None, min=1, help="Items per request (default 1024)."),
    max_members: Optional[int] = typer.Option(None, min=1, help="Members per /v1/aggregate request (default 64)."),
    alias_ttl: Optional[float] = typer.Option(None, min=0, help="Seconds before name@alias is resolved again (default 2)."),
    threads: int = typer.Option(0, min=0, help="torch intra-op threads (0: torch's default). Small models "
                                               "under concurrent load often answer faster with 1."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    access_log: bool = typer.Option(True, help="Log every request."),
    api_key: Optional[List[str]] = typer.Option(
        None, "--api-key", help="A key clients must send as 'Authorization: Bearer KEY' (repeat for several; "
                                "default: ENSEMBLE_API_KEYS, comma-separated, which keeps keys out of `ps`). "
                                "/healthz and the docs stay open."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve a non-loopback --host without any API key."),
    cors_origin: Optional[List[str]] = typer.Option(
        None, "--cors-origin", help="An origin browsers may call the API from, e.g. https://app.example.com "
                                    "(repeat for several; default: none, CORS off)."),
) -> None:
    """Serve registered ensembles over HTTP (FastAPI under uvicorn): predict, aggregate, list, describe.

    With API keys (--api-key or ENSEMBLE_API_KEYS) every request but /healthz and the docs needs
    'Authorization: Bearer KEY'. A --host other than loopback needs a key, or --insecure."""
    import uvicorn

    from ensemble_service.api import auth
    from ensemble_service.api.app import Settings, create_app
    from ensemble_service.cli import console, err, fail
    from ensemble_service.tracking import resolve_uri

    if device not in ("cpu", "cuda", "auto"):
        fail(f"unknown device {device!r}; choose one of: cpu, cuda, auto")
    settings = Settings.from_env(device=device, preload=preload, gc_freeze=True, max_body_bytes=max_body_bytes,
                                 max_batch_items=max_batch_items, max_members=max_members, alias_ttl_s=alias_ttl,
                                 api_keys=tuple(api_key) if api_key else None,
                                 cors_origins=tuple(cors_origin) if cors_origin else None)
    problem = auth.check_keys(settings.api_keys) or auth.check_origins(settings.cors_origins)
    if problem:
        fail(problem)
    if not settings.api_keys and not auth.is_loopback(host):
        if not insecure:
            fail(f"--host {host} is reachable from other machines and no API key is set: set ENSEMBLE_API_KEYS "
                 f"(or --api-key), or pass --insecure to serve without authentication")
        err.print(f"[bold red]WARNING: --insecure: serving WITHOUT authentication on {host}:{port}; anyone who "
                  f"can reach it can list the registered ensembles and query them without limit[/]",
                  highlight=False, soft_wrap=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    app = create_app(tracking_uri, settings)
    keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API key"
    console.print(f"serving ensembles registered in {auth.redact_uri(resolve_uri(tracking_uri))} on "
                  f"http://{host}:{port} with {keys} (docs: http://{host}:{port}/docs)", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    except KeyboardInterrupt:
        raise typer.Exit(0)


def predict(
    name: str = typer.Argument(..., help="Registered ensemble: name, name@alias or name/versions/N."),
    files: List[Path] = typer.Argument(..., help="Inputs: a .npy array, a .json list (or {\"inputs\": ...}), a .csv "
                                                  "table with a header row, or image files (PNG, JPEG, ...)."),
    method: Optional[str] = typer.Option(None, help="mean, vote, weighted or logit_mean (default: mean)."),
    url: str = typer.Option(os.environ.get("ENSEMBLE_URL", DEFAULT_URL), help="Base URL of `ensemble serve`."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole response as JSON instead of the labels."),
    timeout: float = typer.Option(60.0, min=0.1, help="Seconds to wait for the answer."),
) -> None:
    """Ask a running `ensemble serve` for the labels of the inputs in FILES (one label per line, with
    the class name when the ensemble knows it). Inputs are raw, in the training data's format: the
    ensemble applies its own preprocessing. The API key, when the server has them, comes from
    ENSEMBLE_API_KEY."""
    from urllib.parse import quote

    import httpx

    from ensemble_service.cli import EXIT_FAILED, console, fail

    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if images and len(images) != len(files):
        fail("give either image files or one .npy/.json/.csv file, not both")
    if not images and len(files) != 1:
        fail("give one .npy, .json or .csv file (several files only for images)")
    endpoint = f"{url.rstrip('/')}/v1/ensembles/{quote(name, safe='@/')}/predict"
    key = os.environ.get("ENSEMBLE_API_KEY", "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        if images:
            for f in images:
                if not f.is_file():
                    fail(f"no such file: {f}")
            form = {"method": method} if method is not None else {}
            resp = httpx.post(endpoint, files=[("files", (f.name, f.read_bytes())) for f in images], data=form,
                              timeout=timeout, headers=headers)
        else:
            body = _load_inputs(files[0])
            if method is not None:
                body["method"] = method
            resp = httpx.post(endpoint, json=body, timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc}", EXIT_FAILED)
    try:
        data = resp.json()
    except ValueError:
        data = {"detail": resp.text[:500]}
    if resp.status_code != 200:
        detail = data.get("detail") if isinstance(data, dict) else data
        if resp.status_code == 401:
            detail = f"{detail} ({'check' if key else 'set'} ENSEMBLE_API_KEY)"
        fail(f"{resp.status_code}: {detail}", 2 if 400 <= resp.status_code < 500 else EXIT_FAILED)
    if as_json:
        console.print_json(json.dumps(data))
        return
    names = data.get("class_names")
    for i, label in enumerate(data["labels"]):
        typer.echo(f"{label}\t{names[i]}" if names else label)


def register(app: typer.Typer) -> None:
    """Add `serve` and `predict` to the `ensemble` command."""
    app.command()(serve)
    app.command()(predict)

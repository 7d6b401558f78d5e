"""Remote submission through Ray's Jobs API (the only module besides scheduler.py that
imports Ray).

``ensemble submit --address http://HEAD:8265 [overrides...]`` composes and checks the config on
the client, then submits a job whose

* working directory is the user's current directory (their model modules and data files; derived
  files such as ``mlflow.db``, ``.venv`` or ``.git`` are left out),
* ``py_modules`` are this package's ``ensemble_service`` and ``workers`` (so the cluster runs the
  client's version of the service; its dependencies must be installed on the cluster),
* entrypoint is ``python -m ensemble_service.cli submit --resolved`` with the resolved config in
  the ``ENSEMBLE_RESOLVED_CONFIG`` environment variable (conf/ is not needed there), run by the
  Python that runs Ray on the head node: a head started from a virtualenv that is not activated
  (``.venv/bin/ray start --head``) still runs the job with that virtualenv's Python.

That driver joins the cluster (Ray sets RAY_ADDRESS for it) and trains exactly as a local submit
would. The tracking URI should then be an MLflow server every node reaches
(``tracking.uri=http://...``); MLFLOW_TRACKING_URI is forwarded to the job.

Token auth: when RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) is set, the client sends it as a
bearer token, whatever RAY_AUTH_MODE says locally.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ray.job_submission import JobStatus, JobSubmissionClient

PACKAGES = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "workers"]
# gitignore-style, relative to the uploaded working directory: what the service itself derives
EXCLUDES = ["/.env", "/.venv", "/venv", "/.git", "/mlruns", "/mlartifacts", "/mlflow.db", "/.ensemble", "/outputs",
            "/multirun", "/.pytest_cache", "/.hypothesis", "__pycache__", "*.pyc", "/.whl", "*.ckpt", "*.egg-info"]
CONFIG_ENV = "ENSEMBLE_RESOLVED_CONFIG"
# The Python that runs Ray on the head: the job supervisor (the entrypoint's parent) has Ray's
# _raylet.so mapped from that environment's site-packages; fall back to python3 / python on PATH.
_FIND_PYTHON = ('PY=; R=$(grep -m1 -o "/[^ ]*/ray/_raylet[^ ]*\\.so" /proc/$PPID/maps 2>/dev/null); '
                'if [ -n "$R" ] && [ -x "${R%/lib/python*}/bin/python" ]; then PY="${R%/lib/python*}/bin/python"; '
                'else PY=$(command -v python3 || command -v python); fi; ')
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "ENSEMBLE_STORAGE")


class JobsError(RuntimeError):
    """A Jobs API call failed; the message is one line."""


def _token() -> Optional[str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path and Path(path).is_file():
        token = Path(path).read_text().strip()
    return token or None


def has_token() -> bool:
    """Whether Ray clients started here authenticate: a token is given (RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH), or RAY_AUTH_MODE=token (Ray then also reads ~/.ray/auth_token)."""
    return _token() is not None or os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def client(address: str) -> JobSubmissionClient:
    headers = {}
    token = _token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as exc:
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def entrypoint() -> str:
    return _FIND_PYTHON + 'exec "$PY" -m ensemble_service.cli submit --resolved'


def runtime_env(config_json: str, working_dir: Optional[str] = None) -> Dict[str, object]:
    """The job's runtime environment (see the module docstring)."""
    env: Dict[str, str] = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    # RAY_JOB_STOP_WAIT_TIME_S: time between `ensemble cancel`'s SIGTERM and a SIGKILL, enough for the
    # driver to mark its MLflow runs KILLED
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               RAY_JOB_STOP_WAIT_TIME_S="20")
    env[CONFIG_ENV] = config_json
    return {"working_dir": working_dir or os.getcwd(), "excludes": EXCLUDES,
            "py_modules": [str(p) for p in PACKAGES], "env_vars": env}


def submit(address: str, overrides: List[str], config_json: str, *, submission_id: Optional[str] = None,
           working_dir: Optional[str] = None) -> str:
    """Submit the resolved config ``config_json`` (what ``overrides`` composed to) as a job."""
    try:
        return client(address).submit_job(entrypoint=entrypoint(), runtime_env=runtime_env(config_json, working_dir),
                                          submission_id=submission_id,
                                          metadata={"tool": "ensemble", "overrides": " ".join(overrides)[:1000]})
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"job submission to {address} failed: {_upload_problem(exc, working_dir or os.getcwd())}") \
            from None


def _upload_problem(exc: BaseException, working_dir: str) -> str:
    """The first line of a failed submission, told in the user's terms where it is the upload of the
    working directory: Python's zipfile says "File size too large, try using force_zip64" for a file
    of 2 GiB or more."""
    if "zip64" not in str(exc):
        return _first_line(exc)
    return (f"the working directory {working_dir} (uploaded as the job's working_dir) holds a file of 2 GiB or "
            "more; submit from your project's own directory, or list large files in its .rayignore or "
            ".gitignore (data belongs on storage the cluster reads)")


def status(address: str, job_id: str) -> str:
    try:
        return str(client(address).get_job_status(job_id).value)
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"no job {job_id!r} at {address}: {_first_line(exc)}") from None


def list_jobs(address: str) -> List[Dict[str, object]]:
    try:
        jobs = client(address).list_jobs()
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"cannot list jobs at {address}: {_first_line(exc)}") from None
    out = [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
            "start_time": j.start_time, "end_time": j.end_time, "message": j.message or ""} for j in jobs]
    return sorted(out, key=lambda j: j["start_time"] or 0, reverse=True)


def logs(address: str, job_id: str) -> str:
    try:
        return client(address).get_job_logs(job_id)
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"no logs for job {job_id!r} at {address}: {_first_line(exc)}") from None


def follow(address: str, job_id: str) -> Iterator[str]:
    """Yield log chunks until the job ends."""
    c = client(address)

    # tail_job_logs is an async generator; drive it chunk by chunk from sync code
    agen = c.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                chunk = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                break
            yield chunk
    except Exception as exc:
        raise JobsError(f"lost the log stream of {job_id}: {_first_line(exc)}") from None
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        except Exception:
            pass
        loop.close()


def cancel(address: str, job_id: str) -> bool:
    try:
        return bool(client(address).stop_job(job_id))
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"cannot cancel job {job_id!r} at {address}: {_first_line(exc)}") from None


def wait(address: str, job_id: str, timeout: Optional[float] = None, poll: float = 1.0) -> str:
    start = time.time()
    terminal = {JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.STOPPED.value}
    while True:
        s = status(address, job_id)
        if s in terminal:
            return s
        if timeout is not None and time.time() - start > timeout:
            return s
        time.sleep(poll)


def exit_code(final_status: str) -> int:
    return {"SUCCEEDED": 0, "STOPPED": 130}.get(final_status, 1)


def is_jobs_address(address: Optional[str]) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))

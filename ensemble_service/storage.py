"""Where resume checkpoints live: a local directory or an object store, one interface.

``cluster.storage`` (else ``ENSEMBLE_STORAGE``, else ``./.ensemble/checkpoints``) is

* a local path (absolute, or relative to the driver's working directory; ``file://`` too): on
  several machines it must be a path every node mounts;
* ``s3://BUCKET/PREFIX``: any S3-compatible store. The endpoint comes from ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` (MinIO, moto, ...; none: AWS itself), the
  credentials and region from the usual ``AWS_*`` variables (or the instance's role). The bucket
  must exist;
* ``gs://BUCKET/PREFIX`` (Google Cloud Storage, with the machine's default credentials) or any URI
  ``pyarrow.fs.FileSystem.from_uri`` understands (its query options, e.g.
  ``s3://b/p?endpoint_override=host:9000&scheme=http``, are honoured);
* another scheme ``fsspec`` has a filesystem for (``abfs://``, ``hdfs://``, ... with its package
  installed), wrapped as a ``pyarrow.fs.PyFileSystem``.

Writes are atomic: a reader (a restarted worker on any node) finds the previous checkpoint or the
new one, never part of one. Locally the bytes go to a temporary file in the same directory that
``os.replace`` renames over the old one; on an object store the upload itself is the commit (an
S3 PutObject or CompleteMultipartUpload, a GCS object write: the object appears whole or not at
all, and an upload cut short by a killed worker leaves the old object in place). Object stores
have no atomic rename, so a temporary key would not help.

Plain Python and ``pyarrow.fs``: no Ray, no torch. Workers use it once per epoch (one write) and
once at start (one read); filesystems are built once per process.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

DEFAULT_SUBDIR = os.path.join(".ensemble", "checkpoints")
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
NATIVE = ("s3", "gs", "gcs")

_FILESYSTEMS: Dict[Tuple[str, str], object] = {}
_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """The checkpoint storage cannot be used; the message is one line."""


def scheme(uri: "str | os.PathLike") -> str:
    """'' for a local path, else the URI's scheme in lower case (``s3``, ``gs``, ...)."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return ""
    s = uri.split("://", 1)[0].lower()
    return "" if s == "file" else s


def is_remote(uri: str) -> bool:
    return scheme(uri) != ""


def root(storage: Optional[str]) -> str:
    """The checkpoint root: ``storage``, else ENSEMBLE_STORAGE, else ./.ensemble/checkpoints.
    Local paths come back absolute (resolved on the driver: a worker's working directory is not
    the user's); URIs come back as given, without a trailing slash."""
    value = (storage or os.environ.get("ENSEMBLE_STORAGE") or "").strip()
    if not value:
        value = os.path.join(os.getcwd(), DEFAULT_SUBDIR)
    if value.lower().startswith("file://"):
        value = urlsplit(value).path
    if not is_remote(value):
        return str(Path(value).expanduser().resolve())
    parts = urlsplit(value)
    if not parts.netloc:
        raise StorageError(f"cluster.storage={value!r} names no bucket: use {parts.scheme}://BUCKET/PREFIX")
    return value.rstrip("/") if not parts.query else value


def join(base: "str | os.PathLike", *names: str) -> str:
    """``base`` / names, for a local path or a URI (a query string stays at the end)."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *names)
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *names]) + (sep + query)


def _endpoint() -> Optional[str]:
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; built once per process and store."""
    from pyarrow import fs as pafs

    s = scheme(uri)
    if not s:
        return pafs.LocalFileSystem(), (urlsplit(uri).path if uri.lower().startswith("file://") else uri)
    head, _, query = uri.partition("?")
    parts = urlsplit(head)
    path = f"{parts.netloc}{parts.path}".rstrip("/")
    key = (s, query if query else ("" if s not in ("s3",) else (_endpoint() or "")))
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
    if fs is None:
        if s == "s3" and not query:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            endpoint = _endpoint()
            fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region) if endpoint else pafs.S3FileSystem(
                region=region)
        elif s in NATIVE:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            try:
                import fsspec
                from pyarrow.fs import FSSpecHandler, PyFileSystem

                fs = PyFileSystem(FSSpecHandler(fsspec.filesystem(s)))
            except (ImportError, ValueError) as exc:
                raise StorageError(f"cluster.storage={uri!r}: no filesystem for {s}:// "
                                   f"({_first_line(exc)}); use a local path, s3://, gs:// or an installed fsspec "
                                   "protocol") from None
        with _LOCK:
            _FILESYSTEMS[key] = fs
    return fs, path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_bytes(uri: str) -> Optional[bytes]:
    """The object or file at ``uri``; None when there is none."""
    if not is_remote(uri):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (see the module docstring)."""
    if not is_remote(uri):
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        tmp = f"{uri}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, uri)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:  # the object exists once the stream closes without error
        f.write(data)


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return os.path.exists(uri)
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listing(uri: str) -> list:
    """Every file under ``uri`` (relative paths, sorted); [] when there is nothing."""
    if not is_remote(uri):
        base = Path(uri)
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def remove_tree(uri: str) -> None:
    """Delete ``uri`` and everything under it; nothing there is not an error. (On S3, pyarrow
    leaves an empty ``parent/`` marker object where it removed the parent's last entry.)"""
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def _probe_local(uri: str, p: Path) -> str:
    """Make the directory and write, read back and delete a small file in it (root passes every
    access check, and /proc or a read-only mount refuses anyway); the directories it made go again."""
    made = [q for q in [p, *p.parents] if not q.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        ok = probe.read_bytes() == b"ok"
        probe.unlink()
        return "" if ok else f"cluster.storage={uri}: what was written could not be read back"
    except OSError as exc:
        return f"cluster.storage={uri}: cannot write checkpoints there ({exc.strerror or exc})"
    finally:
        for q in made:  # deepest first
            try:
                q.rmdir()
            except OSError:
                break


def check(uri: str) -> str:
    """Why checkpoints cannot be written under ``uri`` ('' when they can): a small object is
    written, read back and deleted (locally: the directory must be creatable)."""
    try:
        if not is_remote(uri):
            p = Path(uri)
            existing = next((q for q in [p, *p.parents] if q.exists()), None)
            if existing is not None and not existing.is_dir():
                return f"cluster.storage={uri}: {existing} is a file, not a directory"
            if existing is not None and not os.access(existing, os.W_OK):
                return f"cluster.storage={uri}: cannot create directories in {existing} (permission denied)"
            return _probe_local(uri, p)
        probe = join(uri, f".probe-{os.getpid()}")
        write_bytes(probe, b"ok")
        ok = read_bytes(probe) == b"ok"
        fs, path = filesystem(probe)
        fs.delete_file(path)
        return "" if ok else f"cluster.storage={uri}: what was written could not be read back"
    except StorageError as exc:
        return str(exc)
    except Exception as exc:  # OSError from the store (no bucket, no credentials, unreachable)
        hint = "" if _endpoint() or scheme(uri) != "s3" else " (for MinIO or another S3-compatible store set AWS_ENDPOINT_URL)"
        return f"cannot write checkpoints to cluster.storage={uri}: {' '.join(_first_line(exc).split())[:300]}{hint}"

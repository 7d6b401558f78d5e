"""A real S3-compatible server on loopback for the tests: moto's server mode (``moto_server``, from
the test extras), started as its own process. The service reaches it the way it reaches MinIO in
docker-compose.yml: ``AWS_ENDPOINT_URL`` and the ``AWS_*`` credentials (``MLFLOW_S3_ENDPOINT_URL``
for an MLflow server's artifact store)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ensemble-test", "AWS_SECRET_ACCESS_KEY": "ensemble-test-secret",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def executable() -> Optional[str]:
    path = BIN / "moto_server"
    return str(path) if path.exists() else shutil.which("moto_server")


class S3Server:
    """``moto_server`` on 127.0.0.1 and a free port; ``env`` points S3 clients at it."""

    def __init__(self, log: Path):
        exe = executable()
        if exe is None:
            raise RuntimeError("moto_server is not installed (pip install -e '.[test]')")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + 60
        while time.time() < end:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {log}")
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"moto_server did not answer on {self.url} within 60 s")

    @property
    def env(self) -> Dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url}

    def create_bucket(self, name: str) -> None:
        """A bucket, made through the S3 API itself (PUT /bucket), as minio-init's `mc mb` does."""
        req = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()

    def keys(self, bucket: str, prefix: str = "") -> list:
        """Every key under ``prefix`` (ListObjectsV2, page after page)."""
        import xml.etree.ElementTree as ET
        from urllib.parse import quote

        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        keys, token = [], None
        while True:
            query = f"list-type=2&prefix={quote(prefix)}" + (f"&continuation-token={quote(token)}" if token else "")
            tree = ET.fromstring(urllib.request.urlopen(f"{self.url}/{bucket}?{query}", timeout=10).read())
            keys += [k.text for k in tree.findall(".//s3:Contents/s3:Key", ns)]
            token = tree.findtext("s3:NextContinuationToken", namespaces=ns)
            if not token:
                return sorted(keys)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()


class Bucket:
    """One test's bucket on the server: ``uri(prefix)`` and ``keys(prefix)``."""

    def __init__(self, server: S3Server, name: str):
        self.server, self.name = server, name

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def keys(self, prefix: str = "") -> list:
        """The objects under ``prefix``, without the empty ``dir/`` markers pyarrow leaves where it
        deleted a directory's last object (it keeps the parent "directory" existing)."""
        return [k for k in self.server.keys(self.name, prefix) if not k.endswith("/")]

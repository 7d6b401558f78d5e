"""The README's Serving section, run as written after `make demo`: the demo's ensemble is trained in a
scratch folder (as `make demo` does), `ensemble serve` is started there, and every command of the
section's bash blocks and its Python block runs and answers without an error."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from processes import free_port, serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def commands(block: str) -> list:
    """Shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    text = block.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    (folder / ".venv").symlink_to(BIN.parent)  # the README's `.venv/bin/...` paths
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ENSEMBLE_API_KEY", None)
    demo_cmd = re.search(r"^demo: .*\n\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert demo_cmd.startswith("$(BIN)/ensemble submit"), demo_cmd
    proc = subprocess.run(demo_cmd.replace("$(BIN)/", ".venv/bin/"), shell=True, cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "registered model: demo/versions/1" in proc.stdout
    port = free_port()
    env["ENSEMBLE_URL"] = f"http://127.0.0.1:{port}"
    with serving(folder, env, port):
        yield {"dir": folder, "env": env, "port": port}


def test_the_serving_sections_commands_run_as_written_after_make_demo(demo):
    blocks = re.findall(r"```bash\n(.*?)```", section("Serving"), flags=re.S)
    lines = [c for b in blocks for c in commands(b)]
    assert any(line.startswith(".venv/bin/ensemble serve") for line in lines)
    # pasted as a whole, the block must wait for the server it starts in the background before its first request
    serve = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/ensemble serve &"))
    assert lines[serve + 1].startswith("until curl -sf http://127.0.0.1:8000/healthz"), lines[serve + 1]
    ran = 0
    for line in lines:
        if line.startswith((".venv/bin/ensemble serve", "kill %1")):
            continue  # the fixture's server, on a free port, stands in for it (and is stopped by it)
        line = line.replace("127.0.0.1:8000", f"127.0.0.1:{demo['port']}")
        proc = subprocess.run(line, shell=True, cwd=demo["dir"], env=demo["env"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        out = proc.stdout.strip()
        if line.startswith("curl") and " -o " in line:  # a binary answer to a file, its headers on stdout
            assert out.startswith("HTTP/1.1 200") and "x-labels:" in out, (line, out)
        elif line.startswith("curl"):
            body = json.loads(out)
            assert "detail" not in body, (line, body)
        if "print(np.load('probs.npy').shape)" in line:
            assert out == "(64, 10)", out
        if "predict demo digits.npy" in line:
            rows = [r.split("\t") for r in out.splitlines()]
            assert len(rows) == 5 and all(name == label for label, name in rows), out  # digits name themselves
            assert sum(int(label) == digit for (label, _), digit in zip(rows, range(5))) >= 4  # digits 0..4
        if "batch.json --json" in line:
            answer = json.loads(out)
            assert len(answer["labels"]) == 2 and len(answer["members"]) == 5 and answer["class_names"]
        ran += 1
    assert ran >= 9


def test_the_serving_sections_python_runs_as_written(demo):
    code = re.search(r"```python\n(.*?)```", section("Serving"), flags=re.S).group(1)
    code += "\nimport json; print(json.dumps([probs.shape, votes.shape, float(probs.sum(1).mean())]))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=demo["dir"], env=demo["env"], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shapes[0] == [5, 10] and shapes[1] == [5, 10] and shapes[2] == pytest.approx(1.0, abs=1e-5)

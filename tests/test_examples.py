"""The walk-through of examples/own_model/README.md, run as a user would: its commands in a copy of
the example, then serving from another directory where the user's `nets` module is not importable."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from processes import free_port, serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_model"
BIN = Path(sys.executable).parent


def readme_block(n: int) -> list:
    """The lines of the n-th ```bash block of the example's README."""
    blocks = re.findall(r"```bash\n(.*?)```", (EXAMPLE / "README.md").read_text(), flags=re.S)
    return [line for line in blocks[n].splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the example after the README's first block ran in it (make_data + three submits)."""
    root = tmp_path_factory.mktemp("walkthrough")
    project = root / "own_model"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("*.npz", "*.csv", "digit_images", "mlflow.db",
                                                                    "mlartifacts", ".ensemble"))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH="",
               MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
    timings = {}
    for line in readme_block(0):
        t0 = time.perf_counter()
        proc = subprocess.run(shlex.split(line, comments=True), cwd=project, env=env, capture_output=True, text=True, timeout=600)
        timings[line.split("tracking.model_name=")[-1] if "model_name=" in line else line] = time.perf_counter() - t0
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if line.startswith("ensemble submit"):
            assert "registered model:" in proc.stdout and "preprocessing:" in proc.stdout, proc.stdout[-2000:]
    return {"dir": project, "env": env, "root": root, "timings": timings}


def test_the_walkthrough_trains_and_registers_three_ensembles(project):
    from mlflow import MlflowClient

    client = MlflowClient(project["env"]["MLFLOW_TRACKING_URI"])
    accs = {}
    for name, floor in (("cancer", 0.9), ("wine", 0.9), ("digit-images", 0.85)):
        mv = client.search_model_versions(f"name = '{name}'")[0]
        parent = client.get_run(mv.run_id)
        assert parent.info.status == "FINISHED"
        accs[name] = parent.data.metrics["ensemble_mean_test_acc"]
        assert accs[name] >= floor, (name, accs[name])
        data = json.loads(Path(client.download_artifacts(mv.run_id, "data.json", str(project["root"]))).read_text())
        assert data["class_names"] == {"cancer": ["malignant", "benign"], "wine": ["barbera", "barolo", "grignolino"],
                                       "digit-images": [str(d) for d in range(10)]}[name]
    print("\nwalk-through test accuracy:", accs, "seconds:", {k: round(v, 1) for k, v in project["timings"].items()})


def test_served_and_loaded_where_the_users_module_is_not_importable(project):
    elsewhere = project["root"] / "elsewhere"
    elsewhere.mkdir()
    env = project["env"]
    assert subprocess.run([sys.executable, "-c", "import nets"], cwd=elsewhere, env=env,
                          capture_output=True).returncode != 0
    with serving(elsewhere, env, free_port()) as url:
        project_dir = project["dir"]
        # the README's predict commands (second block), run from the example's folder
        predict = [line for line in readme_block(1) if line.startswith("ensemble predict")]
        wine = subprocess.run(shlex.split(predict[0], comments=True) + ["--url", url], cwd=project_dir, env=env,
                              capture_output=True, text=True, timeout=120)
        assert wine.returncode == 0, wine.stdout + wine.stderr
        rows = [line.split("\t") for line in wine.stdout.strip().splitlines()]
        truth = [line.rsplit(",", 1)[1] for line in (project_dir / "wine.csv").read_text().splitlines()[1:]]
        assert len(rows) == len(truth) == 178
        assert np.mean([name == t for (_, name), t in zip(rows, truth)]) > 0.9
        images = subprocess.run(shlex.split(predict[1], comments=True) + ["--url", url], cwd=project_dir, env=env,
                                capture_output=True, text=True, timeout=120)
        assert images.returncode == 0, images.stdout + images.stderr
        assert [r.split("\t")[1] for r in images.stdout.strip().splitlines()] == ["3", "7"]

        info = httpx.get(f"{url}/v1/ensembles/wine").json()
        assert info["class_names"] == ["barbera", "barolo", "grignolino"] and info["inputs"]["kind"] == "table"
        assert info["inputs"]["columns"][0] == "alcohol" and len(info["inputs"]["columns"]) == 13

        # the served probabilities equal the pyfunc model's, loaded in a fresh process elsewhere
        x = np.load(project_dir / "cancer.npz")["x"][:5]
        served = httpx.post(f"{url}/v1/ensembles/cancer/predict", json={"inputs": x.tolist()}).json()
        assert served["class_names"] == [["malignant", "benign"][i] for i in served["labels"]]
        code = ("import json, sys, mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/cancer@latest'); "
                f"x = np.load({str(project_dir / 'cancer.npz')!r})['x'][:5]; print(json.dumps(m.predict(x).tolist())); "
                "print('nets' in sys.modules and 'own_model' not in sys.modules['nets'].__file__)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        probs, shipped = proc.stdout.strip().splitlines()[-2:]
        np.testing.assert_allclose(json.loads(probs), served["probabilities"], rtol=1e-5, atol=1e-6)
        assert shipped == "True"  # nets came from the registered model, not the example's folder
        with open(project_dir / "digit_images" / "5" / "0005.png", "rb") as f:
            r = httpx.post(f"{url}/v1/ensembles/digit-images/predict", files=[("files", ("x.png", f.read()))])
        assert r.status_code == 200 and r.json()["class_names"] == [str(r.json()["labels"][0])]

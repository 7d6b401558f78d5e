"""The MLflow UI as a user sees it after `make demo` and `ensemble ui`: a real demo ensemble (5 MLPs
on digits) trained on the session's Ray cluster, `ensemble ui` on its store, and headless Chromium
at 1600 x 1000 opening the address `ensemble ui` prints, with no clicks: the ensemble's runs page
with the ensemble's test accuracy and one row per member with its own. The screenshots are the
README's: docs/mlflow_ui.png (the runs, after closing MLflow's assistant panel) and
docs/mlflow_ui_charts.png (the charts address it prints)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ensemble_service import names
from ensemble_service.cli import app
from ensemble_service.tracking import EnsembleTracker

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs"
WIDTH, HEIGHT = 1600, 1000
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> bytes:
    end = time.time() + timeout
    while time.time() < end:
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


class Page:
    """A minimal Chrome DevTools Protocol client (aiohttp's websocket; no browser download)."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(msg["error"])
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 90):
        """Poll ``expression`` until it is truthy; its value."""
        end = time.time() + timeout
        while time.time() < end:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        body = await self.js("document.body ? document.body.innerText : ''") or ""
        raise AssertionError(f"the page never showed {what}; it showed: {body[:600]!r}")

    async def wait_text(self, text: str, timeout: float = 90) -> str:
        return await self.wait_for(f"(document.body && document.body.innerText.includes({json.dumps(text)})) ? "
                                   "document.body.innerText : ''", repr(text), timeout)

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])


@contextlib.contextmanager
def chromium(tmp_path):
    """A headless Chromium with an empty profile (a first visit); the websocket URL of its page."""
    port = free_port()
    browser = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--remote-debugging-port={port}",
                                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 60))
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        browser.kill()
        browser.wait()


@contextlib.contextmanager
def ensemble_ui(uri: str, *args: str):
    """`ensemble ui` on ``uri`` (a free port); the lines it printed before the server answered."""
    port = free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    ui = subprocess.Popen([str(Path(sys.executable).parent / "ensemble"), "ui", "--port", str(port),
                           "--tracking-uri", uri, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 90).strip() == b"OK"
        lines = []
        while not lines or not lines[-1].startswith("from another machine"):
            lines.append(ui.stdout.readline().rstrip("\n"))
            assert lines[-1] or ui.poll() is None, lines
        yield port, lines
    finally:  # SIGTERM: `ensemble ui` stops its server (its own process group) and exits
        server = descendants(ui.pid)
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()
        for pid in server:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# every grid row as {column id: cell}: its text, whether the cell is on screen and not covered, and
# whether its first six characters (e.g. "0.9666") fit in it
ROWS_JS = r"""(() => {
  const rows = {}, ctx = document.createElement('canvas').getContext('2d');
  for (const cell of document.querySelectorAll('.ag-row .ag-cell[col-id]')) {
    const index = cell.closest('.ag-row').getAttribute('row-index');
    const r = cell.getBoundingClientRect(), style = getComputedStyle(cell);
    const top = document.elementFromPoint(r.left + Math.min(r.width / 2, 20), r.top + r.height / 2);
    const text = cell.innerText.trim();
    ctx.font = style.font;
    const room = cell.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    (rows[index] = rows[index] || {})[cell.getAttribute('col-id')] = {
      text, shown: r.left >= 0 && r.right <= innerWidth && r.bottom <= innerHeight && !!top && cell.contains(top),
      fits6: ctx.measureText(text.slice(0, 6)).width <= room};
  }
  return Object.values(rows);
})()"""
RUN_NAME, TEST_ACC = "attributes.`Run Name`", "metrics.`test_acc`"
MEMBER_INDEX, DATASET, MODELS = "tags.`ensemble.member_index`", "attributes.`Dataset`", "attributes.`Models`"
CLOSE_ASSISTANT = """(() => { const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
                              if (b) { b.click(); return true; } return false; })()"""


def as_js(value: float) -> str:
    """How the UI writes a metric in its runs table (JavaScript's String(number))."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """`make demo`'s ensemble (`ensemble submit experiment=demo`: 5 MLPs on digits, 25 epochs)."""
    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp}/mlflow.db"
    result = CliRunner().invoke(app, ["submit", "experiment=demo", f"tracking.uri={uri}", f"cluster.storage={tmp}/ckpt"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags[names.TAG_KIND] == names.KIND_PARENT)
    members = sorted((r for r in runs if r.data.tags[names.TAG_KIND] == names.KIND_MEMBER),
                     key=lambda r: int(r.data.tags[names.TAG_MEMBER_INDEX]))
    return {"uri": uri, "tmp": tmp, "client": client, "experiment": exp, "parent": parent, "members": members}


def test_the_demo_ensemble_is_described_with_its_datasets_and_model(demo):
    client, parent, members = demo["client"], demo["parent"], demo["members"]
    assert demo["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(members) == 5
    # the pair the parent shares with its members is the ensemble's mean aggregation
    assert parent.data.metrics[names.TEST_ACC] == parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC]
    assert parent.data.metrics[names.TEST_NLL] == parent.data.metrics[names.ENSEMBLE_MEAN_TEST_NLL]
    # Dataset column: the three splits, on the parent and on every member
    for run in (parent, *members):
        inputs = run.inputs.dataset_inputs
        assert sorted(i.tags[0].value for i in inputs) == ["test", "train", "validation"]
        assert {i.dataset.name for i in inputs} == {"digits"}
        sizes = {json.loads(i.dataset.profile)["split"]: json.loads(i.dataset.profile)["num_rows"] for i in inputs}
        assert sum(sizes.values()) == 1797 and sizes["train"] > sizes["val"] > 0   # sklearn's digits
    assert len({i.dataset.digest for i in parent.inputs.dataset_inputs}) == 3
    # Models column: the registered model is the parent's logged model
    [output] = parent.outputs.model_outputs
    version = client.get_model_version("demo", parent.data.tags[names.TAG_MODEL_VERSION])
    assert version.source == f"models:/{output.model_id}" and version.run_id == parent.info.run_id
    assert json.loads(client.get_logged_model(output.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "demo", "version": version.version}]
    assert f"{parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC]:.4f}" in version.description
    assert version.tags[names.ENSEMBLE_MEAN_TEST_ACC] == f"{parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC]:.4f}"
    # descriptions: the parent's summary names every member and how to serve it; each member its seed
    note = parent.data.tags[names.MLFLOW_DESCRIPTION]
    assert f"| ensemble (mean of the members' probabilities) | {parent.data.metrics[names.ENSEMBLE_MEAN_TEST_ACC]:.4f} |" in note
    assert all(f"| {m.data.tags[names.TAG_MEMBER_INDEX]} | member | mlp | {m.data.params['seed']} |" in note for m in members)
    assert f"models:/demo/{version.version}" in note
    for m in members:
        assert m.data.tags[names.MLFLOW_DESCRIPTION].startswith(
            f"Member {m.data.tags[names.TAG_MEMBER_INDEX]} of 5 of a `independent` ensemble: mlp, seed {m.data.params['seed']}")


@needs_chromium
def test_the_address_ensemble_ui_prints_shows_the_ensemble_and_its_members(demo, tmp_path):
    import aiohttp

    parent, members = demo["parent"], demo["members"]
    with ensemble_ui(demo["uri"]) as (port, lines), chromium(tmp_path) as ws_url:
        [runs_url] = [line.split("open ", 1)[1] for line in lines if line.startswith("open ")]
        [charts_url] = [line.split("its charts: ", 1)[1] for line in lines if "its charts: " in line]
        assert runs_url.startswith(f"http://127.0.0.1:{port}/#/experiments/{demo['experiment'].experiment_id}/runs?")
        assert parent.info.run_id in "\n".join(lines)

        async def drive():
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                deviceScaleFactor=1, mobile=False)
                await page.call("Page.navigate", url=runs_url)
                # no clicks: the runs of the ensemble, one row each, their test_acc on screen
                await page.wait_for(f"(() => {{ const rows = {ROWS_JS}; return rows.length === {len(members) + 1} "
                                    f"&& rows.every(r => r['{TEST_ACC}'] && r['{TEST_ACC}'].text !== '-') }})()",
                                    "six rows with test_acc")
                landing = await page.js(ROWS_JS)
                body = await page.js("document.body.innerText")
                await page.js(CLOSE_ASSISTANT)      # the one click docs/mlflow_ui.png shows the page after
                await page.wait_for(f"(() => {{ const rows = {ROWS_JS}; return rows.length && rows.every("
                                    f"r => r['{MODELS}'] && r['{MODELS}'].shown) }})()", "the Models column")
                await asyncio.sleep(1)
                closed = await page.js(ROWS_JS)
                runs_png = await page.screenshot()
                await page.call("Page.navigate", url=charts_url)
                await page.wait_text(names.SIZE_CURVE_ACC)
                await page.wait_for("document.querySelectorAll('.js-plotly-plot, svg.main-svg').length >= 4", "4 charts")
                await asyncio.sleep(2)
                charts_body = await page.js("document.body.innerText")
                return landing, body, closed, runs_png, charts_body, await page.screenshot()

        landing, body, closed, runs_png, charts_body, charts_png = asyncio.run(drive())

    def run_name(row) -> str:  # the cell also holds the run's colour ("#04867d") for screen readers
        return row[RUN_NAME]["text"].splitlines()[-1]

    by_name = {run_name(row): row for row in landing}
    # the ensemble's mean test accuracy, as the UI writes it, and every member's own, on screen
    expected = {parent.info.run_name: parent.data.metrics[names.TEST_ACC],
                **{m.info.run_name: m.data.metrics[names.TEST_ACC] for m in members}}
    assert set(by_name) == set(expected), body[:600]
    for name, value in expected.items():
        cell = by_name[name][TEST_ACC]
        assert cell["text"] == as_js(value) and cell["shown"] and cell["fits6"], (name, cell)
        assert by_name[name][RUN_NAME]["shown"]
    assert [by_name[m.info.run_name][MEMBER_INDEX]["text"] for m in members] == ["0", "1", "2", "3", "4"]
    # the model-training pages, not the GenAI ones
    assert "Sort: test_acc" in body and "Detect Issues" not in body and "Token Usage" not in body
    # Dataset and Models columns filled: every run's splits, the parent's registered model
    rows = {run_name(row): row for row in closed}
    assert all(row[DATASET]["text"].startswith("digits (") for row in rows.values())
    version = parent.data.tags[names.TAG_MODEL_VERSION]
    assert rows[parent.info.run_name][MODELS]["text"].split() == ["demo", f"v{version}"]
    assert {rows[m.info.run_name][MODELS]["text"] for m in members} == {"-"}
    for title in (names.VAL_ACC, names.SIZE_CURVE_ACC, names.TEST_ACC, names.TEST_NLL):
        assert title in charts_body
    for png, name in ((runs_png, "mlflow_ui.png"), (charts_png, "mlflow_ui_charts.png")):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        (DOCS / name).write_bytes(png)


@pytest.fixture
def store(tmp_path):
    """A parent run with three nested member runs, written the way `ensemble submit` writes them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = EnsembleTracker(uri, "ui-check")
    parent = t.start_parent("ensemble-ui-check", {"strategy": {"name": "independent", "members": 3}},
                            {"ensemble.strategy": "independent", "ensemble.data": "digits", "ensemble.model": "mlp"})
    for i in range(3):
        rid = t.start_member(i, f"member-{i}", {"seed": i, "architecture": "mlp"}, {})
        t.log_metrics(rid, {"test_acc": 0.9 + i / 100})
        t.end(rid)
    t.log_metrics(parent, {"ensemble_mean_test_acc": 0.95})
    t.end(parent)
    return uri, t.experiment_id


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_server_on_sigterm_and_sigint(store, sig):
    uri, experiment_id = store
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "ensemble"), "ui", "--port", str(port),
                           "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = set()
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 90).strip() == b"OK"
        server = descendants(ui.pid)
        assert server
        ui.send_signal(sig)
        out, err = ui.communicate(timeout=30)
        assert ui.returncode == 0, err
        time.sleep(0.5)
        assert not [p for p in server if alive(p)]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        # start-up noise is gone: no Starlette deprecation warning, no MLflow security banner, no server logs
        assert "Deprecat" not in err and "Security middleware" not in err, err
        assert "INFO" not in err and "Uvicorn running" not in err, err
        assert "Registry store URI" not in out, out
        # the page to open: the ensemble's runs (these runs predate saved views: the UI's default columns)
        assert (f"open http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                in out), out
    finally:
        if ui.poll() is None:
            ui.kill()
        for p in server:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def _ensemble(uri: str, experiment: str, name: str, accs, extra_tags=None):
    """A finished parent run and one finished member run per test accuracy; (parent, [members])."""
    t = EnsembleTracker(uri, experiment)
    parent = t.start_parent(name, {"strategy": {"name": "independent"}},
                            {names.TAG_ID: f"{name}-id", names.TAG_STRATEGY: "independent", **(extra_tags or {})})
    members = []
    for i, acc in enumerate(accs):
        rid = t.start_member(i, f"{name}-member-{i}", {"seed": i}, {})
        t.log_metrics(rid, {names.TEST_ACC: acc})
        t.end(rid)
        members.append(rid)
    t.log_metrics(parent, {names.TEST_ACC: max(accs or [0.5]) + 0.01})
    t.end(parent)
    return parent, members


@pytest.fixture
def selection(tmp_path):
    """Two ensembles in two experiments, and a selection (in the first) of one member of each."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a, a_members = _ensemble(uri, "pool-a", "ens-a", [0.91, 0.92])
    b, b_members = _ensemble(uri, "pool-b", "ens-b", [0.93, 0.94])
    picked = [a_members[1], b_members[0]]
    sel, _ = _ensemble(uri, "pool-a", "selection-x", [], {
        names.TAG_STRATEGY: names.STRATEGY_SELECTION, names.TAG_SELECTED_MEMBERS: f"{picked[0]}:2,{picked[1]}:1"})
    client = MlflowClient(uri)
    return {"uri": uri, "selection": sel, "picked": picked, "client": client,
            "names": {r: client.get_run(r).info.run_name for r in [sel, *picked]},
            "experiments": sorted(client.get_experiment_by_name(n).experiment_id for n in ("pool-a", "pool-b"))}


def test_ui_of_a_selection_lists_the_runs_it_picked_from_other_experiments(selection):
    """A selection's members are runs of other ensembles: its saved view (its own ensemble id) would
    show the selection alone. `ensemble ui --run` prints MLflow's page comparing both experiments,
    filtered to the selection and the two runs it picked."""
    from ensemble_service.tracking import ensemble_page

    page = ensemble_page(selection["uri"], selection["selection"])
    assert page["run_ids"] == [selection["selection"], *selection["picked"]]
    assert page["experiment_ids"] == selection["experiments"]
    from ensemble_service.cli import ui_pages

    lines = ui_pages(selection["uri"], "http://127.0.0.1:5000", None, selection["selection"])
    assert lines[0].startswith("open http://127.0.0.1:5000/#/compare-experiments/s?experiments=")
    assert "members from other ensembles in 2 experiments" in lines[-1]
    # a plain ensemble keeps its saved-view page
    plain = ensemble_page(selection["uri"], selection["picked"][0])
    assert "run_ids" not in plain and plain["run_id"] != selection["selection"]


def test_ui_of_a_grown_ensemble_lists_its_reused_members_too(tmp_path):
    """A grown ensemble's reused members carry the old ensemble's id: the page lists the runs by id."""
    from urllib.parse import parse_qs, urlsplit

    from ensemble_service.cli import ui_pages
    from ensemble_service.tracking import ensemble_page

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, old = _ensemble(uri, "digits", "ens-a", [0.91, 0.92])
    grown, new = _ensemble(uri, "digits", "ens-a-grown", [0.93], {names.TAG_REUSED_MEMBERS: ",".join(old)})
    page = ensemble_page(uri, new[0])  # a member run's ensemble: the grown one
    assert page["run_ids"] == [grown, new[0], *old] and len(page["experiment_ids"]) == 1
    url = ui_pages(uri, "http://h:1", None, grown)[0].split("open ", 1)[1]
    fragment = urlsplit(urlsplit(url).fragment)
    assert fragment.path == f"/experiments/{page['experiment_id']}/runs"
    assert parse_qs(fragment.query)["searchFilter"] == [
        "attributes.run_id IN (" + ", ".join(f"'{r}'" for r in [grown, new[0], *old]) + ")"]


@needs_chromium
def test_the_page_of_a_selection_shows_its_picks_across_experiments(selection, tmp_path):
    import aiohttp

    with ensemble_ui(selection["uri"], "--run", selection["selection"]) as (port, lines), \
            chromium(tmp_path) as ws_url:
        [url] = [line.split("open ", 1)[1] for line in lines if line.startswith("open ")]

        async def drive():
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                await page.wait_text("3 matching runs")
                await page.wait_for(f"{ROWS_JS}.length === 3", "three rows")
                return await page.js(ROWS_JS), await page.js("document.body.innerText")

        rows, body = asyncio.run(drive())
    # sorted by test_acc (the UI's default columns do not show it): the picks 0.93, 0.92, then the selection
    shown = [row[RUN_NAME]["text"].splitlines()[-1] for row in rows]
    assert sorted(shown) == sorted(selection["names"].values())
    assert "Displaying Runs from 2 Experiments" in body and "Sort: test_acc" in body

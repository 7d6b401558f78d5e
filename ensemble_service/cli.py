"""The `ensemble` command.

    ensemble submit [OVERRIDES...]   train an ensemble (Hydra overrides, e.g. data=mnist1d strategy.members=3);
                                     --address http://HEAD:8265 [--wait] submits it as a job to a remote cluster
    ensemble runs                    recent ensembles and their main metrics, from MLflow
    ensemble ui [--port]             the MLflow UI on the same tracking store; prints the newest ensemble's page
    ensemble serve / predict         the prediction API on the registered ensembles, and its client
    ensemble jobs / status / logs / cancel   the jobs of a remote cluster

Bad input (an unknown data set, model, strategy or optimizer, a value out of range, a
malformed override, missing data files, a member no Ray node could run, a tracking store or
cluster address that cannot be used) prints one line `error: ...` and exits 2, before an
embedded Ray starts or any MLflow run is created. A training failure exits 1 with every
MLflow run closed as FAILED. SIGINT (Ctrl-C) or SIGTERM (`ensemble cancel`, `timeout`, a job
stop) closes every open run as KILLED in one write, shuts the embedded Ray down with all its
processes and exits 130 or 143 (128 + the signal); a failed or interrupted ensemble's resume
checkpoints are removed (no submission resumes them) unless cluster.keep_checkpoints. A usage
error (an unknown option or command, a missing argument) is one line too, exit 2. Set
ENSEMBLE_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ensemble_service import names  # noqa: E402
from ensemble_service.environment import service_env_defaults  # noqa: E402  (light: no torch, Hydra, Ray or MLflow)

service_env_defaults()

app = typer.Typer(
    name="ensemble", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train ensembles of PyTorch classifiers on Ray, track them in MLflow, serve their predictions.",
)
# a wide console when not on a terminal (CI logs, pipes), so tables are not truncated
# plain text unless a call asks for styles (markup=True): messages and table cells carry the user's
# own text, and Rich markup would eat anything in brackets ("takes [batch, 8, 8]")
console = Console(markup=False) if sys.stdout.isatty() else Console(width=140, markup=False, soft_wrap=True)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _count(n: int, noun: str) -> str:
    """'1 member', '3 members'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _debug() -> bool:
    return os.environ.get("ENSEMBLE_DEBUG", "") not in ("", "0")


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (`ensemble cancel`, `timeout`, a job stop, a container shutdown)
    while a command runs: the first raises KeyboardInterrupt where the main thread is; later
    ones are ignored, so the clean-up it starts (runs closed as KILLED, Ray shut down) is not
    cut short."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous: Dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:  # the shell's convention: 128 + the signal's number (130, 143)
        return 128 + int(self.signum or signal.SIGINT)

    def install(self) -> "Interrupt":
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a test's worker thread)
                pass
        return self

    def hold(self) -> None:
        """Ignore both signals from now on (while shutting down)."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


class ProgressObserver:
    """One progress bar per Ray task (a member, or a trajectory yielding several), fed by the driver."""

    def __init__(self, progress: Progress, interrupt: Optional[Interrupt] = None):
        self.progress = progress
        self.interrupt = interrupt
        self.tasks: Dict[int, Any] = {}
        self.done: set = set()
        self.killed: Optional[int] = None   # runs being closed as KILLED, once interrupted
        self.checkpoint_dirs: List[str] = []  # the started ensembles' resume checkpoints (not kept ones)

    def loaded(self, description: str) -> None:
        self.progress.console.print(description, highlight=False)

    def recipe(self, line: str) -> None:
        self.progress.console.print(line, highlight=False)

    def started(self, plan, resources) -> None:
        self.progress.start()   # once: a sweep's later plans add their bars to the same display
        if plan.checkpoint_dir and not plan.keep_checkpoints:
            self.checkpoint_dirs.append(plan.checkpoint_dir)
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        store = resources.get("object_store_memory", 0) / 2 ** 20
        self.progress.console.print(
            f"ensemble {plan.ensemble_id}: {_count(len(plan.slots), 'member')} from "
            f"{_count(len(plan.tasks), 'Ray task')}, "
            f"strategy '{plan.strategy}' on '{plan.data}'; Ray cluster with {cpus:g} CPUs, {gpus:g} GPUs, "
            f"{store:.0f} MiB object store", highlight=False)
        self.tasks, self.done = {}, set()   # a sweep runs one plan after another through one observer
        roles = {slot.task: slot.tags.get(names.TAG_ROLE, "") for slot in plan.slots}
        for spec in plan.tasks:
            if roles.get(spec.index) in (names.ROLE_STUDENT, names.ROLE_BASELINE):
                label = f"{roles[spec.index]} ({spec.architecture}, seed {spec.seed})"
            elif spec.kind == "packed":
                label = f"members {', '.join(map(str, spec.member_indices))} packed ({spec.architecture})"
            elif spec.kind == "trajectory":
                label = (f"trajectory {spec.index} ({spec.architecture}, seed {spec.seed}) "
                         f"-> {len(spec.member_indices)} members")
            else:
                label = f"member {spec.index} ({spec.architecture}, seed {spec.seed})"
            # its clock starts with the task's first event, not while it waits for a CPU
            self.tasks[spec.index] = self.progress.add_task(label, total=spec.epochs, info="queued", start=False)

    def event(self, e: Dict[str, Any]) -> None:
        task = self.tasks.get(e["task"])
        if task is None or e["task"] in self.done:  # a late event must not overwrite "done"
            return
        if not self.progress.tasks[task].started:
            self.progress.start_task(task)
        if e["type"] == "start":
            note = f"resumed at epoch {e['resumed_from']}" if e["resumed_from"] else "training"
            self.progress.update(task, completed=e["resumed_from"], info=f"{note} on {e['device']}")
        elif e["type"] == "epoch":
            self.progress.update(task, completed=e["epoch"],
                                 info=f"loss {e['train_loss']:.3f}  val acc {e['val_acc']:.3f}")

    def member_done(self, row: Dict[str, Any]) -> None:
        pass

    def task_done(self, task: int, members: int) -> None:
        self.done.add(task)
        t = self.tasks[task]
        if not self.progress.tasks[t].started:  # (no event came: a reused or very short task)
            self.progress.start_task(t)
        self.progress.update(t, completed=self.progress.tasks[t].total,
                             info="done" if members == 1 else f"done: {_count(members, 'member')}")

    def task_failed(self, task: int, message: str) -> None:
        self.progress.update(self.tasks[task], info=f"[red]FAILED[/]: {escape(message)}")

    def interrupted(self, open_runs: int) -> None:
        self.killed = open_runs
        name = self.interrupt.name if self.interrupt else "interrupted"
        self.progress.console.print(f"[yellow]{name}[/]: stopping; marking {open_runs} MLflow runs KILLED and "
                                    "shutting down Ray", highlight=False, markup=True)


def result_tables(result) -> List[Table]:
    members = Table(title="Members", title_justify="left")
    for col in ("member", "architecture", "role", "seed", "val acc", "test acc", "test NLL", "epochs", "train s"):
        members.add_column(col, justify="left" if col in ("architecture", "role") else "right")
    for r in result.members:
        members.add_row(str(r["member"]), r["architecture"], r["role"], str(r["seed"]), f"{r['val_acc']:.4f}",
                        f"{r['test_acc']:.4f}", f"{r['test_nll']:.4f}", str(r["epochs"]), f"{r['train_seconds']:.1f}")
    e = result.ensemble
    ens = Table(title="Ensemble (test set)", title_justify="left")
    ens.add_column("aggregation")
    ens.add_column("test acc", justify="right")
    ens.add_row("mean (soft vote)", f"{e[names.ENSEMBLE_MEAN_TEST_ACC]:.4f}")
    ens.add_row("vote (majority)", f"{e[names.ENSEMBLE_VOTE_TEST_ACC]:.4f}")
    ens.add_row("weighted (by val acc)", f"{e[names.ENSEMBLE_WEIGHTED_TEST_ACC]:.4f}")
    ens.add_row("logit mean", f"{e[names.ENSEMBLE_LOGIT_MEAN_TEST_ACC]:.4f}")
    ens.add_row("best member", f"{e[names.BEST_MEMBER_TEST_ACC]:.4f}")
    ens.add_row("mean member", f"{e[names.MEAN_MEMBER_TEST_ACC]:.4f}")
    ens.add_row("oracle (any member right)", f"{e[names.ORACLE_TEST_ACC]:.4f}")
    extra = Table(title="Ensemble calibration and diversity (mean aggregation)", title_justify="left")
    cols = ["NLL", "Brier", "ECE (15 bins)", "disagreement"]
    row = [f"{e[names.ENSEMBLE_MEAN_TEST_NLL]:.4f}", f"{e[names.ENSEMBLE_MEAN_TEST_BRIER]:.4f}",
           f"{e[names.ENSEMBLE_MEAN_TEST_ECE]:.4f}", f"{e[names.DISAGREEMENT]:.4f}"]
    if names.ENSEMBLE_TEMPERATURE in e:  # calibration=temperature
        cols += ["temperature", "NLL at T", "ECE at T"]
        row += [f"{e[names.ENSEMBLE_TEMPERATURE]:.3f}", f"{e[names.ENSEMBLE_CALIBRATED_TEST_NLL]:.4f}",
                f"{e[names.ENSEMBLE_CALIBRATED_TEST_ECE]:.4f}"]
    if names.OOD_AUROC_MI in e:
        cols += ["OOD AUROC (entropy / MI)"]
        row += [f"{e[names.OOD_AUROC_ENTROPY]:.3f} / {e[names.OOD_AUROC_MI]:.3f}"]
    for col in cols:
        extra.add_column(col, justify="right")
    extra.add_row(*row)
    return [members, ens, extra]


def _jobs_address(address: Optional[str], overrides: List[str]) -> tuple[Optional[str], List[str]]:
    """--address, else an http cluster.address override, else an http RAY_ADDRESS: the Jobs API."""
    from ensemble_service.jobs import is_jobs_address

    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "cluster.address" and is_jobs_address(value):
            address = address or value
            continue
        rest.append(o)
    env = os.environ.get("RAY_ADDRESS")
    if address is None and is_jobs_address(env):
        address = env
    return address, rest


def _warn_without_token(address: Optional[str]) -> None:
    """One line on stderr when a Ray cluster on another machine is reached without a token."""
    from ensemble_service.api.auth import address_host, is_loopback

    host = address_host(address)
    if host is None or is_loopback(host):
        return
    from ensemble_service import jobs

    if not jobs.has_token():
        err.print(f"[yellow]warning:[/] submitting to {address} without a Ray token (set RAY_AUTH_TOKEN); a "
                  f"cluster that takes jobs without one runs anyone's code", highlight=False, soft_wrap=True)


def _submit_remote(address: str, overrides: List[str], wait: bool) -> None:
    from ensemble_service import jobs
    from ensemble_service.config import ConfigError, load_config

    try:  # bad input fails here, not on the cluster (data files may live only there)
        cfg = load_config(overrides, check_files=False)
    except ConfigError as exc:
        fail(str(exc))
    if cfg.recipe is not None:
        from ensemble_service.recipes import describe

        console.print(describe(cfg.recipe), highlight=False)
    _warn_without_token(address)
    try:
        job_id = jobs.submit(address, overrides, json.dumps(cfg.to_dict()))
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    console.print(f"submitted job {job_id} to {address}", highlight=False)
    console.print(f"follow it with: ensemble logs {job_id} --follow --address {address}", highlight=False)
    if not wait:
        return
    try:
        for chunk in jobs.follow(address, job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        final = jobs.wait(address, job_id)
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail(f"stopped following; job {job_id} keeps running (ensemble cancel {job_id} to stop it)", 130)
    console.print(f"job {job_id} {final}", highlight=False)
    raise typer.Exit(jobs.exit_code(final))


def _on_ray(cluster_address: Optional[str], work):
    """Run ``work(observer)`` (training on Ray) with one progress bar per Ray task. Every exit path
    prints at most one line and exits with the service's codes: bad input 2, a failure 1, a signal
    128 + its number (the runs it opened closed as KILLED); an embedded Ray this command started goes
    down with all its processes."""
    from ensemble_service import scheduler
    from ensemble_service.config import ConfigError
    from ensemble_service.runner import EnsembleFailed

    _warn_without_token(cluster_address)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("epochs"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=console, transient=False)
    connected_before = scheduler.is_connected()  # a cluster this command did not connect stays up
    interrupt = Interrupt().install()
    observer = ProgressObserver(progress, interrupt)
    ended = False
    try:  # the bars start with the first plan (ProgressObserver.started): an early error prints no empty display
        try:
            result = work(observer)
            ended = True
            return result
        finally:
            if progress.live.is_started:
                progress.stop()
    except ConfigError as exc:
        fail(str(exc))
    except EnsembleFailed as exc:
        fail(str(exc), EXIT_FAILED)
    except (KeyboardInterrupt, SystemExit) as exc:
        if interrupt.signum is None and isinstance(exc, SystemExit) and exc.code in (signal.SIGINT, signal.SIGTERM):
            interrupt.signum = int(exc.code)  # Ray's own handler, active while ray.init runs: sys.exit(signum)
        closed = (f"its {observer.killed} MLflow runs were marked KILLED" if observer.killed
                  else "no MLflow run had been created")
        fail(f"interrupted by {interrupt.name}; {closed}", interrupt.exit_code)
    except Exception as exc:  # an unexpected failure: runs are already closed as FAILED
        if _debug():
            traceback.print_exc()
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (ENSEMBLE_DEBUG=1 for the traceback)",
             EXIT_FAILED)
    finally:  # every exit path: an embedded cluster goes down with all its processes
        interrupt.hold()
        try:
            if not connected_before:
                scheduler.shutdown()
            if not ended:  # interrupted or failed: no submission resumes another's checkpoints (a fresh
                # ensemble id each), so they would only pile up; the members' tasks are gone by now
                from ensemble_service.runner import remove_checkpoints

                for directory in observer.checkpoint_dirs:
                    remove_checkpoints(directory)
        except Exception:
            if _debug():
                traceback.print_exc()
        finally:
            interrupt.restore()


def _print_result(result) -> None:
    for table in result_tables(result):
        console.print(table)
    if result.degraded:
        console.print(f"[yellow]warning:[/] {escape(result.degraded)}", highlight=False, markup=True)
    console.print(f"parent run: {result.parent_run_id}", highlight=False)
    console.print(f"experiment: {result.experiment}", highlight=False)
    console.print(f"tracking URI: {result.tracking_uri}", highlight=False)
    if result.model_version:
        console.print(f"registered model: {result.model_version} (serve it with: ensemble serve)", highlight=False)
    console.print(f"wall time: {result.wall_seconds:.1f} s; open the MLflow UI with: ensemble ui", highlight=False)


@app.command(context_settings={"ignore_unknown_options": False},
             short_help="Train an ensemble on Ray (embedded, a running cluster or a job).")
def submit(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides, e.g. data=mnist1d model=cnn1d strategy.members=3 trainer.epochs=5 "
                   "(groups: data, model, strategy, optimizer, trainer, cluster, tracking, recipe, experiment; "
                   "the data set x model pair's recipe in conf/recipe/ applies where no override or experiment "
                   "sets its keys, ~recipe leaves it out; calibration=none keeps the ensemble uncalibrated)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray Jobs API of a remote cluster, e.g. http://HEAD:8265: the job runs there "
                                "(also taken from an http cluster.address override or RAY_ADDRESS)."),
    wait: bool = typer.Option(False, "--wait", help="With --address: follow the job's logs until it ends and "
                                                    "exit with its outcome (0 succeeded, 1 failed, 130 stopped)."),
    multirun: bool = typer.Option(
        False, "--multirun", "-m", help="A sweep in Hydra's syntax (optimizer.lr=0.01,0.1 model=lenet,resnet; "
                                        "choice(...), range(...)): one ensemble per combination, one after another "
                                        "on the same Ray cluster (with --address: one job each), all with one "
                                        "sweep tag (tracking.sweep=TAG names it; default: generated). Then: "
                                        "ensemble select --sweep TAG."),
    resolved: bool = typer.Option(False, "--resolved", hidden=True,
                                  help="Train the resolved config in ENSEMBLE_RESOLVED_CONFIG (a remote job's driver)."),
) -> None:
    """Train an ensemble: on an embedded local Ray cluster (default), on the cluster at cluster.address,
    or as a job on a remote cluster's Jobs API (--address http://HEAD:8265); --multirun trains one per
    combination of a sweep."""
    overrides = list(overrides or [])
    address, overrides = _jobs_address(address, overrides)
    if multirun:
        if resolved:
            fail("--resolved takes no --multirun")
        _submit_multirun(overrides, address, wait)
        return
    if address:
        _submit_remote(address, overrides, wait)
        return
    if wait:
        fail("--wait needs --address (a remote cluster's Jobs API)")

    from ensemble_service.config import ConfigError, config_from_dict, load_config, validate

    try:
        if resolved:  # a job's driver: the client composed and checked the config
            if overrides:
                fail("--resolved takes no overrides")
            from ensemble_service.jobs import CONFIG_ENV

            try:
                cfg = config_from_dict(json.loads(os.environ.get(CONFIG_ENV, "")))
            except ValueError:
                fail(f"--resolved needs the resolved config as JSON in {CONFIG_ENV}")
            validate(cfg)
        else:
            cfg = load_config(overrides)
    except ConfigError as exc:
        fail(str(exc))
    from ensemble_service.runner import submit as run_submit

    result = _on_ray(cfg.cluster.address, lambda observer: run_submit(cfg, observer))
    _print_result(result)


def sweep_tag() -> str:
    """A new sweep tag: sweep-<date>-<time>-<4 hex>."""
    import secrets
    import time

    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _submit_multirun(overrides: List[str], address: Optional[str], wait: bool) -> None:
    """One ensemble per combination of the sweep, all tagged with one sweep tag; every combination's
    config is composed and checked before anything trains."""
    from ensemble_service.config import ConfigError, load_config
    from ensemble_service.overrides import expand_multirun

    try:
        combos = expand_multirun(overrides)
    except ConfigError as exc:
        fail(str(exc))
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "tracking.sweep"]
    tag = given[-1] if given else sweep_tag()
    if given and ("," in tag or not tag.strip() or tag.strip().lower() == "null"):
        fail(f"tracking.sweep={tag!r} must be one tag (letters, digits, -, _, .)")
    if not given:
        combos = [c + [f"tracking.sweep={tag}"] for c in combos]
    varied = [[o for o in combo if o not in overrides and not o.startswith("tracking.sweep=")] for combo in combos]
    configs = []
    for combo, v in zip(combos, varied):
        try:
            configs.append(load_config(combo, check_files=address is None))
        except ConfigError as exc:
            fail(f"{' '.join(v) + ': ' if v else ''}{exc}")
    console.print(f"sweep {tag}: {len(combos)} ensembles ({'; '.join(' '.join(v) or '(no sweep)' for v in varied)})",
                  highlight=False, soft_wrap=True)
    if address:
        _multirun_remote(address, combos, configs, tag, wait)
        return
    if wait:
        fail("--wait needs --address (a remote cluster's Jobs API)")
    from ensemble_service.runner import submit as run_submit

    def work(observer):
        results = []
        for v, cfg in zip(varied, configs):
            observer.progress.console.print(f"-- {' '.join(v) or '(no sweep)'}", highlight=False)
            results.append(run_submit(cfg, observer))
        return results

    results = _on_ray(configs[0].cluster.address, work)
    table = Table(title=f"Sweep {tag}", title_justify="left")
    for col in ("overrides", "parent run", "members", "mean acc", "NLL", "registered"):
        table.add_column(col, justify="right" if col in ("members", "mean acc", "NLL") else "left", overflow="fold")
    for v, r in zip(varied, results):
        table.add_row(" ".join(v), r.parent_run_id, str(len(r.members)), f"{r.ensemble[names.ENSEMBLE_MEAN_TEST_ACC]:.4f}",
                      f"{r.ensemble[names.ENSEMBLE_MEAN_TEST_NLL]:.4f}", r.model_version or "-")
    console.print(table)
    console.print(f"sweep tag: {tag} ({names.TAG_SWEEP} on {len(results)} parent runs)", highlight=False)
    console.print(f"tracking URI: {results[0].tracking_uri}", highlight=False)
    console.print(f"the hyper-ensemble: ensemble select --sweep {tag} --size N", highlight=False)


def _multirun_remote(address: str, combos: List[List[str]], configs, tag: str, wait: bool) -> None:
    """One job per combination on the remote cluster (they run concurrently as its resources allow)."""
    from ensemble_service import jobs

    _warn_without_token(address)
    submitted = []
    for combo, cfg in zip(combos, configs):
        try:
            submitted.append(jobs.submit(address, combo, json.dumps(cfg.to_dict())))
        except jobs.JobsError as exc:
            fail(f"{str(exc)} ({len(submitted)} of {len(combos)} jobs submitted: {', '.join(submitted) or 'none'})",
                 EXIT_FAILED)
        console.print(f"submitted job {submitted[-1]}: {' '.join(combo)}", highlight=False, soft_wrap=True)
    console.print(f"sweep tag: {tag}; when they are done: ensemble select --sweep {tag} --size N", highlight=False)
    if not wait:
        return
    worst = 0
    try:
        for job_id in submitted:
            final = jobs.wait(address, job_id)
            console.print(f"job {job_id} {final}", highlight=False)
            worst = max(worst, jobs.exit_code(final))
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail("stopped waiting; the jobs keep running (ensemble cancel JOB to stop one)", 130)
    raise typer.Exit(worst)


# -- ensembles built from tracked runs: grow, select, distill ------------------------------


def _lookup_errors(exc: Exception, uri: Optional[str]) -> None:
    """Bad input found while reading the store (an unknown ensemble, run or experiment, no store):
    one line, exit 2; anything else the store says: exit 1."""
    from ensemble_service.config import ConfigError
    from ensemble_service.tracking import TrackingError, resolve_uri

    if isinstance(exc, (ConfigError, LookupError)):
        fail(str(exc))
    if isinstance(exc, TrackingError):
        fail(str(exc), EXIT_FAILED)
    if _debug():
        traceback.print_exc()
    fail(f"cannot read {resolve_uri(uri)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
         EXIT_FAILED)


TRACKING_URI_HELP = "MLflow tracking URI of the ensemble (default: MLFLOW_TRACKING_URI or ./mlflow.db)."


@app.command(short_help="Add members to a registered ensemble (a new version).")
def grow(
    ensemble: str = typer.Argument(..., help="Registered ensemble: name, name@alias or name/versions/N."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Overrides of the ensemble's own config for the new members, e.g. model=lenet "
                   "optimizer.lr=0.01 trainer.epochs=20 (not its data set, strategy or registry name)."),
    members: int = typer.Option(..., "--members", "-k", help="How many members to add (K >= 1)."),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_URI_HELP),
) -> None:
    """Add K members to a registered ensemble: trained with the ensemble's own config (seeds continue after
    the existing members'; overrides allowed), the existing members reused without training, registered
    as a new version of the same model. The new parent run has the metrics and size curve of all members
    and links the ensemble and the member runs it reused (tags ensemble.grown_from, ensemble.reused_members)."""
    from ensemble_service.grow import describe, prepare
    from ensemble_service.runner import submit as run_submit

    if members < 1:
        fail(f"--members must be at least 1, got {members}")
    try:
        cfg, reuse = prepare(ensemble, members, list(overrides or []), tracking_uri)
    except Exception as exc:
        _lookup_errors(exc, tracking_uri)
    what, how = describe(cfg, reuse)
    console.print(f"growing {what}: {how}", highlight=False)
    result = _on_ray(cfg.cluster.address, lambda observer: run_submit(cfg, observer, reuse=reuse))
    _print_result(result)


@app.command("select", short_help="Greedy ensemble selection over tracked member runs.")
def select_cmd(
    size: int = typer.Option(..., "--size", "-n", help="Greedy picks at most (with replacement); the selection "
                                                       "is the best ensemble along the path."),
    metric: str = typer.Option("val_nll", "--metric", help="What the picks optimize on the validation split: "
                                                           "val_nll or val_acc."),
    experiment: Optional[List[str]] = typer.Option(None, "--experiment", "-e", help="Pool: the members of every "
                                                                                    "finished ensemble in this experiment (repeat for several)."),
    runs: Optional[List[str]] = typer.Option(None, "--runs", "-r", help="Pool: this parent run's members, or "
                                                                        "this member run (repeat for several)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Pool: the members of the ensembles of this sweep "
                                                              "(submit --multirun)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Registered model of the selection "
                                                                        "(default: the first experiment's name + -selected)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
) -> None:
    """Greedy ensemble selection with replacement (Caruana et al. 2004) over tracked member runs of any
    strategies and architectures (one data set and split), on their validation predictions; registers
    the selection with its pick shares as weights. Trains nothing."""
    from ensemble_service.hyperensemble import select

    try:
        result = select(experiments=experiment or [], runs=runs or [], sweep=sweep, size=size, metric=metric,
                        model_name=model_name, uri=tracking_uri)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        _lookup_errors(exc, tracking_uri)
    for line in result.skipped:
        err.print(f"[yellow]left out:[/] {escape(line)}", highlight=False, soft_wrap=True)
    table = Table(title=f"Selected from a pool of {result.pool_size} members", title_justify="left")
    for col in ("member", "run", "architecture", "picks", "weight", "val NLL", "val acc", "test acc"):
        table.add_column(col, justify="left" if col in ("run", "architecture") else "right", overflow="fold")
    for r in result.members:
        table.add_row(str(r["member"]), r["run_id"], r["architecture"], str(r["picks"]), f"{r['weight']:.3f}",
                      f"{r['val_nll']:.4f}", f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}")
    console.print(table)
    v = result.values
    optimized = "NLL" if metric == "val_nll" else "accuracy"
    cmp = Table(title=f"Validation (the selection optimizes its {optimized}) and test", title_justify="left")
    for col in ("", "val NLL", "val acc", "test NLL", "test acc"):
        cmp.add_column(col, justify="left" if not col else "right")
    cmp.add_row("selection", f"{v[names.ENSEMBLE_MEAN_VAL_NLL]:.4f}", f"{v[names.ENSEMBLE_MEAN_VAL_ACC]:.4f}",
                f"{v[names.ENSEMBLE_MEAN_TEST_NLL]:.4f}", f"{v[names.ENSEMBLE_MEAN_TEST_ACC]:.4f}")
    cmp.add_row("best pool member", f"{v[names.BEST_MEMBER_VAL_NLL]:.4f}", f"{v[names.BEST_MEMBER_VAL_ACC]:.4f}", "", "")
    cmp.add_row("whole pool averaged", f"{v[names.POOL_MEAN_VAL_NLL]:.4f}", f"{v[names.POOL_MEAN_VAL_ACC]:.4f}",
                f"{v[names.POOL_MEAN_TEST_NLL]:.4f}", f"{v[names.POOL_MEAN_TEST_ACC]:.4f}")
    console.print(cmp)
    console.print(f"picks kept: {result.best_step} of {len(result.path_nll)} (the best ensemble along the greedy path)",
                  highlight=False)
    console.print(f"parent run: {result.parent_run_id}", highlight=False)
    console.print(f"experiment: {result.experiment}", highlight=False)
    console.print(f"tracking URI: {result.tracking_uri}", highlight=False)
    if result.model_version:
        console.print(f"registered model: {result.model_version} (serve it with: ensemble serve)", highlight=False)


@app.command(short_help="Distil a registered ensemble into one model.")
def distill(
    ensemble: str = typer.Argument(..., help="Registered ensemble (the teacher): name, name@alias or name/versions/N."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="The student: model=M, trainer.* and optimizer.* over the ensemble's own config."),
    temperature: float = typer.Option(2.0, "--temperature", "-T", help="Softmax temperature of the soft targets."),
    alpha: float = typer.Option(0.5, "--alpha", help="Share of the soft-target term in the loss (1 - alpha: the "
                                                     "hard labels' cross-entropy)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also train the student's architecture "
                                                                          "alone on the labels, for comparison."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Registered model of the student "
                                                                        "(default: the ensemble's name + -distilled)."),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_URI_HELP),
) -> None:
    """Distil a registered ensemble into one model (Hinton et al. 2015): trained on the training split
    against the ensemble's soft targets, as a Ray task with its own MLflow run (ensemble.role=student,
    ensemble.distilled_from), registered as an ensemble of one. Reports student vs ensemble vs the same
    architecture trained alone (acc, NLL, ECE) and the forward-time ratio."""
    from ensemble_service.distill import prepare, run

    try:
        plan = prepare(ensemble, list(overrides or []), tracking_uri, temperature=temperature, alpha=alpha,
                       model_name=model_name, baseline=baseline)
    except Exception as exc:
        _lookup_errors(exc, tracking_uri)
    console.print(f"distilling {plan.teacher_ref} ({len(plan.blobs)} members) at T={plan.temperature:g}, "
                  f"alpha={plan.alpha:g}", highlight=False)
    result = _on_ray(plan.cfg.cluster.address, lambda observer: run(plan, observer))
    table = Table(title="Test set", title_justify="left")
    for col in ("model", "acc", "NLL", "ECE", "forward s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    labels = {"teacher": f"ensemble ({result.comparison['teacher']['members']} members)", "student": "student (distilled)",
              "baseline": "same architecture alone"}
    for key in ("teacher", "student", "baseline"):
        c = result.comparison.get(key)
        if c:
            fwd = f"{c['forward_seconds']:.4f}" if "forward_seconds" in c else "-"
            table.add_row(labels[key], f"{c['acc']:.4f}", f"{c['nll']:.4f}", f"{c['ece']:.4f}", fwd)
    console.print(table)
    console.print(f"forward-time ratio (ensemble / student): {result.forward_time_ratio:.1f}", highlight=False)
    console.print(f"student run: {result.run_id}", highlight=False)
    console.print(f"experiment: {result.experiment}", highlight=False)
    console.print(f"tracking URI: {result.tracking_uri}", highlight=False)
    console.print(f"registered model: {result.model_version} (serve it with: ensemble serve)", highlight=False)


def _default_address(address: Optional[str]) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


ADDRESS_HELP = "Ray Jobs API address (default: RAY_ADDRESS, else http://127.0.0.1:8265)."


@app.command("jobs")
def jobs_cmd(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """List the jobs on a Ray cluster, newest first."""
    from ensemble_service import jobs

    address = _default_address(address)
    try:
        found = jobs.list_jobs(address)
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    table = Table(title=f"Jobs at {address}", title_justify="left")
    table.add_column("job id", no_wrap=True)
    for col in ("status", "entrypoint", "message"):
        table.add_column(col, overflow="fold")
    for j in found:
        table.add_row(str(j["job_id"]), str(j["status"]), str(j["entrypoint"]), str(j["message"])[:200])
    console.print(table)


@app.command("status", short_help="Print a job's status.")
def status_cmd(job_id: str = typer.Argument(..., help="Job (submission) id."),
               address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from ensemble_service import jobs

    try:
        console.print(jobs.status(_default_address(address), job_id), highlight=False)
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)


@app.command("logs")
def logs_cmd(job_id: str = typer.Argument(..., help="Job (submission) id."),
             follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the job ends."),
             address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Print a job's logs."""
    from ensemble_service import jobs

    address = _default_address(address)
    try:
        if follow:
            for chunk in jobs.follow(address, job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(jobs.logs(address, job_id))
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command("cancel")
def cancel_cmd(job_id: str = typer.Argument(..., help="Job (submission) id."),
               address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Stop a job; its driver marks the ensemble's MLflow runs KILLED."""
    from ensemble_service import jobs

    address = _default_address(address)
    try:
        stopped = jobs.cancel(address, job_id)
    except jobs.JobsError as exc:
        fail(str(exc), EXIT_FAILED)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}", highlight=False)


RUN_COLUMNS = [  # header, justify; `ensemble runs` hides the last ones first when the terminal is narrow
    ("run id", "left"), ("status", "left"), ("mean acc", "right"), ("strategy", "left"), ("members", "right"),
    ("vote acc", "right"), ("name", "left"), ("data", "left"), ("model", "left"), ("best member", "right"),
    ("mean NLL", "right"),
]
_RUN_COLUMNS_KEPT = 3  # run id, status, mean acc: always shown


def table_width(rows: List[List[str]], cols: List[int]) -> int:
    """Width of the runs table with these columns and every cell on one line: one border, then
    each column's widest cell, its padding and border."""
    return 1 + sum(max([len(RUN_COLUMNS[i][0])] + [len(r[i]) for r in rows]) + 3 for i in cols)


def fit_columns(rows: List[List[str]], width: int) -> List[int]:
    """Indices of RUN_COLUMNS shown: as many as fit ``width`` with every cell on one line."""
    keep = list(range(len(RUN_COLUMNS)))
    while len(keep) > _RUN_COLUMNS_KEPT and table_width(rows, keep) > width:
        keep.pop()
    return keep


@app.command(short_help="List recent ensembles with their main metrics.")
def runs(
    experiment: Optional[str] = typer.Option(None, help="Only this experiment (default: all)."),
    limit: int = typer.Option(20, min=1, help="How many ensembles to list."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
) -> None:
    """List recent ensembles (parent runs) with their main metrics: as many columns as the terminal fits
    (all of them into a pipe).

    Reads only: a store that does not exist, or an unknown --experiment, is an error (exit 2), never created."""
    from ensemble_service.tracking import ExperimentNotFound, StoreNotFound, recent_parent_runs, resolve_uri

    try:
        found = recent_parent_runs(tracking_uri, experiment, limit)
    except (StoreNotFound, ExperimentNotFound) as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"cannot read runs from {resolve_uri(tracking_uri)}: {str(exc).splitlines()[0]}", EXIT_FAILED)
    rows = []
    for r in found:
        m, t = r.data.metrics, r.data.tags

        def f(key: str) -> str:
            return f"{m[key]:.4f}" if key in m else "-"

        rows.append([r.info.run_id, r.info.status, f(names.ENSEMBLE_MEAN_TEST_ACC), t.get(names.TAG_STRATEGY, ""),
                     t.get(names.TAG_MEMBERS, ""), f(names.ENSEMBLE_VOTE_TEST_ACC), r.info.run_name or "",
                     t.get(names.TAG_DATA, ""), t.get(names.TAG_MODEL, ""), f(names.BEST_MEMBER_TEST_ACC),
                     f(names.ENSEMBLE_MEAN_TEST_NLL)])
    # a terminal gets what fits its width; a pipe or a log gets every column, however wide
    terminal = console.is_terminal
    shown = fit_columns(rows, console.width) if terminal else list(range(len(RUN_COLUMNS)))
    table = Table(title=f"Ensembles in {resolve_uri(tracking_uri)}", title_justify="left")
    for i in shown:
        header, justify = RUN_COLUMNS[i]
        table.add_column(header, justify=justify, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*[row[i] for i in shown])
    width = console.width
    if not terminal:
        console.width = max(width, table_width(rows, shown))
    try:
        console.print(table)
    finally:
        console.width = width
    if len(shown) < len(RUN_COLUMNS):
        hidden = ", ".join(RUN_COLUMNS[i][0] for i in range(len(RUN_COLUMNS)) if i not in shown)
        console.print(f"hidden (terminal too narrow): {hidden}", highlight=False)
    if not found:
        console.print("no ensembles yet: run `ensemble submit`")


# `mlflow ui` start-up lines that say nothing to someone opening the UI on their own machine
_UI_NOISE = ("[MLflow] Security middleware enabled with default settings", "Registry store URI not provided")


def port_problem(host: str, port: int) -> str:
    """Why a server could not listen on host:port ('' if it can), found by binding it as uvicorn does."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            hint = " (another server is using it; choose one with --port)" if exc.errno == 98 else ""
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
    return ""


def ui_pages(tracking_uri: Optional[str], base: str, ensemble: Optional[str], run: Optional[str]) -> List[str]:
    """The lines `ensemble ui` prints about what to open: the ensemble's runs page and its charts, or
    the experiment list when the store holds no ensemble. Bad --ensemble / --run: exit 2."""
    from ensemble_service import runs_view
    from ensemble_service.tracking import TrackingError, ensemble_page

    try:
        if ensemble:
            from ensemble_service.registry import resolve_ensemble

            run = resolve_ensemble(tracking_uri, ensemble)["run_id"]
        page = ensemble_page(tracking_uri, run)
    except TrackingError as exc:
        if ensemble or run:
            fail(str(exc))
        page = None
    except Exception as exc:  # a store that cannot be read now: the UI may still show why
        if ensemble or run:
            fail(f"cannot read {ensemble or run} from the tracking store: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        page = None
    if page is None:
        return [f"open {runs_view.runs_url(base)} (no ensemble yet: run `ensemble submit`)"]
    where = dict(view=page["view"]) if page["view"] else dict(ensemble_id=page["ensemble_id"] or None)
    borrowed = bool(page.get("run_ids"))
    if borrowed:  # members that are runs of other ensembles: the page lists the runs by id
        where = dict(run_ids=page["run_ids"], experiment_ids=page["experiment_ids"])
    lines = [f"open {runs_view.runs_url(base, page['experiment_id'], **where)}",
             f"  ensemble {page['run_name']} (parent run {page['run_id']}): the ensemble and one row per member",
             f"  its charts: {runs_view.runs_url(base, page['experiment_id'], charts=True, **where)}"]
    if borrowed:
        n = len(page["experiment_ids"])
        lines.append(f"  (members from other ensembles{f' in {n} experiments' if n > 1 else ''}: the runs are listed "
                     "by id, with the UI's default columns)")
    elif not page["view"]:
        lines.append("  (this ensemble has no saved view: the columns are the UI's defaults)")
    return lines


@app.command(short_help="Start the MLflow UI and print the page of an ensemble's runs.")
def ui(
    port: int = typer.Option(5000, min=1, max=65535, help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (the UI has no login: keep loopback and "
                                               "use an SSH tunnel from other machines)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", help="Open this registered ensemble's runs: NAME "
                                                                    "(its newest version), NAME@ALIAS or NAME/versions/N."),
    run: Optional[str] = typer.Option(None, "--run", help="Open the runs of the ensemble this run belongs to (its "
                                                          "parent run or one of its member runs)."),
) -> None:
    """Start the MLflow UI on the same tracking store and print the page to open: the newest ensemble's
    runs (or --ensemble's, --run's), the ensemble and each of its members as one row with test_acc,
    test_nll, member index, strategy, datasets and registered model; and the address of its charts.
    A grown or selected ensemble's page lists its runs by id (its members are runs of other ensembles,
    possibly in other experiments). It binds 127.0.0.1 unless --host says otherwise (it has no login): reach it over an SSH tunnel.
    A port already in use, an unknown --ensemble or --run is an error (exit 2). Ctrl-C or SIGTERM
    stops the UI's server process with it."""
    import socket

    from ensemble_service.api.auth import is_loopback, redact_uri
    from ensemble_service.tracking import resolve_uri, ui_command

    if ensemble and run:
        fail("give --ensemble or --run, not both")
    problem = port_problem(host, port)
    if problem:
        fail(problem)
    shown = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
    base = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}"
    pages = ui_pages(tracking_uri, base, ensemble, run)
    cmd = [sys.executable, "-m"] + ui_command(tracking_uri, host, port)
    # a UI for people: one web worker, no background job runners (MLflow's GenAI jobs), no start-up noise
    quiet = "ignore:starlette.middleware.wsgi is deprecated"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_LOGGING_LEVEL=os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"),
               PYTHONWARNINGS=",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w))
    console.print(f"MLflow UI for {redact_uri(resolve_uri(tracking_uri))} on http://{host}:{port}", highlight=False)
    for line in pages:
        console.print(line, highlight=False, soft_wrap=True)
    if is_loopback(host):
        console.print(f"from another machine, tunnel to it: ssh -N -L {port}:{host}:{port} {socket.gethostname()} "
                      f"and open the same address", highlight=False, soft_wrap=True)
    else:
        err.print(f"[yellow]warning:[/] the MLflow UI has no login: anyone who can reach {host}:{port} can read, change "
                  f"and delete every run and model (the default --host 127.0.0.1 and an SSH tunnel avoid this)",
                  highlight=False, soft_wrap=True)
    sys.stdout.flush()  # the address reaches a log or a pipe now, not when the server stops
    bind_failed: List[str] = []

    def relay(stream) -> None:
        for line in stream:
            if line.startswith(_UI_NOISE):
                continue
            if "address already in use" in line:
                bind_failed.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    import threading

    child, relaying, code = None, None, 0
    interrupt = Interrupt().install()
    try:
        # its own process group: a signal to this command reaches the server (and its workers) through us
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        relaying = threading.Thread(target=relay, args=(child.stderr,), daemon=True)
        relaying.start()
        code = child.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the server's whole process group
        interrupt.hold()
        code = 0
        if child is not None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            except ProcessLookupError:
                pass
    finally:
        interrupt.restore()
    if relaying is not None:
        relaying.join(timeout=2)
    if bind_failed:
        fail(f"the MLflow UI could not listen on {host}:{port}: address already in use", EXIT_BAD_INPUT)
    raise typer.Exit(code)


# -- serving: `serve` (the HTTP API under uvicorn) and `predict` (its client) ---------------

# `serve` takes API keys from --api-key or ENSEMBLE_API_KEYS (comma-separated) and refuses a non-loopback
# --host without one (exit 2) unless --insecure; `predict` sends ENSEMBLE_API_KEY as `Authorization: Bearer`.

DEFAULT_URL = "http://127.0.0.1:8000"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _load_inputs(path: Path) -> Dict[str, Any]:
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
    if suffix == ".npy":  # sent as a .npy body (application/x-npy), not JSON
        import numpy as np

        with path.open("rb") as f:  # numpy calls anything without its magic "pickled data" and advises allow_pickle
            if f.read(6) != np.lib.format.MAGIC_PREFIX:
                fail(f"{path} is not a .npy file (it does not start with the header numpy.save writes)")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            fail(f"cannot read {path} as a NumPy array: {str(exc).splitlines()[0]}")
        if arr.dtype.kind not in "biuf":
            fail(f"{path} holds {arr.dtype} values; inputs must be numbers")
        return {"npy": arr}
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


@app.command(short_help="Serve registered ensembles over HTTP (uvicorn or Ray Serve).")
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."),
    device: str = typer.Option("cpu", help="Where members run: cpu, cuda or auto."),
    preload: bool = typer.Option(True, help="Load every registered ensemble's latest version at startup."),
    max_body_bytes: Optional[int] = typer.Option(None, min=1, help="Larger request bodies get 413 (default 8 MiB)."),
    max_batch_items: Optional[int] = typer.Option(None, min=1, help="Items per request, and rows per batched "
                                                                     "forward (default 1024)."),
    batching: bool = typer.Option(True, help="Stack concurrent predict requests to one ensemble into one forward "
                                             "(the answers are the same)."),
    batch_wait_ms: Optional[float] = typer.Option(
        None, min=0, help="Under concurrent load, how long a forward waits for more requests to stack (default 2; "
                          "a lone client never waits; with --ray, serve.batch always waits this long)."),
    inline_forward_ms: Optional[float] = typer.Option(
        None, min=0, help="A lone request whose forward should take at most this long runs on the event loop "
                          "instead of the ensemble's thread, saving the hand-off (default 2; 0: never)."),
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
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: the same app in --replicas replicas behind "
                                                  "Ray Serve's HTTP proxy, batching with serve.batch."),
    replicas: int = typer.Option(2, min=1, help="With --ray: how many replicas."),
    address: Optional[str] = typer.Option(
        None, "--address", help="With --ray: the Ray cluster (auto, HOST:6379, ray://HOST:10001; default: a private "
                                "local cluster, stopped on exit)."),
    replica_cpus: float = typer.Option(1.0, min=0, help="With --ray: CPUs per replica (also its torch threads "
                                                        "unless --threads)."),
    replica_gpus: float = typer.Option(0.0, min=0, help="With --ray: GPUs per replica (fractions share one; "
                                                        "use with --device auto or cuda)."),
) -> None:
    """Serve registered ensembles over HTTP (FastAPI under uvicorn): predict, aggregate, list, describe.

    Concurrent predict requests to one ensemble share a forward (--batching, --batch-wait-ms, --max-batch-items).

    With --ray, the same app runs in --replicas Ray Serve replicas.

    With API keys (--api-key or ENSEMBLE_API_KEYS) every request but /healthz and the docs needs
    'Authorization: Bearer KEY'. A --host other than loopback needs a key, or --insecure."""
    import uvicorn

    from ensemble_service.api import auth
    from ensemble_service.api.app import Settings, create_app
    from ensemble_service.tracking import resolve_uri

    if device not in ("cpu", "cuda", "auto"):
        fail(f"unknown device {device!r}; choose one of: cpu, cuda, auto")
    if not ray and (address is not None or replicas != 2 or replica_cpus != 1.0 or replica_gpus != 0.0):
        fail("--replicas, --address, --replica-cpus and --replica-gpus go with --ray")
    settings = Settings.from_env(device=device, preload=preload, gc_freeze=True, max_body_bytes=max_body_bytes,
                                 max_batch_items=max_batch_items, max_members=max_members, alias_ttl_s=alias_ttl,
                                 batching=batching, batch_wait_ms=batch_wait_ms,
                                 inline_forward_ms=inline_forward_ms,
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
    problem = port_problem(host, port)  # before saying it serves (and before Ray starts)
    if problem:
        fail(problem)
    keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API key"
    if ray:
        _serve_on_ray(resolve_uri(tracking_uri), settings, host, port, replicas, address, replica_cpus, replica_gpus,
                      threads, keys, log_level, access_log)
        return
    if threads:
        import torch

        torch.set_num_threads(threads)
    app = create_app(tracking_uri, settings)
    console.print(f"serving ensembles registered in {auth.redact_uri(resolve_uri(tracking_uri))} on "
                  f"http://{host}:{port} with {keys} (docs: http://{host}:{port}/docs)", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    except KeyboardInterrupt:
        raise typer.Exit(0)


def _serve_on_ray(uri: str, settings, host: str, port: int, replicas: int, address: Optional[str], cpus: float,
                  gpus: float, threads: int, keys: str, log_level: str, access_log: bool) -> None:
    from ensemble_service import scheduler
    from ensemble_service.api import auth, ray_serve

    if address and address not in ("local",):
        problem = scheduler.check_address(address)
        if problem:
            fail(problem)
    elif problem := port_problem(host, port):
        fail(problem)

    def ready(info: Dict[str, Any]) -> None:
        console.print(f"serving ensembles registered in {auth.redact_uri(uri)} on {info['address']} with {keys}: "
                      f"{info['replicas']} Ray Serve replica(s) ({cpus:g} CPU, {gpus:g} GPU each) on "
                      f"{info['cluster']} (docs: {info['address']}/docs)", highlight=False, soft_wrap=True)

    def stopping() -> None:
        where = "the private Ray cluster stops" if not address or address == "local" else \
            f"the application is deleted from {address}"
        console.print(f"stopping: the replicas finish their requests, then {where}", highlight=False, soft_wrap=True)

    try:
        ray_serve.run(uri, settings, host=host, port=port, replicas=replicas, address=address, num_cpus=cpus,
                      num_gpus=gpus, threads=threads or max(1, int(cpus)), log_level=log_level, access_log=access_log,
                      ready=ready, stopping=stopping)
        console.print("stopped", highlight=False)
    except KeyboardInterrupt:
        raise typer.Exit(0)
    except Exception as exc:  # a deployment that cannot start (replica errors, resources): one line
        fail(f"Ray Serve deployment failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
             EXIT_FAILED)


@app.command(short_help="Ask a running `ensemble serve` to label the inputs in files.")
def predict(
    name: str = typer.Argument(..., help="Registered ensemble: name, name@alias or name/versions/N."),
    files: List[Path] = typer.Argument(..., help="Inputs: a .npy array, a .json list (or {\"inputs\": ...}), a .csv "
                                                  "table with a header row, or image files (PNG, JPEG, ...)."),
    method: Optional[str] = typer.Option(None, help="mean, vote, weighted or logit_mean (default: mean)."),
    url: str = typer.Option(os.environ.get("ENSEMBLE_URL", DEFAULT_URL), help="Base URL of `ensemble serve`."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole response as JSON instead of the labels."),
    timeout: float = typer.Option(60.0, min=0.1, help="Seconds to wait for each answer."),
    batch_rows: int = typer.Option(1024, min=1, help="Send the inputs in requests of at most this many rows "
                                                     "(the server's --max-batch-items, default 1024); the answers "
                                                     "are joined in order."),
) -> None:
    """Ask a running `ensemble serve` for the labels of the inputs in FILES (one label per line, with
    the class name when the ensemble knows it). Inputs are raw, in the training data's format: the
    ensemble applies its own preprocessing. More rows than --batch-rows go in several requests. The
    API key, when the server has them, comes from ENSEMBLE_API_KEY."""
    from urllib.parse import quote

    import httpx

    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if images and len(images) != len(files):
        fail("give either image files or one .npy/.json/.csv file, not both")
    if not images and len(files) != 1:
        fail("give one .npy, .json or .csv file (several files only for images)")
    endpoint = f"{url.rstrip('/')}/v1/ensembles/{quote(name, safe='@/')}/predict"
    key = os.environ.get("ENSEMBLE_API_KEY", "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if images:
        for f in images:
            if not f.is_file():
                fail(f"no such file: {f}")
        form = {"method": method} if method is not None else {}
        rows: Any = images

        def send(part):
            return httpx.post(endpoint, files=[("files", (f.name, f.read_bytes())) for f in part], data=form,
                              timeout=timeout, headers=headers)
    else:
        body = _load_inputs(files[0])
        if "npy" in body:  # the binary path: the array as a .npy body, the other fields as query parameters
            rows = body["npy"] if body["npy"].ndim else body["npy"].reshape(1)

            def send(part):
                return httpx.post(endpoint, content=_npy_bytes(part), params={"method": method} if method else None,
                                  timeout=timeout, headers={**headers, "content-type": "application/x-npy"})
        else:
            if method is not None:
                body["method"] = method
            rows = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
            whole = not isinstance(body["inputs"], list)  # not a list: sent as it is (the server says what is wrong)

            def send(part):
                return httpx.post(endpoint, json=body if whole else {**body, "inputs": part}, timeout=timeout,
                                  headers=headers)
    answers = []
    for start in range(0, max(len(rows), 1), batch_rows):
        part = rows[start:start + batch_rows]
        try:
            resp = send(part)
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
            where = f" (rows {start}-{start + len(part) - 1})" if len(rows) > batch_rows else ""
            fail(f"{resp.status_code}{where}: {detail}", 2 if 400 <= resp.status_code < 500 else EXIT_FAILED)
        answers.append((len(part), data))
    data = _join_answers(answers)
    if as_json:
        console.print_json(json.dumps(data))
        return
    names = data.get("class_names")
    for i, label in enumerate(data["labels"]):
        typer.echo(f"{label}\t{names[i]}" if names else label)


def _npy_bytes(arr) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _join_answers(answers: List[Tuple[int, Dict[str, Any]]]) -> Dict[str, Any]:
    """One predict answer from the answers of consecutive chunks ((rows, answer) each): the per-row
    lists joined in order (``members``, member x row, joined per member); the rest from the first."""
    if len(answers) == 1:
        return answers[0][1]
    out = dict(answers[0][1])
    for k, v in out.items():
        if k == "members" and isinstance(v, list):
            out[k] = [[row for _, a in answers for row in a[k][m]] for m in range(len(v))]
        elif isinstance(v, list) and len(v) == answers[0][0]:
            out[k] = [item for _, a in answers for item in a[k]]
    return out


def main() -> None:
    """The console script. The user's own modules (model._target_=mymod.Net, data._target_=mymod.load)
    are importable from the directory it runs in, as with `python -m`. Once a command has returned,
    everything it opened is closed (MLflow runs, the embedded Ray with its processes): the process then
    exits at once, skipping the interpreter's teardown, which after training (torch, Ray, MLflow and
    the results in memory) spends seconds in garbage collection."""
    import atexit

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        # not standalone: a usage error (a missing argument, an unknown option, a bad option value)
        # is told here in one line, not in click's boxed usage text
        returned = app(standalone_mode=False)
        code = returned if type(returned) is int else 0
    except typer.Abort:
        err.print("aborted", highlight=False)
        code = 1
    except typer.TyperException as exc:  # click's usage errors (typer carries its own click)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = " ".join(str(exc.format_message()).split()).rstrip(".")
        if message:  # (`ensemble` alone has printed its help)
            err.print(f"[bold red]error:[/] {escape(message)}{where}", highlight=False, soft_wrap=True)
        code = getattr(exc, "exit_code", EXIT_BAD_INPUT)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`ensemble runs | head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    main()

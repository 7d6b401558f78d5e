"""The MLflow Model Registry side: register a finished ensemble, find and download registered ones.

A finished ensemble becomes one version of a registered model (name: ``tracking.model_name``,
default the experiment name): a pyfunc model (``ensemble_service.pyfunc_model``) logged as an
MLflow 3 logged model ``ensemble_model`` of the parent run (its output: the UI's Models column),
holding the ensemble directory
(``ensemble_service.artifact``: manifest with class names and preprocessing, member checkpoints,
the user's model code) as its artifact ``ensemble`` and a copy of the ``ensemble_service``
package as code, with explicit pip requirements (nothing inferred). The version's description
and tags say what it is: strategy, members, architectures and the parent's test metrics.
``models:/<name>@latest``
resolves to the newest version: MLflow 3 reserves the alias ``latest`` for exactly that (it cannot
be set by hand there); on a registry that does not, it is set explicitly. Any other alias is set
with ``MlflowClient.set_registered_model_alias``.

MLflow is imported here, in ``tracking.py`` and in the pyfunc model only.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import LoggedModelOutput, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ensemble_service import names  # noqa: E402
from ensemble_service.tracking import TrackingError, _now_ms, client_for, resolve_uri, uninterrupted  # noqa: E402

ENSEMBLE_MODEL_ARTIFACT = "ensemble_model"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions (as mlflow.register_model writes it)
ENSEMBLE_MODEL_TAG = names.TAG_KIND      # registered-model tag marking our ensembles (names.KIND_ENSEMBLE)
_REF_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")
_REF_VERSION = re.compile(r"[0-9]{1,30}")  # ASCII digits only ('²'.isdigit() is True, int('²') fails)
#: The largest model version number a registry can hold (MLflow stores versions as 32-bit SQL integers).
MAX_VERSION = 2 ** 31 - 1


class EnsembleNotFound(TrackingError, LookupError):
    """No registered ensemble (or version, or alias) of that name."""


class RegisteredEnsemble:
    """What ``register_ensemble`` made: ``name``, ``version`` (str), ``source`` (``models:/<model_id>``),
    ``run_id``, ``seconds``, ``location`` (where the model's files are) and ``model_id`` (the logged model)."""

    def __init__(self, name: str, version: str, source: str, run_id: str, seconds: float, location: str = "",
                 model_id: str = ""):
        self.name, self.version, self.source, self.run_id, self.seconds = name, version, source, run_id, seconds
        self.location, self.model_id = location or source, model_id

    def __repr__(self) -> str:
        return f"RegisteredEnsemble({self.name!r}, version={self.version!r}, seconds={self.seconds:.2f})"


def _pip_requirements(preprocessing: Optional[Mapping[str, Any]] = None) -> List[str]:
    import torch

    reqs = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    if (preprocessing or {}).get("kind") == "image":  # image files are decoded with Pillow
        import PIL

        reqs.append(f"pillow=={PIL.__version__}")
    return reqs


def _stage_code(dest: Path) -> Path:
    """A copy of the ensemble_service package (sources only) for the model's code_paths."""
    import shutil

    src = Path(__file__).resolve().parent
    target = dest / "ensemble_service"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    return target


@uninterrupted
def register_ensemble(uri: Optional[str], parent_run_id: str, model_name: str, member_blobs: List[bytes],
                      member_info: List[Dict[str, Any]], strategy: str, *, alias: str = "latest",
                      description: Optional[str] = None, class_names: Optional[List[str]] = None,
                      preprocessing: Optional[Mapping[str, Any]] = None,
                      temperature: Optional[float] = None) -> RegisteredEnsemble:
    """Log the ensemble as a pyfunc model under the parent run and register a new version.

    ``member_info[i]`` describes ``member_blobs[i]``: ``index``, ``architecture``, ``model``
    (its spec), ``metrics`` (``val_acc`` ... ; ``val_acc`` gives the weights of method
    ``weighted`` unless ``weight`` is given), optional ``weight`` (every member's or none: the
    served ensemble's aggregation weights, e.g. a selection's pick shares), optional ``run_id`` and ``extra`` (the worker result's ``extra``: MC-dropout samples carry ``role``,
    ``sample`` and their seed). ``class_names`` and ``preprocessing`` (the data set's fitted
    pipeline) go into the manifest, and so does ``temperature`` (fitted on the validation split:
    serving applies it unless asked not to); the user code the member models need is shipped with it.
    Sets ``alias`` on the new version (see above for `latest`) and tags the parent run with
    ``ensemble.registered_model`` / ``ensemble.model_version``.
    """
    import shutil
    import warnings

    from mlflow.exceptions import MlflowException

    from ensemble_service import artifact, pyfunc_model
    from ensemble_service.pyfunc_model import ARTIFACT

    t0 = time.perf_counter()
    if not model_name or not str(model_name).strip():
        raise TrackingError("model name must not be empty")
    if len(member_blobs) != len(member_info):
        raise TrackingError(f"{len(member_blobs)} member blobs but {len(member_info)} member descriptions")
    if len({info.get("weight") is None for info in member_info}) > 1:
        raise TrackingError("give a weight for every member or for none")
    uri = resolve_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(parent_run_id)
    records = []
    for k, (blob, info) in enumerate(zip(member_blobs, member_info)):
        extra = dict(info.get("extra") or {})
        needs_meta = extra.get("role") == "mc_sample" and "sample_seed" not in extra and "mc_seed" not in extra
        records.append(artifact.member_record(
            int(info.get("index", k)), info.get("architecture"), info.get("model"), info.get("metrics"), extra,
            blob_meta=artifact.read_member(blob) if needs_meta else None, weight=info.get("weight"),
            run_id=info.get("run_id")))
    meta: Dict[str, Any] = {"name": model_name, "strategy": strategy, "parent_run_id": parent_run_id,
                            "experiment_id": run.info.experiment_id,
                            "data": run.data.tags.get(names.TAG_DATA, ""), "created": _now_ms()}
    if class_names is not None:
        meta["class_names"] = [str(c) for c in class_names]
    if preprocessing is not None:
        meta["preprocessing"] = dict(preprocessing)
    if temperature is not None:
        meta["temperature"] = float(temperature)
    user_code = artifact.user_code(info.get("model") or {} for info in member_info)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        manifest = artifact.write_ensemble_dir(tmp_path / ARTIFACT, member_blobs, records, meta, code=user_code)
        code = _stage_code(tmp_path / "code")
        model_dir = tmp_path / ENSEMBLE_MODEL_ARTIFACT
        with warnings.catch_warnings():  # "no input example": inputs are checked by serving.Ensemble
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir), python_model=str(Path(pyfunc_model.__file__).resolve()),
                artifacts={ARTIFACT: str(tmp_path / ARTIFACT)}, code_paths=[str(code)],
                pip_requirements=_pip_requirements(preprocessing), signature=pyfunc_model.signature(),
                metadata={"ensemble_members": len(member_blobs), "ensemble_strategy": strategy,
                          "ensemble_parent_run_id": parent_run_id})
        test_tags = {k: f"{run.data.metrics[k]:.4f}" for k in _VERSION_METRICS if k in run.data.metrics}
        # an MLflow 3 logged model of the parent run: the UI's Models column, the experiment's Models tab
        logged = client.create_logged_model(run.info.experiment_id, name=ENSEMBLE_MODEL_ARTIFACT,
                                            source_run_id=parent_run_id, model_type="pyfunc ensemble",
                                            tags={names.TAG_STRATEGY: strategy, names.TAG_MEMBERS: str(len(member_blobs)),
                                                  **test_tags})
        try:
            client.log_model_artifacts(logged.model_id, str(model_dir))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
        shutil.rmtree(model_dir, ignore_errors=True)
    client.log_outputs(parent_run_id, [LoggedModelOutput(logged.model_id, 0)])
    try:
        client.create_registered_model(model_name, tags={ENSEMBLE_MODEL_TAG: names.KIND_ENSEMBLE},
                                       description="Ensemble registered by ensemble-service")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    archs: Dict[str, int] = {}
    for r in manifest["members"]:
        archs[r["architecture"]] = archs.get(r["architecture"], 0) + 1
    if description is None:
        description = version_description(strategy, archs, meta["data"], parent_run_id, run.data.metrics)
    # source models:/<model_id>, as mlflow.register_model makes it: the registry links the version to the
    # logged model (its files stay at the logged model's artifact location)
    tags = {names.TAG_STRATEGY: strategy, names.TAG_MEMBERS: str(len(member_blobs)),
            "ensemble.architectures": json.dumps(archs), "ensemble.parent_run_id": parent_run_id,
            "ensemble.num_classes": str(manifest["num_classes"]),
            "ensemble.input_shape": json.dumps(manifest["input_shape"]), **test_tags}
    with _global_tracking_uri(uri):
        mv = client.create_model_version(model_name, f"models:/{logged.model_id}", run_id=parent_run_id,
                                         description=description, model_id=logged.model_id, tags=tags)
    if alias:
        try:
            client.set_registered_model_alias(model_name, alias, mv.version)
        except MlflowException:
            if alias.lower() != "latest":  # MLflow 3 reserves `latest`: it always means the newest version
                raise
    client.set_logged_model_tags(logged.model_id, {MODEL_VERSIONS_TAG: json.dumps(
        [{"name": model_name, "version": mv.version}])})  # the logged model's page lists the version
    client.log_batch(parent_run_id, tags=[RunTag(names.TAG_REGISTERED_MODEL, model_name),
                                          RunTag(names.TAG_MODEL_VERSION, str(mv.version))])
    return RegisteredEnsemble(model_name, str(mv.version), mv.source, parent_run_id, time.perf_counter() - t0,
                              logged.artifact_location, logged.model_id)


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's SQL registry looks a ``models:/<model_id>`` source up through the process's global
    tracking URI (not the client's): point it at ``uri`` for the call, then put back the URI and
    the ``MLFLOW_TRACKING_URI`` variable as they were."""
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


#: the parent run's metrics a model version carries as tags (4 decimals) and names in its description
_VERSION_METRICS = (names.ENSEMBLE_MEAN_TEST_ACC, names.ENSEMBLE_MEAN_TEST_NLL, names.ENSEMBLE_VOTE_TEST_ACC,
                    names.BEST_MEMBER_TEST_ACC, names.MEAN_MEMBER_TEST_ACC)


def version_description(strategy: str, archs: Mapping[str, int], data: str, parent_run_id: str,
                        metrics: Mapping[str, float]) -> str:
    """A model version's description (markdown): what the ensemble is and how good it is."""
    members = sum(archs.values())
    made_of = ", ".join(f"{n} x {a}" for a, n in archs.items())
    text = f"Ensemble of {members} members (`{strategy}`: {made_of})" + (f" trained on {data}" if data else "")
    text += f"; parent run `{parent_run_id}`."
    if names.ENSEMBLE_MEAN_TEST_ACC in metrics:
        text += f" Test accuracy {metrics[names.ENSEMBLE_MEAN_TEST_ACC]:.4f} (mean of the members' probabilities"
        if names.BEST_MEMBER_TEST_ACC in metrics:
            text += f"; best member {metrics[names.BEST_MEMBER_TEST_ACC]:.4f}"
        text += ")"
        if names.ENSEMBLE_MEAN_TEST_NLL in metrics:
            text += f", NLL {metrics[names.ENSEMBLE_MEAN_TEST_NLL]:.4f}"
        text += "."
    return text


def parse_ensemble_ref(ref: str):
    """``name`` | ``name@alias`` | ``name/versions/N`` -> (name, alias, version); bare name = @latest.

    Raises EnsembleNotFound for anything else (so the API answers 404), versions past
    ``MAX_VERSION`` included (no store holds them; SQLite would overflow reading them)."""
    ref = (ref or "").strip()
    name, alias, version = ref, None, None
    if "/versions/" in ref:
        name, _, v = ref.rpartition("/versions/")
        if not _REF_VERSION.fullmatch(v) or not 1 <= int(v) <= MAX_VERSION:
            raise EnsembleNotFound(f"no ensemble version {ref!r} (versions are integers 1..{MAX_VERSION})")
        version = str(int(v))
    elif "@" in ref:
        name, _, alias = ref.rpartition("@")
        if not _REF_ALIAS.match(alias):
            raise EnsembleNotFound(f"no ensemble alias {ref!r}")
    if not name or "/" in name or "@" in name:
        raise EnsembleNotFound(f"no ensemble named {ref!r}")
    return name, alias or (None if version else "latest"), version


def _not_found(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (
        exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        or (exc.error_code == "INVALID_PARAMETER_VALUE" and ("not found" in str(exc) or "Invalid" in str(exc)
                                                             or "must" in str(exc) or "cannot" in str(exc))))


def _version_dict(mv, aliases: Optional[List[str]] = None) -> Dict[str, Any]:
    return {"name": mv.name, "version": str(mv.version), "aliases": sorted(aliases if aliases is not None else (mv.aliases or [])),
            "run_id": mv.run_id, "source": mv.source, "status": mv.status, "tags": dict(mv.tags or {}),
            "created": int(mv.creation_timestamp or 0)}


def _ensemble_versions(client: MlflowClient, name: str) -> List[Any]:
    escaped = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name = '{escaped}'", max_results=10000)
    return sorted(versions, key=lambda v: int(v.version))


def list_registered_ensembles(uri: Optional[str] = None) -> List[Dict[str, Any]]:
    """Registered ensembles (models tagged ensemble.kind=ensemble): name, versions, aliases.

    ``latest`` is listed as an alias of each model's newest version."""
    client = client_for(uri)
    out = []
    for rm in client.search_registered_models(max_results=1000):
        if (rm.tags or {}).get(ENSEMBLE_MODEL_TAG) != names.KIND_ENSEMBLE:
            continue
        versions = _ensemble_versions(client, rm.name)
        aliases: Dict[str, str] = {str(a): str(v) for a, v in (rm.aliases or {}).items()}
        for mv in versions:
            for a in mv.aliases or []:
                aliases.setdefault(a, str(mv.version))
        if versions:
            aliases.setdefault("latest", str(versions[-1].version))
        out.append({"name": rm.name, "description": rm.description or "",
                    "latest_version": str(versions[-1].version) if versions else None, "aliases": aliases,
                    "versions": [_version_dict(mv, [a for a, v in aliases.items() if v == str(mv.version)])
                                 for mv in versions]})
    return sorted(out, key=lambda e: e["name"])


def resolve_ensemble(uri: Optional[str], ref: str) -> Dict[str, Any]:
    """The registered version ``ref`` names (see parse_ensemble_ref), as a dict with ``name``,
    ``version``, ``aliases``, ``run_id``, ``source``, ``tags``, ``created``.

    EnsembleNotFound when the model, version or alias does not exist; TrackingError when the
    store cannot be read."""
    name, alias, version = parse_ensemble_ref(ref)
    client = client_for(uri)
    try:
        try:
            rm = client.get_registered_model(name)
        except Exception as exc:
            if _not_found(exc):  # the name itself, whatever version or alias was asked for
                raise EnsembleNotFound(f"no registered ensemble {name!r}") from None
            raise
        if (rm.tags or {}).get(ENSEMBLE_MODEL_TAG) != names.KIND_ENSEMBLE:
            raise EnsembleNotFound(f"no registered ensemble named {name!r}")
        if version is not None:
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, alias)
        latest = _ensemble_versions(client, name)
    except EnsembleNotFound:
        raise
    except Exception as exc:
        if _not_found(exc):
            what = f"version {version}" if version else f"alias {alias!r}"
            raise EnsembleNotFound(f"no registered ensemble {name!r} with {what}") from None
        raise TrackingError(f"cannot read the model registry: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    aliases = list(mv.aliases or [])
    if latest and str(latest[-1].version) == str(mv.version) and "latest" not in aliases:
        aliases.append("latest")
    return _version_dict(mv, aliases)


def download_ensemble(uri: Optional[str], resolved: Dict[str, Any], dest: str) -> Path:
    """Download a resolved version's ``ensemble`` artifact directory under ``dest``; its local path."""
    from mlflow.artifacts import download_artifacts

    from ensemble_service.pyfunc_model import ARTIFACT

    # where the version's files are: its logged model's artifact location (the source is models:/<model_id>),
    # or, for a version registered from run artifacts, the source itself
    location = client_for(uri).get_model_version_download_uri(resolved["name"], resolved["version"])
    local = download_artifacts(artifact_uri=f"{location.rstrip('/')}/artifacts/{ARTIFACT}",
                               dst_path=dest, tracking_uri=resolve_uri(uri))
    return Path(local)


def run_metrics(uri: Optional[str], run_id: str) -> Dict[str, float]:
    """A run's latest metric values (for a parent run: the ensemble metrics)."""
    try:
        return dict(client_for(uri).get_run(run_id).data.metrics)
    except Exception:
        return {}

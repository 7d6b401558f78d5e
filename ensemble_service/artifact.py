"""The member artifact and the ensemble directory: one owner of both formats.

Member checkpoint ("blob")
--------------------------
What a worker hands back for each member and what serving rebuilds it from: the bytes of a
``torch.save`` of ``{"model": <model spec>, "input_shape": [...], "num_classes": int,
"state_dict": {...}}`` (extra keys allowed, e.g. ``"mc_dropout": {"samples", "seed"}``), read with
``torch.load(weights_only=True)``. The model spec is the member's ``_target_`` dict
(``ensemble_service.models.build_model`` rebuilds it).

Ensemble directory
------------------
What the model registry logs (the pyfunc model's artifact) and ``ensemble serve`` loads::

    manifest.json        format, input_shape, num_classes, strategy, class_names, preprocessing
                         (the data set's fitted pipeline: raw inputs -> model inputs), temperature
                         (fitted on the validation split; absent with calibration=none), the member
                         table (records), and the user code it needs
    members/<sha256[:16]>.pt   one file per distinct blob (MC-dropout samples share one)
    code/<module>        the user's model code (a module file or a package folder), so the
                         ensemble loads where that code is not importable

Member records (:func:`member_record`) are JSON: index, role, architecture, model spec, metrics
and, for MC-dropout samples, the pass's seed.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ensemble_service.models import architecture as model_architecture, derive_seed

FORMAT = 1
MANIFEST = "manifest.json"
CODE_DIR = "code"
#: top-level packages the service ships itself (never copied as user code)
OWN_PACKAGES = ("ensemble_service", "workers")


class ArtifactError(ValueError):
    """A member checkpoint or ensemble directory that cannot be written or read; one line."""


# --------------------------------------------------------------------------- member checkpoint


def member_blob(model_spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                model: torch.nn.Module, extra: Optional[Mapping[str, Any]] = None) -> bytes:
    """The member checkpoint of ``model`` (its weights on the CPU) as bytes."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({**dict(extra or {}), "model": dict(model_spec), "input_shape": [int(s) for s in input_shape],
                "num_classes": int(num_classes), "state_dict": state}, buf)
    return buf.getvalue()


def read_member(blob: bytes) -> Dict[str, Any]:
    """A member checkpoint from its bytes (``torch.load(weights_only=True)``, on the CPU)."""
    try:
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"cannot read member checkpoint: {_first(exc)}") from None
    missing = [k for k in ("model", "input_shape", "num_classes", "state_dict")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ArtifactError(f"member checkpoint lacks {', '.join(missing)}")
    return ckpt


def member_record(index: int, architecture: Optional[str] = None, model: Optional[Mapping[str, Any]] = None,
                  metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None,
                  *, blob_meta: Optional[Mapping[str, Any]] = None, weight: Optional[float] = None,
                  run_id: Optional[str] = None) -> Dict[str, Any]:
    """The manifest entry of one member (JSON-safe), from what the runner has about it.

    ``weight`` (a selection's share of the picks, ``ensemble select``) is the member's aggregation
    weight when the ensemble is served; ``run_id`` names the member's MLflow run.

    ``extra`` is the worker result's ``extra``: ``{"role": "mc_sample", "sample": s, ...}`` marks
    MC-dropout pass ``s``. Its seed is ``sample_seed`` (the pass's own seed, as the trajectory worker
    reports it); else it is derived like the worker does, ``derive_seed(base, "mc_dropout", s)``, from
    the base seed ``mc_seed`` or the checkpoint's ``mc_dropout.seed``.
    """
    extra = dict(extra or {})
    role = str(extra.get("role") or "member")
    rec: Dict[str, Any] = {"index": int(index), "role": role}
    if architecture is not None:
        rec["architecture"] = str(architecture)
    if model is not None:
        rec["model"] = json.loads(json.dumps(dict(model), default=str))
    rec["metrics"] = {k: float(v) for k, v in (metrics or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ArtifactError(f"member {index}: weight must be a finite number >= 0, got {weight!r}")
        rec["weight"] = float(weight)
    if run_id:
        rec["run_id"] = str(run_id)
    for key in ("sample", "cycle", "epoch", "head", "trajectory", "n_averaged"):
        if isinstance(extra.get(key), int) and not isinstance(extra.get(key), bool):
            rec[key] = int(extra[key])
    if role == "mc_sample":
        seed = extra.get("sample_seed")
        if seed is None:
            base = extra.get("mc_seed", dict((blob_meta or {}).get("mc_dropout") or {}).get("seed"))
            if base is not None and extra.get("sample") is not None:
                seed = derive_seed(int(base), "mc_dropout", int(extra["sample"]))
        if seed is None:
            raise ArtifactError(f"member {index} is an MC-dropout sample without a seed "
                                "(sample_seed, or mc_seed / the checkpoint's mc_dropout.seed with sample)")
        rec["sample_seed"] = int(seed)
    return rec


# --------------------------------------------------------------------------- user code


def _targets(value: Any) -> Iterable[str]:
    """Every ``_target_`` string inside a (nested) spec."""
    if isinstance(value, Mapping):
        if isinstance(value.get("_target_"), str):
            yield value["_target_"]
        for v in value.values():
            yield from _targets(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _targets(v)


def _installed_roots() -> List[Path]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return [Path(r).resolve() for r in roots if r]


def user_code(specs: Iterable[Mapping[str, Any]]) -> Dict[str, Path]:
    """The user's own code the specs' targets need: top-level module name -> its file (a module)
    or folder (a package). Installed packages (site-packages, the standard library) and the
    service's own packages are not included: they are requirements, not code to ship."""
    installed = _installed_roots()
    out: Dict[str, Path] = {}
    for spec in specs:
        for target in _targets(spec):
            top = target.split(".", 1)[0]
            if top in out or top in OWN_PACKAGES or top in sys.builtin_module_names:
                continue
            try:
                module = importlib.import_module(top)
            except Exception:
                continue  # the model check on the driver already reported unimportable targets
            origin = getattr(module, "__file__", None)
            if not origin:
                continue
            path = Path(origin).resolve()
            if path.name == "__init__.py":
                path = path.parent
            if any(root == path or root in path.parents for root in installed):
                continue
            out[top] = path
    return out


def stage_code(dest: Union[str, Path], modules: Mapping[str, Path]) -> List[str]:
    """Copy the user's modules into ``dest`` (sources only); returns the names copied."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in sorted(modules.items()):
        if path.is_dir():
            shutil.copytree(path, dest / path.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*"))
        else:
            shutil.copy2(path, dest / path.name)
    return sorted(modules)


_CODE_CACHE: Dict[str, Path] = {}


def use_code(path: Union[str, Path]) -> Optional[Path]:
    """Make the user code shipped in an ensemble directory importable: its ``code/`` is copied to a
    folder that lives as long as this process (the directory itself may be a temporary download)
    and put on ``sys.path`` (after everything else, so it never shadows installed packages). A
    module of the same name that this process imported already is not replaced."""
    code = Path(path) / CODE_DIR
    if not code.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(p for p in code.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(code)).encode())
        digest.update(f.read_bytes())
    key = digest.hexdigest()[:16]
    dest = _CODE_CACHE.get(key)
    if dest is None:
        import atexit
        import tempfile

        dest = Path(tempfile.mkdtemp(prefix=f"ensemble-code-{key}-"))
        shutil.copytree(code, dest, dirs_exist_ok=True)
        atexit.register(shutil.rmtree, dest, True)
        _CODE_CACHE[key] = dest
    if str(dest) not in sys.path:
        sys.path.append(str(dest))
    return dest


# --------------------------------------------------------------------------- ensemble directory


def write_ensemble_dir(path: Union[str, Path], blobs: Sequence[bytes], records: Sequence[Mapping[str, Any]],
                       meta: Optional[Mapping[str, Any]] = None, *, code: Optional[Mapping[str, Path]] = None
                       ) -> Dict[str, Any]:
    """Write ``manifest.json``, ``members/*.pt`` (one file per distinct blob) and ``code/`` under
    ``path``. Checks every blob loads (``weights_only=True``) and that members agree on input
    shape and classes; returns the manifest. ``meta`` may hold ``strategy``, ``class_names``,
    ``preprocessing`` and anything else JSON-safe."""
    if not blobs:
        raise ArtifactError("an ensemble needs at least one member")
    if len(records) != len(blobs):
        raise ArtifactError(f"{len(blobs)} member blobs but {len(records)} member records")
    root = Path(path)
    (root / "members").mkdir(parents=True, exist_ok=True)
    entries, shapes, classes = [], set(), set()
    seen: Dict[str, Dict[str, Any]] = {}
    for blob, rec in zip(blobs, records):
        key = hashlib.sha256(blob).hexdigest()
        if key not in seen:
            ckpt = read_member(blob)
            seen[key] = ckpt
            (root / "members" / f"{key[:16]}.pt").write_bytes(blob)
        ckpt = seen[key]
        shapes.add(tuple(int(s) for s in ckpt["input_shape"]))
        classes.add(int(ckpt["num_classes"]))
        entry = dict(rec)
        entry.setdefault("architecture", model_architecture(ckpt["model"]))
        entry.setdefault("model", json.loads(json.dumps(dict(ckpt["model"]), default=str)))
        entry["file"] = f"members/{key[:16]}.pt"
        entry["sha256"] = key
        entries.append(entry)
    if len(shapes) != 1 or len(classes) != 1:
        raise ArtifactError(f"members disagree on input shape / classes: {sorted(shapes)} / {sorted(classes)}")
    meta = dict(meta or {})
    names = meta.get("class_names")
    if names is not None and len(names) != next(iter(classes)):
        raise ArtifactError(f"{len(names)} class names for {next(iter(classes))} classes")
    shipped = stage_code(root / CODE_DIR, code) if code else []
    manifest = {"format": FORMAT, **meta, "input_shape": list(next(iter(shapes))),
                "num_classes": next(iter(classes)), "num_members": len(entries), "code": shipped,
                "members": entries}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read ensemble manifest {p}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"ensemble manifest {p} has unknown format {manifest.get('format')!r}")
    return manifest


def read_ensemble_dir(path: Union[str, Path]) -> Tuple[List[bytes], List[Dict[str, Any]], Dict[str, Any]]:
    """What :func:`write_ensemble_dir` wrote: (member blobs, member records, meta). The directory's
    user code is made importable."""
    root = Path(path)
    manifest = read_manifest(root)
    cache: Dict[str, bytes] = {}
    blobs = []
    for entry in manifest["members"]:
        f = str(entry["file"])
        if f not in cache:
            target = (root / f).resolve()
            if root.resolve() not in target.parents:
                raise ArtifactError(f"ensemble manifest points outside its directory: {f}")
            cache[f] = target.read_bytes()
        blobs.append(cache[f])
    records = [{k: v for k, v in e.items() if k not in ("file", "sha256")} for e in manifest["members"]]
    meta = {k: v for k, v in manifest.items() if k != "members"}
    if manifest.get("code"):
        use_code(root)
    return blobs, records, meta


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else repr(exc)

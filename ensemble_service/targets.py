"""Hydra ``_target_`` specs as plain dicts: locate the callable, instantiate it, one-line errors.

A *spec* is a plain dict ``{"_target_": "package.module.Name", **arguments}`` (what a composed
``model`` / ``optimizer`` / ``data`` config node becomes on the driver). Specs travel to Ray workers
and into checkpoints as plain dicts; :func:`instantiate` builds them with
``hydra.utils.instantiate`` wherever they are needed (Hydra's runtime config is never used).

``locate`` imports the object a dotted path names and says, in one line, which part is missing:
the module (run from the directory that holds it, or put it on ``PYTHONPATH``), the attribute,
or the import that failed inside the user's module.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Set


class TargetError(ValueError):
    """A ``_target_`` that cannot be located or called; the message is one line naming it."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def locate(path: Any, where: str) -> Any:
    """The object the dotted import path ``path`` names (module attributes may be nested)."""
    if not isinstance(path, str) or not path.strip():
        raise TargetError(f"{where} must be a dotted import path such as mypkg.nets.TinyNet, got {path!r}")
    parts = path.strip().split(".")
    if any(not p.isidentifier() for p in parts):
        raise TargetError(f"{where}={path} is not a dotted import path (e.g. mypkg.nets.TinyNet)")
    module, attrs = None, []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports does not
                raise TargetError(f"{where}={path}: importing {name} failed: {first_line(exc)}") from None
            if module is None:
                raise TargetError(f"{where}={path}: no module named {parts[0]!r} (run from the directory that holds "
                                  "it, or add that directory to PYTHONPATH)") from None
            attrs = parts[i - 1:]  # the rest are attributes of the last module
            break
        except Exception as exc:  # the user's module raised while importing
            raise TargetError(f"{where}={path}: importing {name} raised {type(exc).__name__}: "
                              f"{first_line(exc)}") from None
    obj: Any = module
    for depth, attr in enumerate(attrs, start=len(parts) - len(attrs)):
        if not hasattr(obj, attr):
            owner = ".".join(parts[:depth])
            raise TargetError(f"{where}={path}: {owner} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


def parameter_names(fn: Callable) -> Optional[Set[str]]:
    """Names ``fn`` (a function or a class) accepts by keyword; None when it cannot be inspected."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return {p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def instantiate(spec: Mapping[str, Any], where: str, *, call: bool = True, **service_args: Any) -> Any:
    """Build ``spec`` with ``hydra.utils.instantiate``.

    ``service_args`` (e.g. ``input_shape``, ``num_classes``) are passed only when the target's
    signature names them, and as given (a tuple stays a tuple). With ``call=False`` the result is
    the ``functools.partial`` of the target with the spec's arguments (optimizers). Errors are
    :class:`TargetError` with one line naming ``where`` and the target.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise TargetError(f"{where} needs a _target_ (a dotted import path), got {dict(spec or {})!r}")
    target = spec["_target_"]
    fn = locate(target, f"{where}._target_")
    if not callable(fn):
        raise TargetError(f"{where}._target_={target} is a {type(fn).__name__}, not a class or function")
    names = parameter_names(fn)
    passed: Dict[str, Any] = {}
    for key, value in service_args.items():
        if key in spec:
            raise TargetError(f"{where}.{key} is set by the service (from the data set); remove it")
        if names is None or key in names:
            passed[key] = value
    body = {k: v for k, v in spec.items() if k != "_partial_"}
    try:
        factory = hydra_instantiate(body, _partial_=True, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise TargetError(f"{where}._target_={target}: {first_line(cause)}") from None
    except Exception as exc:
        raise TargetError(f"{where}._target_={target}: {type(exc).__name__}: {first_line(exc)}") from None
    if not call:
        return factory
    try:
        return factory(**passed)
    except TargetError:
        raise
    except Exception as exc:
        raise CallError(where, target, exc) from None


class CallError(TargetError):
    """The target raised when called; ``cause`` is what it raised."""

    def __init__(self, where: str, target: str, cause: BaseException):
        self.where, self.target, self.cause = where, target, cause
        if isinstance(cause, ValueError) and type(cause).__name__.endswith("Error") and \
                type(cause).__module__.startswith("ensemble_service"):
            message = f"{where}: {first_line(cause)}"  # the service's own one-line errors stay as they are
        else:
            message = f"{where}._target_={target} raised {type(cause).__name__}: {first_line(cause)}"
        super().__init__(message)

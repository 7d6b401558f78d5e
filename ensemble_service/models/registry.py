"""The built-in model registry: ``register_model`` (a decorator), ``create_model(name, ...)``.

``create_model`` is also the Hydra ``_target_`` of every built-in model config (conf/model/*.yaml:
``_target_: ensemble_service.models.create_model`` and ``name: <model>``), so built-in and user
models are built by the same ``hydra.utils.instantiate`` call (``ensemble_service.models.build``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from ensemble_service.catalog import Catalog
from ensemble_service.models.errors import (
    _KIND_NDIM, _KIND_SHAPES, ACTIVATIONS, INITS, INPUT_KINDS, ModelError,
)
from ensemble_service.models.layers import init_weights

@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    ``depths``: the allowed depth values, or None.  With ``depths=None`` and a
    ``default_depth`` any int >= 0 is allowed; with both None the model has no
    depth option.  ``default_width=None`` means the model has no width option.
    """

    name: str
    fn: Callable[..., nn.Module]
    input_kinds: tuple[str, ...] = ("image",)
    depths: tuple[int, ...] | None = None
    default_depth: int | None = None
    default_width: int | None = None

    @property
    def has_depth(self) -> bool:
        return self.depths is not None or self.default_depth is not None

    @property
    def has_width(self) -> bool:
        return self.default_width is not None


MODELS: Catalog[ModelEntry] = Catalog("model", ModelError)


def register_model(
    name: str,
    *,
    input_kinds: Sequence[str] = ("image",),
    depths: Sequence[int] | None = None,
    default_depth: int | None = None,
    default_width: int | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn`` under ``name``; a duplicate name raises ValueError."""
    kinds = tuple(input_kinds)
    if not kinds or any(k not in INPUT_KINDS for k in kinds):
        raise ValueError(f"input_kinds must be a non-empty subset of {INPUT_KINDS}; got {kinds}")
    depth_set = tuple(int(d) for d in depths) if depths is not None else None
    if depth_set is not None:
        if not depth_set:
            raise ValueError(f"depths for model {name!r} must not be empty")
        if default_depth is None:
            default_depth = depth_set[0]
        elif default_depth not in depth_set:
            raise ValueError(f"default_depth {default_depth} of model {name!r} is not in depths {depth_set}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.add(name, ModelEntry(name=name, fn=fn, input_kinds=kinds, depths=depth_set,
                                    default_depth=default_depth, default_width=default_width))
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ModelError if unknown."""
    return MODELS.get(name)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _normalize_shape(input_shape: object) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)  # type: ignore[arg-type]
    except TypeError:
        shape = None
    if not shape or not all(_is_int(s) and s > 0 for s in shape):
        raise ModelError(f"input_shape must be a non-empty sequence of positive ints; got {input_shape!r}")
    return tuple(int(s) for s in shape)


def check_model_options(
    name: str,
    input_shape: Sequence[int],
    *,
    batchnorm: bool = False,
    dropout: float = 0.0,
    init: str = "default",
    activation: str = "relu",
    depth: int | None = None,
    width: int | None = None,
    num_classes: int | None = None,
) -> None:
    """Validate a model name and its options for per-sample ``input_shape``.

    Raises :class:`ModelError` with a one-line message; builds nothing.
    ``num_classes`` is checked only when given.
    """
    entry = model_entry(name)
    shape = _normalize_shape(input_shape)
    if "any" not in entry.input_kinds and not any(len(shape) == _KIND_NDIM[k] for k in entry.input_kinds):
        needs = " or ".join(_KIND_SHAPES[k] for k in entry.input_kinds)
        raise ModelError(f"model {name} needs {needs}; data set gives shape {shape}")
    if num_classes is not None and not (_is_int(num_classes) and num_classes >= 1):
        raise ModelError(f"num_classes must be a positive int; got {num_classes!r}")
    if not isinstance(batchnorm, bool):
        raise ModelError(f"batchnorm must be true or false; got {batchnorm!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be a number in [0, 1); got {dropout!r}")
    if init not in INITS:
        raise ModelError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    if depth is not None:
        if entry.depths is not None:
            if not _is_int(depth) or depth not in entry.depths:
                raise ModelError(f"{name} depth must be one of {', '.join(map(str, entry.depths))}")
        elif entry.default_depth is not None:
            if not _is_int(depth) or depth < 0:
                raise ModelError(f"{name} depth must be an int >= 0; got {depth!r}")
        else:
            raise ModelError(f"{name} has no depth option; leave depth unset (got {depth!r})")
    if width is not None:
        if not entry.has_width:
            raise ModelError(f"{name} has no width option; leave width unset (got {width!r})")
        if not _is_int(width) or width < 1:
            raise ModelError(f"{name} width must be a positive int; got {width!r}")


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    batchnorm: bool = False,
    dropout: float = 0.0,
    init: str = "default",
    activation: str = "relu",
    depth: int | None = None,
    width: int | None = None,
) -> nn.Module:
    """Build registered model ``name`` for per-sample ``input_shape`` and ``num_classes``.

    Validates with :func:`check_model_options` first (ModelError on bad input).
    """
    check_model_options(
        name,
        input_shape,
        batchnorm=batchnorm,
        dropout=dropout,
        init=init,
        activation=activation,
        depth=depth,
        width=width,
        num_classes=num_classes,
    )
    entry = MODELS.get(name)
    shape = _normalize_shape(input_shape)
    depth = entry.default_depth if depth is None else int(depth)
    width = entry.default_width if width is None else int(width)
    model = entry.fn(
        shape,
        int(num_classes),
        batchnorm=batchnorm,
        dropout=float(dropout),
        activation=activation,
        depth=depth,
        width=width,
    )
    missing = [a for a in ("features", "classifier", "feature_dim") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"model {name!r} lacks {', '.join(missing)}; see the contract in ensemble_service.models")
    init_weights(model, init, activation)
    model.model_config = dict(
        name=name,
        input_shape=shape,
        num_classes=int(num_classes),
        batchnorm=batchnorm,
        dropout=float(dropout),
        init=init,
        activation=activation,
        depth=depth,
        width=width,
    )
    return model



"""Model registry: small PyTorch image/signal classifiers built by name (timm-style).

Registry
--------
Models are registered with the :func:`register_model` decorator and built with
:func:`create_model`::

    model = create_model("resnet", (3, 32, 32), 10, depth=18, batchnorm=True)

:func:`check_model_options` validates a model name and its options against an
input shape *without* building anything, so configs can be rejected early with a
one-line :class:`ModelError` (a ``ValueError``) that names the valid choices.

Input kinds (``ModelEntry.input_kinds``):

* ``"image"``  -- per-sample shape ``(C, H, W)``
* ``"signal"`` -- per-sample shape ``(C, L)``
* ``"any"``    -- any per-sample shape (the model flattens it)

Options (:data:`MODEL_OPTIONS`), honoured by every built-in model:

* ``batchnorm`` (bool): a BatchNorm layer right after each conv / hidden linear
  layer, before the activation.  Convs and hidden linears carry a bias only when
  batchnorm is off.  (ResNet uses ``nn.Identity`` in the BN slots when off.)
* ``dropout`` (float in [0, 1)): an ``nn.Dropout(p)`` on the input of every linear
  layer of the classifier head (and therefore, in the MLP, after each hidden
  layer).  With ``dropout=0`` no Dropout modules are created at all.
* ``init`` (one of :data:`INITS`), applied by :func:`init_weights` to every
  Conv1d/Conv2d/Linear: ``default`` leaves PyTorch's defaults untouched;
  ``normal`` = N(0, 0.01); ``xavier`` = ``xavier_normal_``; ``kaiming`` =
  ``kaiming_normal_`` (fan_in; nonlinearity ``leaky_relu`` with slope 0.01 for
  the leaky_relu activation, else ``relu``).  For every non-default init biases
  are zeroed and BatchNorm weights/biases set to 1/0.
* ``activation`` (one of :data:`ACTIVATIONS`): ``nn.ReLU`` / ``nn.LeakyReLU(0.01)``
  / ``nn.ELU``.
* ``depth`` (int or None = model default): see each model below.  Models with no
  depth option reject a depth; ``ModelEntry.depths`` lists the allowed values
  when they are a fixed set.
* ``width`` (int or None = model default): see each model below.  Models with no
  width option (``ModelEntry.default_width is None``) reject a width.

Built-in models
---------------
* ``mlp`` (any): flatten -> ``depth`` hidden layers (default 2, 0 allowed =
  softmax regression) of ``width`` units (default 128) -> linear.
* ``lenet`` (image): LeNet-5: conv5x5(6, padding 2) -> pool -> conv5x5(16) ->
  pool -> fc120 -> fc84 -> fc.  The second conv is padded (2) along any side
  shorter than 5 and a pool is skipped along a side shorter than 2, so 8x8,
  28x28 (classic 16x5x5 = 400 features) and 32x32 inputs all work.  No depth or
  width option.
* ``alexnet`` (image): small-image AlexNet.  Five convs with ``width`` *
  (1, 3, 6, 4, 4) channels (default width 32; width 64 gives the original
  64-192-384-256-256), kernels 5, 5, 3, 3, 3 (stride 1, "same" padding), max-pool
  after convs 1, 2 and 5 while the side is >= 2, adaptive avg-pool to 2x2, then
  the AlexNet classifier: two hidden FC layers of ``16 * width`` units + output
  layer.  No depth option.
* ``vgg`` (image): depth 11/13/16 (configs A/B/D, default 11).  Channel widths are
  the standard 64-128-256-512-512 divided by ``64 / width``: ``width`` is the
  first stage's channels (default 16), doubling per stage up to 8x.  3x3 convs,
  max-pool only while the side is >= 2, global avg pool, classifier with two
  hidden FC layers of ``8 * width`` units + output layer.
* ``resnet`` (image): depth 18/34 (BasicBlock, [2,2,2,2] / [3,4,6,3]) or 50
  (Bottleneck, [3,4,6,3], expansion 4); default 18.  Small-image stem (3x3
  conv, stride 1, no max-pool); ``width`` = base channels (default 16; stages
  width, 2w, 4w, 8w); stages 2-4 downsample with stride 2 along sides >= 2;
  1x1-conv projection shortcut when the shape changes; global avg pool + fc.
* ``cnn1d`` (signal, e.g. mnist1d's (1, 40)): the mnist1d paper's ConvBase:
  three conv1d layers of ``width`` channels (default 25), kernel 5, stride 2,
  padding 1 (more padding / stride 1 when the length gets too short) -> linear.
  No depth option.

Feature / head contract (for "shared backbone, K heads" ensembles)
------------------------------------------------------------------
Every model returned by :func:`create_model` has

* ``model.features`` -- an ``nn.Module`` mapping a batch ``(N, *input_shape)`` to a
  flat feature matrix ``(N, model.feature_dim)``;
* ``model.classifier`` -- the head ``nn.Module`` mapping ``(N, feature_dim)`` to
  logits ``(N, num_classes)`` (everything after the backbone, including any
  hidden FC layers and dropout of the head);
* ``model.feature_dim`` -- an ``int``;
* ``model.forward(x) == model.classifier(model.features(x))``;
* ``model.model_config`` -- the resolved ``create_model`` keyword arguments
  (name, input_shape, num_classes, batchnorm, dropout, init, activation, depth,
  width), so ``create_model(**model.model_config)`` rebuilds the architecture.

A function registered with :func:`register_model` is called as
``fn(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width)``
(``depth``/``width`` already resolved to the entry's defaults) and must return a
module honouring the contract above; :func:`create_model` applies the weight init
afterwards.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "INPUT_KINDS",
    "MODEL_OPTIONS",
    "AlexNet",
    "BasicBlock",
    "Bottleneck",
    "CNN1d",
    "ClassifierNet",
    "LeNet",
    "MLP",
    "ModelEntry",
    "ModelError",
    "ResNet",
    "VGG",
    "check_model_options",
    "count_parameters",
    "create_model",
    "init_weights",
    "list_models",
    "model_entry",
    "register_model",
]


def derive_seed(seed: int, *keys) -> int:
    """A seed in [0, 2**63) determined by ``seed`` and ``keys`` (e.g. ``("head", k)`` for head k,
    ``("mc_dropout", s)`` for MC-dropout pass s): the training workers and the serving code
    derive the same per-head and per-pass seeds from it."""
    digest = hashlib.sha256(repr((int(seed),) + keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ModelError(ValueError):
    """A bad model name or option; the message is one line naming the valid choices."""


INITS = ("default", "normal", "xavier", "kaiming")
ACTIVATIONS = ("relu", "leaky_relu", "elu")
INPUT_KINDS = ("image", "signal", "any")

#: Option name -> accepted Python type(s).  Value constraints: dropout in [0, 1),
#: init in INITS, activation in ACTIVATIONS, depth/width positive ints (or None =
#: model default; mlp also takes depth 0).
MODEL_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "batchnorm": bool,
    "dropout": float,
    "init": str,
    "activation": str,
    "depth": (int, type(None)),
    "width": (int, type(None)),
}

_KIND_SHAPES = {"image": "image input (C,H,W)", "signal": "signal input (C,L)", "any": "input of any shape"}
_KIND_NDIM = {"image": 3, "signal": 2}


# --------------------------------------------------------------------------- registry


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


_REGISTRY: dict[str, ModelEntry] = {}


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
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(
            name=name,
            fn=fn,
            input_kinds=kinds,
            depths=depth_set,
            default_depth=default_depth,
            default_width=default_width,
        )
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ModelError if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


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
    entry = _REGISTRY[name]
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


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_weights(model: nn.Module, init: str = "default", activation: str = "relu") -> nn.Module:
    """Apply weight init ``init`` (see module docstring) to ``model`` in place; returns it."""
    if init not in INITS:
        raise ModelError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    if init == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if init == "normal":
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
            elif init == "xavier":
                nn.init.xavier_normal_(m.weight)
            elif activation == "leaky_relu":
                nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity="leaky_relu")
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------- building blocks


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "elu":
        return nn.ELU()
    raise ModelError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")


def _conv_block(conv: nn.Module, out_ch: int, batchnorm: bool, activation: str, dim: int = 2) -> list[nn.Module]:
    layers = [conv]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_ch) if dim == 2 else nn.BatchNorm1d(out_ch))
    layers.append(_activation(activation))
    return layers


def _maxpool(h: int, w: int) -> tuple[nn.Module | None, int, int]:
    """2x2 max-pool along each side >= 2 (None when both are < 2); returns new sizes."""
    kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
    if kh == kw == 1:
        return None, h, w
    return nn.MaxPool2d((kh, kw)), h // kh, w // kw


def _head(
    in_dim: int, hidden: Sequence[int], num_classes: int, *, batchnorm: bool, dropout: float, activation: str
) -> nn.Sequential:
    """Classifier head: [Dropout] Linear [BN] act per hidden layer, then [Dropout] Linear."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d, h, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(_activation(activation))
        d = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def _dry_run_dim(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    finally:
        features.train(was_training)
    if out.dim() != 2 or out.shape[1] < 1:
        raise RuntimeError(f"feature extractor produced shape {tuple(out.shape)}; expected (1, D)")
    return int(out.shape[1])


class ClassifierNet(nn.Module):
    """Base class: ``forward(x) = classifier(features(x))``; ``feature_dim`` is an int."""

    features: nn.Module
    classifier: nn.Module
    feature_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- models


class MLP(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu", depth=2, width=128):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(input_shape)
        for i in range(depth):
            if i > 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(d, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_activation(activation))
            d = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = d
        self.classifier = _head(d, (), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation)


class LeNet(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu"):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        layers += _conv_block(nn.Conv2d(c, 6, 5, padding=2, bias=not batchnorm), 6, batchnorm, activation)
        pool, h, w = _maxpool(h, w)
        if pool is not None:
            layers.append(pool)
        ph, pw = (0 if h >= 5 else 2), (0 if w >= 5 else 2)
        layers += _conv_block(nn.Conv2d(6, 16, 5, padding=(ph, pw), bias=not batchnorm), 16, batchnorm, activation)
        h, w = h + 2 * ph - 4, w + 2 * pw - 4
        pool, h, w = _maxpool(h, w)
        if pool is not None:
            layers.append(pool)
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = _dry_run_dim(self.features, input_shape)
        self.classifier = _head(
            self.feature_dim, (120, 84), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation
        )


class AlexNet(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu", width=32):
        super().__init__()
        c, h, w = input_shape
        chans = [width * f for f in (1, 3, 6, 4, 4)]
        kernels = (5, 5, 3, 3, 3)
        pool_after = (0, 1, 4)
        layers: list[nn.Module] = []
        in_ch = c
        for i, (out_ch, k) in enumerate(zip(chans, kernels)):
            conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=not batchnorm)
            layers += _conv_block(conv, out_ch, batchnorm, activation)
            if i in pool_after:
                pool, h, w = _maxpool(h, w)
                if pool is not None:
                    layers.append(pool)
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = _dry_run_dim(self.features, input_shape)
        hidden = 16 * width
        self.classifier = _head(
            self.feature_dim, (hidden, hidden), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation
        )


#: VGG configs in units of the first stage's width ("M" = max-pool).
_VGG_CFGS: dict[int, list[int | str]] = {
    11: [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    13: [1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    16: [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
}


class VGG(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu", depth=11, width=16):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        in_ch = c
        for v in _VGG_CFGS[depth]:
            if v == "M":
                pool, h, w = _maxpool(h, w)
                if pool is not None:
                    layers.append(pool)
                continue
            out_ch = width * int(v)
            layers += _conv_block(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batchnorm), out_ch, batchnorm, activation)
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_ch
        hidden = 8 * width
        self.classifier = _head(
            self.feature_dim, (hidden, hidden), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation
        )


def _norm2d(ch: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(ch) if batchnorm else nn.Identity()


def _shortcut(in_ch: int, out_ch: int, stride: tuple[int, int], batchnorm: bool) -> nn.Module:
    if stride == (1, 1) and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=not batchnorm), _norm2d(out_ch, batchnorm)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride=(1, 1), *, batchnorm=False, activation="relu"):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = _norm2d(planes, batchnorm)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(planes, out_ch, 3, padding=1, bias=not batchnorm)
        self.bn2 = _norm2d(out_ch, batchnorm)
        self.shortcut = _shortcut(in_ch, out_ch, tuple(stride), batchnorm)
        self.act2 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride=(1, 1), *, batchnorm=False, activation="relu"):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=not batchnorm)
        self.bn1 = _norm2d(planes, batchnorm)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn2 = _norm2d(planes, batchnorm)
        self.act2 = _activation(activation)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=not batchnorm)
        self.bn3 = _norm2d(out_ch, batchnorm)
        self.shortcut = _shortcut(in_ch, out_ch, tuple(stride), batchnorm)
        self.act3 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


_RESNET_CFGS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu", depth=18, width=16):
        super().__init__()
        c, h, w = input_shape
        block, counts = _RESNET_CFGS[depth]
        stem = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=not batchnorm), _norm2d(width, batchnorm), _activation(activation)
        )
        stages: list[nn.Module] = []
        in_ch = width
        for i, n in enumerate(counts):
            planes = width * 2**i
            if i == 0:
                stride = (1, 1)
            else:
                stride = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
                h, w = -(-h // stride[0]), -(-w // stride[1])
            blocks = []
            for j in range(n):
                blocks.append(
                    block(in_ch, planes, stride if j == 0 else (1, 1), batchnorm=batchnorm, activation=activation)
                )
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_ch
        self.classifier = _head(in_ch, (), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation)


class CNN1d(ClassifierNet):
    def __init__(self, input_shape, num_classes, *, batchnorm=False, dropout=0.0, activation="relu", width=25):
        super().__init__()
        c, length = input_shape
        layers: list[nn.Module] = []
        in_ch = c
        for _ in range(3):
            stride = 2 if length >= 2 else 1
            padding = max(1, math.ceil((5 - length) / 2))
            conv = nn.Conv1d(in_ch, width, 5, stride=stride, padding=padding, bias=not batchnorm)
            layers += _conv_block(conv, width, batchnorm, activation, dim=1)
            length = (length + 2 * padding - 5) // stride + 1
            in_ch = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = _dry_run_dim(self.features, input_shape)
        self.classifier = _head(self.feature_dim, (), num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation)


# --------------------------------------------------------------------------- registrations


@register_model("mlp", input_kinds=("any",), default_depth=2, default_width=128)
def mlp(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return MLP(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width)


@register_model("lenet", input_kinds=("image",))
def lenet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return LeNet(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation)


@register_model("alexnet", input_kinds=("image",), default_width=32)
def alexnet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return AlexNet(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, width=width)


@register_model("vgg", input_kinds=("image",), depths=(11, 13, 16), default_depth=11, default_width=16)
def vgg(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return VGG(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width)


@register_model("resnet", input_kinds=("image",), depths=(18, 34, 50), default_depth=18, default_width=16)
def resnet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return ResNet(
        input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width
    )


@register_model("cnn1d", input_kinds=("signal",), default_width=25)
def cnn1d(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return CNN1d(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, width=width)

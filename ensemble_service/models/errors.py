"""The model error type and the option vocabularies shared by every built-in model."""
from __future__ import annotations

import hashlib


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

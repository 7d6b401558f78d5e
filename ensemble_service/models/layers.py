"""Building blocks shared by the built-in model families, the weight inits and the base class.

Every built-in model is a :class:`ClassifierNet`: ``forward(x) = classifier(features(x))`` with an
``int`` ``feature_dim`` (the contract the ``heads`` strategy relies on; see ``ensemble_service.models``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ensemble_service.models.errors import ACTIVATIONS, INITS, ModelError


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_weights(model: nn.Module, init: str = "default", activation: str = "relu") -> nn.Module:
    """Apply weight init ``init`` (see ensemble_service.models) to ``model`` in place; returns it."""
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

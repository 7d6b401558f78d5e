"""MLP: flatten -> depth hidden layers of width units -> linear (any input shape)."""
from __future__ import annotations

import math

from torch import nn

from ensemble_service.models.layers import ClassifierNet, _activation, _head
from ensemble_service.models.registry import register_model


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


@register_model("mlp", input_kinds=("any",), default_depth=2, default_width=128)


def mlp(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return MLP(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width)

"""The MNIST-1D paper's ConvBase: three conv1d layers of width channels -> linear."""
from __future__ import annotations

import math

from torch import nn

from ensemble_service.models.layers import ClassifierNet, _conv_block, _dry_run_dim, _head
from ensemble_service.models.registry import register_model


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


@register_model("cnn1d", input_kinds=("signal",), default_width=25)


def cnn1d(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return CNN1d(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, width=width)

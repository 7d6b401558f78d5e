"""A user's own models: plain nn.Module classes, nothing from ensemble_service.

The service builds them with hydra.utils.instantiate from `model._target_=nets.TinyNet`, passing
`input_shape` (per sample, a tuple) and `num_classes` because the constructors name them, and any
`+model.<arg>=<value>` given on the command line.
"""
import math

import torch
from torch import nn


class TinyNet(nn.Module):
    """An MLP for inputs of any shape: flatten -> hidden -> ReLU -> (dropout) -> classes."""

    def __init__(self, input_shape, num_classes, hidden=32, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a linear classifier, for (channels, height, width) images."""

    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

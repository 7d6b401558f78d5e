"""ResNet 18/34 (BasicBlock) and 50 (Bottleneck) with a small-image stem."""
from __future__ import annotations

import torch
from torch import nn

from ensemble_service.models.layers import ClassifierNet, _activation, _head
from ensemble_service.models.registry import register_model


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


@register_model("resnet", input_kinds=("image",), depths=(18, 34, 50), default_depth=18, default_width=16)


def resnet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return ResNet(
        input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width
    )

"""LeNet-5 for small images (the second conv padded / pools skipped on tiny sides)."""
from __future__ import annotations

from torch import nn

from ensemble_service.models.layers import ClassifierNet, _conv_block, _dry_run_dim, _head, _maxpool
from ensemble_service.models.registry import register_model


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


@register_model("lenet", input_kinds=("image",))


def lenet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return LeNet(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation)

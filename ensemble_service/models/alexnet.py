"""A small-image AlexNet: five convs of width * (1, 3, 6, 4, 4) channels, the AlexNet classifier."""
from __future__ import annotations

from torch import nn

from ensemble_service.models.layers import ClassifierNet, _conv_block, _dry_run_dim, _head, _maxpool
from ensemble_service.models.registry import register_model


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


@register_model("alexnet", input_kinds=("image",), default_width=32)


def alexnet(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return AlexNet(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, width=width)

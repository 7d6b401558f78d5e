"""VGG 11/13/16 (configs A/B/D) scaled by width, global average pooling, two hidden FC layers."""
from __future__ import annotations

from torch import nn

from ensemble_service.models.layers import ClassifierNet, _conv_block, _head, _maxpool
from ensemble_service.models.registry import register_model


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


@register_model("vgg", input_kinds=("image",), depths=(11, 13, 16), default_depth=11, default_width=16)


def vgg(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
    return VGG(input_shape, num_classes, batchnorm=batchnorm, dropout=dropout, activation=activation, depth=depth, width=width)

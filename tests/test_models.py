"""Tests for ensemble_service.models (registry, built-in models, options, feature/head contract)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ensemble_service import models
from ensemble_service.models import (
    ACTIVATIONS,
    INITS,
    MODEL_OPTIONS,
    ModelError,
    check_model_options,
    count_parameters,
    create_model,
    list_models,
    model_entry,
    register_model,
)

BUILTIN = ["alexnet", "cnn1d", "lenet", "mlp", "resnet", "vgg"]
NUM_CLASSES = 3
IMAGE_SMALL = (1, 8, 8)
IMAGE_CIFAR = (3, 32, 32)
SIGNAL = (1, 40)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
ACT_TYPES = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test do not leak into the global registry."""
    monkeypatch.setattr(models.MODELS, "_entries", dict(models.MODELS._entries))


def shapes_for(name: str) -> list[tuple[int, ...]]:
    kinds = model_entry(name).input_kinds
    if "any" in kinds:
        return [IMAGE_SMALL, SIGNAL]
    out = []
    if "image" in kinds:
        out.append(IMAGE_SMALL)
    if "signal" in kinds:
        out.append(SIGNAL)
    return out


def depths_for(name: str) -> list[int]:
    entry = model_entry(name)
    if entry.depths is not None:
        return list(entry.depths)
    if entry.default_depth is not None:
        return [0, 1, 3]
    return []


def option_cases() -> list:
    cases = []
    for name in list_models():
        shape = shapes_for(name)[0]
        for s in shapes_for(name):
            cases.append(pytest.param(name, s, {}, id=f"{name}-{'x'.join(map(str, s))}"))
        if "image" in model_entry(name).input_kinds:
            cases.append(pytest.param(name, IMAGE_CIFAR, {"batchnorm": True}, id=f"{name}-3x32x32-bn"))
        variants = [{"batchnorm": True}, {"batchnorm": False}, {"dropout": 0.5}, {"batchnorm": True, "dropout": 0.5}]
        variants += [{"init": i} for i in INITS]
        variants += [{"activation": a} for a in ACTIVATIONS]
        variants += [{"init": "kaiming", "activation": "leaky_relu", "batchnorm": True}]
        variants += [{"depth": d, "batchnorm": True} for d in depths_for(name)]
        for v in variants:
            cases.append(pytest.param(name, shape, v, id=f"{name}-" + "-".join(f"{k}={x}" for k, x in v.items())))
    return cases


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name,shape,opts", option_cases())
def test_forward_backward(name, shape, opts):
    torch.manual_seed(0)
    model = create_model(name, shape, NUM_CLASSES, **opts)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_builtin_models_registered():
    assert list_models() == BUILTIN
    assert set(MODEL_OPTIONS) == {"batchnorm", "dropout", "init", "activation", "depth", "width"}
    assert INITS == ("default", "normal", "xavier", "kaiming")
    assert ACTIVATIONS == ("relu", "leaky_relu", "elu")


@pytest.mark.parametrize(
    "name,shape",
    [("lenet", (1, 28, 28)), ("lenet", (1, 1, 1)), ("resnet", (3, 1, 5)), ("vgg", (1, 2, 3)), ("alexnet", (2, 1, 1)),
     ("cnn1d", (2, 1)), ("cnn1d", (1, 3)), ("mlp", (5,))],
)
def test_odd_and_tiny_shapes(name, shape):
    model = create_model(name, shape, NUM_CLASSES, batchnorm=True)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, NUM_CLASSES)


def test_classic_feature_sizes():
    assert create_model("lenet", (1, 28, 28), 10).feature_dim == 16 * 5 * 5
    assert create_model("lenet", (3, 32, 32), 10).feature_dim == 16 * 6 * 6
    assert create_model("cnn1d", SIGNAL, 10).feature_dim == 25 * 4  # mnist1d ConvBase
    assert create_model("mlp", IMAGE_SMALL, 10).feature_dim == 128
    assert create_model("mlp", IMAGE_SMALL, 10, depth=0).feature_dim == 64
    assert create_model("resnet", IMAGE_SMALL, 10, depth=50, width=8).feature_dim == 8 * 8 * 4
    assert create_model("vgg", IMAGE_SMALL, 10, width=4).feature_dim == 32
    assert create_model("mlp", SIGNAL, 10, width=7, depth=1).feature_dim == 7


# --------------------------------------------------------------------------- options take effect


@pytest.mark.parametrize("name", BUILTIN)
def test_batchnorm_present_iff_enabled(name):
    shape = shapes_for(name)[0]
    on = create_model(name, shape, NUM_CLASSES, batchnorm=True)
    off = create_model(name, shape, NUM_CLASSES, batchnorm=False)
    assert any(isinstance(m, BN_TYPES) for m in on.modules())
    assert not any(isinstance(m, BN_TYPES) for m in off.modules())
    # conv/hidden-linear biases only without BN
    assert any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is None for m in on.modules())
    assert all(m.bias is not None for m in off.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("name", BUILTIN)
def test_batchnorm_follows_each_conv_and_hidden_linear(name):
    model = create_model(name, shapes_for(name)[0], NUM_CLASSES, batchnorm=True)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    hidden_linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features != NUM_CLASSES]
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    assert len(bns) == len(convs) + len(hidden_linears)
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq)
            for a, b in zip(mods, mods[1:]):
                if isinstance(b, BN_TYPES):
                    assert isinstance(a, (nn.Conv1d, nn.Conv2d, nn.Linear))
                if isinstance(a, BN_TYPES) and mods.index(a) + 1 < len(mods):
                    assert isinstance(b, tuple(ACT_TYPES.values()))


@pytest.mark.parametrize("name", BUILTIN)
def test_dropout_modules(name):
    shape = shapes_for(name)[0]
    model = create_model(name, shape, NUM_CLASSES, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
    assert len(drops) >= len(linears) >= 1
    assert all(d.p == pytest.approx(0.3) for d in drops)
    # the last classifier linear layer is fed through dropout
    head = list(model.classifier)
    assert isinstance(head[-2], nn.Dropout) and isinstance(head[-1], nn.Linear)
    none = create_model(name, shape, NUM_CLASSES, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in none.modules())


def test_mlp_dropout_after_each_hidden_layer():
    model = create_model("mlp", IMAGE_SMALL, NUM_CLASSES, depth=3, dropout=0.2)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 4


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_modules(name, activation):
    model = create_model(name, shapes_for(name)[0], NUM_CLASSES, activation=activation)
    found = {type(m) for m in model.modules() if isinstance(m, tuple(ACT_TYPES.values()))}
    assert found == {ACT_TYPES[activation]}
    if activation == "leaky_relu":
        assert all(m.negative_slope == pytest.approx(0.01) for m in model.modules() if isinstance(m, nn.LeakyReLU))


def _big_linear(model: nn.Module) -> nn.Linear:
    return max((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel())


BIG = (1, 28, 28)  # mlp first layer: Linear(784, 256)


@pytest.mark.parametrize(
    "init,activation,expected",
    [
        ("normal", "relu", 0.01),
        ("xavier", "relu", math.sqrt(2.0 / (784 + 256))),
        ("kaiming", "relu", math.sqrt(2.0 / 784)),
        ("kaiming", "elu", math.sqrt(2.0 / 784)),
        ("kaiming", "leaky_relu", math.sqrt(2.0 / (1 + 0.01**2)) / math.sqrt(784)),
        ("default", "relu", 1.0 / math.sqrt(3 * 784)),  # PyTorch's kaiming_uniform(a=sqrt(5))
    ],
)
def test_weight_init_std(init, activation, expected):
    torch.manual_seed(0)
    model = create_model("mlp", BIG, NUM_CLASSES, init=init, activation=activation, width=256)
    lin = _big_linear(model)
    assert lin.weight.shape == (256, 784)
    assert lin.weight.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(lin.weight.mean().item()) < expected * 0.05
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear)]
    if init == "default":
        assert any(b.abs().sum() > 0 for b in biases)
    else:
        assert all(torch.count_nonzero(b) == 0 for b in biases)


@pytest.mark.parametrize("name", BUILTIN)
def test_init_applies_to_convs_and_bn(name):
    torch.manual_seed(0)
    model = create_model(name, shapes_for(name)[0], NUM_CLASSES, init="normal", batchnorm=True)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert layers
    for m in layers:
        assert m.weight.abs().max().item() < 0.01 * 7  # N(0, 0.01): nothing near PyTorch's default bounds
        assert m.bias is None or torch.count_nonzero(m.bias) == 0
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# --------------------------------------------------------------------------- registry and errors


def test_unknown_model_lists_registered():
    msg = "unknown model 'foo'; choose one of: alexnet, cnn1d, lenet, mlp, resnet, vgg"
    for call in (lambda: check_model_options("foo", IMAGE_SMALL), lambda: create_model("foo", IMAGE_SMALL, 2),
                 lambda: model_entry("foo")):
        with pytest.raises(ModelError) as exc:
            call()
        assert str(exc.value) == msg
    assert issubclass(ModelError, ValueError)


def test_input_kind_mismatch():
    with pytest.raises(ModelError) as exc:
        check_model_options("lenet", (1, 40))
    assert str(exc.value) == "model lenet needs image input (C,H,W); data set gives shape (1, 40)"
    with pytest.raises(ModelError, match=r"model cnn1d needs signal input \(C,L\); data set gives shape \(1, 8, 8\)"):
        create_model("cnn1d", (1, 8, 8), 2)
    for shape in (IMAGE_SMALL, SIGNAL, (5,), (2, 2, 2, 2)):
        check_model_options("mlp", shape)  # 'any'


def test_bad_depth_and_width():
    with pytest.raises(ModelError) as exc:
        check_model_options("vgg", IMAGE_SMALL, depth=12)
    assert str(exc.value) == "vgg depth must be one of 11, 13, 16"
    with pytest.raises(ModelError, match="resnet depth must be one of 18, 34, 50"):
        create_model("resnet", IMAGE_SMALL, 2, depth=101)
    with pytest.raises(ModelError, match="lenet has no depth option"):
        check_model_options("lenet", IMAGE_SMALL, depth=5)
    with pytest.raises(ModelError, match="mlp depth must be an int >= 0"):
        check_model_options("mlp", IMAGE_SMALL, depth=-1)
    with pytest.raises(ModelError, match="lenet has no width option"):
        check_model_options("lenet", IMAGE_SMALL, width=8)
    with pytest.raises(ModelError, match="resnet width must be a positive int"):
        check_model_options("resnet", IMAGE_SMALL, width=0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"init": "he"}, "unknown init 'he'; choose one of: default, normal, xavier, kaiming"),
        ({"activation": "gelu"}, "unknown activation 'gelu'; choose one of: relu, leaky_relu, elu"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\); got 1.0"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": "0.5"}, r"dropout must be a number in \[0, 1\)"),
        ({"batchnorm": "yes"}, "batchnorm must be true or false"),
    ],
)
def test_bad_options(kwargs, pattern):
    with pytest.raises(ModelError, match=pattern) as exc:
        check_model_options("resnet", IMAGE_SMALL, **kwargs)
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match=pattern):
        create_model("resnet", IMAGE_SMALL, 2, **kwargs)


@pytest.mark.parametrize("shape", [(), (0, 8, 8), (1, -2), "abc", None, (1.5, 8)])
def test_bad_input_shape(shape):
    with pytest.raises(ModelError, match="input_shape must be"):
        check_model_options("mlp", shape)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ModelError, match="num_classes must be a positive int"):
        create_model("mlp", SIGNAL, num_classes)


def test_model_entry_fields():
    e = model_entry("vgg")
    assert (e.name, e.input_kinds, e.depths, e.default_depth) == ("vgg", ("image",), (11, 13, 16), 11)
    assert callable(e.fn)
    r = model_entry("resnet")
    assert (r.depths, r.default_depth) == ((18, 34, 50), 18)
    assert model_entry("mlp").input_kinds == ("any",) and model_entry("mlp").default_depth == 2
    assert model_entry("cnn1d").input_kinds == ("signal",)
    assert model_entry("lenet").depths is None and model_entry("lenet").default_depth is None


def test_duplicate_registration_raises(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda *a, **k: None)


def test_register_custom_model(scratch_registry):
    @register_model("tiny", input_kinds=("signal",), depths=(1, 2))
    def tiny(input_shape, num_classes, *, batchnorm, dropout, activation, depth, width):
        net = models.ClassifierNet()
        net.features = nn.Flatten()
        net.feature_dim = math.prod(input_shape)
        net.classifier = nn.Linear(net.feature_dim, num_classes)
        return net

    assert "tiny" in list_models()
    assert model_entry("tiny").default_depth == 1
    m = create_model("tiny", SIGNAL, 4, init="xavier")
    assert m(torch.randn(2, *SIGNAL)).shape == (2, 4)
    assert m.model_config["depth"] == 1
    with pytest.raises(ModelError, match="tiny depth must be one of 1, 2"):
        check_model_options("tiny", SIGNAL, depth=3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny")(tiny)


def test_registry_restored_after_scratch():
    assert "tiny" not in list_models()


# --------------------------------------------------------------------------- architecture details


def test_resnet_blocks():
    r18 = create_model("resnet", IMAGE_SMALL, 2, depth=18)
    assert sum(isinstance(m, models.BasicBlock) for m in r18.modules()) == 8
    assert not any(isinstance(m, models.Bottleneck) for m in r18.modules())
    r34 = create_model("resnet", IMAGE_SMALL, 2, depth=34, width=4)
    assert sum(isinstance(m, models.BasicBlock) for m in r34.modules()) == 16
    r50 = create_model("resnet", IMAGE_SMALL, 2, depth=50, width=4)
    bottlenecks = [m for m in r50.modules() if isinstance(m, models.Bottleneck)]
    assert len(bottlenecks) == 16 and all(b.expansion == 4 for b in bottlenecks)
    assert not any(isinstance(m, models.BasicBlock) for m in r50.modules())
    assert bottlenecks[-1].conv3.out_channels == 4 * 8 * 4
    # no BN -> Identity in BN slots
    blk = next(m for m in r18.modules() if isinstance(m, models.BasicBlock))
    assert isinstance(blk.bn1, nn.Identity) and blk.conv1.bias is not None


def test_resnet_small_image_stem_and_downsampling():
    model = create_model("resnet", IMAGE_SMALL, 2, width=4)
    stem_conv = model.features[0][0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x = torch.randn(2, *IMAGE_SMALL)
    sizes = []
    h = model.features[0](x)
    for stage in list(model.features)[1:5]:
        h = stage(h)
        sizes.append(tuple(h.shape[2:]))
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # projection shortcuts where the shape changes
    first_blocks = [stage[0] for stage in list(model.features)[2:5]]
    assert all(isinstance(b.shortcut, nn.Sequential) for b in first_blocks)


@pytest.mark.parametrize("depth,convs", [(11, 8), (13, 10), (16, 13)])
def test_vgg_conv_counts(depth, convs):
    model = create_model("vgg", IMAGE_SMALL, 2, depth=depth, width=4)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    chans = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert chans[0] == 4 and max(chans) == 32


def test_vgg_pools_only_while_size_at_least_two():
    model = create_model("vgg", IMAGE_SMALL, 2)  # 8 -> 4 -> 2 -> 1: three pools of five
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3


def test_alexnet_layout():
    model = create_model("alexnet", IMAGE_CIFAR, 10, width=8, dropout=0.5)
    chans = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert chans == [8, 24, 48, 32, 32]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in model.classifier.modules()) == 3


def test_lenet_layout():
    model = create_model("lenet", (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [m.out_features for m in model.classifier.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]


def test_cnn1d_layout():
    model = create_model("cnn1d", SIGNAL, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [(25, (5,), (2,), (1,))] * 3


def test_count_parameters():
    model = create_model("mlp", SIGNAL, 3, depth=1, width=10)
    assert count_parameters(model) == (40 * 10 + 10) + (10 * 3 + 3)
    model.classifier[-1].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 40 * 10 + 10 + 3


# --------------------------------------------------------------------------- feature / head contract


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_features_classifier_contract(name, batchnorm):
    torch.manual_seed(0)
    for shape in shapes_for(name):
        model = create_model(name, shape, NUM_CLASSES, batchnorm=batchnorm, dropout=0.5)
        assert isinstance(model.feature_dim, int) and model.feature_dim > 0
        assert isinstance(model.features, nn.Module) and isinstance(model.classifier, nn.Module)
        model.eval()
        x = torch.randn(2, *shape)
        with torch.no_grad():
            feats = model.features(x)
            assert feats.shape == (2, model.feature_dim)
            torch.testing.assert_close(model.classifier(feats), model(x))
        # a fresh head on the shared backbone works
        head = nn.Linear(model.feature_dim, 7)
        assert head(model.features(x)).shape == (2, 7)
        cfg = model.model_config
        assert cfg["name"] == name and cfg["input_shape"] == shape and cfg["num_classes"] == NUM_CLASSES
        rebuilt = create_model(**cfg)
        assert count_parameters(rebuilt) == count_parameters(model)

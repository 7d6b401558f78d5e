"""Models: small PyTorch image/signal classifiers built by name, and the user's own models.

Every model the service trains is a Hydra ``_target_`` spec (a plain dict) built by
:func:`build_model`, which passes ``input_shape`` (per sample, a tuple) and ``num_classes`` when the
target's signature names them:

* built-in: conf/model/<name>.yaml holds ``_target_: ensemble_service.models.create_model``,
  ``name: <name>`` and the options below; ``create_model`` looks the name up in the registry
  (:func:`register_model`, timm-style) and builds it;
* the user's: ``model._target_=mypkg.nets.TinyNet +model.hidden=16`` (any class or function
  importable from the working directory or ``PYTHONPATH`` that returns an ``nn.Module``).

Options honoured by every built-in model (:data:`MODEL_OPTIONS`):

* ``batchnorm`` (bool): a BatchNorm layer right after each conv / hidden linear layer, before the
  activation; convs and hidden linears carry a bias only when batchnorm is off (ResNet uses
  ``nn.Identity`` in the BN slots when off).
* ``dropout`` (float in [0, 1)): an ``nn.Dropout(p)`` on the input of every linear layer of the
  classifier head (and so, in the MLP, after each hidden layer); none at all with 0.
* ``init`` (:data:`INITS`), applied to every Conv1d/Conv2d/Linear: ``default`` leaves PyTorch's
  defaults; ``normal`` = N(0, 0.01); ``xavier`` = ``xavier_normal_``; ``kaiming`` =
  ``kaiming_normal_`` (fan_in; leaky_relu slope 0.01 for that activation, else relu). For every
  non-default init biases are zeroed and BatchNorm weights/biases set to 1/0.
* ``activation`` (:data:`ACTIVATIONS`): ReLU / LeakyReLU(0.01) / ELU.
* ``depth`` / ``width`` (int or None = the model's default): see each family's module.

Built-in families (one module each): ``mlp`` (any input), ``lenet``, ``alexnet``, ``vgg``
(11/13/16), ``resnet`` (18/34/50) for images ``(C, H, W)``, ``cnn1d`` for signals ``(C, L)``.

Feature / head contract (what the ``heads`` strategy needs; every built-in model has it):
``model.features`` maps ``(N, *input_shape)`` to ``(N, model.feature_dim)``, ``model.classifier`` maps
that to logits, ``forward(x) == classifier(features(x))``; built-ins also carry
``model.model_config`` (their resolved ``create_model`` arguments).
"""
from ensemble_service.models.errors import (
    ACTIVATIONS, INITS, INPUT_KINDS, MODEL_OPTIONS, ModelError, derive_seed,
)
from ensemble_service.models.layers import ClassifierNet, count_parameters, init_weights
from ensemble_service.models.registry import (
    MODELS, ModelEntry, check_model_options, create_model, list_models, model_entry, register_model,
)
from ensemble_service.models import alexnet as _alexnet, cnn1d as _cnn1d, lenet as _lenet  # noqa: F401  (register)
from ensemble_service.models import mlp as _mlp, resnet as _resnet, vgg as _vgg  # noqa: F401
from ensemble_service.models.alexnet import AlexNet
from ensemble_service.models.build import (
    BUILTIN_TARGET, architecture, build_model, check_model, feature_head_problem, is_builtin, model_spec,
)
from ensemble_service.models.cnn1d import CNN1d
from ensemble_service.models.lenet import LeNet
from ensemble_service.models.mlp import MLP
from ensemble_service.models.resnet import BasicBlock, Bottleneck, ResNet
from ensemble_service.models.vgg import VGG

__all__ = [
    "ACTIVATIONS", "INITS", "INPUT_KINDS", "MODEL_OPTIONS", "MODELS", "BUILTIN_TARGET",
    "AlexNet", "BasicBlock", "Bottleneck", "CNN1d", "ClassifierNet", "LeNet", "MLP", "ModelEntry", "ModelError",
    "ResNet", "VGG", "architecture", "build_model", "check_model", "check_model_options", "count_parameters",
    "create_model", "derive_seed", "feature_head_problem", "init_weights", "is_builtin", "list_models",
    "model_entry", "model_spec", "register_model",
]

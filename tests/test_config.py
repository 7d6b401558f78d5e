"""Config composition for every option of every group, and bad input rejected in one line."""
from __future__ import annotations

import pytest

from ensemble_service.config import (Config, ConfigError, compose, conf_dir, group_options, load_config,
                                     to_plain)

GROUP_OPTIONS = {
    "data": ["cifar10", "digits", "fashion_mnist", "mnist", "mnist1d", "synthetic"],
    "model": ["alexnet", "cnn1d", "lenet", "mlp", "resnet", "vgg"],
    "strategy": ["independent"],
    "optimizer": ["adam", "sgd"],
    "trainer": ["default"],
    "cluster": ["local"],
    "tracking": ["default"],
}


def test_groups_list_the_expected_options():
    for group, options in GROUP_OPTIONS.items():
        assert set(options) <= set(group_options(group)), group
    assert {"demo", "mixed", "bagging"} <= set(group_options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = to_plain(compose([f"{group}={option}"]))
    assert isinstance(cfg, Config)
    node = getattr(cfg, group)
    if hasattr(node, "name"):
        assert node.name == option


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_every_experiment_preset_composes_and_validates(preset):
    cfg = load_config([f"experiment={preset}"], check_files=False)
    assert cfg.tracking.experiment == preset


def test_defaults():
    cfg = load_config([])
    assert (cfg.data.name, cfg.model.name, cfg.strategy.name, cfg.optimizer.name) == ("digits", "mlp", "independent", "adam")
    assert cfg.cluster.address is None and cfg.tracking.uri is None
    assert cfg.strategy.members == 5


def test_user_keys_are_typed_and_reach_the_config():
    cfg = load_config([
        "data=mnist1d", "data.root=/tmp/x", "model=cnn1d", "model.batchnorm=true", "model.dropout=0.25",
        "model.init=kaiming", "model.activation=elu", "strategy.members=3", "strategy.bagging=true",
        "optimizer=sgd", "optimizer.lr=0.1", "optimizer.weight_decay=0.001", "optimizer.momentum=0.5",
        "trainer.epochs=4", "trainer.batch_size=32", "trainer.seed=7", "cluster.num_cpus=2",
        "cluster.cpus_per_member=0.5", "cluster.gpus_per_member=0.25", "cluster.max_retries=1",
        "tracking.uri=sqlite:///x.db", "tracking.experiment=e1",
    ], check_files=False)
    assert cfg.data.root == "/tmp/x" and cfg.model.dropout == 0.25 and cfg.model.init == "kaiming"
    assert cfg.strategy.members == 3 and cfg.strategy.bagging is True
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.5
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed) == (4, 32, 7)
    assert cfg.cluster.gpus_per_member == 0.25 and cfg.cluster.cpus_per_member == 0.5
    assert cfg.tracking.experiment == "e1"


@pytest.mark.parametrize("model,depth", [("vgg", 11), ("vgg", 13), ("vgg", 16), ("resnet", 18), ("resnet", 34), ("resnet", 50)])
def test_depths(model, depth):
    cfg = load_config([f"model={model}", f"model.depth={depth}"])
    assert cfg.model.depth == depth


def test_mixed_architectures_from_the_command_line():
    cfg = load_config(["strategy.members=4", "strategy.models=[{name:mlp},{name:lenet,batchnorm:true}]"])
    assert [m.name for m in cfg.strategy.models] == ["mlp", "lenet"]
    assert cfg.strategy.models[1].batchnorm is True and cfg.strategy.models[0].init == "default"


BAD = [
    (["data=imagenet"], "unknown data 'imagenet'; choose one of: cifar10, digits"),
    (["model=transformer"], "unknown model 'transformer'; choose one of: alexnet, cnn1d"),
    (["strategy=boosting"], "unknown strategy 'boosting'; choose one of:"),
    (["optimizer=rmsprop"], "unknown optimizer 'rmsprop'; choose one of: adam, sgd"),
    (["experiment=nope"], "unknown experiment 'nope'"),
    (["strategy.members=0"], "strategy.members must be at least 1, got 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number, got -0.1"),
    (["optimizer.momentum=1.5"], "optimizer.momentum must be in [0, 1)"),
    (["trainer.epochs=0"], "trainer.epochs must be at least 1"),
    (["trainer.batch_size=-4"], "trainer.batch_size must be at least 1"),
    (["trainer.epochs=abc"], "bad value for trainer.epochs"),
    (["strategy.members=2.5"], "bad value for strategy.members"),
    (["strategy.members"], "malformed override"),
    (["a=b=c"], "malformed override"),
    (["--members=3"], "unknown option '--members=3'"),
    (["data.colour=red"], "unknown config key 'data.colour'"),
    (["+foo=1"], "unknown config key 'foo'"),
    (["model.init=he"], "init"),
    (["model.activation=tanh"], "activation"),
    (["model=vgg", "model.depth=19"], "vgg depth must be one of 11, 13, 16"),
    (["model=lenet", "data=mnist1d"], "lenet"),
    (["model.dropout=1.5"], "dropout"),
    (["cluster.gpus_per_member=1.5"], "cluster.gpus_per_member must be a fraction"),
    (["cluster.cpus_per_member=0"], "cluster.cpus_per_member must be > 0"),
    (["cluster.max_retries=-1"], "cluster.max_retries must be >= 0"),
    (["data=mnist", "data.root=/nonexistent/dir"], "/nonexistent/dir"),
    (["trainer.device=tpu"], "unknown trainer.device 'tpu'"),
    (["strategy.models=[{name:nope}]"], "strategy.models[0]: unknown model 'nope'"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_line_naming_the_problem(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message and len(message) < 300


def test_conf_dir_is_the_repository_conf():
    assert (conf_dir() / "config.yaml").is_file()

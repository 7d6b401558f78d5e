"""Config composition for every option of every group, and bad input rejected in one line."""
from __future__ import annotations

import pytest

from ensemble_service.config import (Config, ConfigError, compose, conf_dir, group_options, load_config,
                                     member_settings, to_plain)

GROUP_OPTIONS = {
    "data": ["arrays", "cifar10", "csv", "digits", "fashion_mnist", "image_folder", "mnist", "mnist1d", "synthetic"],
    "model": ["alexnet", "cnn1d", "lenet", "mlp", "resnet", "vgg"],
    "strategy": ["independent"],
    "optimizer": ["adam", "adamw", "sgd"],
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
    if group == "model":
        assert node["_target_"] == "ensemble_service.models.create_model" and node["name"] == option
    elif group == "optimizer":
        assert node["_target_"] == {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW",
                                    "sgd": "torch.optim.SGD"}[option] and node["_partial_"] is True
    elif hasattr(node, "name"):
        assert node.name == option


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_every_experiment_preset_composes_and_validates(preset):
    cfg = load_config([f"experiment={preset}"], check_files=False)
    assert cfg.tracking.experiment == preset


def test_defaults():
    cfg = load_config([])
    assert (cfg.data.name, cfg.model["name"], cfg.strategy.name) == ("digits", "mlp", "independent")
    # the digits x mlp recipe (conf/recipe/digits_mlp.yaml) sets the training keys
    assert cfg.recipe.name == "digits_mlp"
    assert cfg.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "weight_decay": 0.0005,
                             "momentum": 0.9, "nesterov": False}
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.schedule) == (50, 16, "constant")
    assert cfg.cluster.address is None and cfg.tracking.uri is None
    assert cfg.strategy.members == 5
    bare = load_config(["~recipe"])   # without the recipe: conf/optimizer/adam.yaml and conf/trainer/default.yaml
    assert bare.recipe is None and bare.trainer.epochs == 10
    assert bare.optimizer == {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001, "weight_decay": 0.0}


def test_user_keys_are_typed_and_reach_the_config():
    cfg = load_config([
        "data=mnist1d", "data.root=/tmp/x", "model=cnn1d", "model.batchnorm=true", "model.dropout=0.25",
        "model.init=kaiming", "model.activation=elu", "strategy.members=3", "strategy.bagging=true",
        "optimizer=sgd", "optimizer.lr=0.1", "optimizer.weight_decay=0.001", "optimizer.momentum=0.5",
        "trainer.epochs=4", "trainer.batch_size=32", "trainer.seed=7", "cluster.num_cpus=2",
        "cluster.cpus_per_member=0.5", "cluster.gpus_per_member=0.25", "cluster.max_retries=1",
        "tracking.uri=sqlite:///x.db", "tracking.experiment=e1",
    ], check_files=False)
    assert cfg.data.root == "/tmp/x" and cfg.model["dropout"] == 0.25 and cfg.model["init"] == "kaiming"
    assert cfg.strategy.members == 3 and cfg.strategy.bagging is True
    assert cfg.optimizer["_target_"] == "torch.optim.SGD" and cfg.optimizer["lr"] == 0.1
    assert cfg.optimizer["momentum"] == 0.5
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed) == (4, 32, 7)
    assert cfg.cluster.gpus_per_member == 0.25 and cfg.cluster.cpus_per_member == 0.5
    assert cfg.tracking.experiment == "e1"


@pytest.mark.parametrize("model,depth", [("vgg", 11), ("vgg", 13), ("vgg", 16), ("resnet", 18), ("resnet", 34), ("resnet", 50)])
def test_depths(model, depth):
    cfg = load_config([f"model={model}", f"model.depth={depth}"])
    assert cfg.model["depth"] == depth


def test_mixed_architectures_from_the_command_line():
    cfg = load_config(["strategy.members=4", "strategy.models=[{name:mlp},{name:lenet,batchnorm:true}]"])
    settings = member_settings(cfg)
    assert [ms.model["name"] for ms in settings] == ["mlp", "lenet", "mlp", "lenet"]
    assert settings[1].model["batchnorm"] is True and settings[0].model["init"] == "default"
    assert settings[1].model["_target_"] == "ensemble_service.models.create_model"


def test_mixed_members_carry_their_own_optimizer_and_training_settings():
    cfg = load_config(["strategy.members=3", "optimizer=sgd", "optimizer.lr=0.1",
                       "strategy.models=[{name:mlp},{name:lenet,optimizer:adam,trainer:{epochs:2}},"
                       "{name:mlp,width:16,optimizer:{lr:0.5},trainer:{batch_size:8}}]"])
    a, b, c = member_settings(cfg)
    assert a.optimizer["_target_"] == "torch.optim.SGD" and a.optimizer["lr"] == 0.1 and a.epochs == 10
    assert b.optimizer["_target_"] == "torch.optim.Adam" and b.optimizer["lr"] == 0.001 and b.epochs == 2
    assert c.optimizer == {**cfg.optimizer, "lr": 0.5} and c.batch_size == 8 and c.model["width"] == 16


def test_any_torch_optimizer_and_its_arguments_from_the_command_line():
    cfg = load_config(["optimizer._target_=torch.optim.RMSprop", "+optimizer.alpha=0.9", "optimizer.lr=0.01"])
    assert cfg.optimizer["_target_"] == "torch.optim.RMSprop" and cfg.optimizer["alpha"] == 0.9
    cfg = load_config(["optimizer=adamw", "optimizer.weight_decay=0.05"])
    assert cfg.optimizer["_target_"] == "torch.optim.AdamW" and cfg.optimizer["weight_decay"] == 0.05


def test_a_model_target_replaces_the_default_model_node(tmp_path, monkeypatch):
    (tmp_path / "usernets.py").write_text(
        "import torch\n"
        "class TinyNet(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_classes, hidden=8):\n"
        "        super().__init__()\n"
        "        self.seen = (input_shape, num_classes)\n"
        "        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(),\n"
        "                                       torch.nn.Linear(hidden, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
        "def make(num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(["model._target_=usernets.TinyNet", "+model.hidden=16"])
    assert cfg.model == {"_target_": "usernets.TinyNet", "hidden": 16}  # no mlp options leaked in
    from ensemble_service.models import architecture, build_model
    net = build_model(cfg.model, (1, 8, 8), 10)
    assert net.seen == ((1, 8, 8), 10) and isinstance(net.seen[0], tuple) and net.net[1].out_features == 16
    assert architecture(cfg.model) == "TinyNet"
    cfg = load_config(["model._target_=usernets.make"])  # a function naming only num_classes
    assert build_model(cfg.model, (1, 8, 8), 10)[1].out_features == 10


BAD = [
    (["data=imagenet"], "unknown data 'imagenet'; choose one of: arrays, cifar10, csv, custom, digits"),
    (["model=transformer"], "unknown model 'transformer'; choose one of: alexnet, cnn1d"),
    (["strategy=boosting"], "unknown strategy 'boosting'; choose one of:"),
    (["optimizer=rmsprop"], "unknown optimizer 'rmsprop'; choose one of: adam, adamw, sgd"),
    (["experiment=nope"], "unknown experiment 'nope'"),
    (["strategy.members=0"], "strategy.members must be at least 1, got 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number, got -0.1"),
    (["optimizer=sgd", "optimizer.momentum=-1.5"], "optimizer._target_=torch.optim.SGD raised ValueError: Invalid momentum value: -1.5"),
    (["optimizer._target_=torch.optim.Nope"], "optimizer._target_=torch.optim.Nope: torch.optim has no attribute 'Nope'"),
    (["~recipe", "+optimizer.bogus=1"], "optimizer._target_=torch.optim.Adam raised TypeError"),
    (["model._target_=nosuchmodule.Net"], "model._target_=nosuchmodule.Net: no module named 'nosuchmodule'"),
    (["model._target_=torch.nn.NoSuchNet"], "model._target_=torch.nn.NoSuchNet: torch.nn has no attribute 'NoSuchNet'"),
    (["model._target_=math.pi"], "model._target_=math.pi is a float, not a class or function"),
    (["model._target_=math.sqrt"], "model._target_=math.sqrt raised TypeError"),
    (["model._target_=torch.nn.Linear", "+model.in_features=3", "+model.out_features=10"],
     "model: a forward pass on a batch of shape [2, 1, 8, 8]"),
    (["model._target_=torch.nn.Flatten"], "model: the model returned [2, 64] for a batch of shape [2, 1, 8, 8]"),
    (["model._target_=builtins.dict"], "model._target_=builtins.dict returned a dict, not a torch.nn.Module"),
    (["model._target_=not a path"], "is not a dotted import path"),
    (["model=custom"], "model._target_"),
    (["+model.num_classes=3"], "model.num_classes is set by the service"),
    (["strategy=heads", "model._target_=torch.nn.Sequential"], "model"),
    (["strategy.models=[{width:3}]"], "strategy.models[0] needs a name"),
    (["strategy.models=[{name:mlp,trainer:{lr:1}}]"], "strategy.models[0].trainer may set only epochs and batch_size"),
    (["strategy.models=[{name:mlp,trainer:{epochs:0}}]"], "strategy.models[0].trainer.epochs must be at least 1"),
    (["strategy.models=[{name:mlp,optimizer:nope}]"], "strategy.models[0].optimizer: unknown optimizer 'nope'"),
    (["cluster.pack=2", "optimizer._target_=torch.optim.LBFGS", "~optimizer.weight_decay"], "cluster.pack trains members as one stacked model"),
    (["trainer.epochs=0"], "trainer.epochs must be at least 1"),
    (["trainer.batch_size=-4"], "trainer.batch_size must be at least 1"),
    (["trainer.epochs=abc"], "bad value for trainer.epochs"),
    (["strategy.members=2.5"], "bad value for strategy.members"),
    (["strategy.members"], "malformed override"),
    (["a=b=c"], "malformed override"),
    (["--members=3"], "unknown option '--members=3'"),
    (["foo"], "malformed override 'foo': no '='; overrides look like key=value, e.g. strategy.members=5"),
    (["=3"], "malformed override '=3': no key before '='"),
    (["tracking.model_name=bad/name"], "tracking.model_name='bad/name' must not contain '/'"),
    (["tracking.model_name=a@b"], "must not contain '@'"),
    (["tracking.model_name=a:b"], "must not contain ':'"),
    (["tracking.model_name="], "tracking.model_name='' must not be empty"),
    (["data.colour=red"], "unknown config key 'data.colour'"),
    # a built-in model's and an optimizer's keys: the composed node's, the chosen option's (lenet has no width)
    (["model.hiden=3"], "unknown config key 'model.hiden' (model's keys: batchnorm, dropout, init, activation, depth, width)"),
    (["model.widht=3"], "unknown config key 'model.widht' (did you mean model.width?"),
    (["model=lenet", "model.widht=3"], "unknown config key 'model.widht' (model's keys: batchnorm, dropout, init, activation)"),
    (["optimizer=sgd", "optimizer.momentun=0.5"], "(did you mean optimizer.momentum? optimizer's keys: lr, momentum, "),
    (["+foo=1"], "unknown config key 'foo' (keys go with their group, e.g. trainer.epochs=3; groups: data, model, "
                 "strategy, optimizer, trainer, cluster, tracking)"),
    # a key without its group, or in a misspelt group: which group's key it is (not the recipe's)
    (["epochs=3"], "unknown config key 'epochs' (did you mean trainer.epochs?)"),
    (["+epochs=3"], "unknown config key 'epochs' (did you mean trainer.epochs?)"),
    (["members=3"], "unknown config key 'members' (did you mean strategy.members?)"),
    (["lr=0.1"], "unknown config key 'lr' (did you mean optimizer.lr?)"),
    (["model_name=x"], "unknown config key 'model_name' (did you mean tracking.model_name or model=...?)"),
    (["trainr.epochs=3"], "unknown config key 'trainr.epochs' (did you mean trainer.epochs?)"),
    (["+trainr.epochs=3"], "unknown config key 'trainr.epochs' (did you mean trainer.epochs?)"),
    (["strategy.member=3"], "unknown config key 'strategy.member' for strategy=independent (did you mean "
                            "strategy.members?); its keys: members, bagging, models"),
    (["strategy=snapshot", "cycles=4"], "unknown config key 'cycles' (did you mean strategy.cycles?)"),
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

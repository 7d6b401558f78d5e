"""Recipes (conf/recipe/<data>_<model>.yaml): one per built-in pair that runs here, applied by
load_config, losing to every command-line override and to experiment presets, printed at submit."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ensemble_service.config import ConfigError, conf_dir, config_from_dict, load_config
from ensemble_service.recipes import TRAINER_KEYS, describe

RECIPE_KEYS = {"name", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "epochs", "batch_size"}
#: the built-in pairs whose data runs on this machine (bench/quality.py measures them)
LOCAL_PAIRS = [(d, m) for d in ("digits", "synthetic") for m in ("mlp", "lenet", "alexnet", "vgg", "resnet")] + \
    [("mnist1d", "mlp"), ("mnist1d", "cnn1d")]


def recipe_file(pair: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "recipe" / f"{pair}.yaml"))


def optimizer_file(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "optimizer" / f"{name}.yaml"))


def test_every_recipe_file_names_its_pair_and_keeps_to_the_recipe_keys():
    files = sorted((conf_dir() / "recipe").glob("*.yaml"))
    assert files
    for f in files:
        r = recipe_file(f.stem)
        assert r["name"] == f.stem and set(r) <= RECIPE_KEYS, (f.name, set(r) - RECIPE_KEYS)


@pytest.mark.parametrize("data,model", LOCAL_PAIRS)
def test_a_plain_submit_of_each_local_pair_trains_with_its_recipe(data, model):
    r = recipe_file(f"{data}_{model}")
    cfg = load_config([f"data={data}", f"model={model}", "strategy.members=5"], check_files=False)
    assert cfg.recipe.name == f"{data}_{model}" and not cfg.recipe.skipped and not cfg.recipe.kept
    for key in TRAINER_KEYS:
        if key in r:
            assert getattr(cfg.trainer, key) == r[key], key
    if "optimizer" in r:
        want = {**optimizer_file(r["optimizer"]), **{k: r[k] for k in ("lr", "weight_decay") if k in r}}
        assert cfg.optimizer == want
    line = describe(cfg.recipe)
    assert line.startswith(f"recipe {data}_{model}: ") and "kept" not in line


def test_command_line_keys_win_and_an_optimizer_choice_drops_the_recipes_optimizer():
    r = recipe_file("mnist1d_cnn1d")
    cfg = load_config(["data=mnist1d", "model=cnn1d", "trainer.epochs=7", "optimizer.lr=0.03"], check_files=False)
    assert cfg.trainer.epochs == 7 and cfg.optimizer["lr"] == 0.03
    assert cfg.optimizer["_target_"] == optimizer_file(r["optimizer"])["_target_"]
    assert cfg.trainer.batch_size == r["batch_size"]
    assert "kept from the command line: optimizer.lr=0.03 trainer.epochs=7" in describe(cfg.recipe)
    adam = load_config(["data=mnist1d", "model=cnn1d", "optimizer=adam"], check_files=False)
    assert adam.optimizer == optimizer_file("adam")            # not the recipe's lr or weight decay
    assert adam.trainer.epochs == r["epochs"]
    assert "kept from the command line: optimizer=adam" in describe(adam.recipe)


def test_experiments_other_strategies_mixed_members_and_tilde_recipe_leave_it_out():
    snap = load_config(["experiment=snapshot_mnist1d"], check_files=False)
    assert snap.recipe.name == "mnist1d_cnn1d" and snap.trainer.epochs == 50 and snap.trainer.schedule == "constant"
    assert describe(snap.recipe) == ("recipe mnist1d_cnn1d: not applied (experiment=snapshot_mnist1d sets its own "
                                     "training settings)")
    demo = load_config(["experiment=demo"], check_files=False)
    assert demo.trainer.epochs == 25 and demo.optimizer == optimizer_file("adam") and demo.recipe.skipped
    heads = load_config(["data=digits", "model=lenet", "strategy=heads"], check_files=False)
    assert heads.trainer.epochs == 10 and "strategy=heads" in describe(heads.recipe)
    mixed = load_config(["strategy.models=[{name:mlp},{name:lenet}]"], check_files=False)
    assert mixed.trainer.epochs == 10 and "strategy.models" in describe(mixed.recipe)
    none = load_config(["data=mnist1d", "model=cnn1d", "~recipe"], check_files=False)
    assert none.recipe is None and none.trainer.epochs == 10 and describe(none.recipe) == ""


def test_a_users_model_has_no_recipe_and_an_unknown_recipe_is_one_line():
    custom = load_config(["data=digits", "model=custom", "model._target_=ensemble_service.models.create_model",
                          "+model.name=mlp"], check_files=False)
    assert custom.recipe is None and custom.trainer.epochs == 10
    picked = load_config(["data=digits", "model=mlp", "recipe=mnist1d_cnn1d"], check_files=False)
    assert picked.recipe.name == "mnist1d_cnn1d" and picked.trainer.epochs == recipe_file("mnist1d_cnn1d")["epochs"]
    with pytest.raises(ConfigError) as exc:
        load_config(["recipe=digits_nope"], check_files=False)
    assert str(exc.value).startswith("unknown recipe 'digits_nope'; choose one of: ") and "mnist1d_cnn1d" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown config key 'recipe.momentum'"):
        load_config(["data=mnist1d", "model=cnn1d", "+recipe.momentum=0.5"], check_files=False)


def test_a_remote_jobs_resolved_config_keeps_the_applied_recipe():
    cfg = load_config(["data=mnist1d", "model=cnn1d", "trainer.epochs=9"], check_files=False)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.trainer == cfg.trainer and again.optimizer == cfg.optimizer and again.recipe == cfg.recipe


def test_submit_reports_the_recipe_line_to_the_observer(tmp_path):
    from ensemble_service import runner
    from test_runner import InProcess

    seen = []

    class Recorder(runner.Observer):
        def recipe(self, line):
            seen.append(line)

    cfg = load_config(["data=synthetic", "model=mlp", "strategy.members=1", "trainer.epochs=1",
                       f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cluster.storage={tmp_path}/ck",
                       "tracking.register=false"])
    runner.submit(cfg, Recorder(), scheduler=InProcess())
    assert seen == [describe(cfg.recipe)] and seen[0].startswith("recipe synthetic_mlp: ")
    assert "kept from the command line: trainer.epochs=1" in seen[0]


def test_a_run_shorter_than_the_recipes_warm_up_gets_it_scaled_down():
    """digits x lenet warms up 2 of 50 epochs: `model=lenet trainer.epochs=2` (the user never set a
    warm-up) trained nothing before, with "warmup_epochs (2) must be below trainer.epochs (2)"."""
    cfg = load_config(["model=lenet", "trainer.epochs=2"])
    assert (cfg.trainer.epochs, cfg.trainer.warmup_epochs) == (2, 0)   # round(2 * 2 / 50)
    assert "warmup_epochs=0 (the recipe's 2 of 50 epochs, scaled to 2)" in describe(cfg.recipe)
    assert load_config(["model=lenet", "trainer.epochs=40"]).trainer.warmup_epochs == 2   # long enough: as measured
    with pytest.raises(ConfigError, match=r"trainer.warmup_epochs \(2\) must be below trainer.epochs \(2\)"):
        load_config(["model=lenet", "trainer.epochs=2", "trainer.warmup_epochs=2"])  # the user's own: an error

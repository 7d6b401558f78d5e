"""Sweeps expanded as Hydra's basic sweeper does, and overrides applied to a resolved config."""
from __future__ import annotations

import pytest

from ensemble_service.config import ConfigError, load_config
from ensemble_service.overrides import apply_overrides, expand_multirun, resolved_config


def test_a_two_by_two_sweep_is_four_combinations_first_sweep_slowest():
    combos = expand_multirun(["optimizer.lr=0.01,0.1", "model=lenet,mlp", "trainer.epochs=2"])
    assert combos == [["optimizer.lr=0.01", "model=lenet", "trainer.epochs=2"],
                      ["optimizer.lr=0.01", "model=mlp", "trainer.epochs=2"],
                      ["optimizer.lr=0.1", "model=lenet", "trainer.epochs=2"],
                      ["optimizer.lr=0.1", "model=mlp", "trainer.epochs=2"]]
    assert expand_multirun(["trainer.seed=range(1,4)"]) == [[f"trainer.seed={i}"] for i in (1, 2, 3)]
    assert expand_multirun(["model=choice(mlp,lenet)"]) == [["model=mlp"], ["model=lenet"]]
    assert expand_multirun([]) == [[]]


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=interval(0,1)"], "continuous sweep"), (["a=b=c=,"], "malformed override"),
    (["--x"], "unknown option"),
    (["2"], "malformed override '2': no '='; overrides look like key=value"),  # not Hydra's lexer's exception
])
def test_bad_sweeps(overrides, message):
    with pytest.raises(ConfigError, match=message):
        expand_multirun(overrides)


@pytest.fixture(scope="module")
def base():
    return load_config(["data=synthetic", "model=mlp", "strategy.members=3"]).to_dict()


def test_overrides_change_values_groups_and_add_keys(base):
    import copy

    before = copy.deepcopy(base)
    d = apply_overrides(base, ["optimizer.lr=0.5", "trainer.epochs=7", "model=lenet", "+model.width=4",
                               "trainer.device=cpu"])
    assert d["optimizer"]["lr"] == 0.5 and d["trainer"]["epochs"] == 7 and d["trainer"]["device"] == "cpu"
    assert d["model"]["name"] == "lenet" and d["model"]["width"] == 4
    assert base == before and base["model"]["name"] == "mlp"   # the original is untouched
    assert apply_overrides(base, ["optimizer.lr=1"])["optimizer"]["lr"] == 1.0   # an int where a float is
    cfg = resolved_config(base, ["model=lenet"], {"strategy.members": 5})
    assert cfg.strategy.members == 5 and cfg.model["name"] == "lenet"


@pytest.mark.parametrize("overrides,message", [
    (["trainer.epochs=abc"], "bad value for trainer.epochs"), (["trainer.epochs=1.5"], "bad value for trainer.epochs"),
    (["model.nope=1"], "unknown config key 'model.nope'"), (["nope.x=1"], "unknown config key 'nope.x'"),
    (["model=nope"], "unknown model 'nope'"), (["experiment=demo"], "experiment presets"),
    (["optimizer.lr=0.1,1"], "is a sweep"), (["~model.width"], "deleting"),
    (["nope=1"], r"unknown config key 'nope' \(keys go with their group, e.g. trainer.epochs=3; groups: data, model, "),
])
def test_bad_overrides_are_one_line(base, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(base, overrides)


@pytest.mark.parametrize("overrides,message", [
    (["trainer.epocs=3"], "unknown config key 'trainer.epocs' (did you mean trainer.epochs? trainer's keys: epochs,"),
    (["+trainer.epocs=3"], "unknown config key 'trainer.epocs' (did you mean trainer.epochs?"),  # not a TypeError
    (["+cluster.adress=x"], "did you mean cluster.address?"),
    # a key without its group, or in a misspelt one: the group keys of that name (the stored config's)
    (["epochs=3"], "unknown config key 'epochs' (did you mean trainer.epochs?)"),
    (["lr=0.1"], "unknown config key 'lr' (did you mean optimizer.lr?)"),
    (["trainr.epochs=3"], "unknown config key 'trainr.epochs' (did you mean trainer.epochs?)"),
    # a built-in model's and an optimizer's own keys (grow's overrides apply to the stored config)
    (["model.widht=3"], "unknown config key 'model.widht' (did you mean model.width? model's keys: batchnorm,"),
    (["optimizer.lrr=3"], "(did you mean optimizer.lr? or, for a new argument of the optimizer's `_target_`, "
                          "add it with +optimizer.lrr=...)"),
])
def test_unknown_keys_say_what_was_meant(base, overrides, message):
    with pytest.raises(ConfigError) as err:
        resolved_config(base, overrides)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_unknown_key_of_a_users_own_model_says_it_takes_a_plus(base):
    own = dict(base, model={"_target_": "usermod.Net", "hidden": 8})
    with pytest.raises(ConfigError) as err:
        resolved_config(own, ["model.hiden=3"])
    assert str(err.value) == ("unknown config key 'model.hiden' (did you mean model.hidden? or, for a new argument of "
                              "the model's `_target_`, add it with +model.hiden=...)")
    with pytest.raises(ConfigError) as err:
        resolved_config(own, ["model.depth=3"])
    assert str(err.value).endswith("(for a new argument of the model's `_target_`, add it with +model.depth=...)")


def test_the_result_is_validated(base):
    with pytest.raises(ConfigError, match="optimizer.lr"):
        resolved_config(base, ["optimizer.lr=-1"])

"""Data configs through Hydra: ``ensemble_service.config.load_config`` composes ``data=<source>`` with
its overrides into the source's schema dataclass (conf/data/*.yaml); unknown keys, bad values and
missing files are one-line ConfigErrors before anything runs."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from data_formats import image_array, one_line, write_csv, write_image, write_npz
from ensemble_service.config import ConfigError, load_config
from ensemble_service.data import load
from ensemble_service.data.arrays import ArraysData
from ensemble_service.data.bundled import DigitsData
from ensemble_service.data.csvfile import CsvData
from ensemble_service.data.custom import CustomData
from ensemble_service.data.image_folder import ImageFolderData


@pytest.fixture
def files(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    write_csv(tmp_path / "t.csv", "a,b,c,species\n" + "".join(f"{i},{i * 2},{i % 3},{'xy'[i % 2]}\n" for i in range(20)))
    for i in range(6):
        write_image(tmp_path / "imgs" / "ab"[i % 2] / f"{i}.png", image_array(i, 9, 9, 3))
    return tmp_path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "cfg_loaders.py").write_text(
        "import numpy as np\n\n\ndef fn(n=10, scale=1.0):\n"
        "    return {'x': scale * np.arange(2.0 * n).reshape(n, 2), 'y': np.arange(n) % 2}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cfg_loaders", None)
    yield "cfg_loaders"
    sys.modules.pop("cfg_loaders", None)


def test_arrays(files):
    cfg = load_config(["data=arrays", f"data.path={files / 'a.npz'}", "data.standardize=true",
                       "data.val_fraction=0.1"])
    assert isinstance(cfg.data, ArraysData)
    assert (cfg.data.name, cfg.data.path, cfg.data.standardize) == ("arrays", str(files / "a.npz"), True)
    assert (cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed) == (0.1, 0.2, 0)
    bundle = load(cfg.data)  # the schema object is what load takes
    assert bundle.sizes() == {"train": 14, "val": 2, "test": 4}
    assert bundle.preprocessing["ops"][0]["op"] == "standardize"


def test_csv(files):
    cfg = load_config(["data=csv", f"data.path={files / 't.csv'}", "data.target=species", "data.features=[c,a]",
                       "data.dropna=true"])
    assert isinstance(cfg.data, CsvData)
    assert (cfg.data.target, cfg.data.features, cfg.data.standardize, cfg.data.dropna) == (
        "species", ["c", "a"], True, True)
    bundle = load(cfg.data)
    assert bundle.preprocessing["columns"] == ["c", "a"] and bundle.class_names == ["x", "y"]


def test_image_folder(files):
    cfg = load_config(["data=image_folder", f"data.root={files / 'imgs'}", "data.image_size=5", "data.channels=1"])
    assert isinstance(cfg.data, ImageFolderData)
    assert (cfg.data.root, cfg.data.image_size, cfg.data.channels) == (str(files / "imgs"), 5, 1)
    assert load_config(["data=image_folder", f"data.root={files / 'imgs'}"]).data.channels is None
    assert load(cfg.data).input_shape == (1, 5, 5)


def test_custom_target_selects_data_custom(user_module):
    cfg = load_config(["data._target_=cfg_loaders.fn", "+data.n=5"])
    assert isinstance(cfg.data, CustomData)
    assert (cfg.data.name, cfg.data.target, cfg.data.args) == ("custom", "cfg_loaders.fn", {"n": 5})
    assert (cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.standardize) == (0.2, 0.2, False)
    cfg = load_config(["data._target_=cfg_loaders.fn", "+data.n=30", "+data.scale=0.5", "data.standardize=true",
                       "data.test_fraction=0.1"])
    assert cfg.data.args == {"n": 30, "scale": 0.5}
    assert (cfg.data.standardize, cfg.data.test_fraction) == (True, 0.1)
    bundle = load(cfg.data)
    assert sum(bundle.sizes().values()) == 30 and bundle.sizes()["test"] == 3
    # data=custom named explicitly works the same
    assert load_config(["data=custom", "data._target_=cfg_loaders.fn"]).data.target == "cfg_loaders.fn"


def test_builtin_data_sets_compose_to_their_schema():
    cfg = load_config(["data=digits"])
    assert isinstance(cfg.data, DigitsData) and cfg.data.name == "digits"


# ---------------------------------------------------------------------------------------------
# one-line ConfigErrors
# ---------------------------------------------------------------------------------------------


def test_unknown_keys(files):
    for overrides, key in [
        (["data=csv", f"data.path={files / 't.csv'}", "data.target=species", "data.colour=red"], "data.colour"),
        (["data=csv", f"data.path={files / 't.csv'}", "data.target=species", "+data.colour=red"], "data.colour"),
        (["data=digits", "+data.path=x"], "data.path"),
        (["data=arrays", f"data.path={files / 'a.npz'}", "data.target=y"], "data.target"),
        (["data=image_folder", f"data.root={files / 'imgs'}", "+data.size=4"], "data.size"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(overrides)
        one_line(err, f"unknown config key '{key}'")


def test_bad_values(files):
    for overrides, needles in [
        (["data=image_folder", f"data.root={files / 'imgs'}", "data.image_size=big"], ["data.image_size"]),
        (["data=arrays", f"data.path={files / 'a.npz'}", "data.standardize=maybe"], ["data.standardize"]),
        (["data=image_folder", f"data.root={files / 'imgs'}", "data.channels=2"],
         ["data.channels must be 1, 3 or null, got 2"]),
        (["data=csv", f"data.path={files / 't.csv'}"], ["data=csv needs data.target=COLUMN"]),
        (["data=custom"], ["missing value for data._target_"]),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(overrides)
        one_line(err, *needles)


def test_missing_files_before_anything_runs(files):
    for overrides, needles in [
        (["data=arrays", f"data.path={files / 'nope.npz'}"], ["nope.npz: no such file"]),
        (["data=arrays"], ["data=arrays needs data.path"]),
        (["data=csv", f"data.path={files / 'a.npz'}", "data.target=y"], ["expected a .csv or .tsv or .txt file"]),
        (["data=image_folder", f"data.root={files / 'none'}"], ["none: no such folder"]),
        (["data._target_=cfg_loaders_missing_xyz.fn"], ["no module named 'cfg_loaders_missing_xyz'"]),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(overrides)
        one_line(err, *needles)
    # without the file checks the config composes
    cfg = load_config(["data=arrays", f"data.path={files / 'nope.npz'}"], check_files=False)
    assert cfg.data.path == str(files / "nope.npz")

"""ensemble_service.catalog: the one registry of models, data sources and strategies."""
from __future__ import annotations

import pytest

from ensemble_service.catalog import Catalog
from ensemble_service.data import SOURCES
from ensemble_service.models import MODELS
from ensemble_service.strategies import STRATEGIES


class Oops(ValueError):
    pass


def test_register_get_and_errors_naming_the_choices():
    c = Catalog("widget", Oops)

    @c.register("b")
    def b():
        return "b"

    c.add("a", 1)
    assert c.get("b") is b and c.names() == ["a", "b"] and "a" in c and len(c) == 2 and list(c) == ["a", "b"]
    with pytest.raises(Oops, match="unknown widget 'z'; choose one of: a, b"):
        c.get("z")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        c.add("a", 2)
    with pytest.raises(ValueError, match="non-empty string"):
        c.add("", 3)
    c.remove("a")
    assert c.names() == ["b"]


def test_the_three_catalogs_of_the_package():
    assert MODELS.names() == ["alexnet", "cnn1d", "lenet", "mlp", "resnet", "vgg"]
    assert {"digits", "mnist1d", "arrays", "csv", "image_folder", "custom"} <= set(SOURCES.names())
    assert STRATEGIES.names() == ["fge", "heads", "independent", "mc_dropout", "snapshot", "swa"]

"""ensemble_service.data.csvfile: ``data=csv data.path=FILE.csv data.target=COLUMN``: numeric feature
columns standardized with the training split's statistics, class names from the target column, and
every data error as one line."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from data_formats import assert_pipeline_reproduces, one_line, rows, write_csv
from ensemble_service.data import DataError, Pipeline, check, load


def _cfg(path, target="species", **options):
    return {"name": "csv", "path": str(path), "target": target, **options}


def _iris_like(n=30, seed=0) -> str:
    rng = np.random.default_rng(seed)
    species = ["virginica", "setosa", "versicolor"]  # not sorted on purpose
    lines = ["petal_length,species,petal_width,sepal_length"]
    for i in range(n):
        k = i % 3
        lines.append(f"{1 + 2 * k + rng.normal():.3f},{species[k]},{0.2 + k + rng.normal() / 4:.3f},{5 + i * 0.1:.2f}")
    return "\n".join(lines) + "\n"


def test_three_rows_standardized_by_hand(tmp_path):
    path = write_csv(tmp_path / "t.csv", """\
        a,b,label
        1,10,x
        3,30,y
        5,20,x
    """)
    bundle = load(_cfg(path, "label", val_fraction=0.0, test_fraction=0.0))  # all three rows train
    assert bundle.sizes() == {"train": 3, "val": 0, "test": 0}
    assert (bundle.input_shape, bundle.num_classes, bundle.class_names) == ((2,), 2, ["x", "y"])
    spec = bundle.preprocessing
    assert (spec["kind"], spec["columns"], spec["raw_shape"]) == ("table", ["a", "b"], [2])
    op = spec["ops"][0]
    std_a, std_b = math.sqrt(((1 - 3) ** 2 + 0 + (5 - 3) ** 2) / 3), math.sqrt(((10 - 20) ** 2 + 10 ** 2 + 0) / 3)
    np.testing.assert_allclose(op["mean"], [3.0, 20.0])
    np.testing.assert_allclose(op["std"], [std_a, std_b])
    got = sorted(map(tuple, bundle.x_train.numpy().tolist()))
    expected = sorted([(-2 / std_a, -10 / std_b), (0.0, 10 / std_b), (2 / std_a, 0.0)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    middle = int(np.flatnonzero(np.abs(bundle.x_train[:, 0].numpy()) < 1e-6)[0])
    assert int(bundle.y_train[middle]) == 1  # the row "3,30,y"


def test_standardize_uses_only_the_training_split(tmp_path):
    path = write_csv(tmp_path / "iris.csv", _iris_like())
    bundle = load(_cfg(path))
    assert bundle.sizes() == {"train": 18, "val": 6, "test": 6}
    frame = pd.read_csv(path)
    x = frame[["petal_length", "petal_width", "sepal_length"]].to_numpy(np.float32)
    transformed = Pipeline.from_dict(bundle.preprocessing)(x)
    train_rows = rows(bundle.x_train)
    in_train = np.array([row.tobytes() in train_rows for row in transformed])
    assert in_train.sum() == 18
    op = bundle.preprocessing["ops"][0]
    np.testing.assert_allclose(op["mean"], x[in_train].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(op["std"], x[in_train].astype(np.float64).std(0), rtol=1e-6)
    assert not np.allclose(op["mean"], x.astype(np.float64).mean(0), rtol=1e-6)


def test_string_targets_are_sorted_class_names(tmp_path):
    bundle = load(_cfg(write_csv(tmp_path / "iris.csv", _iris_like())))
    assert bundle.class_names == ["setosa", "versicolor", "virginica"]
    assert bundle.num_classes == 3 and bundle.label == "csv:iris.csv"
    frame = pd.read_csv(tmp_path / "iris.csv")
    assert (frame.species == "setosa").sum() == 10
    # label i is the i-th sorted name: count per class matches the file
    counts = np.bincount(np.concatenate([bundle.y_train, bundle.y_val, bundle.y_test]), minlength=3)
    assert counts.tolist() == [10, 10, 10]


def test_integer_targets(tmp_path):
    path = write_csv(tmp_path / "t.csv", "f,grade\n" + "".join(f"{i},{[30, 4, 10][i % 3]}\n" for i in range(12)))
    bundle = load(_cfg(path, "grade", val_fraction=0.0, test_fraction=0.0, standardize=False))
    assert bundle.class_names == ["4", "10", "30"]  # sorted as numbers
    by_feature = dict(zip(bundle.x_train[:, 0].tolist(), bundle.y_train.tolist()))
    assert by_feature[0.0] == 2 and by_feature[1.0] == 0 and by_feature[2.0] == 1
    path = write_csv(tmp_path / "f.csv", "f,label\n1,0.0\n2,1.0\n3,0.0\n4,1.0\n")
    assert load(_cfg(path, "label", val_fraction=0.0, test_fraction=0.0)).class_names == ["0", "1"]


def test_features_option_and_no_standardization(tmp_path):
    path = write_csv(tmp_path / "iris.csv", _iris_like())
    bundle = load(_cfg(path, features=["sepal_length", "petal_length"], standardize=False))
    assert bundle.input_shape == (2,)
    assert bundle.preprocessing == {"format": 1, "kind": "table", "raw_shape": [2], "ops": [],
                                    "columns": ["sepal_length", "petal_length"]}
    frame = pd.read_csv(path)
    assert rows(np.concatenate([bundle.x_train, bundle.x_val, bundle.x_test])) == rows(
        frame[["sepal_length", "petal_length"]].to_numpy(np.float32))


def test_tab_separated_file(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("a\tb\tlabel\n" + "".join(f"{i}\t{i * i}\t{'pq'[i % 2]}\n" for i in range(10)))
    bundle = load(_cfg(path, "label"))
    assert bundle.input_shape == (2,) and bundle.class_names == ["p", "q"]


def test_pipeline_takes_a_dataframe_with_extra_columns_in_another_order(tmp_path):
    path = write_csv(tmp_path / "iris.csv", _iris_like())
    bundle = load(_cfg(path, split_seed=4))
    frame = pd.read_csv(path)
    client = frame[["sepal_length", "species", "petal_width", "petal_length"]].assign(note="sent by a client")
    labels = [bundle.class_names.index(s) for s in frame.species]
    assert_pipeline_reproduces(bundle, client, labels)
    # the same rows as plain numbers, in the training columns' order
    assert np.array_equal(Pipeline.from_dict(bundle.preprocessing)(frame[bundle.preprocessing["columns"]].to_numpy()),
                          Pipeline.from_dict(bundle.preprocessing)(client))


# ---------------------------------------------------------------------------------------------
# missing values
# ---------------------------------------------------------------------------------------------

GAPPY = """\
    a,b,label
    1,2,x
    3,,y
    5,6,x
    7,8,
    9,10,y
    11,12,x
    13,14,y
"""


def test_missing_values_are_an_error_naming_the_first(tmp_path):
    path = write_csv(tmp_path / "gappy.csv", GAPPY)
    with pytest.raises(DataError) as err:
        load(_cfg(path, "label"))
    one_line(err, "gappy.csv has 2 row(s) with missing values (first: line 3, column 'b')", "data.dropna=true")


def test_dropna_drops_those_rows(tmp_path):
    path = write_csv(tmp_path / "gappy.csv", GAPPY)
    bundle = load(_cfg(path, "label", dropna=True, val_fraction=0.0, test_fraction=0.0, standardize=False))
    assert bundle.sizes()["train"] == 5
    assert sorted(bundle.x_train[:, 0].tolist()) == [1.0, 5.0, 9.0, 11.0, 13.0]
    # a missing value in an unused column does not count
    path = write_csv(tmp_path / "unused.csv", "a,b,label\n1,,x\n2,,y\n3,4,x\n4,5,y\n")
    assert load(_cfg(path, "label", features=["a"], val_fraction=0.0, test_fraction=0.0)).sizes()["train"] == 4
    path = write_csv(tmp_path / "empty.csv", "a,label\n,x\n2,\n")
    with pytest.raises(DataError) as err:
        load(_cfg(path, "label", dropna=True))
    one_line(err, "empty.csv: every row has a missing value")


# ---------------------------------------------------------------------------------------------
# every data error is one line naming the problem
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, options, needles", [
    ("a,b,label\n1,2,x\n3,4,y\n", {"target": "species"},
     ["data.target='species' is not a column of t.csv (columns: a, b, label)"]),
    ("a,b,label\n1,2,x\n3,4,y\n", {"target": "label", "features": ["a", "c"]},
     ["data.features names column(s) c that t.csv does not have"]),
    ("a,b,label\n1,2,x\n3,4,y\n", {"target": "label", "features": ["a", "label"]},
     ["data.features must not include the target column 'label'"]),
    ("label\nx\ny\n", {"target": "label"}, ["t.csv has no feature columns besides the target 'label'"]),
    ("a,colour,label\n1,red,x\n3,blue,y\n", {"target": "label"},
     ["feature column(s) 'colour' are not numeric", "data.features=[...]"]),
    ("a,flag,label\n1,true,x\n3,false,y\n", {"target": "label"}, ["feature column(s) 'flag' are not numeric"]),
    ("a,b,label\n1,2,x\n3,inf,y\n5,6,x\n", {"target": "label"},
     ["t.csv has infinite feature values (first at data row 2)"]),
    ("a,b,label\n1,2,x\n3,1e300,y\n5,6,x\n7,8,y\n9,10,x\n", {"target": "label"},
     ["input value(s) beyond float32's range"]),
    ("a,b,label\n1,2,x\n3,4,x\n", {"target": "label"},
     ["data.target='label' holds 1 distinct value(s) (x); a classifier needs at least 2 classes"]),
    ("a,b,label\n", {"target": "label"}, ["t.csv has a header but no data rows"]),
    ("", {"target": "label"}, ["cannot read it as CSV"]),
    ('a,b,label\n1,2,"x\n', {"target": "label"}, ["cannot read it as CSV"]),
])
def test_data_errors(tmp_path, text, options, needles):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load({"name": "csv", "path": str(path), **options})
    one_line(err, *needles)


def test_path_and_target_errors(tmp_path):
    write_csv(tmp_path / "t.csv", "a,label\n1,x\n2,y\n")
    (tmp_path / "t.json").write_text("{}")
    for cfg, needles in [
        ({"name": "csv", "target": "label"}, ["data=csv needs data.path (e.g. data.path=data/train.csv)"]),
        (_cfg(tmp_path / "missing.csv"), ["missing.csv: no such file"]),
        (_cfg(tmp_path / "t.json"), ["t.json: expected a .csv or .tsv or .txt file"]),
        ({"name": "csv", "path": str(tmp_path / "t.csv")}, ["data=csv needs data.target=COLUMN"]),
    ]:
        for call in (check, load):
            with pytest.raises(DataError) as err:
                call(cfg)
            one_line(err, *needles)

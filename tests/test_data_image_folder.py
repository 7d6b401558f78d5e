"""ensemble_service.data.image_folder: ``data=image_folder data.root=DIR data.image_size=S``: one
sub-folder per class, real PNG/JPEG files of different sizes read with Pillow, grey or RGB as found,
and the ensemble's pipeline taking the same files' bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_formats import assert_pipeline_reproduces, image_array, one_line, write_image, write_image_folder
from ensemble_service.data import DataError, Pipeline, check, load
from ensemble_service.data.preprocess import decode_image


def _cfg(root, size=8, **options):
    return {"name": "image_folder", "root": str(root), "image_size": size, **options}


GREY = {
    "dog": [("a.png", 12, 9, 1), ("b.png", 8, 8, 1), ("c.jpg", 20, 14, 1), ("d.png", 5, 30, 1), ("e.png", 9, 9, 1)],
    "cat": [("a.png", 10, 10, 1), ("b.jpeg", 16, 11, 1), ("c.PNG", 7, 13, 1), ("d.png", 8, 3, 1), ("e.png", 6, 6, 1)],
    "bird": [("x.png", 11, 11, 1), ("y.png", 8, 12, 1), ("z.jpg", 9, 17, 1), ("w.png", 4, 4, 1), ("v.png", 13, 7, 1)],
}


def test_grey_folder(tmp_path):
    written = write_image_folder(tmp_path / "pets", GREY)
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not an image")  # other files are ignored
    bundle = load(_cfg(tmp_path / "pets"))
    assert bundle.class_names == ["bird", "cat", "dog"]  # sorted folder names
    assert (bundle.input_shape, bundle.num_classes, bundle.label) == ((1, 8, 8), 3, "image_folder:pets")
    assert sum(bundle.sizes().values()) == len(written) == 15
    assert bundle.preprocessing == {"format": 1, "kind": "image", "raw_shape": [8, 8, 1],
                                    "image": {"size": 8, "channels": 1},
                                    "ops": [{"op": "hwc_to_chw"}, {"op": "divide", "by": 255.0}]}
    labels = np.concatenate([bundle.y_train, bundle.y_val, bundle.y_test])
    assert np.bincount(labels).tolist() == [5, 5, 5]


def test_pipeline_takes_the_image_files(tmp_path):
    written = write_image_folder(tmp_path / "pets", GREY)
    bundle = load(_cfg(tmp_path / "pets", split_seed=3))
    labels = [bundle.class_names.index(folder) for _, folder in written]
    assert_pipeline_reproduces(bundle, [path.read_bytes() for path, _ in written], labels)
    # decoded pixels [S, S, C] 0..255 (and grey ones without the channel axis) give the same inputs
    pixels = np.stack([decode_image(path.read_bytes(), 8, 1) for path, _ in written])
    assert_pipeline_reproduces(bundle, pixels, labels)
    assert_pipeline_reproduces(bundle, pixels[..., 0], labels)


def test_rgb_when_any_image_is_colour(tmp_path):
    classes = {"a": [("1.png", 9, 9, 1), ("2.png", 6, 10, 1), ("3.png", 7, 7, 1)],
               "b": [("1.jpg", 12, 8, 3), ("2.png", 5, 5, 3), ("3.png", 10, 4, 1)]}
    written = write_image_folder(tmp_path / "mixed", classes)
    bundle = load(_cfg(tmp_path / "mixed", size=6))
    assert bundle.input_shape == (3, 6, 6) and bundle.preprocessing["image"] == {"size": 6, "channels": 3}
    labels = [bundle.class_names.index(folder) for _, folder in written]
    assert_pipeline_reproduces(bundle, [path.read_bytes() for path, _ in written], labels)


@pytest.mark.parametrize("channels, expected", [(1, (1, 6, 6)), (3, (3, 6, 6))])
def test_channels_forced(tmp_path, channels, expected):
    classes = {"a": [("1.png", 9, 9, 1), ("2.png", 6, 10, 3)], "b": [("1.png", 12, 8, 3), ("2.png", 5, 5, 1)]}
    written = write_image_folder(tmp_path / "f", classes)
    bundle = load(_cfg(tmp_path / "f", size=6, channels=channels, val_fraction=0.25, test_fraction=0.25))
    assert bundle.input_shape == expected
    labels = [bundle.class_names.index(folder) for _, folder in written]
    assert_pipeline_reproduces(bundle, [path.read_bytes() for path, _ in written], labels)


def test_resized_values_by_hand(tmp_path):
    # constant images stay constant when resized: the model sees value / 255
    write_image(tmp_path / "f" / "dark" / "1.png", np.full((20, 10), 51, np.uint8))
    write_image(tmp_path / "f" / "dark" / "2.png", np.full((3, 7), 51, np.uint8))
    write_image(tmp_path / "f" / "light" / "1.png", np.full((4, 4), 204, np.uint8))
    write_image(tmp_path / "f" / "light" / "2.png", np.full((50, 2), 204, np.uint8))
    bundle = load(_cfg(tmp_path / "f", size=5, val_fraction=0.0, test_fraction=0.0))
    assert bundle.class_names == ["dark", "light"]
    for x, y in zip(bundle.x_train, bundle.y_train):
        value = np.float32([51, 204][int(y)]) / np.float32(255)
        assert torch.equal(x, torch.full((1, 5, 5), float(value)))


def test_nested_and_hidden_files(tmp_path):
    root = tmp_path / "f"
    for cls in ("a", "b"):
        write_image(root / cls / "1.png", image_array(ord(cls), 6, 6, 1))
        write_image(root / cls / "deeper" / "2.png", image_array(ord(cls) + 9, 6, 6, 1))
    write_image(root / "a" / ".hidden.png", image_array(1, 6, 6, 1))
    write_image(root / ".cache" / "1.png", image_array(2, 6, 6, 1))  # a hidden folder is not a class
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    bundle = load(_cfg(root, size=4, val_fraction=0.0, test_fraction=0.0))
    assert bundle.class_names == ["a", "b"] and bundle.sizes()["train"] == 4


# ---------------------------------------------------------------------------------------------
# every data error is one line naming the problem
# ---------------------------------------------------------------------------------------------


def _two_classes(root):
    write_image_folder(root, {"a": [("1.png", 5, 5, 1), ("2.png", 6, 6, 1)], "b": [("1.png", 7, 7, 1)]})
    return root


@pytest.mark.parametrize("damage, needles", [
    ("garbage", ["bad.png is not an image Pillow can read", "cannot identify image file"]),
    ("truncated", ["bad.png is not an image Pillow can read"]),
    ("empty", ["bad.png is not an image Pillow can read"]),
])
@pytest.mark.parametrize("channels", [None, 1])
def test_undecodable_image_is_named(tmp_path, damage, needles, channels):
    root = _two_classes(tmp_path / "f")
    bad = root / "b" / "bad.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a png at all")
    elif damage == "truncated":
        good = write_image(tmp_path / "whole.png", image_array(3, 40, 40, 3)).read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load(_cfg(root, channels=channels))
    one_line(err, str(bad), *needles)


def test_folder_errors(tmp_path):
    one_class = tmp_path / "one"
    write_image_folder(one_class, {"only": [("1.png", 5, 5, 1)]})
    empty_class = _two_classes(tmp_path / "empty_class")
    (empty_class / "c").mkdir()
    (empty_class / "c" / "readme.txt").write_text("no images here")
    (tmp_path / "file").write_text("")
    root = _two_classes(tmp_path / "ok")
    no_classes = tmp_path / "no_classes"
    no_classes.mkdir()
    write_image(no_classes / "loose.png", image_array(1, 5, 5, 1))  # images must sit in class folders
    for cfg, needles in [
        ({"name": "image_folder"}, ["data=image_folder needs data.root=DIR"]),
        (_cfg(tmp_path / "missing"), ["data.root=", "missing: no such folder"]),
        (_cfg(tmp_path / "file"), ["file: no such folder"]),
        (_cfg(one_class), ["has 1 class folder(s); a classifier needs at least 2"]),
        (_cfg(no_classes), ["has 0 class folder(s)"]),
        (_cfg(empty_class), ["class folder 'c' holds no images (.png, .jpg"]),
        (_cfg(root, size=0), ["data.image_size must be an integer in [1, 4096], got 0"]),
        (_cfg(root, size="32"), ["data.image_size must be an integer in [1, 4096], got '32'"]),
        (_cfg(root, channels=2), ["data.channels must be 1, 3 or null, got 2"]),
    ]:
        for call in (check, load):
            with pytest.raises(DataError) as err:
                call(cfg)
            one_line(err, *needles)


def test_client_image_errors_after_training(tmp_path):
    from ensemble_service.data import PreprocessError

    bundle = load(_cfg(_two_classes(tmp_path / "f"), size=4, val_fraction=0.0, test_fraction=0.0))
    pipeline = Pipeline.from_dict(bundle.preprocessing)
    with pytest.raises(PreprocessError) as err:
        pipeline([b"GIF89a broken"])
    one_line(err, "inputs[0] is not an image Pillow can read")
    assert str(err.value).endswith("(cannot identify image file)")  # no "<_io.BytesIO object at 0x...>"


def test_16_bit_grey_images_keep_their_values(tmp_path):
    from PIL import Image

    for cls, level in (("dim", 10000), ("bright", 50000)):
        for i, (h, w) in enumerate([(6, 6), (9, 4)]):
            path = tmp_path / "f" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w), level + i, dtype=np.uint16)).save(path)
    bundle = load(_cfg(tmp_path / "f", size=3, val_fraction=0.0, test_fraction=0.0))
    assert bundle.input_shape == (1, 3, 3) and bundle.class_names == ["bright", "dim"]
    for x, y in zip(bundle.x_train, bundle.y_train):
        level = [50000, 10000][int(y)]
        assert torch.equal(x, torch.full((1, 3, 3), float(np.float32(round(level / 257)) / np.float32(255))))


def test_big_endian_16_bit_tiffs_are_grey(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        for i in range(2):
            path = tmp_path / "f" / cls / f"{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 5), 30000 + 1000 * i + (cls == "b") * 9000, dtype=">u2")).save(path)
    assert Image.open(path).mode == "I;16B"
    bundle = load(_cfg(tmp_path / "f", size=2, val_fraction=0.0, test_fraction=0.0))
    assert bundle.input_shape == (1, 2, 2)  # grey, as found
    assert sorted(set(torch.round(bundle.x_train * 255).flatten().tolist())) == [117.0, 121.0, 152.0, 156.0]

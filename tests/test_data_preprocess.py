"""ensemble_service.data.preprocess: the pipeline (raw inputs -> model inputs) that travels with the
ensemble: its ops against hand-computed values, fitting, the JSON spec, and what it accepts from a
client (arrays, flattened rows, DataFrames, image files) or refuses (one line naming the field)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from data_formats import one_line, png_bytes
from ensemble_service.data import Pipeline, PreprocessError
from ensemble_service.data.preprocess import decode_image, image_pipeline


def test_divide_and_reshape():
    p = Pipeline((2, 2), [{"op": "divide", "by": 16.0}, {"op": "reshape", "shape": [1, 2, 2]}])
    assert p.input_shape == (1, 2, 2)
    out = p([[[0, 4], [8, 16]], [[2, 2], [2, 2]]])
    assert out.dtype == np.float32 and out.shape == (2, 1, 2, 2) and out.flags["C_CONTIGUOUS"]
    assert out.tolist() == [[[[0.0, 0.25], [0.5, 1.0]]], [[[0.125, 0.125], [0.125, 0.125]]]]


def test_no_ops_is_identity_as_float32():
    p = Pipeline((3,))
    assert p.input_shape == (3,) and p.describe() == "none"
    out = p(np.array([[1, 2, 3]], dtype=np.int64))
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 2.0, 3.0]]


def test_standardize_scalar_fitted_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    p = Pipeline((2,), [{"op": "standardize", "mode": "scalar"}]).fit(x)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (3 - 3) ** 2 + (6 - 3) ** 2) / 4)  # sqrt(3.5)
    op = p.to_dict()["ops"][0]
    assert op["mean"] == pytest.approx(mean) and op["std"] == pytest.approx(std)
    assert isinstance(op["mean"], float) and isinstance(op["std"], float)
    expected = (x - mean) / std
    np.testing.assert_allclose(p.transform(x), expected, rtol=1e-6)
    assert p.transform(x).dtype == np.float32


def test_standardize_feature_fitted_by_hand_zero_std_counts_as_one():
    x = np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0], [5.0, 20.0, 5.0]])
    p = Pipeline((3,), [{"op": "standardize", "mode": "feature"}]).fit(x)
    op = p.to_dict()["ops"][0]
    # column means 3, 20, 5; population stds sqrt(8/3), sqrt(200/3), 0 -> 1
    np.testing.assert_allclose(op["mean"], [3.0, 20.0, 5.0])
    np.testing.assert_allclose(op["std"], [math.sqrt(8 / 3), math.sqrt(200 / 3), 1.0])
    out = p.transform([[3.0, 20.0, 5.0], [3.0 + math.sqrt(8 / 3), 20.0, 7.0]])
    np.testing.assert_allclose(out, [[0, 0, 0], [1, 0, 2]], atol=1e-6)


def test_standardize_feature_on_images_is_per_element():
    x = np.array([[[0.0, 1.0], [2.0, 3.0]], [[2.0, 3.0], [4.0, 9.0]]])  # [2, 2, 2]
    p = Pipeline((2, 2), [{"op": "standardize", "mode": "feature"}]).fit(x)
    op = p.to_dict()["ops"][0]
    np.testing.assert_allclose(op["mean"], [1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(op["std"], [1.0, 1.0, 1.0, 3.0])
    assert p.transform(x).shape == (2, 2, 2)
    np.testing.assert_allclose(p.transform(x)[1], [[1.0, 1.0], [1.0, 1.0]])


def test_fit_uses_the_inputs_each_op_sees_and_keeps_fitted_statistics():
    x = np.array([[0.0, 16.0], [8.0, 8.0]])
    p = Pipeline((2,), [{"op": "divide", "by": 16.0}, {"op": "standardize", "mode": "scalar"}]).fit(x)
    op = p.to_dict()["ops"][1]
    assert op["mean"] == pytest.approx(0.5) and op["std"] == pytest.approx(math.sqrt(0.125))  # of x / 16
    # a fitted pipeline is not refitted
    again = Pipeline.from_dict(p.to_dict()).fit(np.zeros((3, 2)))
    assert again.to_dict() == p.to_dict()
    assert x.tolist() == [[0.0, 16.0], [8.0, 8.0]]  # the inputs are left alone


def test_spec_is_json_and_round_trips():
    x = np.arange(12.0).reshape(3, 2, 2)
    p = Pipeline((2, 2), [{"op": "standardize", "mode": "feature"}, {"op": "reshape", "shape": [4]}],
                 kind="table", columns=["a", "b", "c", "d"]).fit(x)
    spec = json.loads(json.dumps(p.to_dict()))
    assert spec["format"] == 1 and spec["kind"] == "table" and spec["raw_shape"] == [2, 2]
    assert spec["columns"] == ["a", "b", "c", "d"] and "image" not in spec
    clone = Pipeline.from_dict(spec)
    assert clone.input_shape == (4,) and clone.to_dict() == p.to_dict()
    assert np.array_equal(clone.transform(x), p.transform(x))
    img = image_pipeline(5, 3).to_dict()
    assert img == {"format": 1, "kind": "image", "raw_shape": [5, 5, 3], "image": {"size": 5, "channels": 3},
                   "ops": [{"op": "hwc_to_chw"}, {"op": "divide", "by": 255.0}]}


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown preprocessing format 2"):
        Pipeline.from_dict({"format": 2, "raw_shape": [3]})
    with pytest.raises(ValueError, match="pipeline kind"):
        Pipeline((3,), kind="audio")
    with pytest.raises(ValueError, match="unknown preprocessing op 'log'"):
        Pipeline((3,), [{"op": "log"}]).transform(np.ones((1, 3)))


def test_describe():
    p = Pipeline((28, 28, 1), [{"op": "hwc_to_chw"}, {"op": "divide", "by": 255.0},
                               {"op": "standardize", "mode": "scalar"}, {"op": "reshape", "shape": [784]}])
    assert p.describe() == "HWC -> CHW, / 255, standardize (scalar), reshape [784]"


def test_hwc_to_chw():
    rgb = image_pipeline(2, 3)
    assert rgb.input_shape == (3, 2, 2)
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)  # pixel (h, w) has channels 3*(2h+w) + c
    out = rgb.transform(x)
    assert out.shape == (1, 3, 2, 2)
    assert np.array_equal(out[0, 2], np.array([[2, 5], [8, 11]], dtype=np.float32) / np.float32(255))
    grey = Pipeline((2, 2), [{"op": "hwc_to_chw"}])
    assert grey.input_shape == (1, 2, 2) and grey.transform(np.ones((4, 2, 2))).shape == (4, 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# accept: what a client may send
# ---------------------------------------------------------------------------------------------


def test_accepts_raw_shape_flattened_rows_and_lists():
    p = Pipeline((2, 3), [{"op": "divide", "by": 2.0}])
    full = np.arange(12).reshape(2, 2, 3)
    assert np.array_equal(p(full), p(full.reshape(2, 6)))
    assert np.array_equal(p(full), p(full.tolist()))
    assert p.accept(full).dtype == np.float32


@pytest.mark.parametrize("inputs, needles", [
    (np.ones((2, 5)), ["inputs has shape [2, 5]", "raw inputs [batch, 2, 3] or [batch, 6]",
                       "the training data's own values, before any scaling"]),
    (np.ones((0, 6)), ["inputs is an empty batch"]),
    (np.float32(3.0), ["inputs is an empty batch"]),
    ([["a", "b", "c", "d", "e", "f"]], ["inputs must hold numbers, got <U1"]),
    ([[1, 2], [3]], ["inputs must be an array of numbers"]),
    (np.array([[1, 2, 3, 4, 5, np.nan]]), ["inputs contain NaN or infinite values"]),
    (np.array([[1, 2, 3, 4, 5, np.inf]]), ["inputs contain NaN or infinite values"]),
])
def test_refuses_bad_inputs_in_one_line(inputs, needles):
    p = Pipeline((2, 3))
    with pytest.raises(PreprocessError) as err:
        p(inputs)
    one_line(err, *needles)
    assert err.value.field == "inputs"


def test_field_is_named():
    with pytest.raises(PreprocessError) as err:
        Pipeline((3,))(np.ones((1, 2)), field="instances")
    one_line(err, "instances has shape [1, 2]; this ensemble takes raw inputs [batch, 3] (")
    assert err.value.field == "instances"


def test_table_takes_a_dataframe_by_column_name():
    p = Pipeline((2,), [{"op": "standardize", "mode": "feature", "mean": [1.0, 10.0], "std": [2.0, 5.0]}],
                 kind="table", columns=["height", "width"])
    frame = pd.DataFrame({"colour": ["red", "blue"], "width": [15.0, 5.0], "height": [3, 1]})
    assert p(frame).tolist() == [[1.0, 1.0], [0.0, -1.0]]
    assert p([[3.0, 15.0]]).tolist() == [[1.0, 1.0]]  # plain rows: the columns in order
    with pytest.raises(PreprocessError) as err:
        p(frame.drop(columns=["height"]))
    one_line(err, "inputs lacks the column(s) height")
    with pytest.raises(PreprocessError) as err:
        p(pd.DataFrame({"height": ["tall"], "width": [1.0]}))
    one_line(err, "inputs must hold only numbers")
    with pytest.raises(PreprocessError) as err:
        p(np.ones((1, 3)))
    one_line(err, "the columns height, width")


def test_image_pipeline_takes_pixels_or_image_files():
    p = image_pipeline(4, 3)
    pixels = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)
    expected = np.moveaxis(pixels, -1, 1).astype(np.float32) / np.float32(255.0)
    assert np.array_equal(p(pixels), expected)
    assert np.array_equal(p([png_bytes(pixels[0])]), expected)  # PNG is lossless, no resize needed
    # a grey image sent to an RGB ensemble is converted: each channel holds the grey value
    grey = np.full((4, 4), 51, dtype=np.uint8)
    assert np.array_equal(p([png_bytes(grey)]), np.full((1, 3, 4, 4), np.float32(51) / np.float32(255)))


def test_grey_image_pipeline_takes_pixels_without_the_channel_axis():
    p = image_pipeline(3, 1)
    pixels = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    assert np.array_equal(p(pixels), p(pixels[..., None]))
    assert p(pixels).shape == (2, 1, 3, 3)


def test_image_files_are_resized_and_undecodable_ones_named():
    p = image_pipeline(5, 1)
    flat = np.full((20, 12), 200, dtype=np.uint8)  # a constant image stays constant when resized
    out = p([png_bytes(flat), png_bytes(np.full((3, 3, 3), 100, dtype=np.uint8), "JPEG")])
    assert out.shape == (2, 1, 5, 5)
    assert np.array_equal(out[0], np.full((1, 5, 5), np.float32(200) / np.float32(255)))
    assert np.abs(out[1] * 255 - 100).max() <= 2  # JPEG is lossy
    with pytest.raises(PreprocessError) as err:
        p([png_bytes(flat), b"\x89PNG\r\n\x1a\n garbage"], field="instances")
    one_line(err, "instances[1] is not an image Pillow can read")
    assert err.value.field == "instances[1]"
    with pytest.raises(PreprocessError) as err:
        p(np.ones((1, 4, 4, 1)))
    one_line(err, "[batch, 5, 5, 1] or [batch, 25]", "5x5 images, 1 channel(s), pixel values 0-255")


def test_decode_image_modes():
    from PIL import Image
    import io

    rgba = Image.new("RGBA", (6, 2), (10, 20, 30, 128))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    rgb = decode_image(buf.getvalue(), 3, 3)
    assert rgb.shape == (3, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [10, 20, 30]
    grey = decode_image(buf.getvalue(), 2, 1)
    assert grey.shape == (2, 2, 1)
    # ITU-R 601-2 luma, as Pillow converts to L: 10 * 299/1000 + 20 * 587/1000 + 30 * 114/1000 = 18.15
    assert grey[0, 0, 0] == 18
    with pytest.raises(PreprocessError) as err:
        decode_image(b"", 2, 1, "photo.png")
    one_line(err, "photo.png is not an image Pillow can read")


def test_decode_16_bit_grey_scales_to_bytes():
    from PIL import Image
    import io

    deep = np.array([[0, 257 * 15, 257 * 128], [257 * 200, 65535, 4000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    # 16-bit values v become round(v / 257) in 0..255 (not clipped to 255)
    wide = np.zeros((3, 3), dtype=np.uint16)
    wide[:2, :3] = deep
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    grey = decode_image(buf.getvalue(), 3, 1)
    assert grey[..., 0].tolist() == [[0, 15, 128], [200, 255, 16], [0, 0, 0]]
    rgb = decode_image(buf.getvalue(), 3, 3)
    assert rgb[1, 0].tolist() == [200, 200, 200]

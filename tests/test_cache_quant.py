"""Storage dtypes of the teacher cache (pipeline.cache.quant)."""

import numpy as np
import pytest

from pipeline.cache.quant import FLOAT16_MAX, dequantize_int8, quantize_int8, to_float16


def test_int8_hand_checked_channel():
    # lo = -1, hi = 1 -> scale = 2/255; q = rint((x + 1) / scale) - 128
    x = np.array([[-1.0, 0.0, 0.5, 1.0]], np.float32)
    q, scale, offset = quantize_int8(x)
    # (x + 1) * 255 / 2 = [0, 127.5, 191.25, 255] -> rint (half to even) [0, 128, 191, 255]
    np.testing.assert_array_equal(q, [[-128, 0, 63, 127]])
    assert q.dtype == np.int8
    np.testing.assert_allclose(scale, [2 / 255], rtol=1e-7)
    np.testing.assert_allclose(offset, [-1 + 128 * 2 / 255], rtol=1e-7)
    back = dequantize_int8(q, scale, offset)
    np.testing.assert_allclose(back, [[-1.0, 1 / 255, 1 - 64 * 2 / 255, 1.0]], atol=1e-6)


def test_int8_round_trip_bound_per_channel():
    rng = np.random.default_rng(0)
    # channels with very different ranges: the bound is per channel
    x = (
        rng.normal(size=(5, 7, 9)).astype(np.float32)
        * np.array([1e-3, 0.1, 1, 10, 300], np.float32)[:, None, None]
    )
    q, scale, offset = quantize_int8(x)
    back = dequantize_int8(q, scale, offset)
    err = np.abs(back - x).reshape(5, -1).max(axis=1)
    span = x.reshape(5, -1).max(axis=1) - x.reshape(5, -1).min(axis=1)
    assert (err <= span / 255 / 2 * (1 + 1e-4) + 1e-6 * np.abs(x).max()).all()
    # extremes are hit exactly by q = -128 and q = 127
    assert (q.reshape(5, -1).min(axis=1) == -128).all() and (
        q.reshape(5, -1).max(axis=1) == 127
    ).all()


def test_int8_constant_channel_is_exact():
    x = np.stack([np.full((3, 3), 4.25, np.float32), np.arange(9, dtype=np.float32).reshape(3, 3)])
    q, scale, offset = quantize_int8(x)
    assert scale[0] == 0 and offset[0] == np.float32(4.25) and (q[0] == 0).all()
    np.testing.assert_array_equal(dequantize_int8(q, scale, offset)[0], x[0])


def test_int8_refuses_non_finite():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8(np.array([[0.0, np.nan]]))


def test_float16_cast_and_range_error_names_data():
    x = np.array([1.0, -2.5, 1000.0], np.float32)
    y = to_float16(x, "image 7 level neck")
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y.astype(np.float32), x)  # exactly representable values
    with pytest.raises(ValueError, match=r"image 7 level neck.*float16.*cache.dtype: int8"):
        to_float16(np.array([FLOAT16_MAX * 2]), "image 7 level neck")
    with pytest.raises(ValueError, match="image 7.*NaN"):
        to_float16(np.array([np.inf]), "image 7")

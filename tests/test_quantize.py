"""The C quantizers against gguf's reference (bit for bit), and the reproducible low-rank update."""

import gguf
import numpy as np
import pytest
from gguf import quants

from cecollm import _core

TYPES = {
    _core.TYPE_Q4_0: gguf.GGMLQuantizationType.Q4_0,
    _core.TYPE_Q4_1: gguf.GGMLQuantizationType.Q4_1,
    _core.TYPE_Q8_0: gguf.GGMLQuantizationType.Q8_0,
    _core.TYPE_F16: gguf.GGMLQuantizationType.F16,
}


def hard_rows(rng) -> np.ndarray:
    """Random rows plus blocks that stress the rounding: zeros, constants, exact ties, one outlier."""
    x = (rng.standard_normal((24, 128)) * 0.05).astype(np.float32)
    x[0] = 0.0
    x[1, :32] = 0.7
    x[2, :32] = np.arange(32) / 2.0  # halves: ties in the 8-bit rounding
    x[3, 5] = 40.0
    x[4, :32] = -np.arange(32, dtype=np.float32)
    x[5] = rng.uniform(-1e4, 1e4, 128)
    return x


@pytest.mark.parametrize("type_id", sorted(TYPES))
def test_quantizer_matches_gguf_reference_bit_for_bit(type_id, rng):
    x = hard_rows(rng)
    ours = _core.quantize(x, type_id)
    reference = quants.quantize(x, TYPES[type_id]).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(ours, reference)
    back = _core.dequantize(ours.reshape(len(x), -1), type_id, *x.shape)
    np.testing.assert_array_equal(back, quants.dequantize(reference.reshape(len(x), -1), TYPES[type_id]))


@pytest.mark.parametrize("type_id", [_core.TYPE_Q4_0, _core.TYPE_Q4_1, _core.TYPE_Q8_0])
def test_requantizing_dequantized_blocks_is_the_identity(type_id, rng):
    raw = _core.quantize((rng.standard_normal((8, 256)) * 0.05).astype(np.float32), type_id)
    w = _core.dequantize(raw.reshape(8, -1), type_id, 8, 256)
    np.testing.assert_array_equal(_core.quantize(w, type_id), raw)


def test_quantize_refuses_what_it_cannot_represent():
    x = np.zeros((2, 64), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="element 3 of row 1 is not finite"):
        _core.quantize(x, _core.TYPE_Q4_1)
    with pytest.raises(ValueError, match="cannot quantize rows of 40 elements"):
        _core.quantize(np.zeros((2, 40), np.float32), _core.TYPE_Q8_0)


def test_add_lowrank_is_the_product_summed_in_a_fixed_order(rng):
    w = rng.standard_normal((37, 300)).astype(np.float32)
    up, down = rng.standard_normal((37, 5)).astype(np.float32), rng.standard_normal((5, 300)).astype(np.float32)
    out = _core.add_lowrank(w, up, down)
    np.testing.assert_allclose(out, w + up.astype(np.float64) @ down, rtol=0, atol=1e-5)
    expected = np.zeros_like(w)  # k ascending from 0, in float32, then added to w
    for k in range(5):
        expected += up[:, k : k + 1] * down[k]
    np.testing.assert_array_equal(out, w + expected)
    assert out is not w and not np.shares_memory(out, w)
    with pytest.raises(ValueError, match="do not match"):
        _core.add_lowrank(w, up, down[:, :10])

"""C kernels against NumPy references: gguf's own (de)quantizers and float64 matrix products."""

import gguf
import numpy as np
import pytest

from cecollm import _core

# Summing n fp32 products in any order errs by at most n·eps·Σ|terms| (the textbook bound).
FP32_EPS = float(np.finfo(np.float32).eps)
NORM_ATOL = 1e-5

TYPES = {
    "F32": (_core.TYPE_F32, gguf.GGMLQuantizationType.F32),
    "F16": (_core.TYPE_F16, gguf.GGMLQuantizationType.F16),
    "Q4_0": (_core.TYPE_Q4_0, gguf.GGMLQuantizationType.Q4_0),
    "Q4_1": (_core.TYPE_Q4_1, gguf.GGMLQuantizationType.Q4_1),
    "Q8_0": (_core.TYPE_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "Q5_0": (_core.TYPE_Q5_0, gguf.GGMLQuantizationType.Q5_0),
    "Q5_1": (_core.TYPE_Q5_1, gguf.GGMLQuantizationType.Q5_1),
    "Q4_K": (_core.TYPE_Q4_K, gguf.GGMLQuantizationType.Q4_K),
    "Q5_K": (_core.TYPE_Q5_K, gguf.GGMLQuantizationType.Q5_K),
    "Q6_K": (_core.TYPE_Q6_K, gguf.GGMLQuantizationType.Q6_K),
}
# gguf has no quantizer for the K-quants: their tests use random blocks with sane fp16 scales, at
# these byte offsets of each block (d and dmin; Q6_K keeps d last)
K_QUANT_SCALES = {gguf.GGMLQuantizationType.Q4_K: (144, (0, 2)), gguf.GGMLQuantizationType.Q5_K: (176, (0, 2)),
                  gguf.GGMLQuantizationType.Q6_K: (210, (208,))}  # fmt: skip


def quantized(rng, rows, cols, qtype):
    if qtype in K_QUANT_SCALES:
        size, offsets = K_QUANT_SCALES[qtype]
        blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        for at in offsets:
            blocks[:, :, at : at + 2] = (rng.uniform(1e-3, 2e-2, (rows, cols // 256, 1))).astype("<f2").view(np.uint8)
        return blocks.reshape(rows, -1)
    data = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.view(np.uint8).reshape(rows, -1).copy()
    return np.ascontiguousarray(gguf.quants.quantize(data, qtype))


def reference_dequantize(raw, qtype, rows, cols):
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(rows, cols)
    return gguf.quants.dequantize(raw, qtype).reshape(rows, cols)


@pytest.fixture(params=["generic", "avx2", "avx512"])
def kernels(request):
    try:
        name = _core.select_kernels(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield name
    _core.select_kernels("auto")


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf(rng, type_name):
    ours, theirs = TYPES[type_name]
    raw = quantized(rng, 7, 512, theirs)  # whole K-quant super-blocks
    got = _core.dequantize(raw, ours, 7, 512)
    np.testing.assert_array_equal(got, reference_dequantize(raw, theirs, 7, 512))


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("n", [1, 3, _core.SMALL_BATCH, _core.SMALL_BATCH + 5])
def test_matmul_matches_numpy(rng, kernels, type_name, n):
    ours, theirs = TYPES[type_name]
    rows, cols = 300, 768
    raw = quantized(rng, rows, cols, theirs)
    w = reference_dequantize(raw, theirs, rows, cols).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = _core.matmul(raw, ours, rows, cols, x)
    ref = x.astype(np.float64) @ w.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T  # Σ|terms| per output
    assert got.shape == (n, rows)
    assert np.all(np.abs(got - ref) <= cols * FP32_EPS * scale)


def reference_quantize_q8a(x):
    """NumPy statement of the 8-bit activation blocks: d = max|x| / 127 per 32 values,
    q = round-half-even(x * (1 / d)), s = d * Σq, computed in float32 like the C code."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[:, None]).astype(np.int8)
    return d, d * q.sum(axis=1, dtype=np.int32).astype(np.float32), q.reshape(-1)


def test_quantize_q8a_matches_numpy(rng, kernels):
    x = (rng.standard_normal(1536) * np.repeat(10.0 ** rng.integers(-4, 3, 48), 32)).astype(np.float32)
    x[:32] = 0.0  # an all-zero block
    x[32:64] = np.arange(-16, 16) * 0.5  # halves: ties round to even
    x[33] = 127.0
    got, want = _core.quantize_q8a(x), reference_quantize_q8a(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def prompt_q8_kernel(kernels: str, type_name: str) -> bool:
    """Whether q8-mode prompts of this type take 8-bit integer kernels in this set (matmul_q8a: the
    AVX-512 set on a CPU with VNNI, Q4 weights); elsewhere they run as in the f32 mode."""
    with open("/proc/cpuinfo") as f:
        return kernels == "avx512" and type_name in ("Q4_0", "Q4_1") and "avx512_vnni" in f.read()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n", [1, _core.SMALL_BATCH, _core.SMALL_BATCH + 23])
def test_q8_matmul_matches_numpy(rng, kernels, type_name, n):
    """With activations="q8" the product equals dequantized weights times the dequantized 8-bit
    activations, up to float summation (the per-block integer sums are exact); above SMALL_BATCH rows
    (prompts) through matmul_q8a where the kernel set has it."""
    ours, theirs = TYPES[type_name]
    rows, cols = 300, 1536 if type_name.endswith("_K") else 576  # K-quant rows: whole super-blocks
    raw = quantized(rng, rows, cols, theirs)
    w = reference_dequantize(raw, theirs, rows, cols).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = _core.matmul(raw, ours, rows, cols, x, "q8")
    if n > _core.SMALL_BATCH and not prompt_q8_kernel(kernels, type_name):  # prompts as in the f32 mode
        np.testing.assert_array_equal(got, _core.matmul(raw, ours, rows, cols, x))
        return
    xq = np.stack([np.repeat(d, 32) * q for d, _, q in map(reference_quantize_q8a, x)]).astype(np.float64)
    ref = xq @ w.T
    scale = np.abs(xq) @ np.abs(w).T
    assert np.all(np.abs(got - ref) <= cols * FP32_EPS * scale)
    exact = x.astype(np.float64) @ w.T  # and it is not the fp32 product: the quantization shows
    assert np.abs(got - exact).max() > 1e3 * np.abs(_core.matmul(raw, ours, rows, cols, x) - exact).max()


def test_small_batches_are_bitwise_row_independent(rng, kernels):
    raw = quantized(rng, 64, 128, gguf.GGMLQuantizationType.Q4_1)
    x = rng.standard_normal((_core.SMALL_BATCH, 128)).astype(np.float32)
    batch = _core.matmul(raw, _core.TYPE_Q4_1, 64, 128, x)
    for i in range(len(x)):
        np.testing.assert_array_equal(_core.matmul(raw, _core.TYPE_Q4_1, 64, 128, x[i : i + 1])[0], batch[i])


def test_rmsnorm_matches_numpy(rng):
    x = rng.standard_normal((5, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(_core.rmsnorm(x, w, 1e-5), ref, atol=NORM_ATOL, rtol=1e-5)


def rope_reference(x, pos, theta, style):
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    c, s = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
    out = x.astype(np.float64).copy()
    if style == _core.ROPE_ADJACENT:  # llama.cpp / GGUF: pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:  # Hugging Face: pairs (i, i + hd/2)
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        out[..., : hd // 2], out[..., hd // 2 :] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("style", [_core.ROPE_ADJACENT, _core.ROPE_HALF])
@pytest.mark.parametrize("pos", [0, 1, 37, 1000])
def test_rope_matches_numpy(rng, style, pos):
    x = rng.standard_normal((9, 64)).astype(np.float32)
    # float32 angles (as Hugging Face computes them) lose ~pos * 2^-24 radians
    np.testing.assert_allclose(_core.rope(x, pos, 100000.0, style), rope_reference(x, pos, 1e5, style),
                               atol=1e-6 * (1 + pos), rtol=1e-5)  # fmt: skip


def test_rope_styles_agree_under_the_gguf_permutation(rng):
    """GGUF permutes each head's Q/K rows so adjacent-pair rotation equals HF's half-split rotation."""
    hd = 64
    x_hf = rng.standard_normal((3, hd)).astype(np.float32)
    # llama.cpp's convert permutation: element i of the first half -> 2i, of the second half -> 2i+1
    perm = np.empty(hd, dtype=int)
    perm[0::2], perm[1::2] = np.arange(hd // 2), np.arange(hd // 2, hd)
    x_gguf = x_hf[:, perm]
    half = _core.rope(x_hf, 11, 1e4, _core.ROPE_HALF)
    adjacent = _core.rope(x_gguf, 11, 1e4, _core.ROPE_ADJACENT)
    np.testing.assert_allclose(adjacent, half[:, perm], atol=1e-6)


def test_bad_arguments_raise(rng):
    raw = quantized(rng, 4, 64, gguf.GGMLQuantizationType.Q4_1)
    with pytest.raises(ValueError, match="do not hold"):
        _core.dequantize(raw, _core.TYPE_Q4_1, 5, 64)
    with pytest.raises(ValueError, match="not supported"):
        _core.dequantize(raw, 9, 4, 64)  # Q8_1: not a weight type here
    with pytest.raises(ValueError, match="shape"):
        _core.matmul(raw, _core.TYPE_Q4_1, 4, 64, np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError, match="'f32' or 'q8'"):
        _core.matmul(raw, _core.TYPE_Q4_1, 4, 64, np.zeros((2, 64), np.float32), "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.quantize_q8a(np.zeros(48, np.float32))
    with pytest.raises(ValueError, match="unknown kernel set"):
        _core.select_kernels("neon-on-x86")

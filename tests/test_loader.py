"""Loading GGUF files: the tiny random model, and corrupt or unsupported files raising clear errors."""

import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest

import cecollm
from cecollm import ModelFormatError

from .tiny_gguf import write_tiny_gguf


def _thp_mode() -> str:
    """The kernel's transparent huge page setting, "[never]" where it has none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_tiny_model_loads_and_runs(tiny_path):
    model = cecollm.load_model(tiny_path)
    assert model.config["n_layers"] == 2 and model.config["dim"] == 64
    ids = model.tokenize("hello world")
    logits = model.logits(ids)
    assert logits.shape == (len(ids), 259) and np.isfinite(logits).all()
    # one prompt batch and one position at a time agree on the tiny model too
    cache = model.new_cache(len(ids))
    one = [model.core.head(cache.forward(model.core.embed(np.array([t], np.int32)), i))[0] for i, t in enumerate(ids)]
    np.testing.assert_allclose(np.stack(one), logits, atol=1e-4)


@pytest.mark.parametrize("activations", ["f32", "q8"])
def test_k_quant_and_q5_layers_run_as_their_dequantized_values(tmp_path, activations):
    """A model whose layers are Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 (random blocks with sane scales, the
    K-quant mixes' types) against the same model with those matrices stored as gguf's dequantization
    of them in F32: the same prompt logits in both modes (prompts of these types take fp32
    activations), and in the f32 mode the same decoded tokens. q8-mode decode runs Q5_0/Q5_1 through
    8-bit activations as it does Q4 (test_kernels checks those products against NumPy), so its
    tokens are not the F32 twin's."""
    from .test_kernels import TYPES, quantized

    rng = np.random.default_rng(4)
    dim, ffn, heads, kv_heads = 256, 512, 4, 2
    hd = dim // heads
    kinds = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q5_0", "ffn_gate": "Q5_1",
             "ffn_up": "Q4_K", "ffn_down": "Q6_K"}  # fmt: skip
    shapes = {"attn_q": (heads * hd, dim), "attn_k": (kv_heads * hd, dim), "attn_v": (kv_heads * hd, dim),
              "attn_output": (dim, heads * hd), "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}  # fmt: skip
    quant, plain = {}, {}
    for layer in range(2):
        for name, kind in kinds.items():
            rows, cols = shapes[name]
            qtype = TYPES[kind][1]
            if kind in ("Q5_0", "Q5_1"):  # gguf quantizes these
                raw = gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype)
            else:
                raw = quantized(rng, rows, cols, qtype)
            quant[f"blk.{layer}.{name}.weight"] = (raw, qtype)
            plain[f"blk.{layer}.{name}.weight"] = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    kw = dict(dim=dim, ffn=ffn, n_heads=heads, n_kv_heads=kv_heads)
    write_tiny_gguf(tmp_path / "k.gguf", overrides=quant, **kw)
    write_tiny_gguf(tmp_path / "f32.gguf", overrides=plain, **kw)
    k_model = cecollm.load_model(tmp_path / "k.gguf", activations)
    f32_model = cecollm.load_model(tmp_path / "f32.gguf", activations)
    assert k_model.info()["tensor_types"].keys() >= {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"}
    ids = k_model.tokenize("hello world, and more words to fill a few positions")
    np.testing.assert_allclose(k_model.logits(ids), f32_model.logits(ids), atol=1e-4)
    if activations == "f32":
        assert k_model.generate(ids, max_new_tokens=6).tokens == f32_model.generate(ids, max_new_tokens=6).tokens


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        cecollm.load_model(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelFormatError):
        cecollm.load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        cecollm.load_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_tiny_file(tiny_path, keep):
    data = tiny_path.read_bytes()
    tiny_path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFormatError):
        cecollm.load_model(tiny_path)


@pytest.mark.model
def test_truncated_default_model(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(cecollm.default_model_path(), "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(60_000_000)
    with pytest.raises(ModelFormatError, match="truncated"):
        cecollm.load_model(path)


def test_wrong_shape_is_named(tmp_path):
    path = tmp_path / "shape.gguf"
    bad = gguf.quants.quantize(np.zeros((24, 64), np.float32), gguf.GGMLQuantizationType.Q4_1)
    write_tiny_gguf(path, overrides={"blk.1.attn_k.weight": (bad, gguf.GGMLQuantizationType.Q4_1)})
    with pytest.raises(ModelFormatError, match=r"blk\.1\.attn_k\.weight has shape \(24, 64\), expected \(32, 64\)"):
        cecollm.load_model(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "bf16.gguf"
    raw = np.zeros((96, 64), np.uint16)  # BF16 bits
    write_tiny_gguf(path, overrides={"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.BF16)})
    with pytest.raises(ModelFormatError, match=r"blk\.0\.ffn_up\.weight has type BF16"):
        cecollm.load_model(path)


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, skip=("blk.1.ffn_down.weight",))
    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_down\.weight is missing"):
        cecollm.load_model(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ModelFormatError, match="architecture 'gpt2' is not supported"):
        cecollm.load_model(path)


def test_norm_must_be_f32(tmp_path):
    path = tmp_path / "norm.gguf"
    half = np.ones(64, np.float16)
    write_tiny_gguf(path, overrides={"output_norm.weight": (half, gguf.GGMLQuantizationType.F16)})
    with pytest.raises(ModelFormatError, match="output_norm.weight must be F32"):
        cecollm.load_model(path)


def _header(version=3, n_tensors=0, n_fields=1):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize(
    "body, message",
    [
        (_header(version=1), "version 1 is not supported"),
        (_header(n_fields=1 << 60), "exceed the file"),
        (_header() + _string(b"k") + struct.pack("<IIQ", 9, 8, 1 << 40), "elements exceed the file"),
        (_header() + _string(b"k") + struct.pack("<IIQ", 9, 4, 1 << 40), "truncated at byte"),
        (_header() + _string(b"k") + struct.pack("<I", 8) + _string(b"\xff\xfe"), "not UTF-8"),
        (_header() + _string(b"k") + struct.pack("<I", 77), "value type 77"),
        (_header() + _string(b"k") + struct.pack("<IIQQ", 9, 8, 2, 1 << 40), "a string of 1099511627776 bytes"),
        (_header() + struct.pack("<Q", 1 << 62), "truncated at byte 32 while reading metadata key"),
        (_header(n_tensors=1, n_fields=0) + _string(b"t") + struct.pack("<I", 9) + b"\0" * 64, "9 dimensions"),
    ],
)
def test_hostile_headers_are_refused(tmp_path, body, message):
    """Lengths and counts in the header are checked against the file before anything is allocated."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(body + b"\0" * 64)
    with pytest.raises(ModelFormatError, match=message):
        cecollm.load_model(path)


def test_token_that_is_not_utf8_is_refused(tmp_path, tiny_path):
    """Vocabulary strings stay bytes in the file until the tokenizer is built; a bad one is named then."""
    data = tiny_path.read_bytes()
    at = data.index(b"<|im_start|>")
    path = tmp_path / "bad_token.gguf"
    path.write_bytes(data[:at] + b"<|im_s\xff\xfert|>" + data[at + 12 :])
    with pytest.raises(ModelFormatError, match="tokenizer: string 1 of an array .* is not UTF-8"):
        cecollm.load_model(path)


def test_tensor_data_is_mapped_not_copied(tiny_path):
    weights = cecollm.load_gguf(tiny_path)
    data = weights.tensors["blk.0.ffn_up.weight"][0]
    assert not data.flags.owndata and not data.flags.writeable
    assert weights.tensors["output_norm.weight"][0].dtype == np.float32


def test_model_weights_are_one_read_only_copy(tiny_path):
    """A model runs on its own copy of the weights: the file's bytes, read-only, 64-byte aligned; a
    model built from another model's weights copies them again and leaves the first one's intact."""
    weights = cecollm.load_gguf(tiny_path)
    model = cecollm.Model(weights)
    ids = model.tokenize("hello world")
    logits = model.logits(ids)
    for name, (data, *shape) in model.weights.tensors.items():
        source = weights.tensors[name][0]
        assert data.tobytes() == source.tobytes() and tuple(shape) == tuple(weights.tensors[name][1:])
        assert not data.flags.writeable and data.ctypes.data % 64 == 0 and not np.shares_memory(data, source)
    again = cecollm.Model(replace(model.weights, tokenizer=model.tokenizer))
    assert np.array_equal(again.logits(ids), logits) and np.array_equal(model.logits(ids), logits)


def test_a_kernel_refusing_huge_pages_still_loads(tiny_path, monkeypatch):
    """The huge-page advice is advice: where madvise refuses it (here an advice value no kernel knows,
    as a kernel without transparent huge pages refuses MADV_HUGEPAGE), the model loads the same."""
    ids = cecollm.load_model(tiny_path).tokenize("hello world")
    want = cecollm.load_model(tiny_path).logits(ids)
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF)
    assert np.array_equal(cecollm.load_model(tiny_path).logits(ids), want)


def test_loading_holds_one_copy_of_the_weights(model):
    """Peak resident memory over loading the default model, in a fresh process: one copy of the
    weights plus the tokenizer's construction (1.39x the file measured; 2.37x when the file's pages
    were not released as they were copied)."""
    code = (
        "import cecollm\n"
        "def status(key):\n"
        "    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))\n"
        "before = status('VmRSS:')\n"
        "cecollm.load_model()\n"
        "print(status('VmHWM:') - before)\n"
    )
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak < 1.7 * os.path.getsize(model.path), f"{peak / 1e6:.1f} MB at the peak"


def _thp_eligible(address: int) -> bool:
    """Whether the mapping holding address may use transparent huge pages (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                inside = low <= address < high
            elif inside and line.startswith("THPeligible:"):
                return line.split()[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif("[never]" in _thp_mode(), reason="no transparent huge pages")
def test_model_weights_sit_on_huge_pages(model):
    data = model.weights.tensors["blk.0.ffn_up.weight"][0]
    assert _thp_eligible(data.ctypes.data)


def test_kv_dtype_choices(tiny_path):
    with pytest.raises(ValueError, match="'f32' or 'f16'"):
        cecollm.load_model(tiny_path, kv_dtype="q4")
    model = cecollm.load_model(tiny_path, kv_dtype="f16")
    with pytest.raises(ValueError, match="'f32' or 'f16'"):
        cecollm._core.KVCache(model.core, 8, 0, 2, "bf16")
    ids = model.tokenize("hello world")
    half, full = model.logits(ids), cecollm.load_model(tiny_path).logits(ids)
    assert model.new_cache(4).dtype == "f16" and 0 < np.abs(half - full).max() < 1e-2

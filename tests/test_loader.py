"""Loading GGUF files: the tiny random model, and corrupt or unsupported files raising clear errors."""

import shutil

import gguf
import numpy as np
import pytest

import cecollm
from cecollm import ModelFormatError

from .tiny_gguf import write_tiny_gguf


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
    # batch (sgemm) and one-by-one (kernels) agree on the tiny model too
    cache = model.new_cache(len(ids))
    one = [model.core.head(cache.forward(model.core.embed(np.array([t], np.int32)), i))[0] for i, t in enumerate(ids)]
    np.testing.assert_allclose(np.stack(one), logits, atol=1e-4)


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

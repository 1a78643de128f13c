"""Hugging Face checkpoint directories: a tiny random llama written by transformers (safetensors,
F32 and BF16, tied and untied output), loaded by cecollm with its weights quantized at load, against
transformers on the same weights."""

import json

import numpy as np
import pytest
import torch

import cecollm
from cecollm import _core
from cecollm.gguf_loader import ModelFormatError

pytestmark = pytest.mark.model

IDS = [1, 504, 3458, 314, 4649, 28, 30, 198, 2205, 253, 1456, 17, 7]


def tiny_checkpoint(folder, tokenizer_model, *, tie: bool, dtype=torch.float32, seed=0, rope_scaling=None):
    """A 2-layer llama with SmolLM2's tokenizer (tokenizer.json written by the tokenizers library)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer_model.config["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0,
        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        rope_scaling=rope_scaling,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so that a missing or misplaced norm shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder, safe_serialization=True)
    tokenizer_model.tokenizer._tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
                "chat_template": tokenizer_model.tokenizer.chat_template,
            }
        )  # fmt: skip
    )
    return hf.float()


def torch_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def with_weights_as_stored(hf, quantize):
    """The torch model with each weight matrix replaced by what cecollm stores for it (quantized with
    ggml's rounding, dequantized back): the reference for a quantized load."""
    qtype = {"q8_0": _core.TYPE_Q8_0, "q4_0": _core.TYPE_Q4_0, "q4_1": _core.TYPE_Q4_1}[quantize]
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim == 2:
                w = p.numpy().astype(np.float32)
                raw = _core.quantize(np.ascontiguousarray(w), qtype)
                p.copy_(torch.from_numpy(_core.dequantize(raw, qtype, *w.shape)))
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_f32_checkpoint_matches_transformers(tmp_path, model, tie):
    hf = tiny_checkpoint(tmp_path, model, tie=tie)
    ours = cecollm.load_model(str(tmp_path), quantize="f32")
    assert ours.config["rope_style"] == _core.ROPE_HALF and ours.config["n_layers"] == 2
    np.testing.assert_allclose(ours.logits(IDS), torch_logits(hf, IDS), atol=1e-4)
    # the tokenizer is the checkpoint's own
    assert ours.tokenize("Hello world") == model.tokenize("Hello world")
    im_end = ours.tokenizer._tok.token_to_id("<|im_end|>")
    assert ours.tokenizer.eos_id == im_end and im_end in ours.tokenizer.end_ids and ours.tokenizer.chat_template


@pytest.mark.parametrize("quantize", ["q8_0", "q4_1"])
def test_quantized_at_load_matches_transformers_on_the_stored_weights(tmp_path, model, quantize):
    hf = tiny_checkpoint(tmp_path, model, tie=False, dtype=torch.bfloat16, seed=1)
    ours = cecollm.load_model(str(tmp_path), quantize=quantize)
    assert {t for _, t, *_ in ours.weights.tensors.values()} == {_core.TYPE_F32, getattr(_core, f"TYPE_{quantize.upper()}")}
    reference = with_weights_as_stored(hf, quantize)
    np.testing.assert_allclose(ours.logits(IDS), torch_logits(reference, IDS), atol=1e-4)
    greedy = ours.generate(IDS, max_new_tokens=8).tokens
    with torch.no_grad():
        out = reference.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert greedy == out[0, len(IDS) :].tolist()[: len(greedy)]


def test_llama3_rope_scaling(tmp_path, model):
    """Llama 3's frequency-dependent RoPE scaling, with an original context short enough that this
    head size has long, short and blended wavelengths, over 60 positions."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    hf = tiny_checkpoint(tmp_path, model, tie=True, rope_scaling=scaling)
    ids = (IDS * 5)[:60]
    ours = cecollm.load_model(str(tmp_path), quantize="f32")
    factors = ours.weights.tensors["rope_freqs.weight"][0]
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2  # kept, divided, blended
    np.testing.assert_allclose(ours.logits(ids), torch_logits(hf, ids), atol=1e-4)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": None, "rope_parameters": None}))
    unscaled = cecollm.load_model(str(tmp_path), quantize="f32").logits(ids)
    assert np.abs(unscaled - torch_logits(hf, ids)).max() > 1e-3  # the scaling is what made them agree


def test_qwen2_checkpoint_matches_transformers(tmp_path, model):
    """Qwen2 layers: biases on the q, k and v projections."""
    import transformers

    torch.manual_seed(3)
    config = transformers.Qwen2Config(
        vocab_size=model.config["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=True, use_sliding_window=False,
    )  # fmt: skip
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases away from zero, so that a missing one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model.tokenizer._tok.save(str(tmp_path / "tokenizer.json"))
    ours = cecollm.load_model(str(tmp_path), quantize="f32")
    assert "blk.1.attn_k.bias" in ours.weights.tensors
    np.testing.assert_allclose(ours.logits(IDS), torch_logits(hf, IDS), atol=1e-4)
    # the same weights as a qwen2 GGUF (llama.cpp's layout: Q/K rows unpermuted, rotate-half RoPE)
    gguf_path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(gguf_path, "qwen2", ours, {name: p.detach().numpy() for name, p in hf.named_parameters()})
    from_gguf = cecollm.load_model(str(gguf_path))
    assert from_gguf.config["rope_style"] == _core.ROPE_HALF
    np.testing.assert_allclose(from_gguf.logits(IDS), torch_logits(hf, IDS), atol=1e-4)


def write_gguf(path, arch, loaded, params):
    """An F32 GGUF of a Hugging Face parameter dict {name: array}, with loaded's config and vocabulary."""
    import gguf

    from cecollm.hf_loader import GLOBAL_NAMES, LAYER_NAMES

    c = loaded.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["context_length"])
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["ffn_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["norm_eps"])
    w.add_vocab_size(c["vocab"])
    vocab = loaded.tokenizer._tok.get_vocab(with_added_tokens=True)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(arch)
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([])
    names = dict(GLOBAL_NAMES)
    for i in range(c["n_layers"]):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in LAYER_NAMES.items()})
        names.update({f"model.layers.{i}.self_attn.{p}_proj.bias": f"blk.{i}.attn_{p}.bias" for p in "qkv"})
    for name, x in params.items():
        w.add_tensor(names[name], np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_pre_tokenizers_of_each_family():
    """Llama 3 groups digits by three, Qwen2 splits them one by one (their tokenizer.json regexes)."""
    from cecollm.tokenizer import _pre_tokenizer

    def words(name, text):
        return [w for w, _ in _pre_tokenizer(name).pre_tokenize_str(text)]

    assert words("llama3", "In 12345 days") == ["In", "Ġ", "123", "45", "Ġdays"]
    assert words("qwen2", "In 12345 days") == ["In", "Ġ", "1", "2", "3", "4", "5", "Ġdays"]


def test_unsupported_checkpoints_are_refused_clearly(tmp_path, model):
    tiny_checkpoint(tmp_path, model, tie=True)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in (
        ({"model_type": "phi3"}, "model_type 'phi3' is not supported"),
        ({"model_type": "mistral", "sliding_window": 128}, "sliding attention window"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 8.0}}, "only Llama 3"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "original_max_position_embeddings"),
        ({"attention_bias": True}, "biases"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelFormatError, match=message):
            cecollm.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json is not readable JSON"):
        cecollm.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantize must be one of"):
        cecollm.load_model(str(tmp_path), quantize="q3")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ModelFormatError, match="do not hold"):
        cecollm.load_model(str(tmp_path))
    weights.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelFormatError, match="header length"):
        cecollm.load_model(str(tmp_path))

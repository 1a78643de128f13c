"""The engine against transformers on the same GGUF (dequantized to fp32, CPU torch)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.model, pytest.mark.reference, pytest.mark.slow]

# Largest |logit difference| allowed. Both sides compute in fp32 from the same dequantized weights;
# what differs is summation order (our kernels vs torch). Measured: ≤ 1e-4 on these
# prompts (see the issue note); logits span about ±40.
LOGIT_ATOL = 1e-3

# activations="q8" quantizes the input of every matrix product to 8 bits per value, the scheme of
# llama.cpp, so its logits move by about 1 (logits span about ±40). Measured from this reference on
# PROMPTS + one story prompt: cecollm q8 0.91-1.24, llama.cpp (same GGUF) 1.08-1.36 (benchmarks/accuracy.py).
# The bounds leave that much room again; a broken quantizer or integer kernel moves logits by far more.
Q8_LOGIT_ATOL = 2.5
Q8_TOP1_AGREEMENT = 0.95  # over all positions; measured 0.98

# An F16 KV cache rounds every stored key and value to half precision (relative 2^-11). Measured from
# this reference: 1.4e-2 to 1.8e-2 on PROMPTS, 3.7e-2 over the 600-token text.
KV_F16_LOGIT_ATOL = 0.1

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Ünïcödé, emoji 🙂 and numbers: 1234567 + 89 = ?",
]
LONG_TEXT = (
    "In the beginning the Universe was created. This has made a lot of people very angry and been widely "
    "regarded as a bad move. Many were increasingly of the opinion that they'd all made a big mistake in "
    "coming down from the trees in the first place. "
)


def reference_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(model, hf_reference, prompt):
    hf, _ = hf_reference
    ids = model.tokenize(prompt)
    ours, ref = model.logits(ids), reference_logits(hf, ids)
    assert ours.shape == ref.shape == (len(ids), model.config["vocab"])
    assert np.abs(ours - ref).max() <= LOGIT_ATOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_long_prompt_logits_match_transformers(model, hf_reference):
    hf, _ = hf_reference
    ids = model.tokenize(LONG_TEXT * 12)[:600]
    assert len(ids) >= 500
    ours, ref = model.logits(ids), reference_logits(hf, ids)
    assert np.abs(ours - ref).max() <= LOGIT_ATOL


@pytest.mark.parametrize("prompt", PROMPTS[:2] + ["Once upon a time, in a small village,"])
def test_greedy_generation_matches_transformers(model, hf_reference, prompt):
    hf, _ = hf_reference
    ids = model.tokenize(prompt)
    ours = model.generate(ids, max_new_tokens=32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=sorted(
            model.tokenizer.end_ids), pad_token_id=model.tokenizer.eos_id)[0, len(ids):].tolist()  # fmt: skip
    out = [t for t in out if t not in model.tokenizer.end_ids]
    assert ours.tokens == out
    assert len(ours.tokens) == 32 or ours.finish_reason == "stop"


def test_decode_step_logits_match_transformers(model, hf_reference):
    """Decode (one position at a time, the kernel path) agrees with the reference too."""
    hf, _ = hf_reference
    ids = model.tokenize(PROMPTS[1])
    cache = model.new_cache(len(ids))
    rows = [model.core.head(cache.forward(model.core.embed(np.array([t], np.int32)), i))[0] for i, t in enumerate(ids)]
    assert np.abs(np.stack(rows) - reference_logits(hf, ids)).max() <= LOGIT_ATOL


def test_q8_activations_stay_close_to_transformers(model, model_q8, hf_reference):
    """Decode (the path 8-bit activations take) against the reference, over all prompts' positions."""
    hf, _ = hf_reference
    errors, agree, total = [], 0, 0
    for prompt in PROMPTS:
        ids = model.tokenize(prompt)
        cache = model_q8.new_cache(len(ids))
        ours = np.stack([model_q8.core.head(cache.forward(model_q8.core.embed(np.array([t], np.int32)), i))[0]
                         for i, t in enumerate(ids)])  # fmt: skip
        ref = reference_logits(hf, ids)
        errors.append(np.abs(ours - ref).max())
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    assert max(errors) <= Q8_LOGIT_ATOL
    assert agree / total >= Q8_TOP1_AGREEMENT
    assert min(errors) > 10 * LOGIT_ATOL  # the quantized path did run (fp32 stays within LOGIT_ATOL)


@pytest.mark.parametrize("text", PROMPTS + [LONG_TEXT * 12])
def test_f16_kv_cache_stays_close_to_transformers(model_kv16, hf_reference, text):
    hf, _ = hf_reference
    ids = model_kv16.tokenize(text)[:600]
    ours, ref = model_kv16.logits(ids), reference_logits(hf, ids)
    assert model_kv16.new_cache(1).dtype == "f16"
    assert LOGIT_ATOL < np.abs(ours - ref).max() <= KV_F16_LOGIT_ATOL  # rounded, and only that much
    assert (ours.argmax(-1) == ref.argmax(-1)).all()

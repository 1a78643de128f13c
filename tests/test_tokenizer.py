"""Our tokenizer (built from the GGUF vocab and merges) against transformers' GGUF tokenizer."""

import pytest

pytestmark = [pytest.mark.model, pytest.mark.reference]

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "def add(a, b):\n    return a + b  # sum\n\n\tindented\ttabs",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語, 한국어, emoji 🙂🚀",
    "   leading spaces and trailing   ",
    "numbers 1 22 333 4444 55555 0.5 -7 1e10 12,345,678",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "URLs https://example.com/a?b=c&d=e and e-mail a.b@c.org",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_reference(model, hf_reference, text):
    _, tok = hf_reference
    assert model.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(model, text):
    assert model.detokenize(model.tokenize(text)) == text


def test_digits_split_one_by_one(model):
    ids = model.tokenize("12345")
    assert [model.detokenize([i]) for i in ids] == list("12345")


def test_special_tokens_and_chat_template(model):
    tok = model.tokenizer
    assert tok.encode("<|im_end|>") == [tok.eos_id]
    prompt = model.chat_prompt("Hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_id in tok.end_ids


def test_chat_template_matches_transformers(model, hf_reference):
    _, tok = hf_reference
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ref = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert model.tokenizer.apply_chat_template(messages) == ref

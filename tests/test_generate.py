"""Generation API and CLI on the default model."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.model


def test_greedy_is_deterministic_and_matches_logits(model):
    ids = model.tokenize("The capital of France is")
    a = model.generate(ids, max_new_tokens=8)
    b = model.generate(ids, max_new_tokens=8)
    assert a.tokens == b.tokens and len(a.tokens) == 8 and a.finish_reason == "length"
    # each greedy token is the argmax of full-depth logits over the sequence so far
    logits = model.logits(ids + a.tokens[:-1])
    assert logits[len(ids) - 1 :].argmax(-1).tolist() == a.tokens
    assert a.text == model.detokenize(a.tokens) and a.tokens_per_s > 0


def test_sampling_is_seeded(model):
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95)
    a = model.generate("Tell me a story:", seed=7, **kw)
    b = model.generate("Tell me a story:", seed=7, **kw)
    c = model.generate("Tell me a story:", seed=8, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stops_at_end_of_generation(model):
    result = model.generate("What is 2+2? Answer with one number.", max_new_tokens=200, chat=True)
    assert result.finish_reason == "stop" and len(result.tokens) < 200
    assert not set(result.tokens) & model.tokenizer.end_ids


def test_stream_pieces_join_to_text(model):
    stream = model.generate("Write the word hello in French:", max_new_tokens=12, stream=True, chat=True)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(pieces) == result.text and len(pieces) >= 1


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        model.generate("x", max_new_tokens=0)
    with pytest.raises(ValueError):
        model.generate("", max_new_tokens=3)
    with pytest.raises(ValueError):
        model.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="outside"):
        model.logits([0, model.config["vocab"]])


def test_kv_cache_errors(model):
    cache = model.new_cache(4)
    x = model.core.embed(np.array([1, 2], np.int32))
    with pytest.raises(IndexError, match="cannot start"):
        cache.forward(x, 1)  # position 0 never computed
    with pytest.raises(IndexError, match="capacity"):
        cache.forward(x, 3)
    with pytest.raises(ValueError, match="shape"):
        cache.forward(np.zeros((1, 5), np.float32), 0)


def run_cli(*args):
    out = subprocess.run([sys.executable, "-m", "cecollm.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_generate_json(model):
    data = json.loads(run_cli("generate", "The capital of France is", "--max-new-tokens", "6", "--json"))
    assert {"prompt_tokens", "tokens", "text", "tokens_per_s"} <= data.keys()
    assert data["tokens"] == model.generate("The capital of France is", max_new_tokens=6).tokens
    assert data["prompt_tokens"] == model.tokenize("The capital of France is")


def test_cli_info(model):
    info = json.loads(run_cli("info", "--json"))
    assert info["n_layers"] == 30 and info["dim"] == 576 and info["tensor_types"]["Q4_1"] == 210
    assert "n_layers" in run_cli("info")


def test_cli_error_is_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cecollm.cli", "info", "--model", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "model file not found" in out.stderr


def test_cli_bench_json(model):
    data = json.loads(run_cli("bench", "--threads", "1", "--repeats", "1", "--activations", "q8", "--json"))
    assert data["threads"] == 1 and data["pp512"] > 0 and data["tg128"] > 0 and data["activations"] == "q8"
    assert data["kernels"] in ("avx2", "generic")

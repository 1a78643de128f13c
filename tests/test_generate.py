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


def test_stream_events_join_to_the_result(model):
    stream = model.generate("Write the word hello in French:", max_new_tokens=12, stream=True, chat=True, logprobs=2)
    events = list(stream)
    result = stream.result
    assert "".join(e.text for e in events) == result.text and result.text
    assert [e.token for e in events if e.token is not None] == result.tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in events if e.token is not None)
    assert result.tokens == model.generate("Write the word hello in French:", max_new_tokens=12, chat=True).tokens


def test_stop_strings_end_the_text_before_them(model):
    full = model.generate("Count from one to ten in words:", max_new_tokens=40, chat=True)
    cut = full.text.find("5. 5")
    assert cut > 0, full.text
    r = model.generate("Count from one to ten in words:", max_new_tokens=40, chat=True, stop=["5. 5"])
    assert r.text == full.text[:cut] and r.finish_reason == "stop"
    assert r.tokens == full.tokens[: len(r.tokens)] and len(r.tokens) < len(full.tokens)
    events = list(model.generate("Count from one to ten in words:", max_new_tokens=40, chat=True, stop="5. 5",
                                 stream=True))  # fmt: skip
    assert "".join(e.text for e in events) == full.text[:cut]


def test_logprobs_match_the_full_models_logits(model):
    r = model.generate("The capital of France is", max_new_tokens=4, logprobs=3)
    ids = r.prompt_tokens + r.tokens
    z = model.logits(ids).astype(np.float64)
    for k, rec in enumerate(r.logprobs):
        row = z[len(r.prompt_tokens) - 1 + k]
        lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert rec["token"] == r.tokens[k] and abs(rec["logprob"] - lp[rec["token"]]) < 1e-3
        assert max(rec["top"].values()) == pytest.approx(lp.max(), abs=1e-3)


def test_repetition_penalty_follows_the_common_rule(model):
    from cecollm import _core

    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    rng = np.zeros(4, np.uint64)
    token = _core.pick(logits, rng, repetition_penalty=2.0, seen=np.array([1, 1, 0, 0], np.uint8))
    assert logits.tolist() == [1.0, -4.0, 1.0, 0.5] and token == 0  # penalized in place; ties go to the first
    plain = model.generate("Repeat after me: la la la la", max_new_tokens=24, chat=True)
    penalized = model.generate("Repeat after me: la la la la", max_new_tokens=24, chat=True, repetition_penalty=1.5)
    assert len(set(penalized.tokens)) / len(penalized.tokens) > len(set(plain.tokens)) / len(plain.tokens)


def test_sampling_follows_softmax_top_k_and_top_p():
    """The C sampler's draws against the law they sample: softmax(logits / T), cut to top_k, then to
    the smallest most-likely set reaching top_p (frequencies within 4 standard errors)."""
    from cecollm import _core
    from cecollm.model import Sampler

    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))
    draws = 20000

    def freq(**kw):
        sampler = Sampler(seed=1, **kw)
        counts = np.bincount([sampler(logits) for _ in range(draws)], minlength=5)
        return counts / draws

    def close(got, want):
        want = np.asarray(want) / np.sum(want)
        assert np.all(np.abs(got - want) <= 4 * np.sqrt(want * (1 - want) / draws) + 1e-9), (got, want)

    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    close(freq(temperature=1.0), p)
    close(freq(temperature=0.5), p**2)
    close(freq(temperature=1.0, top_k=2), [0, 0.4, 0, 0.3, 0])
    close(freq(temperature=1.0, top_p=0.8), [0, 0.4, 0, 0.3, 0.15])  # 0.4 + 0.3 < 0.8 <= 0.85
    close(freq(temperature=1.0, top_k=3, top_p=0.5), [0, 0.4, 0, 0.3, 0])
    assert freq(temperature=0.0)[1] == 1.0  # greedy
    with pytest.raises(ValueError, match="top_p"):
        _core.pick(logits.copy(), np.zeros(4, np.uint64), top_p=0.0)


def test_the_c_token_loop_is_the_python_one(model):
    """KVCache.generate (the C loop) against the same steps taken one call at a time from Python:
    greedy picks of embed -> forward -> head, and the same sampled tokens for the same generator."""
    from cecollm.model import Sampler

    ids = model.tokenize("Write a haiku about the sea.")
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.2}):
        r = model.generate(ids, max_new_tokens=24, seed=5, **kw)
        sampler = Sampler(seed=5, **kw)
        seen = np.zeros(model.config["vocab"], np.uint8)
        seen[ids] = sampler.repetition_penalty != 1.0
        cache = model.new_cache(len(ids) + 24)
        logits = model.core.head(cache.forward(model.core.embed(np.array(ids, np.int32)), 0)[-1:])[0]
        tokens = []
        for i in range(24):
            token = sampler(logits, seen)
            if token in model.tokenizer.end_ids:
                break
            tokens.append(token)
            seen[token] = 1
            logits = model.core.head(cache.forward(model.core.embed(np.array([token], np.int32)), len(ids) + i))[0]
        assert r.tokens == tokens
        assert r.decode_steps == len(tokens) - (r.finish_reason == "length")


def test_messages_and_lists_of_prompts(model):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert model.generate(messages=msgs, max_new_tokens=8).tokens == model.generate(
        "What is the capital of France?", max_new_tokens=8, chat=True).tokens
    several = model.generate(["Hello", "The sky is"], max_new_tokens=4)
    assert [r.tokens for r in several] == [model.generate(p, max_new_tokens=4).tokens for p in ("Hello", "The sky is")]
    with pytest.raises(ValueError, match="not both"):
        model.generate("x", messages=msgs)


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
    assert data["kernels"] in ("avx512", "avx2", "generic")


def test_edge_and_collab_modes_stream(model):
    from cecollm import Cloud, Edge, ExitPolicy

    policy = ExitPolicy(exits=(6, 10), split=15, thresholds=(0.7,))
    for cloud in (None, Cloud(model, split=15)):
        edge = Edge(model, policy, cloud=cloud)
        stream = edge.generate("The history of the bicycle begins", max_new_tokens=12, stream=True)
        events = list(stream)
        plain = edge.generate("The history of the bicycle begins", max_new_tokens=12)
        assert [e.token for e in events if e.token is not None] == plain.tokens == stream.result.tokens
        assert "".join(e.text for e in events) == plain.text
        assert [e.source for e in events if e.token is not None] == [t.source for t in plain.extra["traces"]]
        assert all(e.exit_layer is not None for e in events if e.token is not None)

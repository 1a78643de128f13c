"""Early exits: the exactness invariants, the decision, catch-up vs propagate, the pre-check."""

import numpy as np
import pytest

from cecollm.edge import EdgeRunner, generate_edge
from cecollm.exits import ExitHead, ExitPolicy, confidence

pytestmark = pytest.mark.model

PROMPT = "The history of the bicycle begins"


def full_cache_over(model, ids, tokens, layers):
    """A plain forward pass over prompt + tokens (prompt in one batch, then one token at a time)."""
    cache = model.new_cache(len(ids) + len(tokens) + 1, 0, layers)
    cache.forward(model.core.embed(np.asarray(ids, np.int32)), 0)
    for i, t in enumerate(tokens):
        cache.forward(model.core.embed(np.array([t], np.int32)), len(ids) + i)
    return cache


def assert_same_cache(a, b, layers):
    assert a.lengths() == b.lengths()
    for layer in range(layers):
        for x, y in zip(a.kv(layer), b.kv(layer)):
            np.testing.assert_array_equal(x, y)


# ---- confidence in C against NumPy ----


def test_confidence_metrics_match_numpy(rng):
    logits = (rng.standard_normal((6, 1000)) * 3).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    srt = np.sort(p, -1)
    entropy = -(p * np.log(p)).sum(-1)
    expected = {"max_prob": srt[:, -1], "margin": srt[:, -1] - srt[:, -2], "entropy": 1 - entropy / np.log(1000)}
    for metric, ref in expected.items():
        conf, top1 = confidence(logits, metric)
        np.testing.assert_allclose(conf, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(top1, logits.argmax(-1))


def test_confidence_extremes():
    one_hot = np.full(100, -1e4, np.float32)
    one_hot[7] = 0
    for metric in ("max_prob", "margin", "entropy"):
        conf, top1 = confidence(one_hot, metric)
        assert conf[0] == pytest.approx(1.0, abs=1e-6) and top1[0] == 7
        assert confidence(np.zeros(100, np.float32), metric)[0][0] == pytest.approx(0.01 if metric == "max_prob" else 0.0, abs=1e-6)
    with pytest.raises(ValueError, match="not finite"):
        confidence(np.full(10, np.nan, np.float32))


# ---- the three exactness invariants ----


def test_exits_disabled_give_the_full_models_tokens(model):
    full = model.generate(PROMPT, max_new_tokens=24)
    for kv in ("catchup", "propagate"):
        policy = ExitPolicy(exits=(8, 16, 24), split=model.n_layers, thresholds=(1.1,), kv=kv)
        assert generate_edge(model, PROMPT, policy, max_new_tokens=24).tokens == full.tokens


def test_exits_that_cannot_accept_cost_no_stop(model):
    """Exits above threshold 1 do not cut the edge's forward pass: one segment (forward call) up to the
    split per token, as without them; an exit that can accept is a stop."""
    for thresholds, stops in (((1.01,), 1), ((1.01, 1.01, 0.999999), 2)):
        runner = EdgeRunner(model, ExitPolicy(exits=(8, 16, 24), split=model.n_layers, thresholds=thresholds), 64)
        runner.prefill(model.tokenize(PROMPT))
        decision = runner.step(504)
        assert decision.segments == stops and decision.layers_run == model.n_layers


def test_exit_at_the_last_layer_gives_the_full_logits(model):
    ids = model.tokenize(PROMPT)
    runner = EdgeRunner(model, ExitPolicy(exits=(model.n_layers,), split=model.n_layers, thresholds=(0.0,)), 64)
    runner.prefill(ids)
    cache = model.new_cache(64)
    cache.forward(model.core.embed(np.asarray(ids, np.int32)), 0)
    for i, token in enumerate([504, 3575, 282]):
        decision = runner.step(token)
        full = model.core.head(cache.forward(model.core.embed(np.array([token], np.int32)), len(ids) + i))[0]
        assert decision.exit_layer == model.n_layers
        np.testing.assert_array_equal(decision.logits, full)


@pytest.mark.parametrize("threshold, mixed", [(0.05, False), (0.3, True), (0.6, True)])
def test_catch_up_leaves_the_exact_kv_cache(model, threshold, mixed):
    """0.05: every token exits at 3, so catch-up runs grow past SMALL_BATCH; others mix exits."""
    policy = ExitPolicy(exits=(3, 7, 11), split=15, thresholds=(threshold,))
    ids = model.tokenize(PROMPT)
    runner = EdgeRunner(model, policy, 64)
    logits = model.core.head(runner.prefill(ids)[-1:])[0]
    tokens, exits = [], []
    for _ in range(20):  # 20 > SMALL_BATCH: long catch-up runs are sliced
        tokens.append(int(np.argmax(logits)))
        decision = runner.step(tokens[-1])
        logits, _ = decision.logits, exits.append(decision.exit_layer)
    assert (len(set(exits)) > 1) == mixed, f"exit pattern {exits}"
    assert runner.pending, "some positions are still pending before the flush"
    runner.flush()
    assert not runner.pending
    assert_same_cache(runner.cache, full_cache_over(model, ids, tokens, 15), 15)


def test_catch_up_matches_in_python_and_after_each_step(model):
    """Without a flush, every layer's filled prefix already equals the plain pass's."""
    policy = ExitPolicy(exits=(4, 8), split=12, thresholds=(0.2,))
    ids = model.tokenize("Once upon a time")
    runner = EdgeRunner(model, policy, 64)
    logits = model.core.head(runner.prefill(ids)[-1:])[0]
    tokens = []
    for _ in range(10):
        tokens.append(int(np.argmax(logits)))
        logits = runner.step(tokens[-1]).logits
        ref = full_cache_over(model, ids, tokens, 12)
        for layer, filled in enumerate(runner.cache.lengths()):
            for ours, theirs in zip(runner.cache.kv(layer), ref.kv(layer)):
                np.testing.assert_array_equal(ours, theirs[:, :filled])


def test_propagate_fills_skipped_layers_at_once(model):
    policy = ExitPolicy(exits=(4,), split=15, thresholds=(0.0,), kv="propagate")  # every token exits at 4
    ids = model.tokenize(PROMPT)
    runner = EdgeRunner(model, policy, 64)
    runner.prefill(ids)
    decision = runner.step(504)
    assert decision.exit_layer == 4 and not runner.pending
    assert runner.cache.lengths() == [len(ids) + 1] * 15
    # the skipped layers' keys come from the exit's hidden state: approximate, not the exact ones
    exact = full_cache_over(model, ids, [504], 15)
    assert not np.array_equal(runner.cache.kv(10)[0], exact.kv(10)[0])
    np.testing.assert_array_equal(runner.cache.kv(3)[0], exact.kv(3)[0])


# ---- decisions, pre-check, traces ----


def test_first_exit_over_threshold_decides(model):
    policy = ExitPolicy(exits=(6, 10), split=15, thresholds=(0.6, 0.0))
    runner = EdgeRunner(model, policy, 64)
    runner.prefill(model.tokenize(PROMPT))
    decision = runner.step(504)
    assert decision.exit_layer in (6, 10)
    if decision.exit_layer == 10:  # then the exit at 6 was checked and failed
        assert decision.head_checks == 2
    conf, top1 = confidence(decision.logits, "max_prob")
    assert conf[0] == pytest.approx(decision.confidence)


def test_precheck_never_adds_exits_and_saves_head_evaluations(model):
    base = ExitPolicy(exits=(4, 8, 12), split=15, thresholds=(0.8,))
    pre = ExitPolicy(exits=(4, 8, 12), split=15, thresholds=(0.8,), precheck_rows=4096)
    a = generate_edge(model, PROMPT, base, max_new_tokens=24, trace_full=True)
    b = generate_edge(model, PROMPT, pre, max_new_tokens=24, trace_full=True)
    ta, tb = a.extra["traces"], b.extra["traces"]
    assert sum(t.head_checks for t in tb) < sum(t.head_checks for t in ta)
    assert sum(t.prechecks_skipped for t in tb) > 0
    # a skipped check only sends a token deeper: no token exits earlier than it would without it
    for x, y in zip(ta, tb):
        if x.token != y.token:
            break  # the sequences diverged; later steps are not comparable
        assert y.exit_layer >= x.exit_layer


def test_policy_validation(model):
    with pytest.raises(ValueError, match="inside"):
        ExitPolicy(exits=(4, 20), split=15)
    with pytest.raises(ValueError, match="thresholds"):
        ExitPolicy(exits=(4, 8), split=15, thresholds=(0.5, 0.6, 0.7))
    with pytest.raises(ValueError, match="metric"):
        ExitPolicy(metric="vibes")
    with pytest.raises(ValueError, match="pre-check"):
        ExitPolicy(metric="entropy", precheck_rows=1000)
    with pytest.raises(ValueError, match="split"):
        EdgeRunner(model, ExitPolicy(exits=(4,), split=31), 16)
    with pytest.raises(ValueError, match="exit norm"):
        EdgeRunner(model, ExitPolicy(exits=(4,), split=15, exit_heads={4: ExitHead(norm=np.ones(3, np.float32))}), 16)


def test_exit_norm_changes_the_exit_head(model):
    final_norm = np.asarray(model.weights.tensors["output_norm.weight"][0], np.float32)
    scaled = ExitPolicy(exits=(8,), split=15, thresholds=(1.1,), exit_heads={15: ExitHead(norm=0.5 * final_norm)})
    plain = ExitPolicy(exits=(8,), split=15, thresholds=(1.1,))
    ids = model.tokenize(PROMPT)
    a, b = EdgeRunner(model, scaled, 32), EdgeRunner(model, plain, 32)
    a.prefill(ids), b.prefill(ids)
    la, lb = a.step(504).logits, b.step(504).logits
    np.testing.assert_allclose(la, lb * 0.5, rtol=1e-4, atol=1e-4)  # the head is linear in the norm weights


def test_trace_records_full_model_agreement(model):
    policy = ExitPolicy(exits=(8, 16, 24), split=model.n_layers, thresholds=(1.1,))
    result = generate_edge(model, PROMPT, policy, max_new_tokens=8, trace_full=True)
    assert all(t.matches_full for t in result.extra["traces"])
    assert [t.exit_layer for t in result.extra["traces"]] == [model.n_layers] * 8


# ---- the token loop in C ----


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_edge_loop_in_c_equals_the_per_token_loop(model, temperature):
    """generate_edge's loop runs in C (all tokens in one call) unless a caller sees each token; both
    give the same tokens and traces, early exits and catch-up included."""
    policy = ExitPolicy(exits=(4, 8, 12), split=15, thresholds=(0.4,))
    seen = []
    whole = generate_edge(model, PROMPT, policy, max_new_tokens=24, temperature=temperature, seed=3)
    stepped = generate_edge(model, PROMPT, policy, max_new_tokens=24, temperature=temperature, seed=3,
                            on_token=lambda i, trace: seen.append((i, trace.token)))  # fmt: skip
    assert whole.tokens == stepped.tokens and seen == list(enumerate(stepped.tokens))
    key = [(t.token, t.exit_layer, t.confidence, t.layers_run, t.head_checks) for t in whole.extra["traces"]]
    assert key == [(t.token, t.exit_layer, t.confidence, t.layers_run, t.head_checks) for t in stepped.extra["traces"]]
    assert len({t.exit_layer for t in whole.extra["traces"]}) > 1, "the exits mix"
    assert whole.extra["edge_layer_positions"] == stepped.extra["edge_layer_positions"]


def test_exit_head_adapter_and_gate_match_numpy(model, rng):
    """The C exit head (x + up (down x), its norm, the LM head) and gate against the NumPy formulas."""
    dim = model.config["dim"]
    h = rng.standard_normal((3, dim)).astype(np.float32)
    head = ExitHead(norm=(1 + 0.1 * rng.standard_normal(dim)).astype(np.float32),
                    down=(0.05 * rng.standard_normal((4, dim))).astype(np.float32),
                    up=(0.05 * rng.standard_normal((dim, 4))).astype(np.float32),
                    gate_w=rng.standard_normal(dim + 1).astype(np.float32), gate_b=0.25)  # fmt: skip
    adapted = (h.astype(np.float64) + (h.astype(np.float64) @ head.down.T) @ head.up.T).astype(np.float32)
    np.testing.assert_allclose(head.logits(model, h), model.core.head(adapted, head.norm), rtol=1e-4, atol=1e-4)
    prev = np.array([0.0, 0.3, 0.9])
    hn = h / np.sqrt(np.mean(h.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6)
    z = hn @ head.gate_w[:-1].astype(np.float64) + prev * head.gate_w[-1] + head.gate_b
    np.testing.assert_allclose(head.gate(h, prev), 1 / (1 + np.exp(-z)), rtol=1e-12)

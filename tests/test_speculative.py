"""Verify mode: the edge drafts, the cloud verifies blocks; the output is the full model's, exactly."""

import pytest

from cecollm.client import CloudFallbackWarning, LocalLink, NetworkModel, TcpLink, generate_collab
from cecollm.cloud import Cloud, CloudServer
from cecollm.exits import ExitPolicy
from cecollm.speculative import choose_block

pytestmark = [pytest.mark.model, pytest.mark.slow]

SPLIT = 15
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "List three uses of copper.")
POLICY = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.8,))


@pytest.fixture(scope="module")
def reference(model):
    return {p: model.generate(p, max_new_tokens=24, chat=True).tokens for p in PROMPTS}


@pytest.mark.parametrize("speculate", [1, 2, 4, 8, "auto"])
def test_verify_mode_gives_the_full_models_tokens(model, reference, speculate):
    cloud = Cloud(model, split=SPLIT)
    for prompt in PROMPTS:
        r = generate_collab(model, prompt, POLICY, lambda: LocalLink(cloud, NetworkModel(12.5e6, 0.02)),
                            max_new_tokens=24, dtype="f32", chat=True, speculate=speculate)  # fmt: skip
        assert r.tokens == reference[prompt], (prompt, speculate)
        assert r.extra["round_trips"] >= 1 and r.extra["fallbacks"] == 0
        assert len(r.extra["traces"]) == len(r.tokens)


def test_verify_mode_over_tcp_equals_the_simulation(model, reference):
    server = CloudServer(Cloud(model, split=SPLIT), port=0).start()
    try:
        host, port = server.address
        for prompt in PROMPTS[:2]:
            r = generate_collab(model, prompt, POLICY, lambda: TcpLink(host, port), max_new_tokens=24, dtype="f32",
                                chat=True, speculate=4)  # fmt: skip
            assert r.tokens == reference[prompt]
    finally:
        server.shutdown()


def test_rollback_under_forced_mismatches(model, reference):
    """Blocks of 8 drafts from the original model's split exit (right ~10 % of the time): nearly every
    block rolls back, several positions at a time."""
    cloud = Cloud(model, split=SPLIT)
    for prompt in PROMPTS[:2]:
        r = generate_collab(model, prompt, POLICY, lambda: LocalLink(cloud), max_new_tokens=24, dtype="f32", chat=True,
                            speculate=8)  # fmt: skip
        assert r.tokens == reference[prompt]
        assert r.extra["rolled_back_positions"] > 0
        assert [t.source for t in r.extra["traces"]].count("cloud") >= len(r.tokens) // 2


class DyingLink(LocalLink):
    """A link that fails for good after `lives` requests."""

    def __init__(self, cloud, lives):
        super().__init__(cloud)
        self.lives = lives

    def request(self, message, want_reply):
        self.lives -= 1
        if self.lives < 0:
            self.alive = False
            raise ConnectionError("link lost")
        return super().request(message, want_reply)


@pytest.mark.parametrize("lives", [3, 6])
def test_cloud_loss_in_the_middle_of_a_block(model, reference, lives):
    """The edge finishes alone: every token counted once, the verified prefix is the full model's."""
    cloud = Cloud(model, split=SPLIT)
    prompt = PROMPTS[1]
    with pytest.warns(CloudFallbackWarning, match="link lost"):
        r = generate_collab(model, prompt, POLICY, lambda: DyingLink(cloud, lives), max_new_tokens=24, dtype="f32",
                            chat=True, speculate=4, deadline_s=0.5)  # fmt: skip
    assert r.extra["cloud_failure"] == "connection failed: link lost"
    sources = [t.source for t in r.extra["traces"]]
    assert "fallback" in sources and r.extra["fallbacks"] >= 1
    assert len(r.tokens) == len(sources) == 24 or r.finish_reason == "stop"
    verified = sources.index("fallback")
    assert verified >= 1 and r.tokens[:verified] == reference[prompt][:verified]
    assert all(s == "fallback" for s in sources[verified:])


def test_eviction_and_rebuild_with_blocks_in_flight(model, reference):
    """A KV budget for one session: a second edge runs while the first has blocks in flight, evicting
    the first's KV; the first is rebuilt from its hidden states on its next block. Both stay exact."""
    kv, hidden = model.kv_bytes_per_position(model.n_layers - SPLIT) * 64, 4 * model.config["dim"] * 64
    cloud = Cloud(model, split=SPLIT, kv_budget_bytes=kv + 2 * hidden, session_budget_bytes=kv + hidden)
    link = lambda: LocalLink(cloud, NetworkModel(12.5e6, 0.05))  # noqa: E731  (slow link: blocks stay in flight)
    inner = []

    def interleave(step, trace):
        if step == 3:
            inner.append(generate_collab(model, PROMPTS[2], POLICY, link, max_new_tokens=24, dtype="f32", chat=True,
                                         speculate=2))  # fmt: skip

    outer = generate_collab(model, PROMPTS[0], POLICY, link, max_new_tokens=24, dtype="f32", chat=True, speculate=4,
                            on_token=interleave)  # fmt: skip
    assert outer.tokens == reference[PROMPTS[0]] and inner[0].tokens == reference[PROMPTS[2]]
    assert outer.extra["fallbacks"] == inner[0].extra["fallbacks"] == 0


def test_block_size_follows_acceptance_and_round_trip():
    assert choose_block(0.0, 0.02, 0.005) == 1  # nothing is accepted: one draft per round trip
    assert choose_block(0.95, 0.1, 0.005) == 8  # nearly everything is, and the link is slow
    assert choose_block(0.6, 0.0, 0.005) <= 2  # a free link: drafting far ahead only wastes work
    with pytest.raises(ValueError, match="speculate"):
        generate_collab(None, "x", POLICY, None, speculate=9)


def test_paper_mode_split_exit_finishes_tokens_at_the_edge(model):
    """An exit at the split itself: in collaborative mode, a confident token never goes to the cloud."""
    cloud = Cloud(model, split=SPLIT)
    every = ExitPolicy(exits=(SPLIT,), split=SPLIT, thresholds=(0.0,))
    r = generate_collab(model, PROMPTS[0], every, lambda: LocalLink(cloud), max_new_tokens=12, chat=True)
    sources = [t.source for t in r.extra["traces"]]
    assert sources[0] == "cloud" and set(sources[1:]) == {"edge"}  # the prompt's token comes from the cloud
    none = ExitPolicy(exits=(SPLIT,), split=SPLIT, thresholds=(1.1,))
    r = generate_collab(model, PROMPTS[0], none, lambda: LocalLink(cloud), max_new_tokens=12, chat=True, dtype="f32")
    assert {t.source for t in r.extra["traces"]} == {"cloud"}
    assert r.tokens == model.generate(PROMPTS[0], max_new_tokens=12, chat=True).tokens

"""Latency-aware exits: the threshold follows what a cloud token costs on the link."""

import pytest

from cecollm.client import LocalLink, NetworkModel, generate_collab
from cecollm.cloud import Cloud
from cecollm.exits import ExitPolicy


def test_the_rule():
    p = ExitPolicy(exits=(6, 10), split=15, thresholds=(0.9, 1.5), latency_budget_s=0.05, threshold_floor=0.6)
    assert p.effective_threshold(6, None) == 0.9  # no cost known yet: as configured
    assert p.effective_threshold(6, 0.05) == pytest.approx(0.9)  # at the budget: as configured
    assert p.effective_threshold(6, 0.10) == pytest.approx(0.8)  # twice the budget: twice the risk
    assert p.effective_threshold(6, 1.0) == 0.6  # never below the floor
    assert p.effective_threshold(6, 0.0) == 1.0  # a free cloud: ask it
    assert p.effective_threshold(10, 1.0) == 1.5  # a disabled exit stays disabled
    assert ExitPolicy(exits=(6,), split=15).effective_threshold(6, 9.0) == 0.8  # no budget: fixed
    with pytest.raises(ValueError, match="latency_budget_s"):
        ExitPolicy(latency_budget_s=0)


@pytest.mark.model
@pytest.mark.slow
def test_a_slow_link_moves_tokens_to_the_edge(model):
    policy = ExitPolicy(exits=(6, 10, 15), split=15, thresholds=(0.9,), latency_budget_s=0.05)
    cloud = Cloud(model, split=15)
    share = {}
    for rtt in (0.005, 0.2):
        r = generate_collab(model, "Write a short story about a lighthouse keeper.", policy,
                            lambda: LocalLink(cloud, NetworkModel(12.5e6, rtt)), max_new_tokens=48, chat=True)  # fmt: skip
        share[rtt] = sum(t.source == "edge" for t in r.extra["traces"]) / len(r.tokens)
    assert share[0.2] > share[0.005]

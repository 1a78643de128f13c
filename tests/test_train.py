"""Trained exit heads: the side file round-trips, belongs to one model, and untrained means default."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cecollm
from cecollm.edge import generate_edge
from cecollm.exits import ExitPolicy, load_exit_heads, model_fingerprint, save_exit_heads
from cecollm.sweep import eval_text
from cecollm.train import gate_calibration, train_exit_heads

from .tiny_gguf import write_tiny_gguf

pytestmark = [pytest.mark.model, pytest.mark.slow]
TEXTS = eval_text("train")[:3]


@pytest.fixture(scope="module")
def trained(model):
    heads, report = train_exit_heads(model, exits=(4, 8), steps=5, rank=8, texts=TEXTS, self_text=0, progress=False)
    return heads, report


def test_round_trip(model, trained, tmp_path):
    heads, report = trained
    assert report.positions > 100 and set(report.final_kl) == {4, 8}
    save_exit_heads(tmp_path / "h.safetensors", heads, model)
    loaded = load_exit_heads(tmp_path / "h.safetensors", model)
    assert set(loaded) == {4, 8}
    for e in (4, 8):
        for name in ("norm", "down", "up", "gate_w"):
            np.testing.assert_array_equal(getattr(loaded[e], name), getattr(heads[e], name))
        assert loaded[e].gate_b == pytest.approx(heads[e].gate_b)


def test_a_file_for_another_model_is_refused(model, trained, tmp_path):
    heads, _ = trained
    save_exit_heads(tmp_path / "h.safetensors", heads, model)
    write_tiny_gguf(tmp_path / "tiny.gguf")
    tiny = cecollm.load_model(tmp_path / "tiny.gguf")
    assert model_fingerprint(tiny) != model_fingerprint(model)
    with pytest.raises(ValueError, match="trained for another model"):
        load_exit_heads(tmp_path / "h.safetensors", tiny)


def test_untrained_heads_behave_exactly_as_the_defaults(model, tmp_path):
    heads, _ = train_exit_heads(model, exits=(4, 8), steps=0, texts=TEXTS[:1], self_text=0, progress=False)
    save_exit_heads(tmp_path / "zero.safetensors", heads, model)
    loaded = load_exit_heads(tmp_path / "zero.safetensors", model)
    for kv in ("catchup", "propagate"):
        plain = ExitPolicy(exits=(4, 8), split=15, thresholds=(0.3,), kv=kv)
        with_heads = ExitPolicy(exits=(4, 8), split=15, thresholds=(0.3,), kv=kv, exit_heads=loaded)
        a = generate_edge(model, "Once upon a time", plain, max_new_tokens=16)
        b = generate_edge(model, "Once upon a time", with_heads, max_new_tokens=16)
        assert a.tokens == b.tokens
        assert [t.confidence for t in a.extra["traces"]] == [t.confidence for t in b.extra["traces"]]


def test_training_lowers_the_distillation_loss(model):
    _, short = train_exit_heads(model, exits=(8,), steps=1, texts=TEXTS, self_text=0, progress=False)
    _, longer = train_exit_heads(model, exits=(8,), steps=60, texts=TEXTS, self_text=0, progress=False)
    assert longer.final_kl[8] < short.final_kl[8]


def test_gate_policy_and_calibration(model, trained):
    heads, _ = trained
    policy = ExitPolicy(exits=(4, 8), split=15, thresholds=(0.5,), metric="gate", exit_heads=heads)
    result = generate_edge(model, "Hello", policy, max_new_tokens=8)
    assert all(0.0 <= t.confidence <= 1.0 for t in result.extra["traces"])
    rows = gate_calibration(model, heads, (4, 8), eval_text("test")[:1])
    assert sum(r["count"] for r in rows if r["exit"] == 4) == sum(r["count"] for r in rows if r["exit"] == 8) > 0
    with pytest.raises(ValueError, match="needs a trained gate"):
        ExitPolicy(exits=(4, 8), split=15, metric="gate")


def test_cli_train_exits(model, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(TEXTS))
    out = subprocess.run([sys.executable, "-m", "cecollm.cli", "train-exits", "--exits", "6", "--steps", "2", "--rank",
                          "4", "--data", str(data), "--self-text", "0", "--out", str(tmp_path / "e.safetensors"),
                          "--no-progress", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["exits"] == [6] and summary["positions"] > 50
    assert set(load_exit_heads(tmp_path / "e.safetensors", model)) == {6}

"""The accuracy sweep: scoring invariants, outputs, side files, CLI."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from cecollm.exits import ExitPolicy, load_exit_heads
from cecollm.sweep import collect_layer_stats, eval_text, score_policy, sweep

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def stats(model):
    return collect_layer_stats(model, eval_text("test")[:2], [4, 8, 12, 15, 30])


def test_eval_text_splits_are_disjoint():
    train, test = eval_text("train"), eval_text("test")
    assert len(train) >= 5 and len(test) >= 5 and not set(train) & set(test)
    with pytest.raises(ValueError, match="no split"):
        eval_text("validation")


def test_disabled_exits_at_full_depth_score_perfectly(stats):
    row = score_policy(stats, ExitPolicy(exits=(4, 8), split=30, thresholds=(1.1,)))
    assert row["agreement_tf"] == 1.0 and row["early_exit_fraction"] == 0.0
    assert row["perplexity"] == pytest.approx(row["full_perplexity"], rel=1e-6)
    assert row["head_checks_per_token"] == 1.0


def test_lower_thresholds_exit_more(stats):
    fractions = [score_policy(stats, ExitPolicy(exits=(4, 8, 12), split=15, thresholds=(t,)))["early_exit_fraction"]
                 for t in (0.99, 0.9, 0.7, 0.5, 0.0)]  # fmt: skip
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_scores_match_a_direct_computation(model, stats):
    """Agreement for one policy, recomputed position by position from the stored per-layer numbers."""
    policy = ExitPolicy(exits=(4, 8), split=15, thresholds=(0.6,))
    row = score_policy(stats, policy)
    li = {layer: i for i, layer in enumerate(stats.layers)}
    hits = []
    for j in range(len(stats.full_top1)):
        chosen = next((e for e in (4, 8) if stats.confidence["max_prob"][li[e], j] >= 0.6), 15)
        hits.append(stats.top1[li[chosen], j] == stats.full_top1[j])
    assert row["agreement_tf"] == pytest.approx(np.mean(hits))
    assert sum(row[f"frac_exit_{e}"] for e in (4, 8, 15)) == pytest.approx(1.0)


def test_sweep_rows_csv_json_plot(model, tmp_path):
    result = sweep(model, thresholds=(0.9, 1.1), exit_sets=[(6, 10)], splits=(30,), texts=eval_text("test")[:1],
                   gen_prompts=("Hello",), gen_tokens=4, progress=False)  # fmt: skip
    assert len(result.rows) == 2
    disabled = result.rows[1]
    assert disabled["agreement_tf"] == 1.0 and disabled["agreement_gen"] == 1.0
    rows = list(csv.DictReader(io.StringIO(result.to_csv(tmp_path / "s.csv"))))
    assert [float(r["thresholds"]) for r in rows] == [0.9, 1.1]
    assert json.loads(result.to_json()) == result.rows
    result.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_exit_norm_side_file_from_elsewhere(model, tmp_path):
    """A side file written by another tool: tensors named exit.<E>.norm.weight, no fingerprint."""
    dim = model.config["dim"]
    norms = {"exit.8.norm.weight": np.linspace(0.5, 1.5, dim, dtype=np.float32)}
    save_file(norms, str(tmp_path / "exits.safetensors"))
    loaded = load_exit_heads(tmp_path / "exits.safetensors", model)
    np.testing.assert_array_equal(loaded[8].norm, norms["exit.8.norm.weight"])
    policy = ExitPolicy(exits=(8,), split=15, exit_heads=loaded)
    np.testing.assert_array_equal(policy.head(8).norm, loaded[8].norm)
    assert policy.head(15).norm is None
    save_file({"something.else": np.ones(3, np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no tensors named"):
        load_exit_heads(tmp_path / "bad.safetensors")


def test_cli_sweep_json(model):
    out = subprocess.run([sys.executable, "-m", "cecollm.cli", "sweep", "--thresholds", "0.9", "--exit-sets", "6,10",
                          "--splits", "30", "--gen-tokens", "0", "--no-progress", "--json"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["exits"] == "6,10" and 0 <= rows[0]["agreement_tf"] <= 1


def test_cli_generate_edge_json(model):
    out = subprocess.run([sys.executable, "-m", "cecollm.cli", "generate", "The capital of France is", "--mode", "edge",
                          "--split", "30", "--exits", "8,16", "--threshold", "1.1", "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["tokens"] == model.generate("The capital of France is", max_new_tokens=6).tokens
    assert data["exit_layers"] == [30] * 6 and len(data["edge_layers_run"]) == 6


def test_plot_returns_a_figure_and_leaves_the_backend_alone(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    from cecollm.sweep import SweepResult

    rows = [{"exits": "6,10", "split": 15, "thresholds": t, "agreement_tf": a, "early_exit_fraction": f,
             "mean_exit_layer": m} for t, a, f, m in ((0.8, 0.7, 0.4, 11.0), (0.95, 0.9, 0.1, 14.0))]  # fmt: skip
    before = matplotlib.get_backend()
    fig = SweepResult(rows).plot(tmp_path / "sweep.png")
    assert isinstance(fig, Figure) and matplotlib.get_backend() == before
    assert (tmp_path / "sweep.png").stat().st_size > 0
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"0.8", "0.95"} <= labels, "thresholds are labelled"

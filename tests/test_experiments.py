"""The experiment harness: data sets, the grid, work and byte accounting, quality, Ray = serial."""

import json

import numpy as np
import pytest

from cecollm import cli
from cecollm.datasets import examples, instructions, summaries
from cecollm.experiments import Setting, Worker, comparable, grid, quality, run_grid

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"  # the original model: its exits are rarely confident, so most tokens reach the cloud


def test_shipped_data_sets():
    evals, train = instructions("eval"), instructions("train")
    assert len(evals) >= 200 and all(r["reference"].strip() for r in evals)
    assert not {r["instruction"] for r in evals} & {r["instruction"] for r in train}
    docs = summaries("all")
    assert len(docs) == 250 and len(summaries("test")) == 100
    assert all(d["abstract"] and len(d["summaries"]) == 3 for d in docs)
    ex = examples("summaries", 100)
    assert {e.id for e in ex} == {d["id"] for d in summaries("test")}, "the test split comes first"
    assert examples("instructions", 3)[0].references == (evals[0]["reference"],)
    with pytest.raises(ValueError, match="has 220"):
        examples("instructions", 221)
    with pytest.raises(ValueError, match="no data set"):
        examples("xsum", 1)


def test_grid_expands_thresholds_and_validates():
    g = grid(["cloud", "collab", "verify"], thresholds=(0.8, 0.9), rtts=(0.0, 0.05), n=3, tokens=5)
    assert [s.label for s in g[:4]] == ["cloud", "collab@0.8", "collab@0.9", "verify"]
    assert len(g) == 8
    assert g[0].compute_key() == g[4].compute_key(), "cloud-only is computed once for every link"
    assert g[1].compute_key() != g[5].compute_key(), "collab runs on each link"
    with pytest.raises(ValueError, match="threshold"):
        Setting("collab")
    with pytest.raises(ValueError, match="unknown scheme"):
        Setting("cloudy")


def test_quality_metrics():
    refs = [("The cat sat on the mat.", "A dog ran."), ("Paris is the capital of France.",)]
    same = quality(["A dog ran.", "Paris is the capital of France."], refs)
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    assert same["chrf"] == pytest.approx(100.0)
    other = quality(["Bananas are yellow.", "Berlin is big."], refs, ["Bananas are yellow.", "Rome."])
    assert other["rouge1"] < 0.3 and other["chrf"] < 40
    assert other["rougeL_vs_cloud"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def small_grid():
    settings = grid(["cloud", "edge", "naive", "collab", "verify"], thresholds=(2.0,), models=(MODEL,),
                    dtypes=("f32",), rtts=(0.02,), n=2, tokens=6, speculate=4)  # fmt: skip
    return settings, run_grid(settings, progress=False)


def test_schemes_account_work_bytes_and_agreement(small_grid, model):
    settings, res = small_grid
    rows = {r["scheme"]: r for r in res.rows}
    n_layers, split, dim = model.n_layers, 15, model.config["dim"]
    cloud, edge, naive, collab, verify = (rows[k] for k in ("cloud", "edge", "naive", "collab@2", "verify"))
    runs = [res.runs[(settings[0].compute_key(), i)] for i in range(2)]
    positions = sum(r["prompt_tokens"] + len(r["tokens"]) - 1 for r in runs)
    assert cloud["edge_token_share"] == 0 and cloud["cloud_layer_share"] == 1 and cloud["cloud_work_offloaded"] == 0
    assert edge["edge_token_share"] == 1 and edge["cloud_layer_share"] == 0 and edge["bytes_up"] == 0
    # exits disabled, F32 wire: the full model's output, every layer-position computed exactly once
    for row in (naive, collab, verify):
        assert row["identical_to_cloud"] == 1.0 and row["rougeL_vs_cloud"] == 1.0
    assert collab["edge_token_share"] == 0
    assert collab["cloud_work_offloaded"] == pytest.approx(split / n_layers)
    assert collab["cloud_layer_share"] == pytest.approx((n_layers - split) / n_layers)
    # naive re-sends every position's split state (fp32) with every token
    naive_runs = [res.runs[(settings[2].compute_key(), i)] for i in range(2)]
    sent = sum(sum((r["prompt_tokens"] + k) * dim * 4 + 64 for k in range(len(r["tokens"]))) for r in naive_runs)
    assert naive["bytes_up"] == sent and naive["cloud_work_offloaded"] < 0
    assert positions > 0 and cloud["tokens"] == collab["tokens"] == naive["tokens"]
    # derived network time: one round trip and the bytes at 100 Mbit/s
    assert cloud["network_s"] == pytest.approx(2 * 0.02 + (cloud["bytes_up"] + cloud["bytes_down"]) / 12.5e6)
    assert cloud["time_per_token_s"] == pytest.approx(cloud["total_time_s"] / cloud["tokens"])


def test_ray_results_equal_serial(small_grid):
    import ray  # noqa: F401  (installed by make test)

    settings, serial = small_grid
    distributed = run_grid(settings, progress=False, ray=True, workers=2)
    assert [comparable(r) for r in distributed.rows] == [comparable(r) for r in serial.rows]


def test_sweep_on_ray_equals_serial():
    import ray  # noqa: F401  (installed by make test)

    import cecollm
    from cecollm.sweep import eval_text, sweep

    m = cecollm.load_model()
    kw = dict(thresholds=(0.5, 0.9), exit_sets=[(6, 10)], gen_tokens=4, texts=eval_text("test")[:1], progress=False)
    serial, distributed = sweep(m, **kw), sweep(m, ray=True, workers=2, **kw)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "decode_tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(distributed.rows) == drop(serial.rows)


def test_cli_json_rows(capsys):
    code = cli.main(["experiment", "--dataset", "instructions", "--n", "1", "--tokens", "3", "--schemes",
                     "cloud,edge,naive,collab", "--thresholds", "0.8", "--rtt", "0.02", "--model", MODEL, "--json"])  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["scheme"] for r in rows] == ["cloud", "edge", "naive", "collab@0.8"]
    for r in rows:
        for k in ("time_per_token_s", "edge_token_share", "cloud_layer_share", "bytes_up", "bytes_down", "rougeL"):
            assert isinstance(r[k], (int, float)) and np.isfinite(r[k])


def test_worker_loads_each_model_once():
    w = Worker()
    assert w.model(MODEL) is w.model(MODEL)


def test_trained_exit_heads_are_an_axis():
    heads = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "exits4.safetensors")
    g = grid(["cloud", "collab"], thresholds=(0.8,), models=(MODEL,), exit_heads=(None, heads), n=1, tokens=6)
    assert [(s.label, s.exit_heads) for s in g] == [("cloud", None), ("collab@0.8", None), ("collab@0.8", heads)]
    rows = run_grid(g, progress=False).rows
    plain, adapted = [r for r in rows if r["scheme"] == "collab@0.8"]
    assert plain["exit_heads"] is None and adapted["exit_heads"] == heads
    assert Worker().policy(g[-1], Worker().model(MODEL)).exit_heads, "the heads are used"

"""Exit fine-tuning on a tiny random model: the torch model is the C engine's, what trains is what
ships (quantizer, delta, rebuild, GGUF export), and a stopped run resumes to the same weights."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cecollm  # noqa: E402
from cecollm import _core, finetune  # noqa: E402
from cecollm.finetune import Recipe  # noqa: E402
from cecollm.gguf_loader import ModelFormatError, load_gguf  # noqa: E402
from cecollm.model import Model  # noqa: E402
from cecollm.tuned import apply_delta, finetune_exits, torch_tensors  # noqa: E402

from .tiny_gguf import write_tiny_gguf  # noqa: E402

RECIPE = Recipe(exits=(1, 2), steps=6, batch=3, seq_len=48, lr=2e-2, warmup=1, w_final=1.0)  # block scales
LORA = Recipe(exits=(1, 2), method="lora", rank=4, steps=6, batch=3, seq_len=48, lr=2e-2, warmup=1, w_final=1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path, n_layers=4)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return cecollm.load_model(tiny)


@pytest.fixture(scope="module")
def data(tiny_model):
    rng = np.random.default_rng(0)
    texts = ["the quick brown fox jumps over the lazy dog", "tune the exits, keep the final layer", "abc " * 9]
    seqs = [{"ids": tiny_model.tokenize(t + " " + str(rng.integers(1000))), "prompt_len": 3} for t in texts * 4]
    return {"sequences": seqs, "heldout": seqs[:2], "human": [s["ids"] for s in seqs[2:4]]}


def test_torch_model_is_the_c_engine(tiny_model):
    tm = finetune.build_torch_model(tiny_model.config, torch_tensors(tiny_model.weights), RECIPE)
    ids = tiny_model.tokenize("hello there, general")
    x = torch.tensor([ids])
    cache = tiny_model.new_cache(len(ids))
    h2 = cache.forward(tiny_model.core.embed(np.asarray(ids, np.int32)), 0, 0, 2)
    full = tiny_model.core.head(cache.forward(h2, 0, 2, 4))
    with torch.no_grad():
        for adapted in (False, True):  # a zero update re-quantizes to the base weights exactly
            states = tm.hidden_states(x, [2, 4], adapted)
            np.testing.assert_allclose(tm.logits(states[4])[0].numpy(), full, atol=1e-4, rtol=0)
            np.testing.assert_allclose(tm.logits(states[2])[0].numpy(), tiny_model.core.head(h2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("type_id", [_core.TYPE_Q4_0, _core.TYPE_Q4_1, _core.TYPE_Q8_0, _core.TYPE_F16])
def test_fake_quantize_is_the_c_quantizer(type_id, rng):
    w = (rng.standard_normal((16, 96)) * 0.05).astype(np.float32)
    shipped = _core.dequantize(_core.quantize(w, type_id).reshape(16, -1), type_id, 16, 96)
    wt = torch.from_numpy(w).requires_grad_(True)
    q = finetune.fake_quantize(wt, type_id)
    np.testing.assert_array_equal(q.detach().numpy(), shipped)
    q.sum().backward()  # straight through: the gradient of the rounding is the identity
    np.testing.assert_array_equal(wt.grad.numpy(), np.ones_like(w))


@pytest.fixture(scope="module", params=[RECIPE, LORA], ids=["scales", "lora"])
def tuned(tiny_model, data, tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("tuned")
    result = finetune_exits(tiny_model, str(folder / "delta.safetensors"), request.param, data,
                            gguf_out=str(folder / "tuned.gguf"), device="cpu", progress=False)  # fmt: skip
    return result


def test_delta_rebuild_equals_the_exported_gguf(tiny, tuned):
    rebuilt = apply_delta(load_gguf(tiny), tuned.delta_path)
    exported = load_gguf(tuned.gguf_path)
    base = load_gguf(tiny)
    assert set(rebuilt.tensors) == set(exported.tensors)
    changed = 0
    for name, (data, type_id, rows, cols) in rebuilt.tensors.items():
        other = exported.tensors[name]
        assert (type_id, rows, cols) == other[1:] == base.tensors[name][1:], name
        ours = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        np.testing.assert_array_equal(ours, np.ascontiguousarray(other[0]).reshape(-1).view(np.uint8), err_msg=name)
        changed += not np.array_equal(ours, np.ascontiguousarray(base.tensors[name][0]).reshape(-1).view(np.uint8))
    assert changed >= 4 * 7  # every layer matrix moved
    assert exported.metadata["exits"] == rebuilt.metadata["exits"] == (1, 2)


def test_exported_gguf_loads_and_generates_like_the_rebuilt_model(tiny, tuned):
    from_delta = Model(apply_delta(load_gguf(tiny), tuned.delta_path))
    from_gguf = cecollm.load_model(tuned.gguf_path)
    assert from_delta.trained_exits == from_gguf.trained_exits == (1, 2)
    a = from_delta.generate("abc", max_new_tokens=8)
    b = from_gguf.generate("abc", max_new_tokens=8)
    assert a.tokens == b.tokens and len(a.tokens) >= 1
    policy = cecollm.ExitPolicy.for_model(from_gguf, split=2)
    assert policy.exits == (1, 2) and policy.split == 2


@pytest.mark.parametrize("recipe, tolerance", [(RECIPE, 1e-4), (LORA, 2e-3)], ids=["scales", "lora"])
def test_what_trains_is_what_ships(tiny, tiny_model, data, tmp_path, recipe, tolerance):
    """The torch model's tuned logits equal the C engine running the rebuilt model (lora: f32 delta)."""
    tm = finetune.build_torch_model(tiny_model.config, torch_tensors(tiny_model.weights), recipe)
    finetune.train(tm, [s["ids"] for s in data["sequences"]], recipe, device="cpu", progress=False)
    finetune.save_delta(tmp_path / "d.safetensors", tm, "", "tiny", dtype="f32")
    shipped = Model(apply_delta(load_gguf(tiny), tmp_path / "d.safetensors"))
    ids = data["sequences"][0]["ids"]
    with torch.no_grad():
        ours = tm.logits(tm.hidden_states(torch.tensor([ids]), [4])[4])[0].numpy()
    np.testing.assert_allclose(ours, shipped.logits(ids), atol=tolerance, rtol=0)
    assert np.abs(ours - tiny_model.logits(ids)).max() > 1e-2  # and training did change the model


def test_block_grid_reads_codes_and_scales_off_the_dequantized_matrix(rng):
    for type_id in (_core.TYPE_Q4_0, _core.TYPE_Q4_1, _core.TYPE_Q8_0):
        raw = _core.quantize((rng.standard_normal((6, 64)) * 0.05).astype(np.float32), type_id)
        w = _core.dequantize(raw.reshape(6, -1), type_id, 6, 64)
        codes, d, m = finetune.block_grid(torch.from_numpy(w), type_id)
        np.testing.assert_array_equal((codes * d[..., None] + m[..., None]).reshape(6, 64).numpy(), w)
        np.testing.assert_array_equal(d.numpy().astype(np.float16).view(np.uint16)[:, 0],
                                      raw.reshape(6, 2, -1)[:, 0, :2].copy().view(np.uint16)[:, 0])  # fmt: skip
    with pytest.raises(ValueError, match="block grid"):
        finetune.block_grid(torch.from_numpy(rng.standard_normal((2, 32)).astype(np.float32)), _core.TYPE_Q4_1)


def test_a_stopped_run_resumes_to_the_same_weights(tiny_model, data, tmp_path):
    seqs = [s["ids"] for s in data["sequences"]]
    tensors = torch_tensors(tiny_model.weights)
    straight = finetune.build_torch_model(tiny_model.config, tensors, RECIPE)
    finetune.train(straight, seqs, RECIPE, device="cpu", progress=False)
    ckpt = str(tmp_path / "run.ckpt")
    first = finetune.build_torch_model(tiny_model.config, tensors, RECIPE)
    log = finetune.train(first, seqs, RECIPE, device="cpu", progress=False, checkpoint=ckpt, stop_after=2)
    assert log.steps_done == 2
    resumed = finetune.build_torch_model(tiny_model.config, tensors, RECIPE)
    log = finetune.train(resumed, seqs, RECIPE, device="cpu", progress=False, checkpoint=ckpt)
    assert log.steps_done == RECIPE.steps
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_delta_for_another_model_or_a_broken_one_is_refused(tiny, tuned, tmp_path):
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, n_layers=4, seed=7)
    with pytest.raises(ModelFormatError, match="made for another base model"):
        apply_delta(load_gguf(other), tuned.delta_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFormatError, match="not a readable delta"):
        apply_delta(load_gguf(tiny), broken)
    from safetensors.numpy import save_file

    save_file({"blk.0.attn_q.weight.up": np.zeros((3, 2), np.float32)}, str(tmp_path / "s.safetensors"),
              metadata={"format": finetune.DELTA_FORMAT})  # fmt: skip
    with pytest.raises(ModelFormatError, match="do not make"):
        apply_delta(load_gguf(tiny), tmp_path / "s.safetensors")


def test_cli_finetune_on_the_tiny_model(tiny, data, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "d.safetensors"
    proc = subprocess.run([sys.executable, "-m", "cecollm.cli", "finetune", "--model", tiny, "--data", str(path),
                           "--out", str(out), "--exits", "1,2", "--steps", "3", "--rank", "2", "--batch", "2",
                           "--device", "cpu", "--no-progress", "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["delta"] == str(out) and out.exists()
    assert 0 <= summary["evaluation"]["0.8"]["edge_share"] <= 1
    assert Model(apply_delta(load_gguf(tiny), out)).trained_exits == (1, 2)


def test_the_standalone_script_reads_the_gguf_as_the_c_core_does(tiny, data, tmp_path):
    """finetune.py runs where the extension is not built (a GPU machine): its gguf-based reader gives
    the C core's configuration and weights, and its entry point trains, evaluates and writes a delta."""
    config, tensors = finetune.tensors_from_gguf(tiny)
    ours = torch_tensors(load_gguf(tiny))
    model = cecollm.load_model(tiny)
    assert {k: model.config[k] for k in config} == config
    for name, (w, type_id) in ours.items():
        assert tensors[name][1] == type_id
        np.testing.assert_array_equal(tensors[name][0], w, err_msg=name)
    (tmp_path / "data.json").write_text(json.dumps(data))
    recipe = json.dumps({"exits": [1, 2], "rank": 2, "steps": 2, "batch": 2, "seq_len": 32})
    proc = subprocess.run([sys.executable, finetune.__file__, "--gguf", tiny, "--data", str(tmp_path / "data.json"),
                           "--out", str(tmp_path / "out"), "--recipe", recipe],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["eval"]["0.8"]["perplexity_ratio"] > 0
    assert Model(apply_delta(load_gguf(tiny), tmp_path / "out" / "run.safetensors")).trained_exits == (1, 2)


def test_batched_teacher_answers_are_the_c_engines_greedy_answers(tiny_model):
    prompts = [tiny_model.tokenize(t) for t in ("hello", "the quick brown fox", "ab")]
    tm = finetune.build_torch_model(tiny_model.config, torch_tensors(tiny_model.weights), RECIPE)
    answers = finetune.generate_answers(tm, prompts, 10, tiny_model.tokenizer.end_ids, batch=2, device="cpu")
    for p, a in zip(prompts, answers):
        r = tiny_model.generate(p, max_new_tokens=10)
        assert a[: len(r.tokens)] == r.tokens and len(a) == len(r.tokens) + (r.finish_reason == "stop")
    sampled = finetune.generate_answers(tm, prompts, 10, tiny_model.tokenizer.end_ids, temperature=1.0, seed=3,
                                        device="cpu")  # fmt: skip
    assert sampled == finetune.generate_answers(tm, prompts, 10, tiny_model.tokenizer.end_ids, temperature=1.0,
                                                seed=3, device="cpu")  # fmt: skip

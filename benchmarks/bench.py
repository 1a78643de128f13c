"""Prefill and decode speed of cecollm (fp32 or 8-bit activations, F32 or F16 KV cache), llama.cpp
(llama-cpp-python) and transformers, plus cecollm's peak memory.

All engines run the same GGUF with the same thread count in one process, taking turns: every
round times each measurement of each engine once, and each figure is the median over --repeats
rounds after a warm-up round (so a drift in the machine's speed falls on every engine alike). As llama-bench does: pp512 evaluates a
512-token prompt (logits for the last position only); tg128 generates 128 tokens one at a time
from an empty context (logits every step, greedy pick). tg32@2048 decodes 32 tokens after a
2048-token prompt (attention at long context; not run for transformers). The memory-bandwidth line
turns the decode speed into a fraction of the machine's limit: weight bytes read per token / copy
bandwidth. Peak memory is measured in a fresh process: resident memory above the interpreter (with
cecollm imported) over pp512 + tg128, against the GGUF's size plus the KV cache.

    python benchmarks/bench.py --threads 2 [--json out.json]
        [--engines cecollm,cecollm-q8,cecollm-q8-kv16,llama.cpp,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from cecollm.bench import DEPTH, PP, TG, TG_DEEP, prompt_ids

# gen128: generation through each engine's public API (greedy, 128 new tokens after this prompt,
# which none of the engines ends early; each run checks it got all 128).
GEN_PROMPT = "Once upon a time, in a small village by the sea,"


def generated(n: int) -> None:
    if n != TG:
        raise RuntimeError(f"gen128 produced {n} tokens, not {TG}: the prompt no longer suits the measurement")


def setup_cecollm(path, threads, activations="f32", kv_dtype="f32"):
    import cecollm
    from cecollm import _core
    from cecollm.bench import model_runs

    _core.set_threads(threads)
    model = cecollm.load_model(path, activations, kv_dtype)

    def gen():
        result = model.generate(GEN_PROMPT, max_new_tokens=TG)
        generated(len(result.tokens))
        gen.decode_rates.append(result.tokens_per_s)  # the result's own figure: decode steps only

    gen.decode_rates = []
    return {**model_runs(model, deep=True), "gen128": (TG, gen)}


def setup_cecollm_q8(path, threads):
    return setup_cecollm(path, threads, "q8")


def setup_cecollm_q8_kv16(path, threads):
    return setup_cecollm(path, threads, "q8", "f16")


def setup_llama_cpp(path, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=PP + TG, n_batch=PP, n_ubatch=PP, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    ids = prompt_ids(llm.n_vocab())

    def pp():
        llm.reset()
        llm.eval(ids)

    def tg():
        llm.reset()
        token = 1
        for _ in range(TG):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))

    # logits_all: llama-cpp-python keeps a scores row per position only then (decode steps still compute one row)
    deep = Llama(model_path=path, n_ctx=DEPTH + TG_DEEP, n_batch=PP, n_ubatch=PP, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
    deep.eval(np.resize(np.asarray(ids), DEPTH).tolist())

    def tg_deep():
        deep.n_tokens = DEPTH  # the next eval overwrites the cache from here
        token = 1
        for _ in range(TG_DEEP):
            deep.eval([token])
            token = int(np.argmax(deep.scores[deep.n_tokens - 1]))

    def gen():
        out = llm.create_completion(GEN_PROMPT, max_tokens=TG, temperature=0.0)
        generated(out["usage"]["completion_tokens"])

    return {"pp512": (PP, pp), "tg128": (TG, tg), "tg_deep": (TG_DEEP, tg_deep), "gen128": (TG, gen)}


def setup_transformers(path, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size)])

    @torch.no_grad()
    def pp():
        model(ids, logits_to_keep=1)

    @torch.no_grad()
    def tg():
        token, past = torch.tensor([[1]]), None
        for _ in range(TG):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gen_ids = tokenizer(GEN_PROMPT, return_tensors="pt").input_ids

    @torch.no_grad()
    def gen():
        out = model.generate(gen_ids, max_new_tokens=TG, do_sample=False)
        generated(out.shape[1] - gen_ids.shape[1])

    return {"pp512": (PP, pp), "tg128": (TG, tg), "gen128": (TG, gen)}


def run_interleaved(setups: dict, repeats: int) -> dict:
    """{engine: {measurement: tokens/s}}: the median of `repeats` timed runs after a warm-up, the
    engines taking turns within every round so that drift of the machine's speed (this VM's is
    large) falls on all of them alike."""
    times = {engine: {name: [] for name in runs} for engine, runs in setups.items()}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for engine, runs in setups.items():
            for name, (_, run) in runs.items():
                t0 = time.perf_counter()
                run()
                if round_:
                    times[engine][name].append(time.perf_counter() - t0)
    return {engine: {name: runs[name][0] / statistics.median(times[engine][name]) for name in runs}
            for engine, runs in setups.items()}  # fmt: skip


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large memcpy (read + write), best of repeats."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _status_bytes(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def memory_child(path: str, activations: str, kv_dtype: str) -> None:
    """Run in a fresh process: the model's peak resident memory over a pp512 prompt and tg128 decode,
    above the interpreter with cecollm's imports loaded, printed as JSON."""
    import cecollm

    baseline = _status_bytes("VmRSS")
    model = cecollm.load_model(path, activations, kv_dtype)
    loaded = _status_bytes("VmRSS")  # the weights (Model copies them onto huge pages), metadata, tokenizer
    cache = model.new_cache(PP + TG)
    ids = np.asarray(prompt_ids(model.config["vocab"]), np.int32)
    token = np.array([int(model.core.head(cache.forward(model.core.embed(ids), 0)[-1:])[0].argmax())], np.int32)
    for pos in range(PP, PP + TG):
        token[0] = int(model.core.head(cache.forward(model.core.embed(token), pos))[0].argmax())
    kv = (PP + TG) * model.kv_bytes_per_position(model.n_layers)
    print(json.dumps({"model_peak": _status_bytes("VmHWM") - baseline, "after_load": loaded - baseline, "kv": kv,
                      "file": os.path.getsize(path)}))  # fmt: skip


def peak_memory(path: str, activations: str = "f32", kv_dtype: str = "f32") -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", path, activations, kv_dtype],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes_per_token(path) -> int:
    """Bytes of weights one decode step reads: every layer tensor, the final norm and the LM head."""
    import cecollm

    tensors = cecollm.load_gguf(path).tensors
    return sum(t[0].nbytes for name, t in tensors.items())


ENGINES = {"cecollm": setup_cecollm, "cecollm-q8": setup_cecollm_q8, "cecollm-q8-kv16": setup_cecollm_q8_kv16,
           "llama.cpp": setup_llama_cpp, "transformers": setup_transformers}  # fmt: skip


def main():

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--plot", default=None, help="also draw the figures into this image (.png)")
    parser.add_argument("--from-json", default=None, help="report (and plot) a saved run instead of measuring")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "ACTIVATIONS", "KV_DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        data = measure(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
    report(data)
    if args.plot:
        plot(data, args.plot)


def measure(args) -> dict:
    import cecollm

    path = args.model or cecollm.default_model_path()
    setups = {}
    for engine in args.engines.split(","):
        print(f"loading {engine} ...", flush=True)
        setups[engine] = ENGINES[engine](path, args.threads)
    print(f"measuring: {args.repeats} rounds after a warm-up, the engines in turn", flush=True)
    results = run_interleaved(setups, args.repeats)
    for engine, runs in setups.items():  # cecollm's own decode rate inside gen128 (warm-up round left out)
        rates = getattr(runs.get("gen128", (0, None))[1], "decode_rates", None)
        if rates:
            results[engine]["gen128_decode"] = statistics.median(rates[1:])
    return {"model": os.path.basename(path), "threads": args.threads, "repeats": args.repeats,
            "cpu": platform.processor() or platform.machine(), "results": results, "copy_bandwidth": copy_bandwidth(),
            "weight_bytes_per_token": weight_bytes_per_token(path), "memory": peak_memory(path)}  # fmt: skip


COLUMNS = {"pp512": "pp512", "tg128": "tg128", "tg_deep": f"tg{TG_DEEP}@{DEPTH}", "gen128": "gen128"}


def report(data: dict) -> None:
    """One table: tokens/s, ratios to llama.cpp and to transformers, % of the decode bandwidth limit;
    then how generate() compares with raw decode, and peak memory."""
    results = data["results"]
    limit = data["copy_bandwidth"] / data["weight_bytes_per_token"]

    def ratios(anchor):
        ref = results.get(anchor, {})
        return {e: [f"{r[k] / ref[k]:.2f}" if k in r and k in ref else "-" for k in COLUMNS] for e, r in results.items()}

    by_llama, by_torch = ratios("llama.cpp"), ratios("transformers")
    names = list(COLUMNS.values())
    print(f"\nmodel {data.get('model', '?')}, {data['threads']} threads, {data.get('cpu', '?')}; tokens/s, median of"
          f" {data.get('repeats', '?')} rounds")  # fmt: skip
    head = f"{'engine':<16}" + "".join(f"{c:>10}" for c in names)
    print(head + " |" + "".join(f"{c:>10}" for c in names) + " |" + "".join(f"{c:>10}" for c in names) + " | decode")
    print(f"{'':<16}{'':>40} | {'x llama.cpp':<40}| {'x transformers':<40}| % of limit")
    for engine, r in results.items():
        cells = "".join(f"{r[k]:>10.1f}" if k in r else f"{'-':>10}" for k in COLUMNS)
        print(f"{engine:<16}{cells} |" + "".join(f"{c:>10}" for c in by_llama[engine]) + " |"
              + "".join(f"{c:>10}" for c in by_torch[engine]) + f" | {r['tg128'] / limit:>6.0%}")  # fmt: skip
    print(f"decode limit {limit:.0f} tok/s = copy bandwidth {data['copy_bandwidth'] / 1e9:.1f} GB/s / "
          f"{data['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token")  # fmt: skip
    print("gen128: 128 greedy tokens through the public API (Model.generate, llama-cpp-python create_completion,"
          " transformers generate), prompt included")  # fmt: skip
    for engine, r in results.items():
        if "gen128" in r:
            own = f"; its decode steps alone {r['gen128_decode'] / r['tg128']:.2f} x" if "gen128_decode" in r else ""
            print(f"  {engine}: gen128 = {r['gen128'] / r['tg128']:.2f} x its own tg128{own}")
    memory = data["memory"]
    ratio = (memory["model_peak"] - memory["kv"]) / memory["file"]
    print(f"peak memory (pp512 + tg128, f32 KV): {memory['model_peak'] / 1e6:.1f} MB above the interpreter ="
          f" {ratio:.2f} x the {memory['file'] / 1e6:.1f} MB file + {memory['kv'] / 1e6:.1f} MB KV cache"
          f" ({memory['after_load'] / 1e6:.1f} MB of it right after loading: the weights' copy, metadata and tokenizer)")  # fmt: skip


def plot(data: dict, path: str) -> None:
    """Tokens/s per measurement and engine (bars), each labelled with its ratio to llama.cpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    engines = list(results)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 4))
    for ax, (key, name) in zip(axes, COLUMNS.items()):
        shown = [e for e in engines if key in results[e]]
        values = [results[e][key] for e in shown]
        bars = ax.bar(range(len(shown)), values, color=[f"C{engines.index(e)}" for e in shown])
        ref = results.get("llama.cpp", {}).get(key)
        for bar, v in zip(bars, values):
            if ref:
                ax.annotate(f"{v / ref:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"{data.get('model', '')}, {data['threads']} threads, {data.get('cpu', '')} (labels: x llama.cpp)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()

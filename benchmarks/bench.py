"""Prefill (pp512) and decode (tg128) speed of cecollm (fp32 and 8-bit activations), llama.cpp
(llama-cpp-python) and transformers.

All engines run the same GGUF with the same thread count, in one process, one after another, and
report the median of --repeats runs after a warm-up. As llama-bench does: pp512 evaluates a
512-token prompt (logits for the last position only); tg128 generates 128 tokens one at a time
from an empty context (logits every step, greedy pick). The memory-bandwidth line turns the
decode speed into a fraction of the machine's limit: weight bytes read per token / copy bandwidth.

    python benchmarks/bench.py --threads 2 [--json out.json] [--engines cecollm,cecollm-q8,llama.cpp,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from cecollm.bench import PP, TG, median_time, prompt_ids


def bench_cecollm(path, threads, repeats, activations="f32"):
    import cecollm
    from cecollm.bench import bench_model

    result = bench_model(cecollm.load_model(path, activations), threads, repeats)
    return {"pp512": result["pp512"], "tg128": result["tg128"]}


def bench_cecollm_q8(path, threads, repeats):
    return bench_cecollm(path, threads, repeats, "q8")


def bench_llama_cpp(path, threads, repeats):
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

    return {"pp512": PP / median_time(pp, repeats), "tg128": TG / median_time(tg, repeats)}


def bench_transformers(path, threads, repeats):
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

    return {"pp512": PP / median_time(pp, repeats), "tg128": TG / median_time(tg, repeats)}


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large memcpy (read + write), best of repeats."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes_per_token(path) -> int:
    """Bytes of weights one decode step reads: every layer tensor, the final norm and the LM head."""
    import cecollm

    tensors = cecollm.load_gguf(path).tensors
    return sum(t[0].nbytes for name, t in tensors.items())


ENGINES = {"cecollm": bench_cecollm, "cecollm-q8": bench_cecollm_q8, "llama.cpp": bench_llama_cpp,
           "transformers": bench_transformers}  # fmt: skip


def main():
    import cecollm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    path = args.model or cecollm.default_model_path()

    results = {}
    for engine in args.engines.split(","):
        print(f"running {engine} ...", flush=True)
        results[engine] = ENGINES[engine](path, args.threads, args.repeats)

    bandwidth = copy_bandwidth()
    per_token = weight_bytes_per_token(path)
    limit = bandwidth / per_token
    anchor = results.get("llama.cpp")

    print(f"\nmodel {os.path.basename(path)}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'engine':<14}{'pp512 tok/s':>14}{'tg128 tok/s':>14}{'x llama.cpp pp':>16}{'x llama.cpp tg':>16}")
    for engine, r in results.items():
        ratio = f"{r['pp512'] / anchor['pp512']:>16.2f}{r['tg128'] / anchor['tg128']:>16.2f}" if anchor else ""
        print(f"{engine:<14}{r['pp512']:>14.1f}{r['tg128']:>14.1f}{ratio}")
    if "transformers" in results:
        for engine in ("cecollm", "cecollm-q8"):
            if engine in results:
                print(f"  {engine} decode = {results[engine]['tg128'] / results['transformers']['tg128']:.2f} x transformers")
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per token {per_token / 1e6:.1f} MB;"
          f" decode limit {limit:.0f} tok/s")  # fmt: skip
    for engine, r in results.items():
        print(f"  {engine}: decode at {r['tg128'] / limit:.0%} of the bandwidth limit")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "results": results, "copy_bandwidth": bandwidth,
                       "weight_bytes_per_token": per_token}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

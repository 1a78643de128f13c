"""Two measurements behind design decisions in docs/benchmarks.md.

1. Matrix-vector kernel cost per 32-weight block, with fp32 activations and with 8-bit activations:
   one thread on Q4_1 1536×576 (the FFN gate shape, cache-resident), then one and two threads on a
   147456×576 Q4_1 matrix (53 MB) and a 98304×576 Q8_0 one (60 MB, the LM head's format): more than
   the 32 MB L3, so the weights stream from memory as in decode.
2. Prefill paths: pp512 through matmul_f32, fp32 kernels on dequantized 32-row tiles (one
   512-position call, which the core runs as one CE_BATCH_CHUNK (512 rows), or calls of 128
   positions; every chunk dequantizes every tile again) against the decode kernels in batches of 8
   positions (each weight row read once per 8).

    python benchmarks/kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np

import cecollm
from cecollm import _core
from cecollm.bench import PP, prompt_ids


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_ns_per_block(rows: int, cols: int = 576, threads=(1,), repeats: int = 100, qtype: str = "Q4_1") -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype]))
    del weights
    x = rng.standard_normal((1, cols)).astype(np.float32)
    for n in threads:
        _core.set_threads(n)
        for activations in ("f32", "q8"):
            run = lambda: [_core.matmul(raw, getattr(_core, f"TYPE_{qtype}"), rows, cols, x, activations) for _ in range(repeats)]  # noqa: E731
            seconds = best_of(run, 5) / repeats
            print(f"{qtype} {rows}x{cols} ({raw.nbytes / 1e6:.1f} MB), {n} thread(s), {activations} activations:"
                  f" {seconds / (rows * cols / 32) * 1e9:.2f} ns/block, {raw.nbytes / seconds / 1e9:.1f} GB/s")  # fmt: skip


def prefill_paths(threads: int) -> None:
    _core.set_threads(threads)
    for activations in ("f32", "q8"):
        model = cecollm.load_model(activations=activations)
        ids = np.asarray(prompt_ids(model.config["vocab"]), np.int32)
        for batch in (PP, 128, _core.SMALL_BATCH):

            def run():
                cache = model.new_cache(PP)
                for p0 in range(0, PP, batch):
                    hidden = cache.forward(model.core.embed(ids[p0 : p0 + batch]), p0)
                model.core.head(hidden[-1:])

            path = "decode kernels" if batch <= _core.SMALL_BATCH else f"matmul_f32, chunks of {min(batch, _core.BATCH_CHUNK)}"
            print(f"pp512, {threads} threads, {activations} activations, calls of {batch} ({path}):"
                  f" {PP / best_of(run, 3):.1f} tok/s")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    kernel_ns_per_block(1536)
    threads = sorted({1, args.threads})
    kernel_ns_per_block(147456, threads=threads, repeats=3)
    kernel_ns_per_block(98304, threads=threads, repeats=3, qtype="Q8_0")
    prefill_paths(args.threads)


if __name__ == "__main__":
    main()

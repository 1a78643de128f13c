"""Decode right after a prefill against decode after decode, in one process: tg128 of the default
model timed after a pp512 run and again after that tg128, over several rounds. OpenBLAS (prefill's
sgemm) keeps its idle threads spinning for 2^OPENBLAS_THREAD_TIMEOUT cycles after each call; while
they spin they take a core from the decode that follows. cecollm sets the exponent to 16 unless the
environment has one; compare with OpenBLAS's own default:

    python benchmarks/after_prefill.py [--activations q8]
    OPENBLAS_THREAD_TIMEOUT=28 python benchmarks/after_prefill.py
"""

import argparse
import os
import time

import cecollm
from cecollm import _core
from cecollm.bench import model_runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", default="f32", choices=("f32", "q8"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _core.set_threads(args.threads)
    runs = model_runs(cecollm.load_model(activations=args.activations))

    def tokens_per_second(name):
        tokens, run = runs[name]
        t0 = time.perf_counter()
        run()
        return tokens / (time.perf_counter() - t0)

    tokens_per_second("tg128")  # warm-up
    print(f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}, {args.activations} activations")
    for _ in range(args.rounds):
        pp = tokens_per_second("pp512")
        after_pp, after_tg = tokens_per_second("tg128"), tokens_per_second("tg128")
        print(f"pp512 {pp:6.1f} tok/s; tg128 right after it {after_pp:6.1f}, after that tg128 {after_tg:6.1f}"
              f" (ratio {after_pp / after_tg:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()

"""Decode with the AVX2 kernel set against the AVX-512 set, whose decode kernels are the AVX2 ones
built with VNNI dot products (csrc/arch/x86_avx2_vnni.c): tg128 (128 greedy steps from an empty
context, logits every step) in one process, the sets taking turns in every round, for each activation
mode. Decode-sized products (n <= SMALL_BATCH) differ between the two sets only in those kernels, and
their logits are checked identical. The figure is the median over --rounds rounds; the ratio the
median of the per-round ratios (the VM's speed drifts between rounds, less within one).

    .venv/bin/python benchmarks/kernel_sets.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import cecollm
from cecollm import _core
from cecollm.bench import TG, greedy_decode, rates_in_turns, ratio_summary

SETS = ("avx2", "avx512")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _core.set_threads(args.threads)
    for activations in ("f32", "q8"):
        model = cecollm.load_model(activations=activations)
        token = np.array([model.tokenize("The")[0]], np.int32)
        logits = {}
        for name in SETS:
            _core.select_kernels(name)
            logits[name] = model.core.head(model.new_cache(1).forward(model.core.embed(token), 0))
        assert np.array_equal(*logits.values()), "the two sets' decode logits differ"

        def decode_with(kernels):
            _core.select_kernels(kernels)
            greedy_decode(model, model.new_cache(TG), range(TG))

        rates = rates_in_turns({name: lambda k=name: decode_with(k) for name in SETS}, TG, args.rounds)
        _core.select_kernels("auto")
        cells = ", ".join(f"{name} {statistics.median(r):.1f}" for name, r in rates.items())
        print(
            f"activations {activations}: tg128 tokens/s {cells}; avx512 / avx2 per round:"
            f" {ratio_summary(rates['avx512'], rates['avx2'])}"
        )


if __name__ == "__main__":
    main()

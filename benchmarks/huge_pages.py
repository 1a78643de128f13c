"""Decode with the weights on transparent huge pages (what Model does) against the same weights read
through the GGUF file's 4 KiB-page mapping (what it did before): tg128 (128 greedy steps from an empty
context, logits every step), both models in one process taking turns in every round, for each
activation mode. The figure is the median over --rounds rounds; the ratio the median of the per-round
ratios (the VM's speed drifts between rounds, less within one). The logits are checked identical.

    .venv/bin/python benchmarks/huge_pages.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import cecollm
from cecollm import _core
from cecollm import model as model_module
from cecollm.bench import TG, greedy_decode, rates_in_turns, ratio_summary


def file_mapped_model(activations: str) -> cecollm.Model:
    """The default model on the file's own mapping: the copy into huge pages left out."""
    copy = model_module.resident_tensors
    model_module.resident_tensors = lambda tensors: tensors
    try:
        return cecollm.load_model(activations=activations)
    finally:
        model_module.resident_tensors = copy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _core.set_threads(args.threads)
    for activations in ("q8", "f32"):
        models = {"huge pages": cecollm.load_model(activations=activations), "file mapping": file_mapped_model(activations)}
        ids = models["huge pages"].tokenize("The weights stream once per token.")
        assert np.array_equal(*(m.logits(ids) for m in models.values())), "the two copies disagree"
        runs = {name: lambda m=model: greedy_decode(m, m.new_cache(TG), range(TG)) for name, model in models.items()}
        rates = rates_in_turns(runs, TG, args.rounds)
        cells = ", ".join(f"{name} {statistics.median(r):.1f}" for name, r in rates.items())
        summary = ratio_summary(rates["huge pages"], rates["file mapping"])
        print(f"activations {activations}: tg128 tokens/s {cells}; per-round ratio {summary}")
        del models


if __name__ == "__main__":
    main()

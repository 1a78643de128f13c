"""Edge decode speed where exits are taken, against full depth, at the measured agreement: the edge in
standalone mode over all layers (split = n_layers, so the split's exit is the full model) with exits at
the exit-tuned model's trained layers (4, 8, 12, 15), for the original and the exit-tuned model.

For each model and threshold: decode tokens/s of generate_edge (its token loop in C) as a ratio to
Model.generate on the same model (the two take turns in each round; median of the per-round ratios),
the share of tokens decided before the last layer, and agreement: the share of generated tokens equal
to the full model's greedy choice for the same prefix (a separate traced run, trace_full=True).

    .venv/bin/python benchmarks/exits_speed.py [--rounds 5] [--tokens 64] [--prompts 3]
"""

from __future__ import annotations

import argparse
import statistics

import cecollm
from cecollm.datasets import examples
from cecollm.edge import generate_edge
from cecollm.exits import ExitPolicy

EXITS = (4, 8, 12, 15)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--thresholds", default="0.8,0.9,0.95,1.01")
    args = parser.parse_args()
    prompts = [example.prompt for example in examples("instructions", args.prompts)]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    print(f"{'model':9s} {'threshold':>9s} {'exited early':>12s} {'agreement':>9s} {'edge tok/s':>10s} "
          f"{'full tok/s':>10s} {'edge / full':>11s}")  # fmt: skip
    for name in ("smollm2-135m", "smollm2-135m-ee"):
        model = cecollm.load_model(name)
        for threshold in thresholds:
            policy = ExitPolicy(exits=EXITS + (model.n_layers,), split=model.n_layers, thresholds=(threshold,),
                                precheck_rows=4096)  # fmt: skip
            early = agree = total = 0
            for prompt in prompts:
                traces = generate_edge(model, prompt, policy, args.tokens, chat=True, trace_full=True).extra["traces"]
                early += sum(t.exit_layer < model.n_layers for t in traces)
                agree += sum(bool(t.matches_full) for t in traces)
                total += len(traces)
            edge, full, ratios = [], [], []
            for _ in range(args.rounds):
                e = [generate_edge(model, p, policy, args.tokens, chat=True).tokens_per_s for p in prompts]
                f = [model.generate(p, args.tokens, chat=True).tokens_per_s for p in prompts]
                edge.append(statistics.mean(e))
                full.append(statistics.mean(f))
                ratios.append(edge[-1] / full[-1])
            print(f"{name.removeprefix('smollm2-135m') or 'original':9s} {threshold:9.2f} {early / total:12.1%} "
                  f"{agree / total:9.1%} {statistics.median(edge):10.1f} {statistics.median(full):10.1f} "
                  f"{statistics.median(ratios):8.3f} x")  # fmt: skip


if __name__ == "__main__":
    main()

"""What exits cost when they are never taken: the edge in standalone mode with every layer (split =
n_layers) and exits at layers 6, 10, 15, 20 and 25 whose thresholds are above 1, against the same edge
without exits and against Model.generate. All three token loops run in C (ce_generate, ce_edge_generate).
Each figure is the median over --rounds rounds of the runs' own decode tokens/s
(GenerationResult.tokens_per_s), the three taking turns in every round; the ratio is the median of the
per-round ratios to Model.generate (the VM's speed drifts between rounds, less within one); the greedy
tokens are checked identical.

    .venv/bin/python benchmarks/exits_cost.py [--rounds 9] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics

import cecollm
from cecollm.edge import generate_edge
from cecollm.exits import ExitPolicy

PROMPT = "Once upon a time, in a small village by the sea,"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = cecollm.load_model()
    n = model.n_layers
    never = ExitPolicy(exits=(6, 10, 15, 20, 25), split=n, thresholds=(1.01,))
    no_exits = ExitPolicy(exits=(n,), split=n, thresholds=(1.01,))
    runs = {
        "Model.generate": lambda: model.generate(PROMPT, max_new_tokens=args.tokens),
        "edge, no exits": lambda: generate_edge(model, PROMPT, no_exits, max_new_tokens=args.tokens),
        "edge, 5 exits never taken": lambda: generate_edge(model, PROMPT, never, max_new_tokens=args.tokens),
    }
    tokens = {name: run().tokens for name, run in runs.items()}  # warm-up
    assert len({tuple(t) for t in tokens.values()}) == 1, "the three runs must generate the same tokens"
    rates: dict[str, list] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(run().tokens_per_s)
    base = rates["Model.generate"]
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(f"{name:28s} {statistics.median(values):6.1f} tokens/s  {statistics.median(ratios):.3f} x "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()

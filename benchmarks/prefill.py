"""Prefill alone against transformers: pp512 of cecollm (default mode) and of transformers+torch on the
same GGUF, the two taking turns in every round, with the per-round ratio (this VM's speed drifts within
minutes, so a ratio of two runs side by side is steadier than a ratio of medians).

    .venv/bin/python benchmarks/prefill.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import setup_cecollm, setup_transformers

from cecollm.bench import PP
from cecollm.gguf_loader import default_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = default_model_path()
    runs = {"cecollm": setup_cecollm(path, args.threads)["pp512"][1],
            "transformers": setup_transformers(path, args.threads)["pp512"][1]}  # fmt: skip
    for run in runs.values():  # warm-up
        run()
    speeds: dict[str, list] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            speeds[name].append(PP / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(speeds["cecollm"], speeds["transformers"])]
    for name, values in speeds.items():
        print(f"{name:13s} pp512 {statistics.median(values):7.1f} tok/s (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"cecollm / transformers per round: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()

"""Greedy decode steps of the default model in a loop, for a profiler to watch:

    perf record -g python benchmarks/profile_decode.py --activations q8 && perf report --no-children
"""

import argparse
import time

import cecollm
from cecollm import _core
from cecollm.bench import greedy_decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", default="f32", choices=("f32", "q8"))
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _core.set_threads(args.threads)
    model = cecollm.load_model(activations=args.activations)
    cache = model.new_cache(args.steps)
    t0 = time.perf_counter()
    greedy_decode(model, cache, range(args.steps))
    print(f"{args.steps / (time.perf_counter() - t0):.1f} tok/s")


if __name__ == "__main__":
    main()

"""Speed of the engine in llama-bench's terms: pp512 (prompt processing) and tg128 (generation).

pp512 evaluates a 512-token prompt in one batch (logits for its last position only); tg128 decodes
128 tokens one at a time from an empty context (logits every step, greedy pick). Median of
`repeats` runs after a warm-up. benchmarks/bench.py runs the same measurement for the peers.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from . import _core
from .model import Model

PP, TG = 512, 128
DEPTH, TG_DEEP = 2048, 32  # decode at long context: TG_DEEP tokens after a DEPTH-token prompt


def median_time(fn, repeats: int, tick=lambda: None) -> float:
    """The median of `repeats` timed runs after a warm-up; tick() after each run."""
    fn()  # warm-up
    tick()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        tick()
    return statistics.median(times)


def rates_in_turns(runs: dict, tokens: int, rounds: int) -> dict:
    """{name: [tokens/s per round]}: every run of `runs` ({name: fn}) once per round, in turns, after
    a warm-up round, so that the machine's drift between rounds falls on all alike."""
    rates = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            if round_:
                rates[name].append(tokens / (time.perf_counter() - t0))
    return rates


def ratio_summary(new: list, base: list) -> str:
    """The median of per-round ratios new / base, and their range."""
    ratios = [n / b for n, b in zip(new, base)]
    return f"median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def prompt_ids(vocab: int) -> list[int]:
    """A fixed pseudo-random prompt of PP token ids, the same for every engine."""
    return np.random.default_rng(0).integers(100, vocab - 100, PP).tolist()


def greedy_decode(model: Model, cache, positions) -> None:
    """One greedy decode step per position (full logits every step), starting from token 1."""
    token = np.array([1], np.int32)
    for pos in positions:
        token[0] = int(model.core.head(cache.forward(model.core.embed(token), pos))[0].argmax())


def model_runs(model: Model, deep: bool = False) -> dict:
    """{"pp512" | "tg128" (| "tg_deep"): (tokens, run)}: one timed run of each measurement. tg_deep
    decodes TG_DEEP tokens after a DEPTH-token prompt, prefilled here once, untimed (each run
    recomputes the same positions, which drops what the last one wrote)."""
    ids = np.asarray(prompt_ids(model.config["vocab"]), np.int32)

    def pp():
        cache = model.new_cache(PP)
        model.core.head(cache.forward(model.core.embed(ids), 0)[-1:])

    runs = {"pp512": (PP, pp), "tg128": (TG, lambda: greedy_decode(model, model.new_cache(TG), range(TG)))}
    if deep:
        deep_cache = model.new_cache(DEPTH + TG_DEEP)
        deep_cache.forward(model.core.embed(np.resize(ids, DEPTH)), 0)
        runs["tg_deep"] = (TG_DEEP, lambda: greedy_decode(model, deep_cache, range(DEPTH, DEPTH + TG_DEEP)))
    return runs


def bench_model(model: Model, threads: int | None = None, repeats: int = 3, progress: bool = True) -> dict:
    """{"pp512": tokens/s, "tg128": tokens/s, "threads": n, "kernels": name, "activations": mode, "kv_dtype": type}.
    progress: a bar on stderr, one step per run."""
    from .sweep import _progress

    if threads:
        _core.set_threads(threads)
    runs = model_runs(model)
    bar = _progress(len(runs) * (repeats + 1), progress)
    speeds = {name: tokens / median_time(run, repeats, lambda: bar.update(name)) for name, (tokens, run) in runs.items()}
    bar.close()
    return {**speeds, "threads": _core.get_threads(), "kernels": _core.active_kernels(),
            "activations": model.activations, "kv_dtype": model.kv_dtype}  # fmt: skip

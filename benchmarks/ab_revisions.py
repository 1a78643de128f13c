"""Two revisions of cecollm side by side: each revision's extension is built in its own git worktree
(the working tree as it is for "."), then one of cecollm.bench's measurements (pp512, tg128, tg_deep
= tg32 after a 2048-token prompt) runs in fresh processes that alternate between the two, --rounds
times; each process reports the median of --repeats runs after a warm-up. Alternating processes is
how this VM's drift of ±15 % between minutes falls on both alike; the ratio is the median of the
per-round ratios.

    .venv/bin/python benchmarks/ab_revisions.py BASE [NEW] [--run tg128] [--rounds 3] [--repeats 5]
                                                [--activations f32] [--kv-dtype f32] [--threads 2]

BASE and NEW are anything git names (a commit, a tag, HEAD~1), or "." for the working tree (NEW's
default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    """Runs in a fresh process with PYTHONPATH at one revision: prints {"tokens_per_s": median}."""
    import cecollm
    from cecollm import _core
    from cecollm.bench import median_time, model_runs

    _core.set_threads(args.threads)
    model = cecollm.load_model(activations=args.activations, kv_dtype=args.kv_dtype)
    tokens, run = model_runs(model, deep=args.run == "tg_deep")[args.run]
    print(json.dumps({"tokens_per_s": tokens / median_time(run, args.repeats), "kernels": _core.active_kernels()}))


def checkout(rev: str, into: str) -> str:
    """The directory whose cecollm/ package is `rev`, built in place: the working tree for "."."""
    if rev == ".":
        return ROOT
    for cmd, cwd in ((["git", "-C", ROOT, "worktree", "add", "--detach", into, rev], ROOT),
                     ([sys.executable, "setup.py", "build_ext", "--inplace"], into)):  # fmt: skip
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} failed for {rev}:\n{done.stderr[-2000:]}")
    return into


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("new", nargs="?", default=".")
    parser.add_argument("--run", default="tg128", choices=("pp512", "tg128", "tg_deep"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", default="f32", choices=("f32", "q8"))
    parser.add_argument("--kv-dtype", default="f32", choices=("f32", "f16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from cecollm.bench import ratio_summary  # this checkout's; a child imports only its revision's cecollm

    options = ["--run", args.run, "--repeats", str(args.repeats), "--activations", args.activations,
               "--kv-dtype", args.kv_dtype, "--threads", str(args.threads)]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        revs = {args.base: None, args.new: None}
        try:
            for i, rev in enumerate(revs):
                print(f"building {rev} ...", flush=True)
                revs[rev] = checkout(rev, os.path.join(scratch, f"rev{i}"))
            rates = {rev: [] for rev in revs}
            for round_ in range(args.rounds):
                for rev, path in revs.items():
                    env = {**os.environ, "PYTHONPATH": path}
                    out = subprocess.run([sys.executable, __file__, "x", "--child", *options], env=env, check=True,
                                         capture_output=True, text=True).stdout  # fmt: skip
                    rates[rev].append(json.loads(out.splitlines()[-1])["tokens_per_s"])
                print(f"round {round_ + 1}: " + ", ".join(f"{rev} {r[-1]:.1f}" for rev, r in rates.items()), flush=True)
        finally:
            for path in revs.values():
                if path and path != ROOT:
                    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)
    print(f"{args.run} ({args.activations} activations, {args.kv_dtype} KV), tokens/s, median of rounds: "
          + ", ".join(f"{rev} {statistics.median(r):.1f}" for rev, r in rates.items())
          + f"; {args.new} / {args.base} per round: {ratio_summary(rates[args.new], rates[args.base])}")  # fmt: skip


if __name__ == "__main__":
    main()

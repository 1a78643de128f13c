"""Trained exit heads against the default (untrained) ones on held-out text, in one table and one plot,
plus the calibration of the trained gates.

    python benchmarks/exits_trained.py --heads exits.safetensors --out docs/exits_trained
(train first: cecollm train-exits --exits 4,8,12,16 --out exits.safetensors)
"""

from __future__ import annotations

import argparse
import json

import cecollm
from cecollm.exits import load_exit_heads
from cecollm.sweep import SweepResult, eval_text, sweep
from cecollm.train import gate_calibration


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", required=True)
    parser.add_argument("--out", default="docs/exits_trained", help="prefix of the .csv, .png and _calibration.json")
    parser.add_argument("--exits", default="4,8,12,16")
    parser.add_argument("--split", type=int, default=30)
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    parser.add_argument("--gen-tokens", type=int, default=16)
    args = parser.parse_args()

    model = cecollm.load_model()
    heads = load_exit_heads(args.heads, model)
    exits = tuple(int(x) for x in args.exits.split(","))
    thresholds = tuple(float(x) for x in args.thresholds.split(","))
    common = dict(thresholds=thresholds, exit_sets=[exits], splits=(args.split,), gen_tokens=args.gen_tokens,
                  texts=eval_text("test"), progress=False)  # fmt: skip
    result = SweepResult()
    result.rows += sweep(model, label="default", **common).rows
    result.rows += sweep(model, label="trained", exit_heads=heads, **common).rows
    result.rows += sweep(model, label="trained", metric="gate", exit_heads=heads, **common).rows
    result.rows += sweep(model, label="trained+pre-check", exit_heads=heads, precheck_rows=4096, **common).rows
    result.to_csv(args.out + ".csv")
    result.plot(args.out + ".png", title="Default vs trained exit heads (held-out text)")
    print(result.table(keys=("heads", "metric", "thresholds", "agreement_tf", "agreement_gen", "early_exit_fraction",
                             "head_checks_per_token", "decode_tokens_per_s")))  # fmt: skip
    calibration = gate_calibration(model, heads, exits, eval_text("test"))
    with open(args.out + "_calibration.json", "w") as f:
        json.dump(calibration, f, indent=1)
    print("\ngate calibration on held-out text (exit, bin, count, predicted, observed):")
    for row in calibration:
        print(f"  {row['exit']:>3} {row['bin']}  n={row['count']:>4}  predicted {row['predicted']:.3f}"
              f"  observed {row['observed']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

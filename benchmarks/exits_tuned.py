"""The exit-tuning targets, measured: collaborative mode (paper's lossy mode) on held-out instructions.

Per model variant (original exits, trained exit adapters, the exit-tuned model) and threshold:
- edge share: tokens finished at an edge exit (the split's own exit included), the rest by the cloud;
- ROUGE-L F1 of the collaborative output against the same model's cloud-only output (`rouge-score`),
  and the share of outputs identical to it;
- time per token on the emulated link (compute measured, network accounted);
per variant: the split exit's teacher-forced top-1 agreement with full depth on the cloud-only
outputs, and full-depth perplexity on the shipped human-written held-out text.

    .venv/bin/python benchmarks/exits_tuned.py --n 100 --tokens 100 --out docs/exits_tuned
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import numpy as np

import cecollm
from cecollm.client import LocalLink, NetworkModel, generate_collab
from cecollm.cloud import Cloud
from cecollm.datasets import instructions, user_message
from cecollm.exits import ExitPolicy, load_exit_heads
from cecollm.sweep import eval_text


def perplexity(model, texts) -> float:
    nll, n = 0.0, 0
    for text in texts:
        ids = model.tokenize(text)
        z = model.logits(ids)[:-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(-1))
        nll -= logp.sum()
        n += len(ids) - 1
    return float(np.exp(nll / n))


def split_agreement(model, runs, split: int, head) -> float:
    """Teacher-forced on (prompt ids, answer ids): how often the split exit's top-1 equals full depth's."""
    same = total = 0
    for prompt, answer in runs:
        ids = np.asarray(prompt + answer, np.int32)
        if not answer:
            continue
        cache = model.new_cache(len(ids))
        h = cache.forward(model.core.embed(ids), 0, 0, split)
        exit_top = head.logits(model, h[len(prompt) - 1 : -1]).argmax(-1)
        full = cache.forward(h, 0, split, model.n_layers)
        full_top = model.core.head(full[len(prompt) - 1 : -1]).argmax(-1)
        same += int((exit_top == full_top).sum())
        total += len(exit_top)
    return same / max(total, 1)


def run_variant(name, model, exits, heads, prompts, tokens, thresholds, split, network, rows, progress=True):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    reference = [model.generate(p, max_new_tokens=tokens, chat=True) for p in prompts]
    runs = [(r.prompt_tokens, r.tokens) for r in reference]
    policy0 = ExitPolicy(exits=exits, split=split, exit_heads=heads)
    info = {"variant": name, "split_agreement": split_agreement(model, runs, split, policy0.head(split)),
            "perplexity": perplexity(model, eval_text("test"))}  # fmt: skip
    print(json.dumps(info), flush=True)
    cloud = Cloud(model, split=split)
    for t in thresholds:
        policy = ExitPolicy(exits=exits, split=split, thresholds=(t,), exit_heads=heads)
        edge = total = same = 0
        rouge, seconds = [], 0.0
        t0 = time.perf_counter()
        for prompt, ref in zip(prompts, reference):
            r = generate_collab(model, prompt, policy, lambda: LocalLink(cloud, NetworkModel(*network)),
                                max_new_tokens=tokens, dtype="f16", chat=True)  # fmt: skip
            sources = [tr.source for tr in r.extra["traces"]]
            edge += sources.count("edge")
            total += len(sources)
            same += r.tokens == ref.tokens
            rouge.append(scorer.score(ref.text, r.text)["rougeL"].fmeasure if ref.text.strip() else float(r.text == ref.text))
            seconds += r.extra["edge_s"] + r.extra["cloud_s"] + r.extra["network_s"]
        row = {**info, "threshold": t, "edge_share": edge / max(total, 1), "rougeL": float(np.mean(rouge)),
               "identical": same / len(prompts), "ms_per_token": 1e3 * seconds / max(total, 1),
               "tokens": total, "prompts": len(prompts), "wall_s": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)


def plot(rows, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = [r for r in rows if r["variant"] == name and r["threshold"] <= 1]
        ax.plot([r["edge_share"] for r in pts], [r["rougeL"] for r in pts], "o-", label=name)
        for r in pts:
            ax.annotate(f"{r['threshold']:g}", (r["edge_share"], r["rougeL"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    ax.axhline(0.90, color="grey", lw=0.8, ls="--")
    ax.axvline(0.50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tokens finished at the edge (share)")
    ax.set_ylabel("ROUGE-L F1 vs the same model's cloud-only output")
    ax.set_title("Collaborative mode, held-out instructions (labels: threshold)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99,1.1")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--variants", default="original,adapters,tuned")
    ap.add_argument("--tuned", default="smollm2-135m-ee", help="preset name or GGUF of the tuned model")
    ap.add_argument("--adapters", default="docs/exits4.safetensors")
    ap.add_argument("--out", default="docs/exits_tuned")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT.json (other variants)")
    args = ap.parse_args()
    prompts = [user_message(item) for item in instructions("eval")[: args.n]]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    network = (12.5e6, 0.02)  # 100 Mbit/s, 20 ms RTT
    rows: list[dict] = []
    if args.append:
        with open(args.out + ".json") as f:
            rows = json.load(f)
    variants = args.variants.split(",")
    if "original" in variants or "adapters" in variants:
        base = cecollm.load_model()
        if "original" in variants:
            run_variant("original", base, (4, 8, 12, 15), {}, prompts, args.tokens, thresholds, args.split, network, rows)
        if "adapters" in variants:
            heads = {e: h for e, h in load_exit_heads(args.adapters, base).items() if e < args.split}
            exits = tuple(sorted(heads)) + (args.split,)
            run_variant("adapters", base, exits, heads, prompts, args.tokens, thresholds, args.split, network, rows)
    if "tuned" in variants:
        tuned = cecollm.load_model(args.tuned)
        exits = ExitPolicy.for_model(tuned, args.split).exits
        run_variant("tuned", tuned, exits, {}, prompts, args.tokens, thresholds, args.split, network, rows)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args.out + ".png")


if __name__ == "__main__":
    main()

"""The paper's evaluation at our scale (docs/paper.md): schemes × data sets on the default link, the
naive split on fewer prompts (it recomputes the whole context for every token), an RTT sweep, and
the original model's exits beside the exit-tuned model's. Rows are saved after each grid (resumable:
grids already in OUT.json are skipped), then the figures are drawn. Grids share computations: a
(scheme, prompt) computed once is reused by every grid that needs it.

    .venv/bin/python benchmarks/paper.py --out docs/paper       # about an hour on this 2-core machine
    .venv/bin/python benchmarks/paper.py --n 4 --tokens 16 --out /tmp/paper   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

from cecollm.experiments import Results, grid, plot, run_grid


def grids(n: int, n_naive: int, n_rtt: int, n_original: int, tokens: int) -> dict:
    both = ("instructions", "summaries")
    return {
        "main": grid(["cloud", "edge", "collab", "verify"], datasets=both, n=n, tokens=tokens),
        "naive": grid(["cloud", "naive"], datasets=both, n=n_naive, tokens=tokens),
        "rtt": grid(["cloud", "naive", "collab", "verify"], thresholds=(0.8,), rtts=(0.0, 0.02, 0.05, 0.1),
                    n=n_rtt, tokens=tokens),  # fmt: skip
        "original": grid(["cloud", "collab"], models=("smollm2-135m",), n=n_original, tokens=tokens),
        # issue 13: latency-aware exits (threshold 0.8 met at a cloud cost equal to the budget) vs fixed thresholds
        # the exits' cheap candidate pre-check (off by default): what exit checks cost
        "precheck": grid(["cloud", "collab"], thresholds=(0.8, 1.0), n=n, tokens=tokens, precheck_rows=4096),
        # the paper's schemes on the naive split's prompts, for a like-for-like communication table
        "naive_compare": grid(["collab", "verify"], datasets=both, n=n_naive, tokens=tokens),
        "latency": grid(["cloud", "collab"], thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), rtts=(0.02, 0.1), n=n_rtt,
                        tokens=tokens)  # fmt: skip
        + grid(["collab"], thresholds=(0.8,), latency_budgets=(0.01, 0.02, 0.04, 0.08), rtts=(0.02, 0.1),
               n=n_rtt, tokens=tokens),  # fmt: skip
    }


# table columns: header -> how a row's cell reads
COLUMNS = {
    "data set": lambda r: r["dataset"],
    "scheme": lambda r: r["scheme"],
    "model": lambda r: r["model"],
    "RTT ms": lambda r: f"{r['rtt_s'] * 1e3:g}",
    "ms/token": lambda r: f"{r['time_per_token_s'] * 1e3:.1f}",
    "tokens at the edge": lambda r: f"{r['edge_token_share']:.1%}",
    "cloud work offloaded": lambda r: f"{r['cloud_work_offloaded']:.1%}",
    "MB up / down": lambda r: f"{r['bytes_up'] / 1e6:.2f} / {r['bytes_down'] / 1e6:.3f}",
    "MB up": lambda r: f"{r['bytes_up'] / 1e6:.3f}",
    "round trips": lambda r: str(r["round_trips"]),
    "ROUGE-1/2/L": lambda r: f"{r['rouge1']:.3f} / {r['rouge2']:.3f} / {r['rougeL']:.3f}",
    "ROUGE-L vs refs": lambda r: f"{r['rougeL']:.3f}",
    "chrF": lambda r: f"{r['chrf']:.1f}",
    "ROUGE-L vs cloud-only": lambda r: f"{r['rougeL_vs_cloud']:.3f}",
    "identical to cloud-only": lambda r: f"{r['identical_to_cloud']:.0%}",
}


def fmt(rows: list[dict], headers: list[str], extra: dict | None = None) -> str:
    """A markdown table of rows with the named COLUMNS (and extra ones: header -> formatter)."""
    cols = {**COLUMNS, **(extra or {})}
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cols[h](r) for h in headers) + " |" for r in rows]
    return "\n".join(out)


def tables(done: dict) -> str:
    """docs/paper.md's tables, in markdown, from OUT.json."""
    text = []
    main_rows = done["main"]["rows"]
    for ds in ("instructions", "summaries"):
        rows = [r for r in main_rows if r["dataset"] == ds]
        cloud = next(r for r in rows if r["scheme"] == "cloud")
        text.append(f"### {ds} ({rows[0]['prompts']} prompts, {rows[0]['tokens'] / rows[0]['prompts']:.0f} tokens each on average, "
                    f"RTT {rows[0]['rtt_s'] * 1e3:g} ms, 100 Mbit/s)\n")  # fmt: skip
        vs_cloud = {"vs cloud-only": lambda r: f"{r['time_per_token_s'] / cloud['time_per_token_s'] - 1:+.1%}"}
        text.append(fmt(rows, ["scheme", "ms/token", "vs cloud-only", "tokens at the edge", "cloud work offloaded",
                               "MB up / down", "ROUGE-1/2/L", "chrF", "ROUGE-L vs cloud-only",
                               "identical to cloud-only"], vs_cloud))  # fmt: skip
        text.append("")
    compare = done.get("naive", {"rows": []})["rows"] + done.get("naive_compare", {"rows": []})["rows"]
    if compare:
        text.append(f"### Communication and time, the naive split's {compare[0]['prompts']} prompts per data set\n")
        text.append(fmt(compare, ["data set", "scheme", "ms/token", "MB up", "round trips", "cloud work offloaded",
                                  "identical to cloud-only"]))  # fmt: skip
        text.append("")
    for name, title in (("precheck", "Exit checks with the candidate pre-check (instructions)"),
                        ("rtt", "Time per token against RTT (instructions)"), ("original", "The original model's exits"),
                        ("latency", "Latency-aware exits vs fixed thresholds (instructions)")):  # fmt: skip
        if name not in done:
            continue
        text.append(f"### {title}, {done[name]['rows'][0]['prompts']} prompts\n")
        identical = {"identical": COLUMNS["identical to cloud-only"]}
        text.append(fmt(done[name]["rows"], ["scheme", "model", "RTT ms", "ms/token", "tokens at the edge",
                                             "ROUGE-L vs refs", "ROUGE-L vs cloud-only", "identical"], identical))  # fmt: skip
        text.append("")
    return "\n".join(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-naive", type=int, default=10)
    ap.add_argument("--n-rtt", type=int, default=10, help="prompts of the RTT and latency-aware grids")
    ap.add_argument("--n-original", type=int, default=30, help="prompts of the original model's grid")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--out", default="docs/paper")
    ap.add_argument("--tables", action="store_true", help="print docs/paper.md's tables from OUT.json and stop")
    args = ap.parse_args()
    if args.tables:
        with open(args.out + ".json") as f:
            print(tables(json.load(f)["grids"]))
        return
    done, cache = {}, {}  # grids share computations (cloud-only, naive, the default link's runs)
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            done = json.load(f)["grids"]
    for name, settings in grids(args.n, min(args.n_naive, args.n), min(args.n_rtt, args.n), min(args.n_original, args.n), args.tokens).items():
        if name in done:
            continue
        t0 = time.perf_counter()
        res = run_grid(settings, cache=cache)
        done[name] = {"rows": res.rows, "wall_s": time.perf_counter() - t0}
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "grids": done}, f, indent=1)
        print(f"{name}: {len(res.rows)} rows in {done[name]['wall_s']:.0f} s", flush=True)
    rows = [dict(r, grid=g) for g, d in done.items() for r in d["rows"]]
    Results(rows).to_csv(args.out + ".csv")
    plot([r for r in rows if r["grid"] in ("main", "naive", "rtt")], args.out + ".png")
    if "latency" in done:
        plot_latency(done["latency"]["rows"], args.out + "_latency.png")


def plot_latency(rows, path):
    """Per RTT: time per token against agreement with cloud-only, fixed thresholds vs latency budgets."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for rtt, color in zip(sorted({r["rtt_s"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
        for aware, marker in ((False, "o-"), (True, "s--")):
            pts = sorted((r for r in rows if r["rtt_s"] == rtt and r["scheme"] != "cloud"
                          and (r["latency_budget_s"] is not None) == aware), key=lambda r: r["time_per_token_s"])  # fmt: skip
            ax.plot([1e3 * r["time_per_token_s"] for r in pts], [r["rougeL_vs_cloud"] for r in pts], marker,
                    color=color, label=f"RTT {rtt * 1e3:g} ms, {'latency budget' if aware else 'fixed threshold'}")  # fmt: skip
            for r in pts:
                tag = f"{r['latency_budget_s'] * 1e3:g}ms" if aware else f"{r['threshold']:g}"
                ax.annotate(tag, (1e3 * r["time_per_token_s"], r["rougeL_vs_cloud"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        cloud = [r for r in rows if r["rtt_s"] == rtt and r["scheme"] == "cloud"]
        if cloud:
            ax.axvline(1e3 * cloud[0]["time_per_token_s"], color=color, lw=0.8, ls=":")
    ax.set_xlabel("ms per token (dotted: cloud-only)")
    ax.set_ylabel("ROUGE-L F1 vs cloud-only output")
    ax.set_title("Paper's mode: latency-aware exits vs fixed thresholds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

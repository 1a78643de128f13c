"""Accuracy sweeps of early-exit policies: what each setting costs in agreement with the full model.

Teacher-forced statistics come from one pass over the text per exit layer: with catch-up, the edge's
KV cache equals the full model's, so the hidden state at every layer is exactly what a plain forward
pass computes, and every policy can be scored from the same per-layer confidences. Free greedy
generation and decode speed are measured by actually generating with each policy.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .edge import generate_edge
from .exits import GATE, METRICS, ExitPolicy
from .model import Model

SWEEP_PROMPTS = (
    "The history of the bicycle begins",
    "Here is a short recipe for tomato soup:",
    "def merge_sorted(a, b):",
)


def eval_text(split: str = "test") -> list[str]:
    """Paragraphs of the shipped evaluation text (written for cecollm, CC0); split "train" or "test"."""
    raw = resources.files("cecollm").joinpath("data/evaltext.txt").read_text(encoding="utf-8")
    splits: dict[str, list[str]] = {}
    current = None
    for block in raw.split("\n\n"):
        lines = [ln for ln in block.strip("\n").split("\n") if not ln.startswith("# ")]
        if lines and lines[0].startswith("## split:"):
            current = lines[0].split(":", 1)[1].strip()
            lines = lines[1:]
        text = "\n".join(lines).strip("\n")
        if text and current:
            splits.setdefault(current, []).append(text)
    if split not in splits:
        raise ValueError(f"no split {split!r} in the evaluation text (have {sorted(splits)})")
    return splits[split]


@dataclass
class LayerStats:
    """Per position of a text: at each exit layer, confidence per metric, top-1, log p(next token)."""

    layers: list[int]
    confidence: dict  # metric -> (n_layers, n_positions)
    top1: np.ndarray  # (n_layers, n_positions)
    logprob: np.ndarray  # (n_layers, n_positions): log-probability of the true next token
    full_top1: np.ndarray  # (n_positions,)
    full_logprob: np.ndarray  # (n_positions,)
    precheck_bound: np.ndarray | None = None  # (n_layers, n_positions): candidate-head max_prob, if asked


def _log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z[np.arange(len(ids)), ids] - np.log(np.exp(z).sum(-1))


def collect_layer_stats(model: Model, texts: list[str], layers, exit_heads: dict | None = None,
                        precheck_rows: int | None = None) -> LayerStats:  # fmt: skip
    """Runs each text through the model once, reading the exit heads at every layer in `layers`
    (and, with precheck_rows, the candidate head's bound; with gated heads, the gates' chain)."""
    from . import _core
    from .exits import ExitHead

    layers = sorted(set(int(x) for x in layers))
    exit_heads = exit_heads or {}
    metrics = list(METRICS) + ([GATE] if any(h.gate_w is not None for h in exit_heads.values()) else [])
    conf = {m: [[] for _ in layers] for m in metrics}
    top1, logprob = [[] for _ in layers], [[] for _ in layers]
    full_top1, full_logprob, bound = [], [], [[] for _ in layers]
    for text in texts:
        ids = np.asarray(model.tokenize(text), np.int32)
        if len(ids) < 2:
            continue
        targets = ids[1:]
        cache = model.new_cache(len(ids))
        hidden, done, gate = model.core.embed(ids), 0, np.zeros(len(ids) - 1)
        for i, layer in enumerate(layers):
            hidden = cache.forward(hidden, 0, done, layer) if layer > done else hidden
            done = layer
            head = exit_heads.get(layer) or ExitHead()
            logits = head.logits(model, hidden[:-1])
            for metric, code in METRICS.items():
                c, t = _core.confidence(logits, code)
                conf[metric][i].append(c)
            if GATE in conf:  # the chain of gates: each sees the previous exit's probability
                gate = head.gate(hidden[:-1], gate) if head.gate_w is not None else np.zeros_like(gate)
                conf[GATE][i].append(gate.astype(np.float32))
            top1[i].append(t)
            logprob[i].append(_log_softmax_at(logits, targets))
            if precheck_rows:
                bound[i].append(_core.confidence(logits[:, :precheck_rows], _core.METRIC_MAX_PROB)[0])
        if done < model.n_layers:
            hidden = cache.forward(hidden, 0, done, model.n_layers)
        logits = model.core.head(hidden[:-1])
        full_top1.append(logits.argmax(-1))
        full_logprob.append(_log_softmax_at(logits, targets))
    stack = lambda rows: np.stack([np.concatenate(r) for r in rows])  # noqa: E731
    return LayerStats(
        layers=layers,
        confidence={m: stack(v) for m, v in conf.items()},
        top1=stack(top1),
        logprob=stack(logprob),
        full_top1=np.concatenate(full_top1),
        full_logprob=np.concatenate(full_logprob),
        precheck_bound=stack(bound) if precheck_rows else None,
    )


def score_policy(stats: LayerStats, policy: ExitPolicy) -> dict:
    """Teacher-forced scores of a policy in standalone mode (tokens that pass no exit finish at the split)."""
    n = len(stats.full_top1)
    row = {layer: i for i, layer in enumerate(stats.layers)}
    chosen = np.full(n, row[policy.split])
    decided = np.zeros(n, bool)
    checks = np.zeros(n)
    for exit_layer, threshold in zip(policy.exits, policy.thresholds):
        if exit_layer == policy.split or threshold > 1:
            continue
        i = row[exit_layer]
        passes = stats.confidence[policy.metric][i] >= threshold
        if policy.metric == GATE:  # the head runs only for the exit taken
            checks += ~decided & passes
        elif policy.precheck_rows is not None:  # a failed pre-check skips the full head
            if stats.precheck_bound is None:
                raise ValueError("score a pre-check policy on statistics collected with precheck_rows")
            hopeful = stats.precheck_bound[i] >= threshold
            passes &= hopeful
            checks += ~decided & hopeful
        else:
            checks += ~decided
        take = ~decided & passes
        chosen[take] = i
        decided |= take
    checks += ~decided  # the split's own head
    cols = np.arange(n)
    exit_layer_of = np.array(stats.layers)[chosen]
    out = {
        "agreement_tf": float(np.mean(stats.top1[chosen, cols] == stats.full_top1)),
        "perplexity": float(np.exp(-np.mean(stats.logprob[chosen, cols]))),
        "full_perplexity": float(np.exp(-np.mean(stats.full_logprob))),
        "early_exit_fraction": float(np.mean(exit_layer_of < policy.split)),
        "mean_exit_layer": float(np.mean(exit_layer_of)),
        "head_checks_per_token": float(np.mean(checks)),
        "positions": int(n),
    }
    for exit_layer in policy.exits:
        out[f"frac_exit_{exit_layer}"] = float(np.mean(exit_layer_of == exit_layer))
    if policy.split not in policy.exits:
        out[f"frac_exit_{policy.split}"] = float(np.mean(exit_layer_of == policy.split))
    return out


def score_generation(model: Model, policy: ExitPolicy, prompts, max_new_tokens: int) -> dict:
    """Free greedy generation: agreement with the full model's choice on the same prefix, edge work,
    and decode speed (from a second, untraced run)."""
    agree, layers, checks, skipped, steps, decode_s = [], [], [], [], 0, 0.0
    for prompt in prompts:
        traced = generate_edge(model, prompt, policy, max_new_tokens=max_new_tokens, trace_full=True)
        traces = traced.extra["traces"]
        agree += [t.matches_full for t in traces]
        layers += [t.layers_run for t in traces[1:]]
        checks += [t.head_checks for t in traces[1:]]
        skipped += [t.prechecks_skipped for t in traces[1:]]
        timed = generate_edge(model, prompt, policy, max_new_tokens=max_new_tokens)
        steps += timed.decode_steps
        decode_s += timed.decode_s
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return {
        "agreement_gen": mean(agree),
        "layers_run_per_token": mean(layers),
        "gen_head_checks_per_token": mean(checks),
        "prechecks_skipped_per_token": mean(skipped),
        "decode_tokens_per_s": steps / decode_s if decode_s else 0.0,
    }


@dataclass
class SweepResult:
    """One row per configuration."""

    rows: list[dict] = field(default_factory=list)

    def to_csv(self, path=None) -> str:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        if path:
            with open(path, "w", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()

    def to_json(self, path=None) -> str:
        text = json.dumps(self.rows, indent=1)
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    def plot(self, path=None, title: str = "Early exits: agreement vs tokens exited early"):
        """Left: agreement with the full model against the fraction of tokens exited before the split,
        each point labelled with its threshold; right: the cost, mean layers run per token (teacher-forced
        exit layer), against the same agreement. Returns the matplotlib Figure (the backend is left
        alone, so it shows inline in a notebook); writes it to `path` when given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2))
        ax, ax_cost = fig.subplots(1, 2)
        groups: dict[str, list[dict]] = {}
        for r in self.rows:
            label = f"exits {r['exits']} split {r['split']}"
            if r.get("heads"):
                label = f"{r['heads']} heads, {r['metric']}, {label}"
            groups.setdefault(label, []).append(r)
        for label, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["early_exit_fraction"])
            line = ax.plot([r["early_exit_fraction"] for r in rows], [r["agreement_tf"] for r in rows], "o-", label=label)
            ax_cost.plot([r["mean_exit_layer"] for r in rows], [r["agreement_tf"] for r in rows], "o-",
                         color=line[0].get_color())  # fmt: skip
            for r in rows:
                for a, x in ((ax, r["early_exit_fraction"]), (ax_cost, r["mean_exit_layer"])):
                    a.annotate(f"{r['thresholds']:g}", (x, r["agreement_tf"]), fontsize=7, xytext=(3, 3),
                               textcoords="offset points")  # fmt: skip
        ax.set_xlabel("fraction of tokens exited before the split")
        ax.set_ylabel("top-1 agreement with the full model (teacher-forced)")
        ax.set_title(title, fontsize=10)
        ax_cost.set_xlabel("cost: mean layers run per token (labels: threshold)")
        ax_cost.set_ylabel("top-1 agreement with the full model")
        for a in (ax, ax_cost):
            a.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def table(self, keys=("exits", "split", "thresholds", "agreement_tf", "agreement_gen", "early_exit_fraction",
                          "perplexity", "decode_tokens_per_s")) -> str:  # fmt: skip
        keys = [k for k in keys if any(k in r for r in self.rows)]
        cells = [[_fmt(r.get(k, "")) for k in keys] for r in self.rows]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def sweep(
    model: Model,
    thresholds=(0.5, 0.7, 0.8, 0.9, 0.95),
    exit_sets=((6, 10), (4, 8, 12)),
    splits=(15,),
    metric: str = "max_prob",
    texts: list[str] | None = None,
    gen_prompts=SWEEP_PROMPTS,
    gen_tokens: int = 32,
    precheck_rows: int | None = None,
    exit_heads: dict | None = None,
    label: str | None = None,
    progress: bool = True,
    ray: str | bool | None = None,
    workers: int = 2,
) -> SweepResult:
    """Scores every (exit set, threshold, split) configuration; returns a tidy table.

    ray: None (this process), True (a local Ray cluster of `workers` actors) or a cluster address:
    the generation scores, one configuration per work item, run on the cluster, each actor loading
    the model once (the model must come from load_model); rows equal the serial run's except the
    measured decode speed.

    >>> result = sweep(model, thresholds=(0.8, 0.9), exit_sets=[(6, 10)], gen_tokens=16)  # doctest: +SKIP
    >>> result.to_csv("sweep.csv"); result.plot("sweep.png")                               # doctest: +SKIP
    """
    texts = eval_text("test") if texts is None else texts
    configs = [(tuple(e), float(t), int(s)) for e, t, s in itertools.product(exit_sets, thresholds, splits)
               if all(x <= s for x in e)]  # fmt: skip
    if not configs:
        raise ValueError("no configuration has all its exits inside the split")
    layers = {x for e, _, s in configs for x in (*e, s)}
    bar = _progress(len(configs) + 1, progress)
    stats = collect_layer_stats(model, texts, layers, exit_heads, precheck_rows)
    bar.update("teacher-forced statistics")
    policies = [ExitPolicy(exits=exits, split=split, thresholds=(threshold,), metric=metric,
                           precheck_rows=precheck_rows, exit_heads=dict(exit_heads or {}))
                for exits, threshold, split in configs]  # fmt: skip
    generation = [{}] * len(policies)
    if gen_tokens and ray:
        from .cluster import run_ordered

        if not hasattr(model, "source"):
            raise ValueError("a sweep on Ray needs a model from load_model (its workers load the same)")
        spec = (model.source, model.activations, model.kv_dtype)
        generation = run_ordered(_GenerationScorer, spec, "score", [(p, tuple(gen_prompts), gen_tokens) for p in policies],
                                 address=ray, workers=workers, on_done=lambda: bar.update("generation"))  # fmt: skip
    result = SweepResult()
    for (exits, threshold, split), policy, gen in zip(configs, policies, generation):
        row = {"exits": ",".join(map(str, exits)), "split": split, "thresholds": threshold, "metric": metric}
        if label:
            row = {"heads": label, **row}
        row.update(score_policy(stats, policy))
        if gen_tokens:
            row.update(gen or score_generation(model, policy, gen_prompts, gen_tokens))
        result.rows.append(row)
        if not ray:
            bar.update(f"exits {row['exits']} t={threshold}")
    bar.close()
    return result


class _GenerationScorer:
    """A Ray actor: loads the model once, scores policies' free generation (one thread)."""

    def __init__(self, source, activations: str, kv_dtype: str):
        from . import _core
        from .model import load_model

        _core.set_threads(1)
        self.model = load_model(source, activations, kv_dtype)

    def score(self, policy: ExitPolicy, prompts, max_new_tokens: int) -> dict:
        return score_generation(self.model, policy, prompts, max_new_tokens)


class _progress:
    """A progress bar: tqdm.auto's (a widget in Jupyter, a line on stderr elsewhere) when tqdm is
    installed, else a counter line on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, disable=not enabled)
        except ImportError:
            self.bar = None

    def update(self, label: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r[{self.done}/{self.total}] {label} ({time.perf_counter() - self.t0:.0f} s)", end="", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)

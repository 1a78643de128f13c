"""The paper's evaluation as a scriptable harness: schemes × data sets × links × splits × models.

Schemes (one row each per grid cell):
- "cloud": cloud-only. The prompt goes up as text, the cloud runs the full model and streams tokens
  back (network: the prompt's bytes one way, one token frame back; the rest streams during compute).
- "edge": edge standalone. Layers [0, split); every token finishes at the split's exit.
- "naive": a split with no context manager and no exits. Each token re-sends the whole context's
  split states (fp32) and the cloud recomputes its layers over all of them.
- "collab": CE-CoLLM (the paper's mode), one row per threshold: confident tokens exit at the edge,
  the rest go to the cloud, which keeps the context; hidden states cross in the wire dtype.
- "verify": cecollm's lossless mode: the cloud verifies blocks of edge drafts (speculate="auto").

Time is compute measured on this machine (it plays both sides) plus network time from the link
model (bandwidth, RTT) and the bytes each scheme sends: deterministic, so a grid can be swept in one
process. Work is counted in layer-positions (one position through one layer): `cloud_layer_share`
is the cloud's part of all the work, `cloud_work_offloaded` = 1 − cloud work / cloud-only's work for
the same outputs, the paper's "cloud workload offloaded".

Quality: ROUGE-1/2/L/Lsum F1 (`rouge-score`, best over a data set's references, sentences split
here) and corpus chrF (`sacrebleu`) against the references; agreement with the same model's
cloud-only output (ROUGE-L and identical outputs).

>>> res = run_grid(grid(["cloud", "collab"], datasets=["instructions"], n=4, tokens=16))  # doctest: +SKIP
>>> res.to_dataframe()                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .datasets import DATASETS, examples

SCHEMES = ("cloud", "edge", "naive", "collab", "verify")
DEFAULT_MODEL = "smollm2-135m-ee"
# fields of a row that are measured times: they differ between runs, everything else is deterministic
TIMING_FIELDS = ("time_per_token_s", "total_time_s", "compute_s", "network_s", "wall_s")


@dataclass(frozen=True)
class Setting:
    """One cell of the grid. exits=None: the model's own exits (ExitPolicy.for_model)."""

    scheme: str
    dataset: str = "instructions"
    model: str = DEFAULT_MODEL
    threshold: float | None = None  # "collab" only
    latency_budget: float | None = None  # "collab": latency-aware exits, seconds per token (ExitPolicy)
    precheck_rows: int | None = None  # "collab": the exits' cheap candidate pre-check (ExitPolicy)
    rtt: float = 0.02  # seconds
    bandwidth: float = 12.5e6  # bytes/s each way (100 Mbit/s)
    split: int = 15
    exits: tuple[int, ...] | None = None
    exit_heads: str | None = None  # a trained exit-head file (`cecollm train-exits`) read at the exits it has
    dtype: str = "f16"  # wire dtype of hidden states ("collab", "verify")
    speculate: int | str = "auto"  # "verify": block size; "auto" picks it from measured times (so its
    # round trips and bytes vary from run to run; its output does not)
    n: int = 100
    tokens: int = 100

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r} (have {', '.join(SCHEMES)})")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r} (have {', '.join(DATASETS)})")
        if (self.scheme == "collab") != (self.threshold is not None):
            raise ValueError("a threshold goes with the collab scheme, and only with it")
        if self.latency_budget is not None and (self.scheme != "collab" or not self.latency_budget > 0):
            raise ValueError("a latency budget (> 0 s) goes with the collab scheme only")
        if self.precheck_rows is not None and self.scheme != "collab":
            raise ValueError("precheck_rows goes with the collab scheme only")
        if self.rtt < 0 or self.bandwidth <= 0 or self.n < 1 or self.tokens < 1:
            raise ValueError("rtt >= 0, bandwidth > 0, n >= 1 and tokens >= 1")

    @property
    def label(self) -> str:
        if self.scheme != "collab":
            return self.scheme
        budget = f" budget {self.latency_budget * 1e3:g}ms" if self.latency_budget else ""
        precheck = " precheck" if self.precheck_rows else ""
        return f"collab@{self.threshold:g}{budget}{precheck}"

    def compute_key(self) -> Setting:
        """The setting with the fields its computation does not depend on reset: cloud, edge and
        naive runs are computed once and their network time is derived per link."""
        if self.scheme != "verify":
            self = replace(self, speculate=0)
        if self.scheme == "cloud":
            return replace(self, rtt=0.0, bandwidth=1.0, split=0, exits=(), exit_heads=None, dtype="")
        if self.scheme == "edge":
            return replace(self, rtt=0.0, bandwidth=1.0, dtype="")
        if self.scheme == "naive":
            return replace(self, rtt=0.0, bandwidth=1.0, exits=(), exit_heads=None, dtype="f32")
        return self


def grid(schemes=("cloud", "edge", "naive", "collab"), thresholds=(0.8, 0.9, 1.0), datasets=("instructions",),
         models=(DEFAULT_MODEL,), rtts=(0.02,), bandwidths=(12.5e6,), splits=(15,), exits=None, dtypes=("f16",),
         n: int = 100, tokens: int = 100, speculate: int | str = "auto",
         latency_budgets=(None,), precheck_rows: int | None = None, exit_heads=(None,)) -> list[Setting]:  # fmt: skip
    """Every combination, in a stable order; "collab" gives one setting per threshold and latency budget."""
    settings = []
    for dataset, model, heads, rtt, bw, split, dtype, scheme in itertools.product(datasets, models, exit_heads, rtts,
                                                                                  bandwidths, splits, dtypes, schemes):  # fmt: skip
        collab = scheme == "collab"
        for t, budget in itertools.product(thresholds if collab else (None,), latency_budgets if collab else (None,)):
            settings.append(Setting(scheme, dataset, model, t, budget, precheck_rows if collab else None, rtt, bw,
                                    split, tuple(exits) if exits else None, heads if scheme != "cloud" else None,
                                    dtype, speculate if scheme == "verify" else 0, n, tokens))  # fmt: skip
    return list(dict.fromkeys(settings))


# ---- running one prompt ----
class Worker:
    """Runs (setting, prompt) units; loads each model once. A Ray actor wraps one of these."""

    def __init__(self, threads: int | None = None):
        if threads:
            from . import _core

            _core.set_threads(threads)
        self.models: dict = {}

    def model(self, name: str):
        if name not in self.models:
            from .model import load_model

            self.models[name] = load_model(None if name == "default" else name)
        return self.models[name]

    def policy(self, s: Setting, model):
        from .exits import ExitPolicy, load_exit_heads

        heads = {e: h for e, h in load_exit_heads(s.exit_heads, model).items() if e < s.split} if s.exit_heads else {}
        exits = s.exits if s.exits is not None else tuple(heads) or ExitPolicy.for_model(model, s.split).exits
        threshold = s.threshold if s.threshold is not None else 2.0  # > 1: no exit below the split fires
        return ExitPolicy(exits=tuple(e for e in exits if e < s.split) + (s.split,), split=s.split,
                          thresholds=(threshold,), latency_budget_s=s.latency_budget,
                          precheck_rows=s.precheck_rows, exit_heads=heads)  # fmt: skip

    def run(self, key: Setting, prompt: str) -> dict:
        """One prompt under one computation setting: tokens, work, bytes and times (see module doc)."""
        model = self.model(key.model)
        run = {"cloud": self._cloud, "edge": self._edge, "naive": self._naive}.get(key.scheme, self._collab)
        return run(key, model, prompt)

    def _cloud(self, s, model, prompt):
        t0 = time.perf_counter()
        r = model.generate(prompt, max_new_tokens=s.tokens, chat=True)
        compute = time.perf_counter() - t0
        positions = len(r.prompt_tokens) + len(r.tokens) - 1  # the last token is never fed
        return _record(r, compute_s=compute, bytes_up=len(model.chat_prompt(prompt).encode()) + 64,
                       bytes_down=16 * len(r.tokens), round_trips=1, edge_tokens=0, edge_work=0,
                       cloud_work=positions * model.n_layers)  # fmt: skip

    def _edge(self, s, model, prompt):
        from .edge import generate_edge

        t0 = time.perf_counter()
        r = generate_edge(model, prompt, self.policy(s, model), max_new_tokens=s.tokens, chat=True)
        compute = time.perf_counter() - t0
        return _record(r, compute_s=compute, bytes_up=0, bytes_down=0, round_trips=0, edge_tokens=len(r.tokens),
                       edge_work=r.extra["edge_layer_positions"], cloud_work=0)  # fmt: skip

    def _naive(self, s, model, prompt):
        """Edge runs [0, split) incrementally; each token re-sends all split states (fp32) and the cloud
        recomputes [split, L) over the whole context without keeping anything."""
        from .model import GenerationResult

        ids = model._prompt_ids(prompt, True)
        edge = model.new_cache(len(ids) + s.tokens, 0, s.split)
        t_start = time.perf_counter()
        states = [edge.forward(model.core.embed(np.asarray(ids, np.int32)), 0)]
        tokens, sent, cloud_work, finish = [], 0, 0, "length"
        for step in range(s.tokens):
            context = np.concatenate(states)
            cloud = model.new_cache(len(context), s.split, model.n_layers)
            out = cloud.forward(context, 0)
            cloud_work += len(context) * (model.n_layers - s.split)
            tokens.append(int(np.argmax(model.core.head(out[-1:])[0])))
            sent += context.nbytes + 64
            if tokens[-1] in model.tokenizer.end_ids:
                finish = "stop"
                break
            if step + 1 < s.tokens:
                states.append(edge.forward(model.core.embed(np.array(tokens[-1:], np.int32)), len(ids) + step))
        t_end = time.perf_counter()
        r = GenerationResult.of_run(model, tokens, ids, finish, t_start, t_start, t_end)
        return _record(r, compute_s=t_end - t_start, bytes_up=sent, bytes_down=16 * len(tokens),
                       round_trips=len(tokens), edge_tokens=0, edge_work=sum(len(x) for x in states) * s.split,
                       cloud_work=cloud_work)  # fmt: skip

    def _collab(self, s, model, prompt):
        from .client import LocalLink, NetworkModel, generate_collab
        from .cloud import Cloud

        cloud = Cloud(model, split=s.split, batching=False)
        connect = lambda: LocalLink(cloud, NetworkModel(s.bandwidth, s.rtt))  # noqa: E731
        policy = self.policy(s, model)
        r = generate_collab(model, prompt, policy, connect, max_new_tokens=s.tokens, dtype=s.dtype, chat=True,
                            speculate=s.speculate)  # fmt: skip
        e = r.extra
        return _record(r, compute_s=e["edge_s"] + e["cloud_s"], network_s=e["network_s"],
                       bytes_up=e["bytes_sent"], bytes_down=e["bytes_received"],
                       round_trips=e.get("round_trips", sum(t.source == "cloud" for t in e["traces"])),
                       edge_tokens=sum(t.source == "edge" for t in e["traces"]),
                       edge_work=e["edge_layer_positions"],
                       cloud_work=cloud.positions_computed * (model.n_layers - s.split),
                       fallbacks=e["fallbacks"])  # fmt: skip


def _record(r, **fields) -> dict:
    return {"tokens": list(r.tokens), "text": r.text, "prompt_tokens": len(r.prompt_tokens), **fields}


# ---- quality ----
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> str:
    """Sentences on lines, for ROUGE-Lsum (rouge-score's own splitter needs NLTK data not here)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def quality(outputs: list[str], references: list[tuple[str, ...]], cloud_outputs: list[str] | None = None) -> dict:
    """Mean ROUGE F1 (best reference per output), corpus chrF, and agreement with cloud-only outputs."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = {k: [] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for out, refs in zip(outputs, references):
        best = scorer.score_multi([_sentences(r) for r in refs], _sentences(out))
        for k in scores:
            scores[k].append(best[k].fmeasure)
    n_refs = max(len(r) for r in references)
    ref_streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n_refs)]
    row = {k: float(np.mean(v)) for k, v in scores.items()}
    row["chrf"] = float(sacrebleu.corpus_chrf(outputs, ref_streams).score)
    if cloud_outputs is not None:
        plain = rouge_scorer.RougeScorer(["rougeL"])
        row["rougeL_vs_cloud"] = float(np.mean([plain.score(c, o)["rougeL"].fmeasure if c.strip() else float(o == c)
                                                for o, c in zip(outputs, cloud_outputs)]))  # fmt: skip
    return row


# ---- the table ----
@dataclass
class Results:
    """Rows (one per setting, tidy) and the per-prompt runs behind them."""

    rows: list[dict]
    runs: dict = field(default_factory=dict, repr=False)  # (compute key, prompt index) -> record

    def to_csv(self, path=None) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in self.rows for k in r)))
        writer.writeheader()
        writer.writerows(self.rows)
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows})

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def _row(s: Setting, records: list[dict], refs, cloud_records: list[dict]) -> dict:
    from .client import NetworkModel

    n_tokens = sum(len(r["tokens"]) for r in records)
    compute = sum(r["compute_s"] for r in records)
    if "network_s" in records[0]:  # measured on the emulated link during the run
        network = sum(r["network_s"] for r in records)
    else:  # derived: a round trip per request plus the bytes at the link's bandwidth (jitter-free)
        link = NetworkModel(s.bandwidth, s.rtt)
        network = sum(r["round_trips"] * s.rtt + (r["bytes_up"] + r["bytes_down"]) / link.bandwidth
                      for r in records) if s.scheme != "edge" else 0.0  # fmt: skip
    edge_work = sum(r["edge_work"] for r in records)
    cloud_work = sum(r["cloud_work"] for r in records)
    cloud_only_work = sum(r["cloud_work"] for r in cloud_records)
    row = {"scheme": s.label, "dataset": s.dataset, "model": s.model, "exit_heads": s.exit_heads, "threshold": s.threshold,
           "latency_budget_s": s.latency_budget, "rtt_s": s.rtt,
           "bandwidth_Bps": s.bandwidth, "split": s.split if s.scheme != "cloud" else None,
           "dtype": s.dtype or None, "prompts": len(records), "tokens": n_tokens,
           "time_per_token_s": (compute + network) / max(n_tokens, 1), "total_time_s": compute + network,
           "compute_s": compute, "network_s": network,
           "edge_token_share": sum(r["edge_tokens"] for r in records) / max(n_tokens, 1),
           "cloud_layer_share": cloud_work / max(edge_work + cloud_work, 1),
           "cloud_work_offloaded": 1 - cloud_work / max(cloud_only_work, 1),
           "bytes_up": sum(r["bytes_up"] for r in records), "bytes_down": sum(r["bytes_down"] for r in records),
           "round_trips": sum(r["round_trips"] for r in records),
           "identical_to_cloud": float(np.mean([a["tokens"] == b["tokens"] for a, b in zip(records, cloud_records)]))}  # fmt: skip
    row.update(quality([r["text"] for r in records], refs, [r["text"] for r in cloud_records]))
    return row


def _units(settings: list[Setting]) -> list[tuple[Setting, int]]:
    """Distinct computations: each setting's compute key × prompt, plus cloud-only runs (the agreement
    reference) for every model and data set in the grid."""
    keys = [s.compute_key() for s in settings]
    keys += [Setting("cloud", s.dataset, s.model, n=s.n, tokens=s.tokens).compute_key() for s in settings]
    return [(k, i) for k in dict.fromkeys(keys) for i in range(k.n)]


def run_grid(settings: list[Setting], progress: bool = True, ray: str | bool | None = None, workers: int = 2,
             threads: int | None = None, cache: dict | None = None) -> Results:  # fmt: skip
    """Runs every setting on its data set; returns the table. ray: None (this process), True (a local
    Ray cluster of `workers` actors, one CPU each), or a cluster address ("auto", "ray://host:port").
    The rows equal the serial run's except the measured times (TIMING_FIELDS).
    cache: a dict kept across calls; a (computation, prompt) already in it is not run again."""
    if not settings:
        raise ValueError("the grid is empty")
    data = {(s.dataset, s.n): examples(s.dataset, s.n) for s in settings}
    units = _units(settings)
    cache = {} if cache is None else cache
    slot = lambda key, i: (replace(key, n=1), i)  # noqa: E731  (prompt i is the same whatever n)
    todo = [(k, i) for k, i in units if slot(k, i) not in cache]
    prompts = [data[(k.dataset, k.n)][i].prompt for k, i in todo]
    for (k, i), record in zip(todo, _execute(todo, prompts, progress, ray, workers, threads)):
        cache[slot(k, i)] = record
    records = {(k, i): cache[slot(k, i)] for k, i in units}
    rows = []
    for s in settings:
        refs = [ex.references for ex in data[(s.dataset, s.n)]]
        cloud = Setting("cloud", s.dataset, s.model, n=s.n, tokens=s.tokens).compute_key()
        rows.append(_row(s, [records[(s.compute_key(), i)] for i in range(s.n)], refs,
                         [records[(cloud, i)] for i in range(s.n)]))  # fmt: skip
    return Results(rows, records)


def _execute(units, prompts, progress, ray, workers, threads) -> list[dict]:
    bar = _bar(len(units), progress)
    try:
        if not ray:
            worker = Worker(threads)
            out = []
            for (key, _), prompt in zip(units, prompts):
                out.append(worker.run(key, prompt))
                bar.update()
            return out
        from .cluster import run_ordered

        return run_ordered(Worker, (threads or 1,), "run", [(key, p) for (key, _), p in zip(units, prompts)],
                           address=ray, workers=workers, on_done=bar.update)  # fmt: skip
    finally:
        bar.close()


def _bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not enabled, desc="experiment", unit="run", leave=False)
    except ImportError:
        return type("NoBar", (), {"update": lambda self, n=1: None, "close": lambda self: None})()


def comparable(row: dict) -> dict:
    """A row without its measured times: what serial and distributed runs must agree on."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def plot(rows: list[dict], path=None):
    """Three panels from a table's rows: time per token per scheme (a bar per data set), time per token
    against RTT (schemes run at several RTTs), and quality against the share of tokens finished at the
    edge. Returns the matplotlib Figure; writes it to `path` when given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4))
    ax_time, ax_rtt, ax_quality = fig.subplots(1, 3)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    rtt0 = min(r["rtt_s"] for r in rows if r["rtt_s"] > 0) if any(r["rtt_s"] > 0 for r in rows) else 0.0
    width = 0.8 / max(len(datasets), 1)
    for k, ds in enumerate(datasets):
        at = {r["scheme"]: r for r in rows if r["dataset"] == ds and r["rtt_s"] == rtt0}
        xs = [i for i, s in enumerate(schemes) if s in at]
        ax_time.bar([x + k * width for x in xs], [1e3 * at[schemes[x]]["time_per_token_s"] for x in xs], width,
                    label=ds)  # fmt: skip
    ax_time.set_xticks([i + 0.4 - width / 2 for i in range(len(schemes))], schemes, rotation=30, fontsize=8)
    ax_time.set_ylabel(f"ms per token (RTT {rtt0 * 1e3:g} ms)")
    ax_time.legend(fontsize=8)
    for ds, scheme, n in dict.fromkeys((r["dataset"], r["scheme"], r["prompts"]) for r in rows):
        pts = sorted(dict((r["rtt_s"], r["time_per_token_s"]) for r in rows
                          if (r["dataset"], r["scheme"], r["prompts"]) == (ds, scheme, n)).items())  # fmt: skip
        if len(pts) > 1:
            ax_rtt.plot([1e3 * p[0] for p in pts], [1e3 * p[1] for p in pts], "o-", label=f"{scheme} ({ds})")
    ax_rtt.set_xlabel("round-trip time (ms)")
    ax_rtt.set_ylabel("ms per token")
    if ax_rtt.lines:
        ax_rtt.legend(fontsize=7)
    for ds in datasets:
        pts = [r for r in rows if r["dataset"] == ds and r["rtt_s"] == rtt0]
        ax_quality.scatter([r["edge_token_share"] for r in pts], [r["rougeL"] for r in pts], label=ds)
        for r in pts:
            ax_quality.annotate(r["scheme"], (r["edge_token_share"], r["rougeL"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
    ax_quality.set_xlabel("tokens finished at the edge (share)")
    ax_quality.set_ylabel("ROUGE-L F1 vs references")
    ax_quality.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig

"""The edge device: layers [0, split) with early exits, keeping its KV cache exact by catch-up.

A token that exits at e has no keys/values yet in layers [e, split). With kv="catchup" those
positions ride along with the next token's pass through the deeper layers (a batch of a few positions
costs little more than one when decode is memory-bound), so the cache always ends up exactly as a
plain forward pass would leave it. With kv="propagate" the exit's hidden state stands in for the
skipped layers' inputs at once (approximate, as in CALM).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import _core
from .exits import GATE, METRICS, ExitPolicy
from .model import GenerationResult, Model, Sampler


@dataclass
class TokenTrace:
    """Where and how one generated token was decided."""

    token: int
    exit_layer: int  # layers run for this token before it was decided
    confidence: float  # at that exit, in the policy's metric
    layers_run: int  # position-layers computed in this step, catch-up included
    head_checks: int  # full LM-head evaluations in this step
    prechecks_skipped: int = 0  # exits skipped by the candidate pre-check
    source: str = "edge"  # "edge", or "cloud" in collaborative mode
    full_token: int | None = None  # the full model's choice for the same prefix, when traced

    @property
    def matches_full(self) -> bool | None:
        return None if self.full_token is None else self.full_token == self.token


@dataclass
class ExitDecision:
    """The result of running one token through the edge layers."""

    logits: np.ndarray | None  # full-vocabulary logits at the exit taken (None: not exited)
    exit_layer: int
    confidence: float
    layers_run: int
    head_checks: int
    prechecks_skipped: int
    split_hidden: np.ndarray | None = None  # (k, dim): positions [n_pos - k, n_pos) at the split (collaborative mode)
    segments: int = 0  # forward calls: one per stop (an exit that can accept, a catch-up join, the split)


class EdgeRunner:
    """Runs one sequence through the edge layers with early exits: a thin face of the C edge
    (`_core.Edge`: the step, catch-up, flush, rollback and standalone token loop are ce_edge_*).

    >>> runner = EdgeRunner(model, ExitPolicy(exits=(6, 10), split=15), capacity=256)  # doctest: +SKIP
    >>> runner.prefill(prompt_ids)                                                      # doctest: +SKIP
    >>> decision = runner.step(token, finish_at_split=True)                             # doctest: +SKIP
    """

    def __init__(self, model: Model, policy: ExitPolicy, capacity: int):
        policy.validate_for(model.n_layers, model.config["vocab"], model.config["dim"])
        self.model, self.policy = model, policy
        self.cache = model.new_cache(capacity, 0, policy.split)
        self.boundaries = [e for e in policy.exits if e < policy.split] + [policy.split]
        metric = _core.METRIC_GATE if policy.metric == GATE else METRICS[policy.metric]
        heads = [policy.head(b).spec(b) for b in self.boundaries]
        self.core = _core.Edge(self.cache, heads, metric, policy.kv == "propagate", policy.precheck_rows or 0)
        self.cloud_cost_s: float | None = None  # what a cloud token costs now (latency-aware exits)

    @property
    def n_pos(self) -> int:
        return self.core.n_pos

    @property
    def split_len(self) -> int:
        """Every position's hidden state at the split is final in split_states[:split_len]."""
        return self.core.split_len

    @property
    def split_states(self) -> np.ndarray:
        """(capacity, dim) hidden states at the split, read-only (complete in order: catch-up carries
        earlier positions along), for the cloud."""
        return self.core.split_states

    @property
    def layer_positions(self) -> int:
        """Positions × layers run here, prompt and rolled-back drafts included."""
        return self.core.layer_positions

    @property
    def pending(self) -> dict[int, int]:
        """{position: exit layer} of the positions waiting for catch-up."""
        return self.core.pending()

    def thresholds(self) -> list[float]:
        """Each stop's threshold now (latency-aware exits move with the cloud's cost); the split's
        applies in collaborative mode only, when the split is an exit."""
        split = self.policy.split
        own = self.policy.effective_threshold(split, self.cloud_cost_s) if split in self.policy.exits else 2.0
        return [self.policy.effective_threshold(b, self.cloud_cost_s) for b in self.boundaries[:-1]] + [own]

    def prefill(self, ids) -> np.ndarray:
        """Runs the prompt through all edge layers (one batch); returns hidden states at the split."""
        if self.n_pos:
            raise RuntimeError("prefill starts a fresh sequence")
        ids = np.asarray(ids, np.int32)
        self.core.prefill(ids)
        return self.split_states[: len(ids)].copy()

    def rollback(self, n: int) -> None:
        """Forgets positions n.. (rejected drafts): their keys/values, pending catch-up and split states."""
        self.core.rollback(n)

    def step(self, token: int, finish_at_split: bool = True) -> ExitDecision:
        """Runs token (at the next position) up the edge layers until an exit accepts it.

        At the split the token is finished locally when finish_at_split (standalone mode);
        otherwise the decision comes back with logits=None and the split hidden state, for the cloud.
        """
        logits, decision, segments, split_start = self.core.step(token, self.thresholds(), finish_at_split)
        split_hidden = None
        if not finish_at_split and split_start >= 0:
            split_hidden = self.split_states[split_start : self.n_pos].copy()
        return ExitDecision(logits, *decision, split_hidden=split_hidden, segments=segments)

    def generate(self, logits: np.ndarray, sample: Sampler, pending: int, n_max: int) -> tuple[list, list, bool]:
        """Standalone generation's token loop in C, without the GIL (ce_edge_generate): feeds `pending`
        (-1: none), picks from the logits, up to n_max tokens or an end token. Returns (tokens,
        per-token (exit_layer, confidence, layers_run, head_checks, prechecks_skipped) or None where
        nothing was fed, ended)."""
        tokens, decisions, ended = self.core.generate(
            logits, sample.rng, pending, n_max, np.fromiter(self.model.tokenizer.end_ids, np.int32), self.thresholds(),
            sample.temperature, sample.top_k, sample.top_p)  # fmt: skip
        return tokens.tolist(), decisions, ended

    def flush(self) -> tuple[int, np.ndarray] | None:
        """Completes all pending catch-up now, without a new token. Returns (first position, split
        hidden states of the positions it finished), or None when nothing was pending."""
        first = self.core.flush()
        return None if first < 0 else (first, self.split_states[first : self.n_pos].copy())


class FullModelShadow:
    """The full model run alongside on the same tokens, for traces: its greedy choice at each step."""

    def __init__(self, model: Model, ids, capacity: int):
        self.model, self.pos = model, len(ids)
        self.cache = model.new_cache(capacity)
        self.choice = int(np.argmax(model.core.head(self.cache.forward(model.core.embed(np.asarray(ids, np.int32)), 0)[-1:])))

    def advance(self, token: int) -> None:
        hidden = self.cache.forward(self.model.core.embed(np.array([token], np.int32)), self.pos)
        self.pos += 1
        self.choice = int(np.argmax(self.model.core.head(hidden)[0]))


def decode_loop(model: Model, first: tuple[int, TokenTrace], step, max_new_tokens: int,
                shadow: FullModelShadow | None = None, on_token=None) -> tuple[list, list, str]:  # fmt: skip
    """The token loop shared by edge and collaborative generation. first: the token decided from the
    prompt and its trace; step(token) runs that token and returns the next (token, trace).
    Returns (tokens, traces, finish reason)."""
    token, trace = first
    tokens, traces, finish = [], [], "length"
    for i in range(max_new_tokens):
        if token in model.tokenizer.end_ids:
            finish = "stop"
            break
        trace.token = token
        if shadow is not None:
            trace.full_token = shadow.choice
        tokens.append(token)
        traces.append(trace)
        if on_token is not None:
            on_token(i, trace)
        if i + 1 == max_new_tokens:
            break
        if shadow is not None:
            shadow.advance(token)
        token, trace = step(token)
    return tokens, traces, finish


def generate_edge(
    model: Model,
    prompt,
    policy: ExitPolicy,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    trace_full: bool = False,
    on_token=None,
) -> GenerationResult:
    """Edge standalone generation: tokens finish at an early exit or at the exit at the split.
    on_token: called as on_token(step, trace) after each token is decided.

    With trace_full, each token's trace also records the full model's greedy choice for the same
    prefix (run alongside in a second cache; costs a full forward pass per token).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    sample = Sampler(temperature, top_k, top_p, seed)
    ids = model._prompt_ids(prompt, chat)
    capacity = len(ids) + max_new_tokens
    runner = EdgeRunner(model, policy, capacity)
    t0 = time.perf_counter()
    hidden = runner.prefill(ids)
    logits = np.ascontiguousarray(policy.head(policy.split).logits(model, hidden[-1:])[0])  # the first token: the split's exit
    shadow = FullModelShadow(model, ids, capacity) if trace_full else None
    t1 = time.perf_counter()
    # The token loop runs in C (EdgeRunner.generate): all at once, or one token per call when a
    # caller sees each token or the full model runs alongside.
    per_token = on_token is not None or shadow is not None
    tokens: list[int] = []
    traces: list[TokenTrace] = []
    finish = "length"
    while len(tokens) < max_new_tokens:
        n_max = 1 if per_token else max_new_tokens - len(tokens)
        new, decisions, ended = runner.generate(logits, sample, tokens[-1] if tokens else -1, n_max)
        for token, decision in zip(new, decisions):
            # the first token's decision is the prompt's (the split's exit; prompt work is not a step's)
            trace = TokenTrace(token, *decision) if decision else TokenTrace(token, policy.split, 0.0, 0, 1)
            if shadow is not None:
                trace.full_token = shadow.choice
                if len(tokens) + 1 < max_new_tokens:
                    shadow.advance(token)
            tokens.append(token)
            traces.append(trace)
            if on_token is not None:
                on_token(len(tokens) - 1, trace)
        if ended:
            finish = "stop"
            break
    return GenerationResult.of_run(model, tokens, ids, finish, t0, t1, time.perf_counter(),
                                   {"traces": traces, "policy": policy,
                                    "edge_layer_positions": runner.layer_positions})  # fmt: skip

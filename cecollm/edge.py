"""The edge device: layers [0, split) with early exits, keeping its KV cache exact by catch-up.

A token that exits at e has no keys/values yet in layers [e, split). With kv="catchup" those
positions ride along with the next token's pass through the deeper layers (a batch of a few positions
costs little more than one when decode is memory-bound), so the cache always ends up exactly as a
plain forward pass would leave it. With kv="propagate" the exit's hidden state stands in for the
skipped layers' inputs at once (approximate, as in CALM).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    hidden: np.ndarray  # (dim,) hidden state of the token at exit_layer
    layers_run: int
    head_checks: int
    prechecks_skipped: int
    split_hidden: np.ndarray | None = None  # (k, dim): positions [n_pos - k, n_pos) at the split (collaborative mode)


@dataclass
class _Pending:
    exit_layer: int
    hidden: np.ndarray = field(repr=False)


class EdgeRunner:
    """Runs one sequence through the edge layers with early exits.

    >>> runner = EdgeRunner(model, ExitPolicy(exits=(6, 10), split=15), capacity=256)  # doctest: +SKIP
    >>> runner.prefill(prompt_ids)                                                      # doctest: +SKIP
    >>> decision = runner.step(token, finish_at_split=True)                             # doctest: +SKIP
    """

    def __init__(self, model: Model, policy: ExitPolicy, capacity: int):
        policy.validate_for(model.n_layers, model.config["vocab"], model.config["dim"])
        self.model, self.policy = model, policy
        self.cache = model.new_cache(capacity, 0, policy.split)
        self.boundaries = [e for e in policy.exits if e < policy.split] + [policy.split]
        self.pending: dict[int, _Pending] = {}  # position -> exit layer and hidden state there
        self.n_pos = 0
        # every position's hidden state at the split, rows [0, split_len) (complete in order: catch-up
        # carries earlier positions along), for the cloud
        self.split_states = np.zeros((capacity, model.config["dim"]), np.float32)
        self.split_len = 0
        self.cloud_cost_s: float | None = None  # what a cloud token costs now (latency-aware exits)
        self.layer_positions = 0  # positions × layers run here, prompt and rolled-back drafts included
        self.metric = METRICS.get(policy.metric, _core.METRIC_MAX_PROB)  # the gate's exits report their gate

    # ---- running layers ----
    def _run(self, hidden: np.ndarray, pos0: int, begin: int, end: int) -> np.ndarray:
        """Layers [begin, end) for positions pos0.., in slices of at most SMALL_BATCH positions so that
        catch-up is bitwise identical to one position at a time."""
        if begin == end:
            return hidden
        self.layer_positions += len(hidden) * (end - begin)
        out = np.empty_like(hidden)
        for i in range(0, len(hidden), _core.SMALL_BATCH):
            out[i : i + _core.SMALL_BATCH] = self.cache.forward(hidden[i : i + _core.SMALL_BATCH], pos0 + i, begin, end)
        return out

    def prefill(self, ids) -> np.ndarray:
        """Runs the prompt through all edge layers (one batch); returns hidden states at the split."""
        if self.n_pos or self.pending:
            raise RuntimeError("prefill starts a fresh sequence")
        ids = np.asarray(ids, np.int32)
        hidden = self.cache.forward(self.model.core.embed(ids), 0)
        self.layer_positions += len(ids) * self.policy.split
        self.n_pos = len(ids)
        self._at_split(0, hidden)
        return hidden

    def _at_split(self, start: int, batch: np.ndarray) -> None:
        self.split_states[start : start + len(batch)] = batch
        self.split_len = start + len(batch)

    def rollback(self, n: int) -> None:
        """Forgets positions n.. (rejected drafts): their keys/values, pending catch-up and split states."""
        self.cache.truncate(n)
        self.n_pos = min(self.n_pos, n)
        self.pending = {q: v for q, v in self.pending.items() if q < n}
        self.split_len = min(self.split_len, n)

    def step(self, token: int, finish_at_split: bool = True) -> ExitDecision:
        """Runs token (at the next position) up the edge layers until an exit accepts it.

        At the split the token is finished locally when finish_at_split (standalone mode);
        otherwise the decision comes back with logits=None and the split hidden state, for the cloud.
        """
        p = self.n_pos
        if p >= self.cache.capacity:
            raise IndexError(f"the sequence is full ({self.cache.capacity} positions)")
        batch = self.model.core.embed(np.array([token], np.int32))
        start = p  # the batch holds positions [start, p]
        layer, layers_run, checks, skipped, gate = 0, 0, 0, 0, 0.0
        for boundary in self._stops():
            batch, start = self._catch_up_into(batch, start, layer)
            batch = self._run(batch, start, layer, boundary)
            layers_run += len(batch) * (boundary - layer)
            layer = boundary
            at_split = boundary == self.policy.split
            if at_split:
                self._at_split(start, batch)
            if at_split and not finish_at_split:  # collaborative: the split's own exit, else the cloud
                self.n_pos = p + 1
                threshold = self.policy.effective_threshold(boundary, self.cloud_cost_s) if boundary in self.policy.exits else 2.0
                if threshold <= 1.0 and self.policy.metric != GATE:
                    logits = self.policy.head(boundary).logits(self.model, batch[-1:])[0]
                    accept, _, conf = _core.exit_decide(logits, self.metric, threshold)
                    if accept:
                        return ExitDecision(logits, boundary, conf, batch[-1], layers_run, checks + 1, skipped,
                                            split_hidden=batch)  # fmt: skip
                    checks += 1
                return ExitDecision(None, boundary, 0.0, batch[-1], layers_run, checks, skipped, split_hidden=batch)
            threshold = 0.0 if at_split else self.policy.effective_threshold(boundary, self.cloud_cost_s)
            if threshold > 1.0:
                continue
            head = self.policy.head(boundary)
            if not at_split and self.policy.metric == GATE:  # the gate decides; the head only names the token
                gate = float(head.gate(batch[-1:], gate)[0])
                if gate < threshold:
                    continue
                checks += 1
                self._leave_pending(batch, start, boundary)
                self.n_pos = p + 1
                return ExitDecision(head.logits(self.model, batch[-1:])[0], boundary, gate, batch[-1], layers_run,
                                    checks, skipped)  # fmt: skip
            if not at_split and self._precheck_fails(batch[-1], boundary, threshold):
                skipped += 1
                continue
            logits = head.logits(self.model, batch[-1:])[0]
            checks += 1
            accept, _, conf = _core.exit_decide(logits, self.metric, threshold)
            if accept:  # the split's threshold is 0: it always accepts
                self._leave_pending(batch, start, boundary)
                self.n_pos = p + 1
                return ExitDecision(logits, boundary, conf, batch[-1], layers_run, checks, skipped)
        raise AssertionError("unreachable: the split always decides")

    def _stops(self) -> list[int]:
        """The boundaries this step stops at: the split, exits that can accept now, and layers where
        pending positions join (catch-up). The layers between two stops run as one segment: exits
        that cannot accept cost nothing."""
        joining = {pending.exit_layer for pending in self.pending.values()}
        return [b for b in self.boundaries
                if b == self.policy.split or b in joining or self.policy.effective_threshold(b, self.cloud_cost_s) <= 1.0]  # fmt: skip

    def _precheck_fails(self, hidden: np.ndarray, exit_layer: int, threshold: float) -> bool:
        """True when the candidate head proves (given its top-1 is the full top-1) that the exit fails."""
        rows = self.policy.precheck_rows
        if rows is None:
            return False
        logits = self.policy.head(exit_layer).logits(self.model, hidden[None], rows)
        bound, _ = _core.confidence(logits, _core.METRIC_MAX_PROB)  # ≥ full p(top1) and ≥ full margin
        return bool(bound[0] < threshold)

    def _leave_pending(self, batch: np.ndarray, start: int, exit_layer: int) -> None:
        """Positions [start, start+len(batch)) stop at exit_layer: their deeper keys/values come later
        (catch-up) or now from their own hidden states (propagate)."""
        if exit_layer == self.policy.split:
            return
        if self.policy.kv == "propagate":
            self.cache.fill_kv(batch, start, exit_layer, self.policy.split)
            return
        for i, h in enumerate(batch):
            self.pending[start + i] = _Pending(exit_layer, h.copy())

    def _catch_up_into(self, batch: np.ndarray, start: int, layer: int) -> tuple[np.ndarray, int]:
        """Puts in front of the batch the pending positions that exited at `layer`: those in
        [filled length of layer, start), whose hidden states entering `layer` were kept."""
        first = self.cache.lengths()[layer]
        if first >= start:
            return batch, start
        waiting = range(first, start)
        assert all(self.pending[q].exit_layer == layer for q in waiting), "catch-up out of order"
        return np.concatenate([np.stack([self.pending.pop(q).hidden for q in waiting]), batch]), first

    def flush(self) -> tuple[int, np.ndarray] | None:
        """Completes all pending catch-up now, without a new token. Returns (first position, split
        hidden states of the positions it finished), or None when nothing was pending."""
        if not self.pending:
            return None
        layer = min(pending.exit_layer for pending in self.pending.values())
        batch, start = np.empty((0, self.model.config["dim"]), np.float32), self.n_pos
        for boundary in (b for b in self.boundaries if b > layer):
            batch, start = self._catch_up_into(batch, start, layer)
            batch = self._run(batch, start, layer, boundary)
            layer = boundary
        self._at_split(start, batch)
        return start, batch


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

    def step(token: int) -> tuple[int, TokenTrace]:
        d = runner.step(token)
        return sample(d.logits), TokenTrace(-1, d.exit_layer, d.confidence, d.layers_run, d.head_checks,
                                            d.prechecks_skipped)  # fmt: skip

    t0 = time.perf_counter()
    hidden = runner.prefill(ids)
    logits = policy.head(policy.split).logits(model, hidden[-1:])[0]  # the first token: the split's exit
    shadow = FullModelShadow(model, ids, capacity) if trace_full else None
    t1 = time.perf_counter()
    first = (sample(logits), TokenTrace(-1, policy.split, 0.0, 0, 1))  # prompt work is not a decode step's
    tokens, traces, finish = decode_loop(model, first, step, max_new_tokens, shadow, on_token)
    return GenerationResult.of_run(model, tokens, ids, finish, t0, t1, time.perf_counter(),
                                   {"traces": traces, "policy": policy,
                                    "edge_layer_positions": runner.layer_positions})  # fmt: skip

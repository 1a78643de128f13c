"""Lossless collaboration: the edge drafts tokens with its exits, the cloud verifies a block of them
per round trip (speculative decoding), and the output is the cloud model's own.

The edge feeds each token through its layers and drafts the next one at the split's exit,
keeping every position's split-layer state. A block of fed positions [s, e) goes to the cloud in one
VERIFY; the cloud runs its layers over the block as one batch and answers with its greedy token after
each position. Comparing the answer with the drafts at (s, e], the edge keeps the longest agreeing
prefix plus the cloud's token at the first disagreement; both sides drop the rejected positions' keys
and values. While a block is in flight the edge keeps drafting (up to `max_in_flight` blocks); a
mismatch rolls those drafts back and the stale replies are ignored.

With the F32 wire the cloud sees exactly the edge's states, and a block of at most CE_SMALL_BATCH
positions computes as one position at a time does, so the tokens equal the full model's greedy output
bit for bit. Time: on an emulated link (LocalLink with a NetworkModel) a virtual clock advances with
the edge's measured compute and waits for each reply's arrival (send time + network + cloud compute);
over TCP the clock is the wall clock.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from . import _core
from .edge import EdgeRunner, TokenTrace
from .exits import ExitPolicy
from .model import GenerationResult, Model
from .protocol import Msg, RemoteError

MAX_BLOCK = _core.SMALL_BATCH  # positions per VERIFY: a block computes as one position at a time does


def choose_block(acceptance: float, round_trip_s: float, draft_s: float, max_block: int = MAX_BLOCK) -> int:
    """The block size K maximizing expected tokens per second when each draft is accepted with
    probability `acceptance`: a block of K positions checks K drafts, and yields the agreeing prefix
    plus the cloud's token at the first disagreement, (1 - a^K) / (1 - a) tokens on average; it costs
    K · draft_s + round_trip_s."""
    a = min(max(acceptance, 0.0), 0.999)
    best, best_rate = 1, -1.0
    for k in range(1, max_block + 1):
        rate = (1 - a**k) / (1 - a) / (k * draft_s + round_trip_s)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass
class _Block:
    start: int  # positions [start, end) verified by this request
    end: int
    future: object
    sent: float  # clock time of sending
    arrival: float  # clock time at which the reply is there (emulated link); 0 over TCP


class _Clock:
    """Virtual time on an emulated link, wall time otherwise."""

    def __init__(self, virtual: bool):
        self.virtual = virtual
        self.t = 0.0 if virtual else time.perf_counter()

    def now(self) -> float:
        return self.t if self.virtual else time.perf_counter()

    def spend(self, seconds: float) -> None:  # edge compute measured around the call
        if self.virtual:
            self.t += seconds

    def wait_until(self, arrival: float) -> None:
        if self.virtual:
            self.t = max(self.t, arrival)


def generate_verify(model: Model, prompt, policy: ExitPolicy, connect, max_new_tokens: int = 64, dtype: str = "f32",
                    speculate: int | str = "auto", deadline_s: float = 2.0, chat: bool = False, max_in_flight: int = 2,
                    on_token=None, strict: bool = False) -> GenerationResult:  # fmt: skip
    """Collaborative greedy generation whose output is the cloud model's (exactly, with dtype="f32").
    strict: a cloud failure raises CloudUnavailable (see generate_collab).

    speculate: drafted tokens per round trip (1..CE_SMALL_BATCH) or "auto" (adapted to the running
    acceptance rate and the measured round trip). connect: a callable returning a fresh link.
    """
    from .client import CollabSession, edge_identity

    auto = speculate == "auto"
    if not auto and (isinstance(speculate, bool) or not isinstance(speculate, int) or not 1 <= speculate <= MAX_BLOCK):
        raise ValueError(f"speculate must be 'auto' or an integer in [1, {MAX_BLOCK}], not {speculate!r}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if policy.split >= model.n_layers:
        raise ValueError("collaboration needs split < n_layers: the cloud owns the layers after it")
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    block = 4 if auto else speculate
    # Drafts come from the split's exit alone: every drafted position must reach the split anyway (the
    # cloud verifies its split state), so earlier exits would only add LM-head evaluations.
    given, policy = policy, ExitPolicy(exits=(policy.split,), split=policy.split, thresholds=(0.0,),
                                       exit_heads={policy.split: policy.head(policy.split)})  # fmt: skip
    ids = model._prompt_ids(prompt, chat)
    n_prompt = len(ids)
    limit = n_prompt + max_new_tokens  # positions that can hold tokens
    runner = EdgeRunner(model, policy, limit + 1)
    session = CollabSession(connect, limit + 1, model.config["dim"], dtype, deadline_s,
                            edge_identity(model, policy.split, dtype), strict)  # fmt: skip
    ends = model.tokenizer.end_ids
    t_start = time.perf_counter()
    session.start()
    virtual = session.link is not None and getattr(session.link, "network", None) is not None
    clock = _Clock(virtual)
    stats = {"round_trips": 0, "drafts_checked": 0, "drafts_accepted": 0, "edge_s": 0.0, "cloud_s": 0.0,
             "rolled_back": 0}  # fmt: skip

    # ---- the prompt: one INFER, as in the paper's mode ----
    t = time.perf_counter()
    hidden = runner.prefill(ids)
    spent = time.perf_counter() - t
    stats["edge_s"] += spent
    clock.spend(spent)
    session.record(0, hidden)
    net0 = getattr(session.link, "network_s", 0.0)
    answer = session.infer(0, n_prompt)
    committed: list[int] = []
    traces: list[TokenTrace] = []
    if answer is None:
        first = int(np.argmax(policy.head(policy.split).logits(model, hidden[-1:])[0]))
        traces.append(TokenTrace(first, policy.split, 0.0, 0, 1, source="fallback"))
    else:
        first = answer[0]
        stats["cloud_s"] += answer[1]
        clock.spend(answer[1] + getattr(session.link, "network_s", 0.0) - net0)
        traces.append(TokenTrace(first, policy.split, 0.0, 0, 0, source="cloud"))
    committed.append(first)
    t_first = time.perf_counter()
    drafts: dict[int, tuple[int, TokenTrace]] = {}  # position -> drafted token, its trace
    inflight: deque[_Block] = deque()
    next_start = n_prompt  # first fed position not yet sent for verification
    finished = stopped = first in ends
    standalone = answer is None  # the cloud failed: drafts become final
    acceptance, round_trip, draft_s = 0.7, 0.02, 0.005  # running estimates for speculate="auto"

    def emit(token: int, trace: TokenTrace) -> None:
        nonlocal finished, stopped
        if token in ends:
            finished = stopped = True
            return
        trace.token = token
        committed.append(token)
        traces.append(trace)
        if on_token is not None:
            on_token(len(committed) - 1, trace)
        if len(committed) >= max_new_tokens:
            finished = True

    if on_token is not None and not finished:
        on_token(0, traces[0])

    def token_at(q: int) -> int | None:
        if q < n_prompt:
            return ids[q]
        if q < n_prompt + len(committed):
            return committed[q - n_prompt]
        d = drafts.get(q)
        return None if d is None else d[0]

    def feed() -> None:
        """Runs the token at the next position through the edge; drafts the one after it."""
        nonlocal draft_s
        q = runner.n_pos
        t = time.perf_counter()
        d = runner.step(token_at(q), finish_at_split=True)
        spent = time.perf_counter() - t
        stats["edge_s"] += spent
        clock.spend(spent)
        draft_s = 0.8 * draft_s + 0.2 * spent
        trace = TokenTrace(-1, d.exit_layer, d.confidence, d.layers_run, d.head_checks, d.prechecks_skipped, "edge")
        drafts[q + 1] = (int(np.argmax(d.logits)), trace)
        if standalone:  # no cloud: the draft is final
            emit(drafts.pop(q + 1)[0], trace)
            trace.source = "fallback"

    def send() -> None:
        """Sends the fed positions [next_start, next_start + block) for verification."""
        nonlocal next_start, standalone
        end = min(runner.n_pos, next_start + block)
        if runner.split_len < end:
            t = time.perf_counter()
            runner.flush()
            clock.spend(time.perf_counter() - t)
        session.record(next_start, runner.split_states[next_start:end])
        link = session.link
        try:
            if session.held < next_start:
                session.upload_gap(next_start)
            before = getattr(link, "network_s", 0.0)
            future = link.request(session._message(Msg.VERIFY, next_start, end), True)
            rt = getattr(link, "network_s", 0.0) - before
        except (OSError, ConnectionError, RemoteError) as exc:
            go_standalone(exc)
            return
        arrival = 0.0
        if virtual:  # served already; it arrives after the network's round trip and the cloud's compute
            arrival = clock.now() + rt + future.result().get("us", 0) / 1e6
        session.held = end
        inflight.append(_Block(next_start, end, future, clock.now(), arrival))
        stats["round_trips"] += 1
        next_start = end

    def go_standalone(exc: BaseException) -> None:
        """The cloud failed or timed out: the edge finishes the rest itself (drafts become final)."""
        nonlocal standalone
        session.note_failure(exc)
        standalone = True
        session.fallbacks += 1
        if session.link is not None:
            session._count(session.link)
            session.link.close()
            session.link = None
        inflight.clear()
        for q in sorted(drafts):  # what was drafted and not verified becomes final, in order
            if finished:
                break
            token, trace = drafts.pop(q)
            trace.source = "fallback"
            emit(token, trace)
        drafts.clear()

    def receive() -> None:
        """Waits for the oldest block's reply and applies it."""
        nonlocal next_start, acceptance, round_trip, block
        blk = inflight[0]
        try:
            reply = blk.future.result(timeout=None if virtual else deadline_s)
            if reply["type"] == Msg.ERROR:
                raise RemoteError(reply["code"], reply["msg"])
        except (OSError, ConnectionError, RemoteError, FutureTimeout) as exc:
            go_standalone(exc)
            return
        clock.wait_until(blk.arrival)
        inflight.popleft()
        cloud = np.frombuffer(reply["data"], "<i4")
        stats["cloud_s"] += reply.get("us", 0) / 1e6
        round_trip = 0.8 * round_trip + 0.2 * ((blk.arrival if virtual else time.perf_counter()) - blk.sent)
        checked = accepted = 0
        for i, q in enumerate(range(blk.start, blk.end)):
            if finished:
                break
            truth = int(cloud[i])
            draft = drafts.pop(q + 1, None)
            checked += 1
            if draft is not None and draft[0] == truth:
                accepted += 1
                emit(truth, draft[1])
                continue
            emit(truth, TokenTrace(truth, policy.split, 0.0, 0, 0, source="cloud"))
            stats["rolled_back"] += max(runner.n_pos - (q + 1), 0)
            runner.rollback(q + 1)  # position q + 1 now holds the cloud's token, fed next
            drafts.clear()
            inflight.clear()  # stale: computed on rejected drafts (the cloud rewinds on the next request)
            session.held = min(session.held, q + 1)
            next_start = q + 1
            break
        stats["drafts_checked"] += checked
        stats["drafts_accepted"] += accepted
        if checked:
            acceptance = 0.8 * acceptance + 0.2 * accepted / checked
        if auto:
            block = choose_block(acceptance, round_trip, draft_s)

    while not finished:
        if standalone:
            feed()
            continue
        unsent = runner.n_pos - next_start
        # a second block in flight pays only when the first is likely to be accepted whole
        in_flight = max_in_flight if not auto or acceptance**block >= 0.25 else 1
        known = token_at(runner.n_pos) if runner.n_pos < limit else None
        can_feed = known is not None and known not in ends
        ready = inflight and (inflight[0].arrival <= clock.now() if virtual else inflight[0].future.done())
        if ready:
            receive()
        elif can_feed and (unsent < block or len(inflight) < in_flight):
            feed()
            if runner.n_pos - next_start >= block and len(inflight) < in_flight:
                send()
        elif unsent > 0 and len(inflight) < in_flight:
            send()
        elif inflight:
            receive()
        else:  # nothing to draft, send or wait for: cannot happen while the loop's invariants hold
            raise RuntimeError("speculative decoding stalled")
    t_end = time.perf_counter()
    session.close()
    wall = t_end - t_start
    total = clock.now() if virtual else wall
    extra = {
        "traces": traces,
        "policy": given,
        "speculate": speculate,
        "round_trips": stats["round_trips"],
        "accepted_per_round_trip": stats["drafts_accepted"] / max(stats["round_trips"], 1),
        "acceptance": stats["drafts_accepted"] / max(stats["drafts_checked"], 1),
        "rolled_back_positions": stats["rolled_back"],
        "bytes_sent": session.bytes_sent,
        "bytes_received": session.bytes_received,
        "edge_s": stats["edge_s"],
        "cloud_s": stats["cloud_s"],
        "edge_layer_positions": runner.layer_positions,
        "network_s": session.network_s,
        "wall_s": wall,
        "time_s": total,  # virtual on an emulated link, else wall
        "fallbacks": session.fallbacks,
        "cloud_failure": session.failure,
    }
    finish = "stop" if stopped else "length"
    return GenerationResult.of_run(model, committed, ids, finish, t_start, t_first, t_end, extra)

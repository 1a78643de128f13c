"""The edge side of collaboration: links to a cloud, and collaborative generation with fallback.

A link carries one session's requests. Sends go through one ordered queue (so an upload always
reaches the cloud before the inference that needs it, while the edge never waits for an upload);
replies are matched to requests by sequence number. When the cloud is unreachable or late past the
deadline, the token is finished at the edge's exit at the split and generation goes on; a background
reconnect resumes the session (or opens a new one) and re-uploads what the cloud lacks.
"""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from . import _core
from .cloud import Cloud, CloudError, Handler
from .edge import EdgeRunner, FullModelShadow, TokenTrace, decode_loop
from .exits import ExitPolicy
from .model import GenerationResult, GenerationStream, Model, TextAssembler, TokenEvent
from .protocol import (
    DTYPES,
    MAX_BODY,
    MAX_BODY_BEFORE_AUTH,
    MAX_UPLOAD_POSITIONS,
    Code,
    Msg,
    ProtocolError,
    RemoteError,
    mac,
    recv_frame,
    recv_message,
    send_message,
)


class TcpLink:
    """A connection to a CloudServer; start(identity) connects and shakes hands."""

    def __init__(self, host: str, port: int, key: bytes | None = None, connect_timeout_s: float = 3.0):
        self.host, self.port, self.key, self.connect_timeout_s = host, port, key, connect_timeout_s
        self.bytes_sent = self.bytes_received = 0
        self.sock: socket.socket | None = None
        self.alive = False
        self.futures: dict[int, Future] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.outbox: queue.Queue = queue.Queue()

    def start(self, identity: dict) -> None:
        """Connects; the hello names the edge's model fingerprint, split and wire dtype (the server
        refuses a mismatch); then authenticates when the server asks for a key."""
        self.sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_sync({"type": Msg.HELLO, "ver": _core.WIRE_VERSION, **identity})
        hello = self._recv_sync()
        if "nonce" in hello:
            if self.key is None:
                raise RemoteError(Code.AUTH_FAILED, "the server asks for a key and none is set")
            self._send_sync({"type": Msg.AUTH, "mac": mac(self.key, hello["nonce"])})
            self._recv_sync()
        self.sock.settimeout(None)
        self.alive = True
        threading.Thread(target=self._sender, daemon=True, name="cecollm-send").start()
        threading.Thread(target=self._reader, daemon=True, name="cecollm-recv").start()

    def _send_sync(self, message: dict) -> None:
        self.bytes_sent += send_message(self.sock, message)

    def _recv_sync(self) -> dict:
        reply = recv_message(self.sock, MAX_BODY_BEFORE_AUTH)
        if reply["type"] == Msg.ERROR:
            raise RemoteError(reply["code"], reply["msg"])
        return reply

    def request(self, message: dict, want_reply: bool) -> Future | None:
        """Queues a message; returns a Future of its reply when want_reply."""
        future = Future() if want_reply else None
        frame = _core.wire_encode(message)  # now: the message's hidden states as they are at the request
        with self.lock:
            if not self.alive:
                raise ConnectionError("the link is down")
            if future is not None:
                self.futures[message["seq"]] = future
        self.outbox.put(frame)
        return future

    def _sender(self) -> None:
        while True:
            frame = self.outbox.get()
            if frame is None:
                return
            try:
                self.sock.sendall(frame)
                self.bytes_sent += len(frame)
            except OSError as exc:
                self._fail(exc)
                return

    def _reader(self) -> None:
        try:
            while True:
                message, nbytes = recv_frame(self.sock, MAX_BODY)
                self.bytes_received += nbytes
                with self.lock:
                    future = self.futures.pop(message.get("seq"), None)
                if future is not None:
                    future.set_result(message)
                elif message["type"] == Msg.ERROR:
                    self.errors.append(message["msg"])
        except (OSError, ProtocolError) as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        with self.lock:
            self.alive = False
            futures, self.futures = list(self.futures.values()), {}
        for f in futures:
            if not f.done():
                f.set_exception(ConnectionError(f"link failed: {exc}"))

    def close(self) -> None:
        with self.lock:
            self.alive = False
        self.outbox.put(None)
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class NetworkModel:
    """An emulated link for deterministic in-process sweeps: time is accounted, not slept.

    bandwidth in bytes/s each way, rtt and jitter (uniform ±) in seconds, loss: probability that a
    transfer is lost once and resent after a retransmission timeout of 3 × rtt + 0.2 s (TCP-like).
    Uploads are charged to the next request that waits for a reply (they travel before it)."""

    bandwidth: float = 12.5e6
    rtt: float = 0.02
    jitter: float = 0.0
    loss: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def one_way(self, nbytes: int) -> float:
        t = self.rtt / 2 + nbytes / self.bandwidth + self.rng.uniform(-self.jitter, self.jitter) / 2
        if self.loss and self.rng.random() < self.loss:
            t += 3 * self.rtt + 0.2
        return max(t, 0.0)


class LocalLink:
    """The same request/reply stream as TcpLink, served in process by the server's own Handler (the
    simulation runs the server's code). With a NetworkModel, network time is accounted on a virtual
    clock."""

    def __init__(self, cloud: Cloud, network: NetworkModel | None = None):
        self.cloud, self.network = cloud, network
        self.handler = Handler(cloud)
        self.bytes_sent = self.bytes_received = 0
        self.alive = False
        self.errors: list[str] = []
        self.backlog = 0  # bytes queued since the last request that waits for its reply
        self.network_s = 0.0  # accounted (virtual) network time

    def start(self, identity: dict) -> None:
        """The server's hello check: the same model, split and a known dtype."""
        try:
            self.handler.hello({"ver": _core.WIRE_VERSION, **identity})
        except CloudError as exc:
            raise RemoteError(exc.code, str(exc)) from None
        self.alive = True

    def request(self, message: dict, want_reply: bool) -> Future | None:
        frame = _core.wire_encode(message)
        self.bytes_sent += len(frame)
        reply_frame = self.handler.handle(frame[4:])
        reply = _core.wire_decode(reply_frame[4:], MAX_BODY)
        self.bytes_received += len(reply_frame)
        self.backlog += len(frame)
        if want_reply and self.network is not None:
            # TCP keeps order: queued uploads cross the link before the request; then the reply returns
            self.network_s += self.network.one_way(self.backlog) + self.network.one_way(len(reply_frame))
        if want_reply:
            self.backlog = 0
        if reply["type"] == Msg.ERROR and not want_reply:
            self.errors.append(reply["msg"])
        if not want_reply:
            return None
        future = Future()
        future.set_result(reply)
        return future

    def close(self) -> None:
        self.alive = False


class CloudUnavailable(ConnectionError):
    """The cloud failed (strict mode): the reason is the message."""


class CloudFallbackWarning(UserWarning):
    """The cloud failed; the edge finishes tokens at its split exit until a reconnect."""


def edge_identity(model: Model, split: int, dtype: str) -> dict:
    """What the hello tells the cloud: the model's fingerprint, the split and the wire dtype."""
    from .exits import model_fingerprint

    if not hasattr(model, "_fingerprint"):
        model._fingerprint = model_fingerprint(model)
    return {"model": model._fingerprint, "split": split, "dtype": DTYPES[dtype]}


def failure_reason(exc: BaseException) -> str:
    """A failure in words: auth failed, mismatch, refused, timed out, or what the cloud said."""
    if isinstance(exc, RemoteError):
        kind = {Code.AUTH_FAILED: "auth failed", Code.MISMATCH: "mismatch"}.get(exc.code, "cloud error")
        return f"{kind}: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"refused: {exc}"
    if isinstance(exc, (FutureTimeout, socket.timeout, TimeoutError)):
        return f"timed out: {str(exc) or 'no answer before the deadline'}"
    return f"connection failed: {exc}"


class CollabSession:
    """One sequence's conversation with the cloud: sequence numbers, what the cloud holds, re-uploads.

    The first failure is kept (`failure`, in words) and warned about once (CloudFallbackWarning);
    with strict, it raises CloudUnavailable instead of falling back to the edge."""

    def __init__(self, connect, capacity: int, dim: int, dtype: str, deadline_s: float, identity: dict | None = None,
                 strict: bool = False):  # fmt: skip
        self.identity = identity or {"model": "", "split": 0, "dtype": DTYPES[dtype]}
        self.strict, self.failure = strict, None
        self.connect, self.capacity, self.dim = connect, capacity, dim
        self.dtype, self.deadline_s = DTYPES[dtype], deadline_s
        self.split_hidden = np.zeros((capacity, dim), np.float32)  # every position's split state, kept
        self.known = 0  # positions whose split state the edge has
        self.link, self.sid, self.seq, self.held = None, None, 0, 0
        self.fallbacks = self.reconnects = 0
        self.bytes_sent = self.bytes_received = 0
        self.network_s = 0.0
        self._reconnecting: threading.Thread | None = None
        self._ready: tuple | None = None  # (link, sid, seq, held) prepared by the reconnect thread
        self.lock = threading.Lock()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _call(self, link, message: dict, want_reply: bool, timeout: float | None = None):
        future = link.request(message, want_reply)
        if not want_reply:
            return None
        reply = future.result(timeout=timeout)
        if reply["type"] == Msg.ERROR:
            raise RemoteError(reply["code"], reply["msg"])
        return reply

    def start(self) -> None:
        """Connects and opens a session (a failure leaves the session in fallback until reconnect)."""
        try:
            self._adopt(*self._establish(None))
        except (OSError, RemoteError, FutureTimeout) as exc:
            self._go_down(exc)

    def _establish(self, sid):
        """A link with the session resumed (or newly opened) and the cloud's held count."""
        link = self.connect()
        try:
            link.start(self.identity)
        except BaseException:
            link.close()
            raise
        seq = self.seq + 1000  # a fresh range: never collides with requests of the old link
        if sid is not None:
            try:
                reply = self._call(link, {"type": Msg.RESUME, "seq": seq, "sid": sid}, True, self.deadline_s * 4)
                return link, sid, seq, reply["pos"]
            except RemoteError as exc:
                if exc.code != Code.UNKNOWN_SESSION:
                    raise
        seq += 1
        reply = self._call(link, {"type": Msg.OPEN, "seq": seq, "cap": self.capacity}, True, self.deadline_s * 4)
        return link, reply["sid"], seq, 0

    def _adopt(self, link, sid, seq, held) -> None:
        self.link, self.sid, self.seq, self.held = link, sid, seq, held

    def record(self, start: int, hidden: np.ndarray) -> None:
        """Split states of positions [start, start + n) exist now."""
        self.split_hidden[start : start + len(hidden)] = hidden
        self.known = max(self.known, start + len(hidden))

    def _message(self, kind: Msg, start: int, end: int) -> dict:
        """A request carrying positions [start, end); the link encodes the states into its frame (one
        C call: wire_encode takes the array) when the request is made."""
        return {"type": kind, "seq": self._next_seq(), "sid": self.sid, "pos": start, "n": end - start,
                "dim": self.dim, "dtype": self.dtype, "data": self.split_hidden[start:end]}  # fmt: skip

    def upload_gap(self, end: int) -> None:
        """Queues uploads of [held, end) (not waited for), in frames of at most MAX_UPLOAD_POSITIONS."""
        while self.held < end:
            stop = min(self.held + MAX_UPLOAD_POSITIONS, end)
            self._call(self.link, self._message(Msg.UPLOAD, self.held, stop), False)
            self.held = stop

    def infer(self, start: int, end: int):
        """Positions [held, start) are uploaded first, then [start, end) rides in one INFER.
        Returns (token, cloud seconds) or None when the cloud could not answer in time."""
        self._maybe_adopt_reconnect()
        if self.link is None or not self.link.alive:
            self._go_down(ConnectionError("the link is down"))
            return None
        try:
            self.upload_gap(start)
            reply = self._call(self.link, self._message(Msg.INFER, start, end), True, self.deadline_s)
            self.held = end
            return reply["token"], reply.get("us", 0) / 1e6
        except (OSError, ConnectionError, RemoteError, FutureTimeout) as exc:
            self._go_down(exc)
            return None

    def _go_down(self, exc: BaseException) -> None:
        """The cloud failed: remember why (warn once, or raise when strict), fall back, reconnect."""
        self.note_failure(exc)
        self.fallbacks += 1
        if self.link is not None:
            self._count(self.link)
            self.link.close()
            self.link = None
        if self._reconnecting is None or not self._reconnecting.is_alive():
            self._reconnecting = threading.Thread(target=self._reconnect, daemon=True, name="cecollm-reconnect")
            self._reconnecting.start()

    def note_failure(self, exc: BaseException) -> None:
        """Keeps the first failure's reason and warns once; strict: raises CloudUnavailable."""
        if self.failure is None:
            self.failure = failure_reason(exc)
            if self.strict:
                raise CloudUnavailable(self.failure) from exc
            warnings.warn(f"cecollm: the cloud failed ({self.failure}); the edge finishes tokens itself",
                          CloudFallbackWarning, stacklevel=5)  # fmt: skip

    def _reconnect(self) -> None:
        delay = 0.05
        for _ in range(200):
            try:
                prepared = self._establish(self.sid)
                with self.lock:
                    self._ready = prepared
                return
            except (OSError, RemoteError, FutureTimeout, ConnectionError):
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _maybe_adopt_reconnect(self) -> None:
        with self.lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self._adopt(*ready)
            self.reconnects += 1

    def _count(self, link) -> None:
        self.bytes_sent += link.bytes_sent
        self.bytes_received += link.bytes_received
        self.network_s += getattr(link, "network_s", 0.0)

    def close(self) -> None:
        self._maybe_adopt_reconnect()
        if self.link is not None:
            try:
                if self.link.alive:
                    self._call(self.link, {"type": Msg.CLOSE, "seq": self._next_seq(), "sid": self.sid}, True, 1.0)
            except (OSError, ConnectionError, RemoteError, FutureTimeout):
                pass
            self._count(self.link)
            self.link.close()
            self.link = None


def _link_network_s(session) -> float:
    return getattr(session.link, "network_s", 0.0) if session.link is not None else 0.0


def generate_collab(
    model: Model,
    prompt,
    policy: ExitPolicy,
    connect,
    max_new_tokens: int = 64,
    dtype: str = "f16",
    deadline_s: float = 2.0,
    chat: bool = False,
    trace_full: bool = False,
    on_token=None,
    speculate: int | str = 0,
    strict: bool = False,
) -> GenerationResult:
    """Collaborative greedy generation: tokens exit at the edge when confident, else the cloud
    finishes them; when the cloud fails, the edge finishes them at its exit at the split.

    connect: a callable returning a fresh link (TcpLink or LocalLink), called again to reconnect.
    on_token: called as on_token(step, trace) after each token is decided.
    speculate: 0 is the paper's mode (an exited token is final); K >= 1 or "auto" is verify mode
    (cecollm.speculative): the edge drafts, the cloud verifies K tokens per round trip, and the
    output is the cloud model's own (exactly, with dtype="f32").
    strict: a cloud failure raises CloudUnavailable (with the reason) instead of a warning and the
    edge finishing tokens itself; extra["cloud_failure"] holds the first failure's reason either way.

    >>> cloud = Cloud(model, split=15)                                              # doctest: +SKIP
    >>> r = generate_collab(model, "Hi", ExitPolicy(split=15), lambda: LocalLink(cloud))  # doctest: +SKIP
    """
    if speculate:
        from .speculative import generate_verify

        if trace_full:
            raise ValueError("trace_full is for the paper's mode: verify mode's output is the full model's")
        return generate_verify(model, prompt, policy, connect, max_new_tokens, dtype, speculate, deadline_s, chat,
                               on_token=on_token, strict=strict)  # fmt: skip
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if policy.split >= model.n_layers:
        raise ValueError("collaboration needs split < n_layers: the cloud owns the layers after it")
    ids = model._prompt_ids(prompt, chat)
    capacity = len(ids) + max_new_tokens
    runner = EdgeRunner(model, policy, capacity)
    session = CollabSession(connect, capacity, model.config["dim"], dtype, deadline_s,
                            edge_identity(model, policy.split, dtype), strict)  # fmt: skip
    edge_s = cloud_s = 0.0
    t_start = time.perf_counter()
    session.start()

    def decide_at_split(start: int, hidden: np.ndarray, trace: TokenTrace) -> int:
        """The cloud's token after positions [start, start+n), or the edge's own. The prompt rides in
        one INFER (the cloud then computes it as the full model does, in one batch); later, caught-up
        positions are uploaded and the INFER carries one position."""
        nonlocal cloud_s, edge_s
        session.record(start, hidden)
        end = start + len(hidden)
        t, net = time.perf_counter(), _link_network_s(session)
        answer = session.infer(0 if start == 0 else end - 1, end)
        if answer is not None:
            trace.source = "cloud"
            cloud_s += answer[1]
            # what this token cost: accounted network time on an emulated link, else the wall time
            virtual = _link_network_s(session) - net
            cost = virtual + answer[1] if virtual > 0 else time.perf_counter() - t
            if start > 0:  # the prompt's answer is not a per-token cost
                runner.cloud_cost_s = cost if runner.cloud_cost_s is None else 0.7 * runner.cloud_cost_s + 0.3 * cost
            return answer[0]
        t = time.perf_counter()
        trace.source = "fallback"
        logits = policy.head(policy.split).logits(model, hidden[-1:])[0]
        edge_s += time.perf_counter() - t
        return int(np.argmax(logits))

    def step(token: int) -> tuple[int, TokenTrace]:
        nonlocal edge_s
        t = time.perf_counter()
        d = runner.step(token, finish_at_split=False)
        edge_s += time.perf_counter() - t
        trace = TokenTrace(-1, d.exit_layer, d.confidence, d.layers_run, d.head_checks, d.prechecks_skipped)
        if d.logits is not None:
            if d.split_hidden is not None:  # finished at the split's exit: the cloud gets these states later
                session.record(runner.n_pos - len(d.split_hidden), d.split_hidden)
            return int(np.argmax(d.logits)), trace
        return decide_at_split(runner.n_pos - len(d.split_hidden), d.split_hidden, trace), trace

    t = time.perf_counter()
    hidden = runner.prefill(ids)
    edge_s += time.perf_counter() - t
    trace = TokenTrace(-1, policy.split, 0.0, 0, 0)
    first = (decide_at_split(0, hidden, trace), trace)
    shadow = FullModelShadow(model, ids, capacity) if trace_full else None
    t_first = time.perf_counter()
    tokens, traces, finish = decode_loop(model, first, step, max_new_tokens, shadow, on_token)
    t_end = time.perf_counter()
    session.close()
    return GenerationResult.of_run(
        model,
        tokens,
        ids,
        finish,
        t_start,
        t_first,
        t_end,
        {
            "traces": traces,
            "policy": policy,
            "bytes_sent": session.bytes_sent,
            "bytes_received": session.bytes_received,
            "edge_s": edge_s,
            "cloud_s": cloud_s,
            "edge_layer_positions": runner.layer_positions,
            "wall_s": t_end - t_start,
            "network_s": session.network_s,
            "fallbacks": session.fallbacks,
            "reconnects": session.reconnects,
            "cloud_failure": session.failure,
        },
    )


class Edge:
    """An edge device: the model's layers [0, split) with early exits, optionally backed by a cloud.

    cloud: None (standalone), a Cloud (in process; with `network`, over an emulated link), or
    "HOST:PORT" of a `cecollm serve` (key: the shared key, default $CECOLLM_KEY).

    >>> edge = Edge(model, ExitPolicy(exits=(6, 10), split=15), cloud="127.0.0.1:7433")  # doctest: +SKIP
    >>> edge.generate("Once upon a time", max_new_tokens=32).text                        # doctest: +SKIP
    """

    def __init__(self, model: Model, policy: ExitPolicy, cloud=None, key: bytes | None = None, dtype: str = "f16",
                 deadline_s: float = 2.0, network: NetworkModel | None = None, strict: bool = False):  # fmt: skip
        from .protocol import load_key

        self.model, self.policy, self.dtype, self.deadline_s = model, policy, dtype, deadline_s
        self.strict = strict
        if cloud is None:
            self.connect = None
        elif isinstance(cloud, Cloud):
            if cloud.split != policy.split:
                raise ValueError(f"the cloud starts at layer {cloud.split}, the policy splits at {policy.split}")
            self.connect = lambda: LocalLink(cloud, network)
        elif isinstance(cloud, str):
            host, _, port = cloud.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"cloud address must be HOST:PORT, got {cloud!r}")
            key = key if key is not None else load_key()
            self.connect = lambda: TcpLink(host.strip("[]"), int(port), key=key)
        else:
            raise TypeError("cloud must be None, a Cloud or 'HOST:PORT'")

    def __repr__(self) -> str:
        where = "standalone" if self.connect is None else "with a cloud"
        return f"Edge(layers [0, {self.policy.split}), exits={self.policy.exits}, {where}, wire {self.dtype})"

    def generate(self, prompt, max_new_tokens: int = 64, chat: bool = False, trace_full: bool = False,
                 speculate: int | str = 0, stream: bool = False, **sampling) -> GenerationResult | GenerationStream:  # fmt: skip
        """Standalone (sampling allowed) or collaborative (greedy) generation with per-token traces.
        speculate: 0 (the paper's mode), K or "auto" (verify mode; see generate_collab).
        stream=True returns a GenerationStream of TokenEvents (source, exit layer, confidence per
        token, as each is decided); its .result is the GenerationResult."""
        from .edge import generate_edge

        if self.connect is None:
            run = lambda on_token: generate_edge(self.model, prompt, self.policy, max_new_tokens=max_new_tokens,  # noqa: E731
                                                 chat=chat, trace_full=trace_full, on_token=on_token, **sampling)  # fmt: skip
        else:
            if sampling.get("temperature", 0.0):
                raise ValueError("collaborative generation is greedy (temperature 0)")
            run = lambda on_token: generate_collab(self.model, prompt, self.policy, self.connect,  # noqa: E731
                                                   max_new_tokens=max_new_tokens, dtype=self.dtype,
                                                   deadline_s=self.deadline_s, chat=chat, trace_full=trace_full,
                                                   speculate=speculate, strict=self.strict, on_token=on_token)  # fmt: skip
        return stream_events(self.model, run) if stream else run(None)


def stream_events(model: Model, run) -> GenerationStream:
    """A GenerationStream over run(on_token), which runs in a background thread: a TokenEvent is
    handed out as each token is decided; an exception in the run is raised from the stream."""
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run(lambda step, trace: events.put(trace))
        except BaseException as exc:  # handed to the consumer
            outcome["error"] = exc
        finally:
            events.put(None)

    threading.Thread(target=target, daemon=True, name="cecollm-stream").start()

    def generate():
        text = TextAssembler(model.detokenize)
        while (trace := events.get()) is not None:
            yield TokenEvent(text.add(trace.token), trace.token, None, trace.source, trace.exit_layer, trace.confidence)
        if "error" in outcome:
            raise outcome["error"]
        tail = text.finish()
        if tail:
            yield TokenEvent(tail, None)
        return outcome["result"]

    return GenerationStream(generate())

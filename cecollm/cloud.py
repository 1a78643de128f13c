"""The cloud: a context manager of edge sessions over layers [split, L), and a TCP server around it.

Each session keeps the split-layer hidden states its edge uploaded (about 10× smaller than the KV
they produce) and a KV cache of the cloud's layers. Uploads are computed lazily, one batch per
uploaded group in upload order, so the cloud's arithmetic depends only on what the edge sent, never
on timing: a session rebuilt after eviction, or the in-process simulation, computes bit for bit the
same. Over the memory budget, least-recently-used sessions lose their KV (not their hidden states)
and are rebuilt when they return; when even that cannot make room the answer is "busy".
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import _core
from .model import Model
from .protocol import (
    DTYPES,
    MAX_BODY,
    MAX_BODY_BEFORE_AUTH,
    MAX_UPLOAD_POSITIONS,
    Code,
    Msg,
    ProtocolError,
    mac,
    new_nonce,
    recv_body,
    recv_message,
)

log = logging.getLogger("cecollm.cloud")


class CloudError(Exception):
    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code


class FairTurn:
    """A lock granted in arrival order: compute turns are taken first come, first served."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque = deque()

    def __enter__(self):
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me:
                self._cond.wait()

    def __exit__(self, *exc):
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()


@dataclass
class Session:
    sid: bytes
    capacity: int
    hidden: np.ndarray  # (capacity, dim) float32: uploaded split hidden states, rows [0, n_hidden)
    owner: str | None = None  # the peer that opened it (limits sessions per peer)
    n_hidden: int = 0
    groups: list = field(default_factory=list)  # (start, end) of each upload, in order
    computed_groups: int = 0  # groups whose keys/values are in the cache
    cache: _core.KVCache | None = None
    last_seq: int = 0
    last_reply: dict | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _BatchItem:
    """A small request waiting for a batched pass of the cloud's layers."""

    cache: _core.KVCache
    x: np.ndarray
    pos0: int
    wake: threading.Event = field(default_factory=threading.Event)  # set when answered or handed the leader role
    done: bool = False
    out: np.ndarray | None = None
    error: BaseException | None = None


class Cloud:
    """Sessions of the cloud's layers [split, n_layers): the part of CE-CoLLM behind the network.

    >>> cloud = Cloud(model, split=15)                    # doctest: +SKIP
    >>> sid = cloud.open(capacity=512)                     # doctest: +SKIP
    >>> token, conf = cloud.infer(sid, 0, prompt_hidden)   # doctest: +SKIP
    """

    def __init__(self, model: Model, split: int, kv_budget_bytes: int = 2 << 30, session_budget_bytes: int = 512 << 20,
                 max_sessions: int = 256, ttl_s: float = 600.0, batching: bool = True,
                 max_sessions_per_peer: int = 16):  # fmt: skip
        """kv_budget_bytes: memory for every session's KV cache *and* uploaded hidden states;
        session_budget_bytes: the most one session may take; sessions hold at most the model's
        context length."""
        from .exits import model_fingerprint

        if not 1 <= split < model.n_layers:
            raise ValueError(f"split {split} outside [1, {model.n_layers})")
        self.model, self.split = model, split
        self.fingerprint = model_fingerprint(model)
        self.dim = model.config["dim"]
        self.context_length = int(model.config.get("context_length", 1 << 20))
        self.kv_bytes_per_position = model.kv_bytes_per_position(model.n_layers - split)
        self.hidden_bytes_per_position = 4 * self.dim
        self.kv_budget, self.session_budget = kv_budget_bytes, session_budget_bytes
        self.max_sessions, self.ttl_s, self.max_sessions_per_peer = max_sessions, ttl_s, max_sessions_per_peer
        self.sessions: dict[bytes, Session] = {}
        self.kv_in_use = 0
        self.hidden_in_use = 0  # bytes of every session's hidden-state store (allocated at open)
        self.lock = threading.Lock()  # guards the session table and the budget
        # cross-session batching: small requests wait here; one of their own threads runs them together
        self.batching = batching
        self.batch_waiting: deque[_BatchItem] = deque()
        self.batch_lock = threading.Lock()  # guards batch_waiting and batch_leader
        self.batch_leader = False  # a request's thread is running batches
        self.batch_stats = {"passes": 0, "rows": 0, "most_sessions": 0}
        self.turn = FairTurn()  # compute turns in arrival order (see _forward)
        self.positions_computed = 0  # positions run through [split, n_layers), all sessions (cloud work)

    def __repr__(self) -> str:
        return (f"Cloud(layers [{self.split}, {self.model.n_layers}), sessions={len(self.sessions)}, "
                f"memory in use={(self.kv_in_use + self.hidden_in_use) / 2**20:.1f} of {self.kv_budget / 2**20:.0f} MiB)")  # fmt: skip

    # ---- sessions ----
    def open(self, capacity: int, owner: str | None = None) -> bytes:
        """A new session of `capacity` positions; owner: the peer asking (None: no per-peer limit)."""
        if not 1 <= capacity <= self.context_length:
            raise CloudError(Code.BAD_REQUEST, f"capacity {capacity} outside [1, {self.context_length}] (the model's context)")
        hidden_bytes = capacity * self.hidden_bytes_per_position
        if capacity * self.kv_bytes_per_position + hidden_bytes > self.session_budget:
            raise CloudError(Code.BUSY, f"a session of {capacity} positions exceeds the per-session budget")
        with self.lock:
            self._expire_idle()
            if len(self.sessions) >= self.max_sessions:
                raise CloudError(Code.BUSY, f"{self.max_sessions} sessions are open")
            if owner is not None and sum(s.owner == owner for s in self.sessions.values()) >= self.max_sessions_per_peer:
                raise CloudError(Code.BUSY, f"{owner} has {self.max_sessions_per_peer} sessions open")
            # admission: hidden states are never evicted, so they must leave room for one KV cache
            need_kv = capacity * self.kv_bytes_per_position
            if self.hidden_in_use + hidden_bytes + need_kv > self.kv_budget:
                raise CloudError(Code.BUSY, "no memory left for this session's hidden states; try again later")
            sid = os.urandom(16)  # 128-bit random, minted here
            self.sessions[sid] = Session(sid, capacity, np.zeros((capacity, self.dim), np.float32), owner)
            self.hidden_in_use += hidden_bytes
        return sid

    def get(self, sid: bytes) -> Session:
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise CloudError(Code.UNKNOWN_SESSION, "unknown or expired session")
        session.last_used = time.monotonic()
        return session

    def close(self, sid: bytes) -> None:
        with self.lock:
            session = self.sessions.pop(sid, None)
            if session is not None:
                self._release(session)

    def _release(self, session: Session) -> None:  # with self.lock held
        self.hidden_in_use -= session.capacity * self.hidden_bytes_per_position
        if session.cache is not None:
            self.kv_in_use -= session.capacity * self.kv_bytes_per_position
            session.cache = None

    def positions(self, sid: bytes) -> int:
        return self.get(sid).n_hidden

    def _expire_idle(self) -> None:  # with self.lock held
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.ttl_s]:
            self._release(self.sessions.pop(sid))

    # ---- context ----
    def upload(self, session: Session, pos: int, hidden: np.ndarray) -> int:
        """Stores hidden states (n, dim) for positions pos.. as one group; returns positions held.
        A pos below the held count rewinds the session to pos first."""
        n = len(hidden)
        if not 0 <= pos <= session.n_hidden:
            raise CloudError(Code.BAD_POSITION, f"upload at {pos} but the session holds {session.n_hidden} positions")
        if pos + n > session.capacity:
            raise CloudError(Code.BAD_POSITION, f"positions up to {pos + n} exceed capacity {session.capacity}")
        if pos < session.n_hidden:
            self._rewind(session, pos)
        session.hidden[pos : pos + n] = hidden
        session.n_hidden = pos + n
        session.groups.append((pos, pos + n))
        return session.n_hidden

    def _rewind(self, session: Session, pos: int) -> None:
        """Forgets positions from pos on: the groups after it and, when pos falls inside a small group
        (a verified block whose drafts were partly rejected), that group's tail."""
        keep = [g for g in session.groups if g[1] <= pos]
        inside = [g for g in session.groups if g[0] < pos < g[1]]
        if inside:
            a, b = inside[0]
            if b - a > _core.SMALL_BATCH:  # cutting a large group would change how a rebuild batches it
                raise CloudError(Code.BAD_POSITION, f"position {pos} is inside an uploaded group of {b - a}")
            keep.append((a, pos))
        session.computed_groups = min(session.computed_groups, len(keep))
        session.groups = keep
        session.n_hidden = pos
        if session.cache is not None:
            session.cache.truncate(pos)

    def infer(self, session: Session, pos: int, hidden: np.ndarray) -> tuple[int, float]:
        """Uploads positions pos.. and returns the greedy token (and its probability) after the last."""
        self.upload(session, pos, hidden)
        logits = self.model.core.head(self._compute(session)[-1:])
        conf, top1 = _core.confidence(logits, _core.METRIC_MAX_PROB)
        return int(top1[0]), float(conf[0])

    def verify(self, session: Session, pos: int, hidden: np.ndarray) -> np.ndarray:
        """Uploads positions pos.. (an edge's drafted block) and returns the greedy token after each:
        int32 (n,). The block runs through the cloud's layers as one batch."""
        self.upload(session, pos, hidden)
        logits = self.model.core.head(np.ascontiguousarray(self._compute(session)))
        return logits.argmax(-1).astype(np.int32)

    def _compute(self, session: Session) -> np.ndarray:
        """Runs every uploaded group not yet in the cache through [split, L); returns the last group's
        outputs (n, dim).
        The request's own group, when small, joins other sessions' in one batched pass."""
        self._ensure_cache(session)
        *earlier, (start, end) = session.groups[session.computed_groups :]
        with self.lock:
            self.positions_computed += end - session.groups[session.computed_groups][0]
        for a, b in earlier:
            self._forward(session, a, b)
            session.computed_groups += 1
        if self.batching and end - start <= _core.SMALL_BATCH:
            out = self._batched(session.cache, session.hidden[start:end], start)
        else:
            out = self._forward(session, start, end)
        session.computed_groups += 1
        return out

    def _forward(self, session: Session, a: int, b: int) -> np.ndarray:
        """Rows [a, b) through the cloud's layers, one compute turn per CE_BATCH_CHUNK rows: the C core
        runs a long batch in exactly these chunks (so the result is the same bit for bit), and other
        sessions' work gets its turn between them (a long request cannot hold the CPU)."""
        outs = []
        for c in range(a, b, _core.BATCH_CHUNK):
            with self.turn:
                outs.append(session.cache.forward(session.hidden[c : min(c + _core.BATCH_CHUNK, b)], c))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _batched(self, cache, x: np.ndarray, pos0: int) -> np.ndarray:
        """Rows x of one session through the cloud's layers, in one pass with whatever other sessions'
        small requests are waiting. No thread of its own: the request that finds no batch running
        runs batches itself (taking the waiting requests in arrival order, at most SMALL_BATCH rows so
        that each row's result is what it would be alone, bit for bit) until its own is done, then
        hands the role to the oldest request still waiting."""
        item = _BatchItem(cache, x, pos0)
        with self.batch_lock:
            self.batch_waiting.append(item)
            lead = not self.batch_leader
            self.batch_leader = True
        if not lead:
            item.wake.wait()  # answered, or handed the role
        while not item.done:
            self._run_batch()
            with self.batch_lock:
                if item.done:
                    if self.batch_waiting:
                        self.batch_waiting[0].wake.set()  # the oldest waiting request leads next
                    else:
                        self.batch_leader = False
        if item.error is not None:
            raise item.error
        return item.out

    def _run_batch(self) -> None:
        """Takes the waiting requests in arrival order, up to SMALL_BATCH rows, and runs them as one pass."""
        with self.batch_lock:
            batch, rows = [], 0
            while self.batch_waiting and rows + len(self.batch_waiting[0].x) <= _core.SMALL_BATCH:
                batch.append(self.batch_waiting.popleft())
                rows += len(batch[-1].x)
        try:
            with self.turn:
                outs = _core.forward_multi([(b.cache, b.x, b.pos0) for b in batch], self.split, self.model.n_layers)
        except Exception as exc:  # reported to every request of the batch
            outs, error = [None] * len(batch), exc
        else:
            error = None
            self.batch_stats["passes"] += 1
            self.batch_stats["rows"] += rows
            self.batch_stats["most_sessions"] = max(self.batch_stats["most_sessions"], len(batch))
        for b, out in zip(batch, outs):
            b.out, b.error, b.done = out, error, True
            b.wake.set()

    def _ensure_cache(self, session: Session) -> None:
        if session.cache is not None:
            return
        need = session.capacity * self.kv_bytes_per_position
        with self.lock:
            if need + self.hidden_in_use > self.kv_budget:
                raise CloudError(Code.BUSY, "no memory left for this session's KV cache; try again later")
            while self.kv_in_use + self.hidden_in_use + need > self.kv_budget:
                victims = [s for s in self.sessions.values() if s.cache is not None and s is not session
                           and s.lock.acquire(blocking=False)]  # fmt: skip
                if not victims:
                    raise CloudError(Code.BUSY, "no KV memory left for this session; try again later")
                victim = min(victims, key=lambda s: s.last_used)
                for s in victims:
                    if s is not victim:
                        s.lock.release()
                victim.cache, victim.computed_groups = None, 0  # keeps its hidden states: rebuilt on return
                self.kv_in_use -= victim.capacity * self.kv_bytes_per_position
                victim.lock.release()
                log.info("evicted the KV cache of a session (%d positions)", victim.n_hidden)
            self.kv_in_use += need
        session.cache = self.model.new_cache(session.capacity, self.split, self.model.n_layers)
        session.computed_groups = 0


def verify_reply(seq: int, pos: int, tokens: np.ndarray, seconds: float) -> dict:
    """The TOKENS message answering a VERIFY: the cloud's token after each position pos.."""
    data = np.ascontiguousarray(tokens, "<i4").tobytes()
    return {"type": Msg.TOKENS, "seq": seq, "pos": pos, "n": len(tokens), "data": data, "us": int(seconds * 1e6)}


class Handler:
    """The cloud's request handling, in one place: a frame body in, a reply frame out. The TCP server
    and the in-process link (the simulation) both pump bytes through it. Session requests are
    applied once per sequence number (a duplicate gets the stored reply)."""

    def __init__(self, cloud: Cloud, max_positions: int = MAX_UPLOAD_POSITIONS):
        self.cloud, self.max_positions = cloud, max_positions
        self.stats = {"requests": 0, "errors": 0, "cloud_s": 0.0}
        self.lock = threading.Lock()  # guards stats

    def hello(self, hello: dict) -> None:
        """Raises CloudError(MISMATCH) unless the edge runs this model, split and a known dtype."""
        cloud = self.cloud
        if hello.get("ver") != _core.WIRE_VERSION:
            raise CloudError(Code.MISMATCH, f"wire version {hello.get('ver')}, the server speaks {_core.WIRE_VERSION}")
        if hello["model"] != cloud.fingerprint or hello["split"] != cloud.split:
            raise CloudError(Code.MISMATCH, f"the edge runs model {hello['model']} split at layer {hello['split']}; "
                             f"this cloud runs model {cloud.fingerprint} from layer {cloud.split}")  # fmt: skip
        if hello["dtype"] not in DTYPES.values():
            raise CloudError(Code.MISMATCH, f"unknown wire dtype {hello['dtype']}")

    def handle(self, body: bytes, owner: str | None = None) -> bytes:
        """One request frame body -> the reply frame (length prefix included). A request's hidden
        states come out of the frame as float32 (n, dim) in the same C call (wire_decode's hidden)."""
        try:
            request = _core.wire_decode(body, MAX_BODY, True)
        except ValueError as exc:
            self._count("errors")
            return _core.wire_encode({"type": Msg.ERROR, "code": Code.BAD_FRAME, "msg": str(exc)[:200]})
        return _core.wire_encode(self.reply(request, owner))

    def reply(self, req: dict, owner: str | None = None) -> dict:
        self._count("requests")
        seq = req.get("seq", 0)
        try:
            kind = req["type"]
            if kind == Msg.OPEN:
                sid = self.cloud.open(int(req.get("cap", 2048)), owner)
                return {"type": Msg.REPLY, "code": Code.OK, "seq": seq, "sid": sid}
            if kind not in (Msg.UPLOAD, Msg.INFER, Msg.VERIFY, Msg.CLOSE, Msg.RESUME):
                raise CloudError(Code.BAD_REQUEST, f"message type {kind} is not a request")
            session = self.cloud.get(req["sid"])
            with session.lock:
                if seq == session.last_seq and session.last_reply is not None:
                    return session.last_reply  # a duplicate: the stored reply, never a second application
                if seq < session.last_seq:
                    raise CloudError(Code.STALE_SEQUENCE, f"sequence {seq} is older than {session.last_seq}")
                reply = self._apply(session, kind, req, seq)
                session.last_seq, session.last_reply = seq, reply
                return reply
        except CloudError as exc:
            self._count("errors")
            if exc.code == Code.BUSY:
                log.warning("limit reached (%s): %s", owner or "in process", exc)
            return {"type": Msg.ERROR, "code": exc.code, "msg": str(exc)[:200], "seq": seq}
        except (ValueError, IndexError) as exc:
            self._count("errors")
            return {"type": Msg.ERROR, "code": Code.BAD_REQUEST, "msg": str(exc)[:200], "seq": seq}

    def _apply(self, session: Session, kind: int, req: dict, seq: int) -> dict:
        if kind == Msg.CLOSE:
            self.cloud.close(session.sid)
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq}
        if kind == Msg.RESUME:
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq, "pos": session.n_hidden}
        if req["dim"] != self.cloud.dim:
            raise CloudError(Code.BAD_REQUEST, f"hidden size {req['dim']}, the model's is {self.cloud.dim}")
        if req["n"] > self.max_positions:
            raise CloudError(Code.BAD_REQUEST, f"{req['n']} positions in one request; at most {self.max_positions}")
        hidden = req["data"]  # float32 (n, dim): the schema requires n, dim and dtype beside the data
        if kind == Msg.UPLOAD:
            held = self.cloud.upload(session, req["pos"], hidden)
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq, "pos": held}
        t0 = time.perf_counter()
        if kind == Msg.VERIFY:
            tokens = self.cloud.verify(session, req["pos"], hidden)
            seconds = time.perf_counter() - t0
            self._count("cloud_s", seconds)
            return verify_reply(seq, req["pos"], tokens, seconds)
        token, conf = self.cloud.infer(session, req["pos"], hidden)
        seconds = time.perf_counter() - t0
        self._count("cloud_s", seconds)
        return {"type": Msg.TOKEN, "seq": seq, "pos": req["pos"] + req["n"] - 1, "token": token, "conf": conf,
                "us": int(seconds * 1e6)}  # fmt: skip

    def _count(self, key: str, amount=1) -> None:
        with self.lock:
            self.stats[key] += amount


_ACCEPT_RETRYABLE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO)


class CloudServer:
    """TCP front of a Cloud. Without a key it listens on loopback only.

    Limits (each a keyword): max_connections at once (more are answered BUSY and closed);
    handshake_timeout_s for the hello and authentication; frame_timeout_s for a frame's body once its
    header is in; io_timeout_s of silence before an idle connection is closed. Sessions per peer and
    memory are the Cloud's limits.

    >>> server = CloudServer(Cloud(model, split=15), port=0).start()   # doctest: +SKIP
    >>> server.address                                                 # doctest: +SKIP
    ('127.0.0.1', 40123)
    """

    def __init__(self, cloud: Cloud, host: str = "127.0.0.1", port: int = 7433, key: bytes | None = None,
                 io_timeout_s: float = 300.0, max_connections: int = 256, handshake_timeout_s: float = 5.0,
                 frame_timeout_s: float = 30.0):  # fmt: skip
        if key is None and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("without a key the server listens on loopback only (set CECOLLM_KEY or --key-file)")
        self.cloud, self.key, self.io_timeout_s = cloud, key, io_timeout_s
        self.handler = Handler(cloud)
        self.max_connections, self.handshake_timeout_s = max_connections, handshake_timeout_s
        self.frame_timeout_s = frame_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.2)  # the accept loop sees a shutdown within this
        self.address = self.sock.getsockname()[:2]
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # guards connections and threads
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.accept_thread: threading.Thread | None = None
        self.stats = {"bytes_out": 0, "auth_failures": 0, "refused_connections": 0, "accept_errors": 0}

    def __repr__(self) -> str:
        state = "stopped" if self.stopping.is_set() else "serving" if self.accept_thread else "not started"
        return (f"CloudServer({self.address[0]}:{self.address[1]}, {state}, connections={len(self.threads)}, "
                f"key={'yes' if self.key else 'no'})")  # fmt: skip

    def __enter__(self) -> CloudServer:
        """`with CloudServer(cloud, port=0) as server:` serves inside the block and shuts down after it."""
        return self.start() if self.accept_thread is None else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def threads(self) -> list[threading.Thread]:
        """The live connection handlers (finished ones are forgotten)."""
        with self.lock:
            return list(self.connections.values())

    def start(self) -> CloudServer:
        self.accept_thread = threading.Thread(target=self.serve_forever, name="cecollm-accept", daemon=True)
        self.accept_thread.start()
        return self

    def serve_forever(self) -> None:
        backoff = 0.01
        while not self.stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self.stopping.is_set():
                    break
                if exc.errno in _ACCEPT_RETRYABLE:  # out of descriptors or memory: wait, never stop serving
                    self.stats["accept_errors"] += 1
                    log.warning("accept failed (%s); retrying in %.2f s", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                log.error("accept failed for good: %s", exc)
                break
            backoff = 0.01
            with self.lock:
                crowded = len(self.connections) >= self.max_connections
            if crowded:
                self.stats["refused_connections"] += 1
                log.warning("refused %s: %d connections open", peer[0], self.max_connections)
                self._try_send(conn, {"type": Msg.ERROR, "code": Code.BUSY, "msg": "too many connections"})
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve_connection, args=(conn, peer[0]), name="cecollm-conn", daemon=True)
            with self.lock:
                self.connections[conn] = t
            t.start()

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stops accepting, closes every connection, waits (up to timeout_s) for the handlers."""
        self.stopping.set()
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for t in [self.accept_thread, *self.threads]:
            if t is not None and t is not threading.current_thread():
                t.join(timeout=max(deadline - time.monotonic(), 0.0))
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- one connection ----
    def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        try:
            if self._handshake(conn, peer):
                while not self.stopping.is_set():
                    conn.settimeout(self.io_timeout_s)  # idle between frames; a started frame has its deadline
                    body = recv_body(conn, MAX_BODY, frame_timeout_s=self.frame_timeout_s)
                    self._send(conn, self.handler.handle(body, peer))
        except ProtocolError as exc:
            self.handler._count("errors")
            self._try_send(conn, {"type": Msg.ERROR, "code": Code.BAD_FRAME, "msg": str(exc)[:200]})
        except (OSError, socket.timeout):
            pass
        finally:
            with self.lock:
                self.connections.pop(conn, None)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: str) -> bool:
        """The hello (model, split, dtype must match) and, with a key, the challenge, all within
        handshake_timeout_s."""
        deadline = time.monotonic() + self.handshake_timeout_s
        hello = recv_message(conn, MAX_BODY_BEFORE_AUTH, deadline)
        try:
            if hello["type"] != Msg.HELLO:
                raise CloudError(Code.BAD_REQUEST, "expected hello")
            self.handler.hello(hello)
        except CloudError as exc:
            log.warning("refused %s: %s", peer, exc)
            self._reply(conn, {"type": Msg.ERROR, "code": exc.code, "msg": str(exc)[:200]})
            return False
        if self.key is None:
            self._reply(conn, {"type": Msg.REPLY, "code": Code.OK, "ver": _core.WIRE_VERSION})
            return True
        nonce = new_nonce()
        self._reply(conn, {"type": Msg.REPLY, "code": Code.OK, "ver": _core.WIRE_VERSION, "nonce": nonce})
        auth = recv_message(conn, MAX_BODY_BEFORE_AUTH, deadline)
        if auth["type"] != Msg.AUTH or not hmac.compare_digest(auth.get("mac", b""), mac(self.key, nonce)):
            self.stats["auth_failures"] += 1
            log.warning("authentication failed from %s", peer)
            self._reply(conn, {"type": Msg.ERROR, "code": Code.AUTH_FAILED, "msg": "authentication failed"})
            return False
        self._reply(conn, {"type": Msg.REPLY, "code": Code.OK})
        return True

    def _send(self, conn: socket.socket, frame: bytes) -> None:
        conn.sendall(frame)
        self.stats["bytes_out"] += len(frame)

    def _reply(self, conn: socket.socket, message: dict) -> None:
        self._send(conn, _core.wire_encode(message))

    def _try_send(self, conn, message) -> None:
        try:
            conn.settimeout(1.0)
            self._reply(conn, message)
        except OSError:
            pass

"""The cloud: a context manager of edge sessions over layers [split, L), and a TCP server around it.

Each session keeps the split-layer hidden states its edge uploaded (about 10× smaller than the KV
they produce) and a KV cache of the cloud's layers. Uploads are computed lazily, one batch per
uploaded group in upload order, so the cloud's arithmetic depends only on what the edge sent, never
on timing: a session rebuilt after eviction, or the in-process simulation, computes bit for bit the
same. Over the memory budget, least-recently-used sessions lose their KV (not their hidden states)
and are rebuilt when they return; when even that cannot make room the answer is "busy".
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from . import _core
from .model import Model
from .protocol import (
    MAX_BODY,
    MAX_BODY_BEFORE_AUTH,
    Code,
    Msg,
    ProtocolError,
    mac,
    new_nonce,
    recv_message,
    send_message,
)

log = logging.getLogger("cecollm.cloud")


class CloudError(Exception):
    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    sid: bytes
    capacity: int
    hidden: np.ndarray  # (capacity, dim) float32: uploaded split hidden states, rows [0, n_hidden)
    n_hidden: int = 0
    groups: list = field(default_factory=list)  # (start, end) of each upload, in order
    computed_groups: int = 0  # groups whose keys/values are in the cache
    cache: _core.KVCache | None = None
    last_seq: int = 0
    last_reply: dict | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Cloud:
    """Sessions of the cloud's layers [split, n_layers): the part of CE-CoLLM behind the network.

    >>> cloud = Cloud(model, split=15)                    # doctest: +SKIP
    >>> sid = cloud.open(capacity=512)                     # doctest: +SKIP
    >>> token, conf = cloud.infer(sid, 0, prompt_hidden)   # doctest: +SKIP
    """

    def __init__(self, model: Model, split: int, kv_budget_bytes: int = 2 << 30, session_budget_bytes: int = 512 << 20,
                 max_sessions: int = 256, ttl_s: float = 600.0, batching: bool = True):  # fmt: skip
        if not 1 <= split < model.n_layers:
            raise ValueError(f"split {split} outside [1, {model.n_layers})")
        self.model, self.split = model, split
        self.dim = model.config["dim"]
        self.kv_bytes_per_position = model.kv_bytes_per_position(model.n_layers - split)
        self.kv_budget, self.session_budget = kv_budget_bytes, session_budget_bytes
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        self.sessions: dict[bytes, Session] = {}
        self.kv_in_use = 0
        self.lock = threading.Lock()  # guards the session table and the budget
        # cross-session batching: small requests queue here and a worker runs them together
        self.batching = batching
        self.batch_queue: queue.Queue = queue.Queue()
        self.batch_lock = threading.Lock()  # held by the worker while it computes a batch
        self.batch_stats = {"passes": 0, "rows": 0, "most_sessions": 0}
        self._worker: threading.Thread | None = None

    # ---- sessions ----
    def open(self, capacity: int) -> bytes:
        if not 1 <= capacity <= 1 << 20:
            raise CloudError(Code.BAD_REQUEST, f"capacity {capacity} outside [1, {1 << 20}]")
        if capacity * self.kv_bytes_per_position > self.session_budget:
            raise CloudError(Code.BUSY, f"a session of {capacity} positions exceeds the per-session budget")
        with self.lock:
            self._expire_idle()
            if len(self.sessions) >= self.max_sessions:
                raise CloudError(Code.BUSY, f"{self.max_sessions} sessions are open")
            sid = os.urandom(16)  # 128-bit random, minted here
            self.sessions[sid] = Session(sid, capacity, np.zeros((capacity, self.dim), np.float32))
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
            if session is not None and session.cache is not None:
                self.kv_in_use -= session.capacity * self.kv_bytes_per_position
                session.cache = None

    def positions(self, sid: bytes) -> int:
        return self.get(sid).n_hidden

    def _expire_idle(self) -> None:  # with self.lock held
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.ttl_s]:
            session = self.sessions.pop(sid)
            if session.cache is not None:
                self.kv_in_use -= session.capacity * self.kv_bytes_per_position

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
        for a, b in earlier:
            session.cache.forward(session.hidden[a:b], a)
            session.computed_groups += 1
        if self.batching and end - start <= _core.SMALL_BATCH:
            out = self._batched(session.cache, session.hidden[start:end], start)
        else:
            out = session.cache.forward(session.hidden[start:end], start)
        session.computed_groups += 1
        return out

    def _batched(self, cache, x: np.ndarray, pos0: int) -> np.ndarray:
        future: Future = Future()
        self.batch_queue.put((cache, x, pos0, future))
        with self.lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._batch_worker, daemon=True, name="cecollm-batch")
                self._worker.start()
        return future.result()

    def _batch_worker(self) -> None:
        """Takes what is queued, up to SMALL_BATCH rows (so each row's result is what it would be
        alone, bit for bit), and runs it as one pass of the cloud's layers."""
        carry = None
        while True:
            item = carry or self.batch_queue.get()
            carry = None
            with self.batch_lock:
                batch, rows = [item], len(item[1])
                while True:
                    try:
                        nxt = self.batch_queue.get_nowait()
                    except queue.Empty:
                        break
                    if rows + len(nxt[1]) > _core.SMALL_BATCH:
                        carry = nxt
                        break
                    batch.append(nxt)
                    rows += len(nxt[1])
                try:
                    outs = _core.forward_multi([(c, x, p) for c, x, p, _ in batch], self.split, self.model.n_layers)
                except Exception as exc:  # reported to every waiting request
                    for *_, future in batch:
                        future.set_exception(exc)
                    continue
                self.batch_stats["passes"] += 1
                self.batch_stats["rows"] += rows
                self.batch_stats["most_sessions"] = max(self.batch_stats["most_sessions"], len(batch))
                for (*_, future), out in zip(batch, outs):
                    future.set_result(out)

    def _ensure_cache(self, session: Session) -> None:
        if session.cache is not None:
            return
        need = session.capacity * self.kv_bytes_per_position
        with self.lock:
            if need > self.kv_budget:
                raise CloudError(Code.BUSY, "the session's KV cache exceeds the cloud's whole budget")
            while self.kv_in_use + need > self.kv_budget:
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


class CloudServer:
    """TCP front of a Cloud. Without a key it listens on loopback only.

    >>> server = CloudServer(Cloud(model, split=15), port=0).start()   # doctest: +SKIP
    >>> server.address                                                 # doctest: +SKIP
    ('127.0.0.1', 40123)
    """

    def __init__(self, cloud: Cloud, host: str = "127.0.0.1", port: int = 7433, key: bytes | None = None,
                 max_data: int = MAX_BODY, io_timeout_s: float = 300.0):  # fmt: skip
        if key is None and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("without a key the server listens on loopback only (set CECOLLM_KEY or --key-file)")
        self.cloud, self.key, self.max_data, self.io_timeout_s = cloud, key, max_data, io_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.address = self.sock.getsockname()[:2]
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.stats = {"bytes_out": 0, "requests": 0, "errors": 0, "cloud_s": 0.0}

    def start(self) -> CloudServer:
        t = threading.Thread(target=self.serve_forever, name="cecollm-accept", daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.io_timeout_s)
            self.connections.add(conn)
            t = threading.Thread(target=self._serve_connection, args=(conn,), name="cecollm-conn", daemon=True)
            t.start()
            self.threads.append(t)

    def shutdown(self) -> None:
        """Stops accepting, closes every connection, waits for the handlers."""
        self.stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)

    # ---- one connection ----
    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            if self._handshake(conn):
                while not self.stopping.is_set():
                    request = recv_message(conn, MAX_BODY)
                    self._reply(conn, self._handle(request))
        except ProtocolError as exc:
            self.stats["errors"] += 1
            self._try_send(conn, {"type": Msg.ERROR, "code": Code.BAD_FRAME, "msg": str(exc)[:200]})
        except (OSError, socket.timeout):
            pass
        finally:
            self.connections.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        hello = recv_message(conn, MAX_BODY_BEFORE_AUTH)
        if hello["type"] != Msg.HELLO or hello.get("ver") != _core.WIRE_VERSION:
            self._reply(conn, {"type": Msg.ERROR, "code": Code.BAD_REQUEST,
                               "msg": f"expected hello with version {_core.WIRE_VERSION}"})  # fmt: skip
            return False
        if self.key is None:
            self._reply(conn, {"type": Msg.REPLY, "code": Code.OK, "ver": _core.WIRE_VERSION})
            return True
        nonce = new_nonce()
        self._reply(conn, {"type": Msg.REPLY, "code": Code.OK, "ver": _core.WIRE_VERSION, "nonce": nonce})
        auth = recv_message(conn, MAX_BODY_BEFORE_AUTH)
        if auth["type"] != Msg.AUTH or not hmac.compare_digest(auth.get("mac", b""), mac(self.key, nonce)):
            self.stats["errors"] += 1
            self._reply(conn, {"type": Msg.ERROR, "code": Code.AUTH_FAILED, "msg": "authentication failed"})
            return False
        self._reply(conn, {"type": Msg.REPLY, "code": Code.OK})
        return True

    def _reply(self, conn: socket.socket, message: dict) -> None:
        self.stats["bytes_out"] += send_message(conn, message)

    def _try_send(self, conn, message) -> None:
        try:
            self._reply(conn, message)
        except OSError:
            pass

    def _handle(self, req: dict) -> dict:
        """One request -> one reply. Session requests are applied once per sequence number."""
        self.stats["requests"] += 1
        seq = req.get("seq", 0)
        try:
            kind = req["type"]
            if kind == Msg.OPEN:
                sid = self.cloud.open(int(req.get("cap", 2048)))
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
            self.stats["errors"] += 1
            return {"type": Msg.ERROR, "code": exc.code, "msg": str(exc)[:200], "seq": seq}
        except (ValueError, IndexError) as exc:  # e.g. a payload that decodes to non-finite values
            self.stats["errors"] += 1
            return {"type": Msg.ERROR, "code": Code.BAD_REQUEST, "msg": str(exc)[:200], "seq": seq}

    def _apply(self, session: Session, kind: int, req: dict, seq: int) -> dict:
        if kind == Msg.CLOSE:
            self.cloud.close(session.sid)
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq}
        if kind == Msg.RESUME:
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq, "pos": session.n_hidden}
        if req["dim"] != self.cloud.dim:
            raise CloudError(Code.BAD_REQUEST, f"hidden size {req['dim']}, the model's is {self.cloud.dim}")
        hidden = _core.hidden_decode(req["data"], req["n"], req["dim"], req["dtype"])
        if kind == Msg.UPLOAD:
            held = self.cloud.upload(session, req["pos"], hidden)
            return {"type": Msg.REPLY, "code": Code.OK, "seq": seq, "pos": held}
        t0 = time.perf_counter()
        if kind == Msg.VERIFY:
            tokens = self.cloud.verify(session, req["pos"], hidden)
            self.stats["cloud_s"] += time.perf_counter() - t0
            return verify_reply(seq, req["pos"], tokens, time.perf_counter() - t0)
        token, conf = self.cloud.infer(session, req["pos"], hidden)
        self.stats["cloud_s"] += time.perf_counter() - t0
        cloud_us = int((time.perf_counter() - t0) * 1e6)
        return {"type": Msg.TOKEN, "seq": seq, "pos": req["pos"] + req["n"] - 1, "token": token, "conf": conf,
                "us": cloud_us}  # fmt: skip

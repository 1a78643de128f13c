"""Framing and authentication over a socket; messages are encoded and checked in C (cecollm._core)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time
from enum import IntEnum

from . import _core

MAX_BODY_BEFORE_AUTH = 512  # bytes: hello and auth are tiny
MAX_BODY = 16 << 20  # after authentication
MAX_UPLOAD_POSITIONS = 4096  # positions per upload frame (4096 × 576 × 2 B = 4.7 MB in F16)
DTYPES = {"f16": _core.WIRE_F16, "q8_0": _core.WIRE_Q8_0, "f32": _core.WIRE_F32}


class Msg(IntEnum):
    HELLO = 1
    AUTH = 2
    OPEN = 3
    UPLOAD = 4
    INFER = 5
    TOKEN = 6
    CLOSE = 7
    RESUME = 8
    ERROR = 9
    REPLY = 10
    VERIFY = 11  # as INFER over n drafted positions; answered by TOKENS (the cloud's token after each)
    TOKENS = 12


class Code(IntEnum):
    """Error codes, defined in C (csrc/include/cecollm/wire.h, ce_wire_code)."""

    OK = _core.CODE_OK
    BAD_FRAME = _core.CODE_BAD_FRAME
    AUTH_FAILED = _core.CODE_AUTH_FAILED
    UNKNOWN_SESSION = _core.CODE_UNKNOWN_SESSION
    BUSY = _core.CODE_BUSY
    BAD_POSITION = _core.CODE_BAD_POSITION
    BAD_REQUEST = _core.CODE_BAD_REQUEST
    STALE_SEQUENCE = _core.CODE_STALE_SEQUENCE
    SHUTTING_DOWN = _core.CODE_SHUTTING_DOWN
    MISMATCH = _core.CODE_MISMATCH


class ProtocolError(ConnectionError):
    """The peer broke the protocol or the connection failed."""


class RemoteError(Exception):
    """The server answered with an error message."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{Code(code).name if code in Code._value2member_map_ else code}: {message}")
        self.code = code


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """n bytes; with a deadline (time.monotonic()), all of them by then or socket.timeout."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{n - got} of {n} bytes still missing at the deadline")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, max_body: int = MAX_BODY, deadline: float | None = None) -> dict:
    """One frame: the length is checked against max_body before the body is read."""
    return recv_frame(sock, max_body, deadline)[0]


def recv_body(sock: socket.socket, max_body: int = MAX_BODY, deadline: float | None = None,
              frame_timeout_s: float | None = None) -> bytes:  # fmt: skip
    """One frame's body. deadline: for the whole frame; frame_timeout_s: once its first byte is in,
    the rest must follow within this many seconds (a slow sender cannot pin the buffer)."""
    header = recv_exact(sock, 4, deadline)
    try:
        length = _core.frame_length(header, max_body)
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"bad frame header: {exc}") from None
    if frame_timeout_s is not None:
        whole = time.monotonic() + frame_timeout_s
        deadline = whole if deadline is None else min(deadline, whole)
    return recv_exact(sock, length, deadline)


def decode(body: bytes, max_body: int = MAX_BODY) -> dict:
    try:
        return _core.wire_decode(body, max_body)
    except ValueError as exc:
        raise ProtocolError(f"bad frame: {exc}") from None


def recv_frame(sock: socket.socket, max_body: int = MAX_BODY, deadline: float | None = None) -> tuple[dict, int]:
    """(message, frame bytes)."""
    body = recv_body(sock, max_body, deadline)
    return decode(body, max_body), 4 + len(body)


def send_message(sock: socket.socket, message: dict) -> int:
    frame = _core.wire_encode(message)
    sock.sendall(frame)
    return len(frame)


def new_nonce() -> bytes:
    return os.urandom(32)


def mac(key: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 of the server's challenge under the shared key."""
    return hmac.new(key, nonce, hashlib.sha256).digest()


def load_key(path: str | None = None, env: str = "CECOLLM_KEY") -> bytes | None:
    """The shared key from a file, or else the environment variable; None when neither is set."""
    if path:
        with open(path, "rb") as f:
            key = f.read().strip()
    else:  # environment values are text; a non-UTF-8 byte survives as its surrogate escape
        key = os.environ.get(env, "").encode("utf-8", "surrogateescape")
    if path and not key:
        raise ValueError(f"key file {path} is empty")
    return key or None

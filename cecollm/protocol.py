"""Framing and authentication over a socket; messages are encoded and checked in C (cecollm._core)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
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
    OK = 0
    BAD_FRAME = 1
    AUTH_FAILED = 2
    UNKNOWN_SESSION = 3
    BUSY = 4
    BAD_POSITION = 5
    BAD_REQUEST = 6
    STALE_SEQUENCE = 7
    SHUTTING_DOWN = 8


class ProtocolError(ConnectionError):
    """The peer broke the protocol or the connection failed."""


class RemoteError(Exception):
    """The server answered with an error message."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{Code(code).name if code in Code._value2member_map_ else code}: {message}")
        self.code = code


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, max_body: int = MAX_BODY) -> dict:
    """One frame: the length is checked against max_body before the body is read."""
    return recv_frame(sock, max_body)[0]


def recv_frame(sock: socket.socket, max_body: int = MAX_BODY) -> tuple[dict, int]:
    """(message, frame bytes)."""
    header = recv_exact(sock, 4)
    try:
        length = _core.frame_length(header, max_body)
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"bad frame header: {exc}") from None
    body = recv_exact(sock, length)
    try:
        return _core.wire_decode(body, max_body), 4 + length
    except ValueError as exc:
        raise ProtocolError(f"bad frame: {exc}") from None


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
    else:
        key = os.environ.get(env, "").encode()
    if path and not key:
        raise ValueError(f"key file {path} is empty")
    return key or None

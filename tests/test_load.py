"""Honest edges beside hostile clients for about two minutes ($CECOLLM_LOAD_S), against a `cecollm
serve` process: honest outputs stay bit-identical to the in-process run, every honest request is
served by the cloud (no fallback), and the server's memory stays bounded."""

import os
import random
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cecollm import _core
from cecollm.client import LocalLink, TcpLink, edge_identity, generate_collab
from cecollm.cloud import Cloud
from cecollm.exits import ExitPolicy
from cecollm.protocol import Msg, mac, recv_message

pytestmark = [pytest.mark.model, pytest.mark.slow]
DURATION = float(os.environ.get("CECOLLM_LOAD_S", "120"))
KEY = b"load-test-key"
SPLIT = 15
POLICY = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
PROMPTS = ("The history of the bicycle begins", "Write a haiku about the sea.", "List three uses of a paperclip.")
# loopback too, but other peers (one per attack): the per-peer limits tell them apart from the honest edges
HOSTILE = {kind: f"127.0.0.{i}" for i, kind in enumerate(("idle", "garbage", "flood", "slow", "heavy"), start=2)}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def hostile_socket(port: int, kind: str) -> socket.socket:
    s = socket.socket()
    s.settimeout(5)
    s.bind((HOSTILE[kind], 0))
    s.connect(("127.0.0.1", port))
    return s


def authenticated(port: int, identity: dict, kind: str) -> socket.socket:
    s = hostile_socket(port, kind)
    s.sendall(_core.wire_encode({"type": Msg.HELLO, "ver": _core.WIRE_VERSION, **identity}))
    nonce = recv_message(s, 512)["nonce"]
    s.sendall(_core.wire_encode({"type": Msg.AUTH, "mac": mac(KEY, nonce)}))
    recv_message(s, 512)
    return s


def attack(kind: str, port: int, identity: dict, dim: int, stop: threading.Event, counts: dict) -> None:
    """One hostile client, repeating its attack until stop."""
    rng = random.Random(kind)
    held = []
    while not stop.is_set():
        try:
            if kind == "idle":  # connections that never say hello (cut at the handshake deadline)
                held.append(hostile_socket(port, kind))
                if len(held) > 40:
                    held.pop(0).close()
            elif kind == "garbage":
                with hostile_socket(port, kind) as s:
                    s.sendall(rng.randbytes(rng.randint(1, 300)))
            elif kind == "flood":  # sessions until the per-peer limit answers BUSY
                with authenticated(port, identity, kind) as s:
                    for seq in range(1, 40):
                        s.sendall(_core.wire_encode({"type": Msg.OPEN, "seq": seq, "cap": 8192}))
                        recv_message(s)
            elif kind == "slow":  # declares 16 MiB, sends a little, stalls past the frame deadline
                s = authenticated(port, identity, kind)
                s.sendall((16 << 20).to_bytes(4, "big") + b"\x81" * 4096)
                held.append(s)
                if len(held) > 10:
                    held.pop(0).close()
            elif kind == "heavy":  # long requests: 4096 positions at a time
                with authenticated(port, identity, kind) as s:
                    s.sendall(_core.wire_encode({"type": Msg.OPEN, "seq": 1, "cap": 4096}))
                    sid = recv_message(s).get("sid")
                    if sid is not None:
                        x = np.ones((4096, dim), np.float32) * 0.01
                        s.settimeout(120)
                        s.sendall(_core.wire_encode({"type": Msg.INFER, "seq": 2, "sid": sid, "pos": 0, "n": 4096,
                                                     "dim": dim, "dtype": _core.WIRE_F16,
                                                     "data": _core.hidden_encode(x, _core.WIRE_F16)}))  # fmt: skip
                        recv_message(s)
            counts[kind] = counts.get(kind, 0) + 1
        except (OSError, ConnectionError, ValueError):
            counts[kind] = counts.get(kind, 0) + 1
            stop.wait(0.05)
    for s in held:
        s.close()


def test_honest_edges_are_served_beside_hostile_clients(model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    server = subprocess.Popen(
        [sys.executable, "-m", "cecollm.cli", "serve", "--port", "0", "--split", str(SPLIT), "--key-file",
         str(key_file), "--kv-budget-mb", "512", "--max-connections", "96", "--max-sessions-per-peer", "8",
         "--handshake-timeout", "2", "--frame-timeout", "3", "--log-level", "ERROR"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        banner = server.stdout.readline()
        port = int(banner.rsplit(":", 1)[1].split()[0])
        base_rss = rss_mb(server.pid)
        local = Cloud(model, split=SPLIT)
        expected = {p: generate_collab(model, p, POLICY, lambda: LocalLink(local), max_new_tokens=24, chat=True).tokens
                    for p in PROMPTS}  # fmt: skip
        identity = edge_identity(model, SPLIT, "f16")
        stop, counts = threading.Event(), {}
        hostile = [threading.Thread(target=attack, args=(kind, port, identity, model.config["dim"], stop, counts))
                   for kind in HOSTILE]  # fmt: skip
        [t.start() for t in hostile]
        honest, failures, peak = 0, [], base_rss
        deadline = time.monotonic() + DURATION
        while time.monotonic() < deadline:
            for p in PROMPTS:
                r = generate_collab(model, p, POLICY, lambda: TcpLink("127.0.0.1", port, key=KEY), max_new_tokens=24,
                                    chat=True, deadline_s=30.0, strict=True)  # fmt: skip
                honest += 1
                if r.tokens != expected[p]:
                    failures.append(p)
                peak = max(peak, rss_mb(server.pid))
        stop.set()
        [t.join(timeout=150) for t in hostile]
        assert server.poll() is None, "the server is alive"
        assert not failures and honest >= len(PROMPTS)
        assert all(counts.get(k, 0) > 0 for k in HOSTILE), counts
        assert peak - base_rss < 700, f"server RSS grew {peak - base_rss:.0f} MB"
    finally:
        server.terminate()
        server.communicate(timeout=30)

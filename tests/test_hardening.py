"""The cloud protocol under abuse and failure: one regression test per symptom of issue 15."""

import logging
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from cecollm import _core, cli
from cecollm.client import (
    CloudFallbackWarning,
    CloudUnavailable,
    LocalLink,
    NetworkModel,
    TcpLink,
    edge_identity,
    generate_collab,
)
from cecollm.cloud import Cloud, CloudServer, Handler
from cecollm.exits import ExitPolicy
from cecollm.protocol import Code, Msg, RemoteError, load_key, recv_message

pytestmark = [pytest.mark.model, pytest.mark.slow]
SPLIT = 15
PROMPT = "The history of the bicycle begins"
POLICY = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))


@pytest.fixture
def cloud(model):
    return Cloud(model, split=SPLIT)


def serve(cloud, **kw):
    return CloudServer(cloud, port=0, **kw).start()


def hello(cloud, **override) -> bytes:
    fields = {"type": Msg.HELLO, "ver": _core.WIRE_VERSION, "model": cloud.fingerprint, "split": cloud.split,
              "dtype": _core.WIRE_F16, **override}  # fmt: skip
    return _core.wire_encode(fields)


def connected(server, cloud):
    sock = socket.create_connection(server.address, timeout=10)
    sock.sendall(hello(cloud))
    assert recv_message(sock, 512)["code"] == Code.OK
    return sock


def closed_by_peer(sock, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_sequence_numbers_stop_where_the_codec_can_answer(cloud):
    with pytest.raises(ValueError, match="64-bit"):
        _core.wire_encode({"type": Msg.OPEN, "seq": 1 << 63})
    assert _core.WIRE_MAX_SEQ == (1 << 63) - 1
    server = serve(cloud)
    try:
        with connected(server, cloud) as s:  # a hand-made frame with seq = 2^63: refused, nothing opened
            body = bytes([0x82, 0xA4]) + b"type" + bytes([Msg.OPEN, 0xA3]) + b"seq" + bytes([0xCF, 0x80]) + bytes(7)
            s.sendall(len(body).to_bytes(4, "big") + body)
            reply = recv_message(s)
            assert reply["type"] == Msg.ERROR and reply["code"] == Code.BAD_FRAME
        with connected(server, cloud) as s:  # the largest allowed one works and its reply encodes
            s.sendall(_core.wire_encode({"type": Msg.OPEN, "seq": _core.WIRE_MAX_SEQ, "cap": 8}))
            assert recv_message(s)["seq"] == _core.WIRE_MAX_SEQ
        assert len(cloud.sessions) == 1
    finally:
        server.shutdown()


def test_non_utf8_key_from_the_environment(monkeypatch, model, cloud):
    monkeypatch.setenv("CECOLLM_KEY", b"\xff\xfekey".decode("utf-8", "surrogateescape"))
    key = load_key()
    assert key == b"\xff\xfekey"
    server = serve(cloud, key=key)
    try:
        r = generate_collab(model, PROMPT, POLICY, lambda: TcpLink(*server.address, key=key), max_new_tokens=6)
        assert r.extra["cloud_failure"] is None and "cloud" in {t.source for t in r.extra["traces"]}
    finally:
        server.shutdown()


def test_accept_loop_survives_running_out_of_descriptors(tmp_path):
    """With 64 descriptors, 80 idle connections exhaust them; once they close, the server answers."""
    script = textwrap.dedent("""
        import logging, resource, sys, time
        import cecollm
        from cecollm.cloud import Cloud, CloudServer
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        model = cecollm.load_model()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        server = CloudServer(Cloud(model, split=15), port=0, handshake_timeout_s=60).start()
        print(server.address[1], flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        idle = []
        for _ in range(80):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)  # the server hits EMFILE on the accepts beyond its limit
        for s in idle:
            s.close()
        time.sleep(0.5)
        import cecollm

        model = cecollm.load_model()
        with warnings.catch_warnings():
            warnings.simplefilter("error", CloudFallbackWarning)
            r = generate_collab(model, PROMPT, POLICY, lambda: TcpLink("127.0.0.1", port), max_new_tokens=4)
        assert "cloud" in {t.source for t in r.extra["traces"]}
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "accept failed" in err and "retrying" in err


def test_connection_limit_answers_busy(cloud):
    server = serve(cloud, max_connections=3)
    try:
        held = [connected(server, cloud) for _ in range(3)]
        with socket.create_connection(server.address, timeout=5) as extra:
            reply = recv_message(extra)
            assert reply["type"] == Msg.ERROR and reply["code"] == Code.BUSY
        for s in held:
            s.close()
        time.sleep(0.3)
        with connected(server, cloud):
            pass
        assert server.stats["refused_connections"] == 1
    finally:
        server.shutdown()


def test_sessions_per_peer_are_limited(model, caplog):
    cloud = Cloud(model, split=SPLIT, max_sessions_per_peer=2)
    server = serve(cloud)
    try:
        with caplog.at_level(logging.WARNING, logger="cecollm.cloud"), connected(server, cloud) as s:
            codes = []
            for seq in range(1, 4):
                s.sendall(_core.wire_encode({"type": Msg.OPEN, "seq": seq, "cap": 16}))
                codes.append(recv_message(s).get("code"))
        assert codes == [Code.OK, Code.OK, Code.BUSY]
        assert "limit reached" in caplog.text
        assert cloud.open(16) is not None, "the in-process owner has no per-peer limit"
    finally:
        server.shutdown()


def test_hidden_states_count_against_the_memory_budget(model):
    probe = Cloud(model, split=SPLIT)
    kv, hidden = probe.kv_bytes_per_position, probe.hidden_bytes_per_position
    budget = 400 * kv + 1000 * hidden  # one session's KV of 400 positions beside 1000 positions of hidden states
    cloud = Cloud(model, split=SPLIT, kv_budget_bytes=budget, session_budget_bytes=budget)
    sids = [cloud.open(400), cloud.open(400)]
    with pytest.raises(Exception, match="no memory left"):  # 1200 positions of hidden states do not fit
        cloud.open(400)
    assert cloud.hidden_in_use == 800 * hidden
    for sid in sids:
        cloud.close(sid)
    assert cloud.hidden_in_use == 0 and cloud.kv_in_use == 0


def test_sessions_are_capped_at_the_models_context(model, cloud):
    with pytest.raises(Exception, match="context"):
        cloud.open(model.config["context_length"] + 1)


def test_requests_are_limited_in_positions(cloud):
    handler = Handler(cloud, max_positions=8)
    sid = cloud.open(64)
    data = _core.hidden_encode(np.ones((9, cloud.dim), np.float32), _core.WIRE_F16)
    frame = _core.wire_encode({"type": Msg.UPLOAD, "seq": 1, "sid": sid, "pos": 0, "n": 9, "dim": cloud.dim,
                               "dtype": _core.WIRE_F16, "data": data})  # fmt: skip
    reply = _core.wire_decode(handler.handle(frame[4:])[4:], 1 << 20)
    assert reply["code"] == Code.BAD_REQUEST and "at most 8" in reply["msg"]


def test_stalled_frames_and_silent_handshakes_are_cut_off(cloud):
    server = serve(cloud, handshake_timeout_s=0.5, frame_timeout_s=0.5)
    try:
        with socket.create_connection(server.address, timeout=5) as silent:  # connects, says nothing
            assert closed_by_peer(silent, 3.0)
        with connected(server, cloud) as slow:  # declares 1 MB, sends 10 bytes, stalls
            slow.sendall((1 << 20).to_bytes(4, "big") + b"\x81" * 10)
            t0 = time.monotonic()
            assert closed_by_peer(slow, 3.0)
            assert time.monotonic() - t0 < 2.0
    finally:
        server.shutdown()


def test_connection_bookkeeping_is_pruned_and_shutdown_is_quick(cloud):
    server = serve(cloud)
    for _ in range(30):
        connected(server, cloud).close()
    idle = [connected(server, cloud) for _ in range(5)]  # still open at shutdown
    deadline = time.monotonic() + 5
    while len(server.threads) > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.threads) == 5
    t0 = time.monotonic()
    server.shutdown()
    assert time.monotonic() - t0 < 1.0
    for s in idle:
        s.close()


def test_mismatched_edge_is_refused_on_both_sides(model, cloud, caplog):
    server = serve(cloud)
    try:
        wrong_split = ExitPolicy(exits=(6,), split=10, thresholds=(0.7,))
        with caplog.at_level(logging.WARNING, logger="cecollm.cloud"):
            with pytest.raises(CloudUnavailable, match="mismatch.*split at layer 10.*from layer 15"):
                generate_collab(model, PROMPT, wrong_split, lambda: TcpLink(*server.address), max_new_tokens=4,
                                strict=True)  # fmt: skip
        assert "refused" in caplog.text and "layer 10" in caplog.text
        link = TcpLink(*server.address)
        with pytest.raises(RemoteError, match="MISMATCH"):
            link.start({**edge_identity(model, SPLIT, "f16"), "model": "another-model"})
        link.close()
        with pytest.raises(RemoteError, match="MISMATCH"):  # the simulation refuses the same way
            LocalLink(cloud).start(edge_identity(model, 10, "f16"))
    finally:
        server.shutdown()


def test_cloud_failures_are_visible(model, cloud, capsys):
    server = serve(cloud, key=b"right-key")
    try:
        with pytest.warns(CloudFallbackWarning, match="auth failed"):
            r = generate_collab(model, PROMPT, POLICY, lambda: TcpLink(*server.address, key=b"wrong-key"),
                                max_new_tokens=4, deadline_s=0.5)  # fmt: skip
        assert r.extra["cloud_failure"].startswith("auth failed")
        assert server.stats["auth_failures"] >= 1
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.warns(CloudFallbackWarning, match="refused"):
        generate_collab(model, PROMPT, POLICY, lambda: TcpLink("127.0.0.1", port), max_new_tokens=4, deadline_s=0.3)
    code = cli.main(["generate", PROMPT, "--mode", "collab", "--cloud", f"127.0.0.1:{port}", "--split", "15",
                     "--max-new-tokens", "4", "--strict"])  # fmt: skip
    assert code == 3 and "refused" in capsys.readouterr().err


def test_the_emulated_link_does_not_depend_on_timing():
    """Reply sizes never depend on the measured compute time, so network time is load-independent."""
    sizes = {len(_core.wire_encode({"type": Msg.TOKEN, "seq": 5, "pos": 3, "token": 7, "conf": 0.5, "us": us}))
             for us in (0, 1, 300, 70_000, 5_000_000_000)}  # fmt: skip
    assert len(sizes) == 1


def test_in_process_link_runs_the_servers_handler(model, cloud):
    link = LocalLink(cloud, NetworkModel())
    link.start(edge_identity(model, SPLIT, "f16"))
    sid = link.request({"type": Msg.OPEN, "seq": 1, "cap": 16}, True).result()["sid"]
    data = _core.hidden_encode(np.ones((2, cloud.dim), np.float32), _core.WIRE_F16)
    infer = {"type": Msg.INFER, "seq": 2, "sid": sid, "pos": 0, "n": 2, "dim": cloud.dim, "dtype": _core.WIRE_F16,
             "data": data}  # fmt: skip
    first = link.request(infer, True).result()
    assert link.request(infer, True).result() == first, "a replay gets the stored reply"
    assert cloud.get(sid).n_hidden == 2
    stale = link.request({**infer, "seq": 1}, True).result()
    assert stale["code"] == Code.STALE_SEQUENCE
    wrong = link.request({**infer, "seq": 3, "dim": 64, "data": data[: 2 * 64 * 2]}, True).result()
    assert wrong["code"] == Code.BAD_REQUEST and "hidden size" in wrong["msg"]


def test_hidden_states_cross_the_codec_once_each_way(rng):
    """The edge's array goes into its frame in one call (the same bytes as encoding the payload apart),
    the cloud's frame comes out as float32 (n, dim) in one call, non-finite states refused there."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for dtype in (_core.WIRE_F32, _core.WIRE_F16, _core.WIRE_Q8_0):
        message = {"type": Msg.UPLOAD, "seq": 5, "sid": b"s" * 16, "pos": 4, "n": 3, "dim": 64, "dtype": dtype}
        frame = _core.wire_encode({**message, "data": x})
        assert frame == _core.wire_encode({**message, "data": _core.hidden_encode(x, dtype)})
        decoded = _core.wire_decode(frame[4:], 1 << 20, True)["data"]
        assert decoded.dtype == np.float32 and decoded.shape == (3, 64)
        np.testing.assert_array_equal(decoded, _core.hidden_decode(_core.hidden_encode(x, dtype), 3, 64, dtype))
        assert isinstance(_core.wire_decode(frame[4:], 1 << 20)["data"], bytes), "without hidden: the raw payload"
    nan = {**message, "dtype": _core.WIRE_F32, "data": np.full((3, 64), np.nan, np.float32).tobytes()}
    with pytest.raises(ValueError, match="not finite"):
        _core.wire_decode(_core.wire_encode(nan)[4:], 1 << 20, True)
    with pytest.raises(ValueError, match="matching n, dim"):
        _core.wire_encode({**message, "n": 2, "data": x})


def test_error_codes_come_from_c():
    assert [c.value for c in Code] == [getattr(_core, f"CODE_{c.name}") for c in Code]


def test_cache_reads_take_the_lock_while_a_forward_pass_runs(model):
    """lengths() and kv() wait for a running forward pass: every layer reports the same length, and
    the keys read have exactly that many positions (a read between layers would see them differ)."""
    import threading

    cache = model.new_cache(256, 0, SPLIT)
    x = model.core.embed(np.arange(100, 164, dtype=np.int32))
    seen, done = [], threading.Event()

    def writer():
        for i in range(0, 64, 4):
            cache.forward(x[i : i + 4], i)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        lengths = cache.lengths()
        keys, _ = cache.kv(SPLIT - 1)
        seen.append((len(set(lengths)), keys.shape[1] >= lengths[-1]))
    t.join()
    assert seen and all(n == 1 and ok for n, ok in seen)
    assert cache.lengths() == [64] * SPLIT


def test_long_requests_take_turns_with_other_sessions(model):
    """A 1024-position request runs in turns of CE_BATCH_CHUNK rows (bit-identical to one batch); a
    small request of another session is answered between two of them, not after the whole."""
    import threading

    cloud = Cloud(model, split=SPLIT, batching=False)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1024, cloud.dim)) * 0.1).astype(np.float32)
    alone = model.new_cache(1024, SPLIT, model.n_layers).forward(x, 0)
    big = cloud.get(cloud.open(1024))
    cloud.upload(big, 0, x)
    cloud._ensure_cache(big)
    assert np.array_equal(cloud._forward(big, 0, 1024), alone)
    cloud.close(big.sid)
    big, small = cloud.get(cloud.open(1024)), cloud.get(cloud.open(16))
    cloud.infer(small, 0, x[:4])
    finished = {}
    worker = threading.Thread(target=lambda: (cloud.infer(big, 0, x), finished.setdefault("big", time.monotonic())))
    worker.start()
    time.sleep(0.05)  # the long request holds its first turn
    cloud.infer(small, 4, x[4:5])
    finished["small"] = time.monotonic()
    worker.join()
    assert finished["small"] < finished["big"]

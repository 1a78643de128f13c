"""Collaborative mode over real TCP on loopback: exactness, faults, isolation, hostile input."""

import socket
import threading

import numpy as np
import pytest

import cecollm
from cecollm import _core
from cecollm.client import CloudFallbackWarning, LocalLink, NetworkModel, TcpLink, generate_collab
from cecollm.cloud import Cloud, CloudServer
from cecollm.edge import generate_edge
from cecollm.exits import ExitPolicy
from cecollm.protocol import Code, Msg, recv_message

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPT = "The history of the bicycle begins"
KEY = b"test-shared-key"
SPLIT = 15


@pytest.fixture
def server(model):
    srv = CloudServer(Cloud(model, split=SPLIT), port=0, key=KEY).start()
    yield srv
    srv.shutdown()


def tcp(srv, key=KEY):
    host, port = srv.address
    return lambda: TcpLink(host, port, key=key)


def test_exits_disabled_f32_gives_the_full_models_tokens(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(1.1,))
    result = generate_collab(model, PROMPT, policy, tcp(server), max_new_tokens=24, dtype="f32")
    assert result.tokens == model.generate(PROMPT, max_new_tokens=24).tokens
    assert {t.source for t in result.extra["traces"]} == {"cloud"}


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_tcp_matches_the_in_process_simulation(model, server, dtype):
    policy = ExitPolicy(exits=(4, 8, 12), split=SPLIT, thresholds=(0.5,))
    over_tcp = generate_collab(model, PROMPT, policy, tcp(server), max_new_tokens=32, dtype=dtype)
    cloud = Cloud(model, split=SPLIT)
    simulated = generate_collab(model, PROMPT, policy, lambda: LocalLink(cloud), max_new_tokens=32, dtype=dtype)
    assert over_tcp.tokens == simulated.tokens
    sources = [(t.exit_layer, t.source) for t in over_tcp.extra["traces"]]
    assert sources == [(t.exit_layer, t.source) for t in simulated.extra["traces"]]
    assert {"cloud", "edge"} <= {s for _, s in sources}, "the policy should use both sides"
    assert over_tcp.extra["bytes_sent"] > 0 and over_tcp.extra["fallbacks"] == 0


def test_f16_upload_stays_close_to_the_full_model(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(1.1,))
    result = generate_collab(model, PROMPT, policy, tcp(server), max_new_tokens=16, dtype="f16", trace_full=True)
    agreement = np.mean([t.matches_full for t in result.extra["traces"]])
    assert agreement >= 0.9  # F16 rounding of the split state rarely changes a greedy choice


def test_server_killed_then_restarted(model):
    srv = CloudServer(Cloud(model, split=SPLIT), port=0, key=KEY).start()
    host, port = srv.address
    state = {"srv": srv}

    def on_token(step, trace):
        if step == 4:
            state["srv"].shutdown()
        if step == 12:  # a new server process on the same port: the old session is gone
            state["srv"] = CloudServer(Cloud(model, split=SPLIT), host=host, port=port, key=KEY).start()

    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(1.1,))
    try:
        with pytest.warns(CloudFallbackWarning, match="the cloud failed"):
            result = generate_collab(model, PROMPT, policy, lambda: TcpLink(host, port, key=KEY), max_new_tokens=40,
                                     deadline_s=1.0, on_token=on_token)  # fmt: skip
    finally:
        state["srv"].shutdown()
    sources = [t.source for t in result.extra["traces"]]
    assert len(result.tokens) == 40, "every token is produced"
    assert "fallback" in sources and sources[-1] == "cloud", sources
    assert result.extra["reconnects"] >= 1
    # no token lost or duplicated: the stream is one token per position
    assert [t.token for t in result.extra["traces"]] == result.tokens


def test_dropped_connection_resumes_the_same_session(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(1.1,))
    sids = set()

    def on_token(step, trace):
        if step == 5:
            for conn in list(server.connections):
                conn.shutdown(socket.SHUT_RDWR)
        sids.update(server.cloud.sessions)

    with pytest.warns(CloudFallbackWarning, match="the cloud failed"):
        result = generate_collab(model, PROMPT, policy, tcp(server), max_new_tokens=20, dtype="f32", on_token=on_token)
    sources = [t.source for t in result.extra["traces"]]
    assert len(result.tokens) == 20 and sources[-1] == "cloud" and result.extra["reconnects"] >= 1
    assert len(sids) == 1, "the same session was resumed, not reopened"


def test_concurrent_clients_are_isolated(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    prompts = ["Once upon a time", "The recipe for bread needs"]
    solo = [generate_collab(model, p, policy, tcp(server), max_new_tokens=20).tokens for p in prompts]
    together = [None, None]

    def run(i):
        together[i] = generate_collab(model, prompts[i], policy, tcp(server), max_new_tokens=20).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == solo


def test_eviction_rebuilds_bitwise(model):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    roomy = Cloud(model, split=SPLIT)
    # room for one session's KV only: two interleaved sessions keep evicting each other
    tight = Cloud(model, split=SPLIT, kv_budget_bytes=64 * roomy.kv_bytes_per_position)
    expected = generate_collab(model, PROMPT, policy, lambda: LocalLink(roomy), max_new_tokens=20).tokens
    other = {}

    def interleave(step, trace):
        if "sid" not in other:
            other["sid"] = tight.open(40)
            tight.infer(tight.get(other["sid"]), 0, np.zeros((3, tight.dim), np.float32))
        else:  # touching the other session evicts ours
            s = tight.get(other["sid"])
            tight.infer(s, s.n_hidden, np.zeros((1, tight.dim), np.float32))

    result = generate_collab(model, PROMPT, policy, lambda: LocalLink(tight), max_new_tokens=20, on_token=interleave)
    assert result.tokens == expected


def test_budgets_answer_busy(model):
    cloud = Cloud(model, split=SPLIT, session_budget_bytes=10 * 1024 * 1024, max_sessions=1)
    too_big = cloud.session_budget // cloud.kv_bytes_per_position + 1
    with pytest.raises(Exception, match="per-session budget"):
        cloud.open(too_big)
    cloud.open(16)
    with pytest.raises(Exception, match="sessions are open"):
        cloud.open(16)


def test_emulated_network_is_deterministic(model):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    runs = []
    for _ in range(2):
        cloud = Cloud(model, split=SPLIT)
        net = NetworkModel(bandwidth=1e6, rtt=0.05, jitter=0.01, loss=0.1, seed=3)
        runs.append(generate_collab(model, PROMPT, policy, lambda: LocalLink(cloud, net), max_new_tokens=16))
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].extra["network_s"] == runs[1].extra["network_s"] > 0.05


def test_cloud_unreachable_from_the_start_is_edge_standalone(model):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    with pytest.warns(CloudFallbackWarning, match="refused"):
        result = generate_collab(model, PROMPT, policy, lambda: TcpLink("127.0.0.1", port, key=KEY, connect_timeout_s=0.2),
                                 max_new_tokens=12, deadline_s=0.2)  # fmt: skip
    standalone = generate_edge(model, PROMPT, policy, max_new_tokens=12)
    assert result.tokens == standalone.tokens
    assert {t.source for t in result.extra["traces"]} <= {"fallback", "edge"}


# ---- hostile input ----


def hello_frame(srv) -> bytes:
    """The hello frame of an edge that matches the server's model and split."""
    return _core.wire_encode({"type": Msg.HELLO, "ver": _core.WIRE_VERSION, "model": srv.cloud.fingerprint,
                              "split": srv.cloud.split, "dtype": _core.WIRE_F16})  # fmt: skip


def raw_connection(srv, key=KEY):
    sock = socket.create_connection(srv.address, timeout=10)
    sock.sendall(hello_frame(srv))
    hello = recv_message(sock, 512)
    if key is not None:
        from cecollm.protocol import mac

        sock.sendall(_core.wire_encode({"type": Msg.AUTH, "mac": mac(key, hello["nonce"])}))
        assert recv_message(sock, 512)["code"] == Code.OK
    return sock


def attacks(srv):
    """Each attack on its own connection; returns the error codes the server answered."""
    codes = []

    def expect_error(sock):
        reply = recv_message(sock)
        assert reply["type"] == Msg.ERROR, reply
        codes.append(reply["code"])

    with socket.create_connection(srv.address, timeout=10) as s:  # garbage before the handshake
        s.sendall(b"\x00\x00\x00\x10" + bytes(range(16)))
        expect_error(s)
    with socket.create_connection(srv.address, timeout=10) as s:  # oversized length before auth
        s.sendall(b"\x7f\xff\xff\xff")
        expect_error(s)
    with raw_connection(srv, key=None) as s:  # the wrong key
        pass
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(hello_frame(srv))
        recv_message(s, 512)
        s.sendall(_core.wire_encode({"type": Msg.AUTH, "mac": b"\x00" * 32}))
        expect_error(s)
    with raw_connection(srv) as s:  # truncated frame, then the connection drops
        s.sendall(b"\x00\x00\x01\x00" + b"\x81")
    with raw_connection(srv) as s:  # garbage after auth
        s.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
        expect_error(s)
    with raw_connection(srv) as s:  # unknown session, wrong shapes, replays
        s.sendall(_core.wire_encode({"type": Msg.RESUME, "seq": 1, "sid": b"\x01" * 16}))
        expect_error(s)
        s.sendall(_core.wire_encode({"type": Msg.OPEN, "seq": 1, "cap": 32}))
        sid = recv_message(s)["sid"]
        wrong_dim = _core.hidden_encode(np.ones((1, 64), np.float32), _core.WIRE_F16)
        s.sendall(_core.wire_encode({"type": Msg.INFER, "seq": 2, "sid": sid, "pos": 0, "n": 1, "dim": 64,
                                     "dtype": _core.WIRE_F16, "data": wrong_dim}))  # fmt: skip
        expect_error(s)
        gap = _core.hidden_encode(np.ones((1, 576), np.float32), _core.WIRE_F16)
        s.sendall(_core.wire_encode({"type": Msg.UPLOAD, "seq": 3, "sid": sid, "pos": 5, "n": 1, "dim": 576,
                                     "dtype": _core.WIRE_F16, "data": gap}))  # fmt: skip
        expect_error(s)
        good = {"type": Msg.INFER, "seq": 4, "sid": sid, "pos": 0, "n": 1, "dim": 576, "dtype": _core.WIRE_F16,
                "data": gap}  # fmt: skip
        s.sendall(_core.wire_encode(good))
        first = recv_message(s)
        s.sendall(_core.wire_encode(good))  # replayed: the stored reply, not a second application
        assert recv_message(s) == first
        assert srv.cloud.get(sid).n_hidden == 1
        s.sendall(_core.wire_encode({**good, "seq": 2}))  # older than the last
        expect_error(s)
    return codes


def test_hostile_input_gets_clear_errors_and_spares_honest_sessions(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    alone = generate_collab(model, PROMPT, policy, tcp(server), max_new_tokens=24).tokens
    honest = {}
    t = threading.Thread(target=lambda: honest.update(r=generate_collab(model, PROMPT, policy, tcp(server),
                                                                        max_new_tokens=24)))  # fmt: skip
    t.start()
    codes = attacks(server)
    t.join()
    assert honest["r"].tokens == alone
    assert honest["r"].extra["fallbacks"] == 0
    assert {Code.BAD_FRAME, Code.AUTH_FAILED, Code.UNKNOWN_SESSION, Code.BAD_REQUEST, Code.BAD_POSITION,
            Code.STALE_SEQUENCE} <= set(codes)  # fmt: skip


def test_without_key_only_loopback(model):
    with pytest.raises(ValueError, match="loopback"):
        CloudServer(Cloud(model, split=SPLIT), host="0.0.0.0", port=0)


def test_ready_requests_of_different_sessions_share_one_pass(model):
    """Requests that wait while a batch runs go together in the next pass, and give what they give alone."""
    cloud = Cloud(model, split=SPLIT)
    alone = Cloud(model, split=SPLIT, batching=False)
    rng = np.random.default_rng(5)
    prompts = [rng.standard_normal((4, cloud.dim)).astype(np.float32) for _ in range(3)]
    steps = [rng.standard_normal((1, cloud.dim)).astype(np.float32) for _ in range(3)]
    expected = []
    for p, x in zip(prompts, steps):
        s = alone.get(alone.open(16))
        alone.infer(s, 0, p)
        expected.append(alone.infer(s, 4, x))
    sessions = []
    for p in prompts:
        s = cloud.get(cloud.open(16))
        cloud.infer(s, 0, p)
        sessions.append(s)
    got = [None] * 3
    with cloud.batch_lock:
        cloud.batch_leader = True  # as if another request's batch were running: the three wait
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, cloud.infer(sessions[i], 4, steps[i])))
               for i in range(3)]  # fmt: skip
    [t.start() for t in threads]
    for _ in range(500):
        if len(cloud.batch_waiting) == 3:
            break
        threading.Event().wait(0.01)
    with cloud.batch_lock:
        cloud.batch_waiting[0].wake.set()  # that batch ends: the oldest waiting request leads
    [t.join() for t in threads]
    assert not cloud.batch_leader  # the role is given up when nobody waits
    assert got == expected
    assert cloud.batch_stats["most_sessions"] == 3


def test_edge_object_points_at_a_local_cloud_or_a_server(model, server):
    policy = ExitPolicy(exits=(6, 10), split=SPLIT, thresholds=(0.7,))
    local = cecollm.Edge(model, policy, cloud=Cloud(model, split=SPLIT)).generate(PROMPT, max_new_tokens=12)
    remote = cecollm.Edge(model, policy, cloud="%s:%d" % server.address, key=KEY).generate(PROMPT, max_new_tokens=12)
    alone = cecollm.Edge(model, policy).generate(PROMPT, max_new_tokens=12)
    assert local.tokens == remote.tokens
    assert {t.source for t in remote.extra["traces"]} >= {"cloud"}
    assert {t.source for t in alone.extra["traces"]} == {"edge"}
    with pytest.raises(ValueError, match="splits at"):
        cecollm.Edge(model, policy, cloud=Cloud(model, split=10))

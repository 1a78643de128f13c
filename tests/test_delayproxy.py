"""The shaping proxy: bytes arrive intact, in order, one delay (plus serialization) later each way."""

import socket
import threading
import time

from cecollm.delayproxy import DelayProxy


def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def recv_n(sock, n):
    got = b""
    while len(got) < n:
        got += sock.recv(n - len(got))
    return got


def test_round_trip_delay_and_bandwidth():
    srv = echo_server()
    with DelayProxy(srv.getsockname(), delay_s=0.03, bandwidth=1e6) as proxy:
        c = socket.create_connection(proxy.address)
        t0 = time.monotonic()
        c.sendall(b"x")
        assert recv_n(c, 1) == b"x"
        rtt = time.monotonic() - t0
        assert 0.06 <= rtt < 0.2  # two one-way delays
        payload = bytes(range(256)) * 400  # 100 kB: 0.1 s to serialize at 1 MB/s, each way
        t0 = time.monotonic()
        c.sendall(payload)
        assert recv_n(c, len(payload)) == payload
        assert time.monotonic() - t0 >= 0.06 + 0.1
        c.close()
    srv.close()

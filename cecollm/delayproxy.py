"""A TCP proxy that shapes a link: a one-way delay and a bandwidth limit in each direction.

For honest end-to-end timing where the kernel has no netem: the edge connects to the proxy, the proxy
to the cloud server, and every chunk of bytes is delivered `delay_s` after its last byte has been
serialized at `bandwidth` bytes/s (serialization queues behind earlier chunks, as on a real link).

>>> with DelayProxy(("127.0.0.1", 7433), delay_s=0.01, bandwidth=12.5e6) as proxy:   # doctest: +SKIP
...     link = TcpLink(*proxy.address)
"""

from __future__ import annotations

import heapq
import socket
import threading
import time


class _Direction:
    """src -> dst: a reader stamps each chunk with its delivery time, a writer delivers on time."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, bandwidth: float):
        self.src, self.dst, self.delay_s, self.bandwidth = src, dst, delay_s, bandwidth
        self.free_at = 0.0  # when the link finishes serializing what it already carries
        self.queue: list = []
        self.cv = threading.Condition()
        self.closed = False
        self.seq = 0

    def read(self) -> None:
        try:
            while True:
                data = self.src.recv(1 << 16)
                if not data:
                    break
                now = time.monotonic()
                self.free_at = max(now, self.free_at) + len(data) / self.bandwidth
                with self.cv:
                    self.seq += 1
                    heapq.heappush(self.queue, (self.free_at + self.delay_s, self.seq, data))
                    self.cv.notify()
        except OSError:
            pass
        with self.cv:
            self.closed = True
            self.cv.notify()

    def write(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.queue and not self.closed:
                        self.cv.wait()
                    if not self.queue:
                        break
                    due, _, data = self.queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self.cv.wait(wait)
                        continue
                    heapq.heappop(self.queue)
                self.dst.sendall(data)
        except OSError:
            pass
        for sock in (self.dst, self.src):  # one side ended: end the other as well
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DelayProxy:
    """Listens on host:port (0: any free port) and forwards each connection to `target`, shaped."""

    def __init__(self, target: tuple, delay_s: float, bandwidth: float = 12.5e6, host: str = "127.0.0.1",
                 port: int = 0):  # fmt: skip
        if delay_s < 0 or bandwidth <= 0:
            raise ValueError("need delay_s >= 0 and bandwidth > 0")
        self.target, self.delay_s, self.bandwidth = target, delay_s, bandwidth
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.address = self.sock.getsockname()[:2]
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="cecollm-proxy").start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(s)
            for src, dst in ((client, server), (server, client)):
                d = _Direction(src, dst, self.delay_s, self.bandwidth)
                threading.Thread(target=d.read, daemon=True).start()
                threading.Thread(target=d.write, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        for s in [self.sock, *self.sockets]:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The cloud's aggregate decode throughput with 1, 2, 4 and 8 concurrent edge sessions.

Each session is a thread that opens a session, sends a 32-position prompt's split states and then
decodes: one INFER of one position per token, through the server's Handler (frames in, frames out),
as an edge does after an exit miss. Small requests of different sessions are batched into one pass
of the cloud's layers (`Cloud(batching=True)`, at most CE_SMALL_BATCH rows, bit-identical to running
alone). Reported: cloud tokens/s over all sessions, and the ratio to one session, with batching on
and off, in the same run.

    .venv/bin/python benchmarks/many_clients.py [--tokens 64] [--sessions 1,2,4,8] [--json docs/many_clients.json]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

import cecollm
from cecollm import _core
from cecollm.cloud import Cloud, Handler
from cecollm.protocol import Msg


def one_session(handler: Handler, dim: int, tokens: int, seed: int, barrier: threading.Barrier, out: list) -> None:
    rng = np.random.default_rng(seed)
    reply = _core.wire_decode(handler.handle(_core.wire_encode({"type": Msg.OPEN, "seq": 1, "cap": 32 + tokens})[4:])[4:], 1 << 20)
    sid = reply["sid"]

    def infer(seq, pos, x):
        data = _core.hidden_encode(x, _core.WIRE_F16)
        frame = _core.wire_encode({"type": Msg.INFER, "seq": seq, "sid": sid, "pos": pos, "n": len(x), "dim": dim,
                                   "dtype": _core.WIRE_F16, "data": data})  # fmt: skip
        r = _core.wire_decode(handler.handle(frame[4:])[4:], 1 << 20)
        assert r["type"] == Msg.TOKEN, r
        return r

    infer(2, 0, rng.standard_normal((32, dim)).astype(np.float32))
    steps = rng.standard_normal((tokens, 1, dim)).astype(np.float32)
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(tokens):
        infer(3 + i, 32 + i, steps[i])
    out.append(time.perf_counter() - t0)


def measure(model, n_sessions: int, tokens: int, batching: bool) -> float:
    cloud = Cloud(model, split=15, batching=batching)
    handler = Handler(cloud)
    barrier = threading.Barrier(n_sessions)
    times: list = []
    threads = [threading.Thread(target=one_session, args=(handler, cloud.dim, tokens, s, barrier, times))
               for s in range(n_sessions)]  # fmt: skip
    [t.start() for t in threads]
    [t.join() for t in threads]
    return n_sessions * tokens / max(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = cecollm.load_model()
    measure(model, 1, 8, True)  # warm-up
    rows = []
    for batching in (True, False):
        base = None
        for n in (int(x) for x in args.sessions.split(",")):
            tps = measure(model, n, args.tokens, batching)
            base = base or tps
            rows.append({"sessions": n, "batching": batching, "cloud_tokens_per_s": tps, "vs_one_session": tps / base})
            print(f"batching {'on ' if batching else 'off'}  {n} sessions: {tps:7.1f} cloud tokens/s "
                  f"({tps / base:.2f}x one session)", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": _core.get_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

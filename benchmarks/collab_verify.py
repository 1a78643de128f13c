"""Verify mode against the paper's mode and cloud-only, timed honestly: two processes over TCP.

The cloud is a `cecollm serve` process (one thread), the edge this process (one thread); between them
a DelayProxy applies RTT/2 and 100 Mbit/s to each direction (this kernel has no netem). The same runs
on the emulated link (LocalLink + NetworkModel, virtual time) show that the two agree.

Per model (original, exit-tuned), RTT and scheme, on held-out instructions (greedy, split 15):
- exact: the paper's mode with exits disabled (every token from the cloud; the cloud model's output);
- paper 0.8: the paper's mode, threshold 0.8 (lossy: an exited token is final);
- verify: verify mode, speculate=auto (the cloud model's output; F32 wire: exactly);
- cloud-only: the full model in the cloud, the prompt sent as text, tokens streamed back: the cloud's
  measured compute (one thread) plus one round trip and the prompt's transfer.
Columns: ms per token, tokens identical to cloud-only, tokens per round trip (verify).

    .venv/bin/python benchmarks/collab_verify.py --n 10 --tokens 100 --rtts 0,0.02,0.05,0.1 --out docs/collab_verify
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import numpy as np

import cecollm
from cecollm import _core
from cecollm.client import LocalLink, NetworkModel, TcpLink, generate_collab
from cecollm.cloud import Cloud
from cecollm.datasets import instructions, user_message
from cecollm.delayproxy import DelayProxy
from cecollm.exits import ExitPolicy

BANDWIDTH = 12.5e6  # 100 Mbit/s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cloud(model_name: str, split: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "cecollm.cli", "serve", "--port", str(port), "--split", str(split), "--threads", "1"]
    if model_name:
        cmd += ["--model", model_name]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the cloud server did not start: " + proc.stderr.read().decode()[-500:])


def run_scheme(model, prompts, policy, connect, tokens, dtype, speculate, virtual: bool):
    out, seconds, n, round_trips, accepted = [], 0.0, 0, 0, 0
    for p in prompts:
        r = generate_collab(model, p, policy, connect, max_new_tokens=tokens, dtype=dtype, chat=True, speculate=speculate)
        e = r.extra
        if speculate:
            seconds += e["time_s"]
            round_trips += e["round_trips"]
            accepted += sum(1 for t in e["traces"] if t.source == "edge")
        else:
            seconds += e["edge_s"] + e["cloud_s"] + e["network_s"] if virtual else e["wall_s"]
        n += len(r.tokens)
        out.append(r.tokens)
    return out, seconds / max(n, 1), round_trips, n


def cloud_only(model, prompts, tokens, rtt):
    """The full model's greedy tokens and time per token: compute measured here with one thread, plus
    the prompt's text up and one round trip (tokens stream back while the cloud computes)."""
    out, seconds, n = [], 0.0, 0
    for p in prompts:
        text = model.chat_prompt(p).encode()
        t0 = time.perf_counter()
        r = model.generate(p, max_new_tokens=tokens, chat=True)
        seconds += time.perf_counter() - t0 + rtt + (len(text) + 64) / BANDWIDTH
        n += len(r.tokens)
        out.append(r.tokens)
    return out, seconds / max(n, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--rtts", default="0,0.02,0.05,0.1")
    ap.add_argument("--models", default="smollm2-135m,smollm2-135m-ee")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--out", default="docs/collab_verify")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT.json")
    args = ap.parse_args()
    _core.set_threads(1)
    prompts = [user_message(item) for item in instructions("eval")[: args.n]]
    rows = []
    if args.append:
        with open(args.out + ".json") as f:
            rows = json.load(f)
    for name in args.models.split(","):
        model = cecollm.load_model(name)
        exits = ExitPolicy.for_model(model, args.split).exits
        policies = {
            "exact": (ExitPolicy(exits=exits, split=args.split, thresholds=(1.1,)), "f32", 0),
            "paper 0.8": (ExitPolicy(exits=exits, split=args.split, thresholds=(0.8,)), "f16", 0),
            "verify f32": (ExitPolicy(exits=exits, split=args.split, thresholds=(0.8,)), "f32", "auto"),
            "verify f16": (ExitPolicy(exits=exits, split=args.split, thresholds=(0.8,)), "f16", "auto"),
        }
        proc, port = start_cloud(name, args.split)
        try:
            for rtt in (float(x) for x in args.rtts.split(",")):
                reference, ref_s = cloud_only(model, prompts, args.tokens, rtt)
                rows.append({"model": name, "rtt_ms": rtt * 1e3, "link": "-", "scheme": "cloud-only",
                             "ms_per_token": ref_s * 1e3, "identical": 1.0, "tokens_per_round_trip": None})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                cloud = Cloud(model, split=args.split)
                with DelayProxy(("127.0.0.1", port), rtt / 2, BANDWIDTH) as proxy:
                    links = {
                        "tcp": (lambda: TcpLink(*proxy.address), False),
                        "emulated": (lambda: LocalLink(cloud, NetworkModel(BANDWIDTH, rtt)), True),
                    }
                    for link_name, (connect, virtual) in links.items():
                        for scheme, (policy, dtype, speculate) in policies.items():
                            toks, s, rts, n = run_scheme(model, prompts, policy, connect, args.tokens, dtype, speculate,
                                                         virtual)  # fmt: skip
                            rows.append({"model": name, "rtt_ms": rtt * 1e3, "link": link_name, "scheme": scheme,
                                         "ms_per_token": s * 1e3, "vs_cloud_only": s / ref_s,
                                         "identical": float(np.mean([a == b for a, b in zip(toks, reference)])),
                                         "tokens_per_round_trip": n / rts if rts else None})  # fmt: skip
                            print(json.dumps(rows[-1]), flush=True)
            with open(args.out + ".json", "w") as f:  # each model's rows as soon as they exist
                json.dump(rows, f, indent=1)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # the server's shutdown can take ~10 s (handler threads)
                proc.kill()
                proc.wait()
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args.out + ".png")


def plot(rows, path):
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(5 * len(models), 4))
    for i, name in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        for scheme in ("cloud-only", "exact", "paper 0.8", "verify f32"):
            pts = [r for r in rows if r["model"] == name and r["scheme"] == scheme and r["link"] in ("-", "tcp")]
            ax.plot([r["rtt_ms"] for r in pts], [r["ms_per_token"] for r in pts], "o-", label=scheme)
        ax.set_xlabel("round-trip time (ms), TCP through the shaping proxy")
        ax.set_ylabel("ms per output token")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

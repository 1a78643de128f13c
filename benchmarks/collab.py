"""Collaborative inference against its baselines, on an emulated link (deterministic network time).

For each round-trip time, per output token:
- collab: cecollm's edge (exits + split) and cloud, F16 or Q8_0 hidden states, context manager;
- cloud-only: the prompt is sent as text to a cloud that runs the full model and streams tokens back;
- naive split: the same split with no context manager: every request re-sends the whole context's
  split hidden states (fp32) and the cloud recomputes its layers over all of them.
Compute is measured (this machine plays both edge and cloud); network time is accounted from the
link model (bandwidth, RTT) and the bytes each scheme actually sends.

    python benchmarks/collab.py [--rtts 0,0.02,0.1] [--bandwidth-mbit 100] [--tokens 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import cecollm
from cecollm.client import LocalLink, NetworkModel, generate_collab
from cecollm.cloud import Cloud
from cecollm.exits import ExitPolicy

PROMPTS = (
    "Explain in one sentence why the sky is blue.",
    "Write a short story about a lighthouse keeper.",
    "List three uses of a paperclip.",
)


def collab(model, policy, network, dtype, tokens):
    per_token, sent, received, cloud_tokens, total = [], 0, 0, 0, 0
    for prompt in PROMPTS:
        cloud = Cloud(model, split=policy.split)
        r = generate_collab(model, prompt, policy, lambda: LocalLink(cloud, network), max_new_tokens=tokens,
                            dtype=dtype, chat=True)  # fmt: skip
        n = len(r.tokens)
        t = r.extra["edge_s"] + r.extra["cloud_s"] + r.extra["network_s"]
        per_token.append(t / n)
        sent += r.extra["bytes_sent"]
        received += r.extra["bytes_received"]
        cloud_tokens += sum(tr.source == "cloud" for tr in r.extra["traces"])
        total += n
    return {"s_per_token": float(np.mean(per_token)), "bytes_up_per_token": sent / total,
            "bytes_down_per_token": received / total, "cloud_fraction": cloud_tokens / total}  # fmt: skip


def cloud_only(model, network, tokens):
    per_token = []
    for prompt in PROMPTS:
        text = model.chat_prompt(prompt).encode()
        t0 = time.perf_counter()
        r = model.generate(prompt, max_new_tokens=tokens, chat=True)
        compute = time.perf_counter() - t0
        # one request with the text; tokens stream back while the cloud computes (≈ 8 bytes each)
        net = network.one_way(len(text) + 64) + network.one_way(8)
        per_token.append((compute + net) / len(r.tokens))
    return {"s_per_token": float(np.mean(per_token)), "bytes_up_per_token": None, "cloud_fraction": 1.0}


def naive_split(model, split, network, tokens):
    """Edge runs [0, split) incrementally; each token re-sends all split states (fp32) and the cloud
    recomputes [split, L) over the whole context without keeping anything."""
    per_token, up = [], []
    for prompt in PROMPTS:
        ids = model.tokenize(model.chat_prompt(prompt))
        edge = model.new_cache(len(ids) + tokens, 0, split)
        states = [edge.forward(model.core.embed(np.asarray(ids, np.int32)), 0)]
        elapsed, sent, n = 0.0, 0, 0
        for step in range(tokens):
            context = np.concatenate(states)
            t0 = time.perf_counter()
            cloud = model.new_cache(len(context), split, model.n_layers)
            out = cloud.forward(context, 0)
            token = int(np.argmax(model.core.head(out[-1:])[0]))
            elapsed += time.perf_counter() - t0
            payload = context.nbytes + 64
            sent += payload
            elapsed += network.one_way(payload) + network.one_way(16)
            n += 1
            if token in model.tokenizer.end_ids:
                break
            t0 = time.perf_counter()
            states.append(edge.forward(model.core.embed(np.array([token], np.int32)), len(ids) + step))
            elapsed += time.perf_counter() - t0
        per_token.append(elapsed / n)
        up.append(sent / n)
    return {"s_per_token": float(np.mean(per_token)), "bytes_up_per_token": float(np.mean(up)), "cloud_fraction": 1.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtts", default="0,0.02,0.1", help="round-trip times in seconds")
    parser.add_argument("--bandwidth-mbit", type=float, default=100.0)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--exits", default="6,10")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = cecollm.load_model()
    exits = tuple(int(x) for x in args.exits.split(","))
    policy = ExitPolicy(exits=exits, split=args.split, thresholds=(args.threshold,), precheck_rows=4096)
    rows = []
    for rtt in (float(x) for x in args.rtts.split(",")):
        net = lambda: NetworkModel(bandwidth=args.bandwidth_mbit * 1e6 / 8, rtt=rtt)  # noqa: E731
        for name, result in (
            ("collab f16", collab(model, policy, net(), "f16", args.tokens)),
            ("collab q8_0", collab(model, policy, net(), "q8_0", args.tokens)),
            ("cloud-only", cloud_only(model, net(), args.tokens)),
            ("naive split", naive_split(model, args.split, net(), args.tokens)),
        ):
            rows.append({"rtt_ms": rtt * 1000, "scheme": name, **result})
            print(f"rtt {rtt * 1000:5.0f} ms  {name:<12} {result['s_per_token'] * 1000:8.2f} ms/token  "
                  f"up {result['bytes_up_per_token'] or 0:9.0f} B/token  cloud {result['cloud_fraction']:.0%}",
                  flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

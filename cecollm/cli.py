"""The `cecollm` command line: human tables by default, one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
)


def _load(args):
    from .model import load_model

    if getattr(args, "threads", None):
        from . import _core

        _core.set_threads(args.threads)
    return load_model(args.model, args.activations, args.kv_dtype, args.quantize)


def cmd_info(args) -> int:
    info = _load(args).info()
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_list(text: str) -> str:
    """argparse type: comma-separated integers (kept as text; parsed by _ints)."""
    try:
        _ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 6,10, got {text!r}") from None
    return text


def float_list(text: str) -> str:
    try:
        values = _floats(text)
    except ValueError:
        values = (float("nan"),)
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return text


# what to install when an optional dependency is missing
EXTRAS = {"torch": "train", "matplotlib": "experiments", "rouge_score": "experiments", "sacrebleu": "experiments",
          "pandas": "experiments", "tqdm": "experiments", "ray": "cluster", "gguf": "train"}  # fmt: skip


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _policy(args, model):
    """The CLI's exits: --exits when given, else the model's own (its trained exits, see ExitPolicy.for_model)."""
    from .exits import ExitPolicy

    split = args.split if args.split is not None else model.n_layers // 2
    thresholds = _floats(args.thresholds) if args.thresholds else (args.threshold,)
    options = dict(metric=args.metric, precheck_rows=args.precheck_rows, exit_heads=_heads(args, model))
    if not args.exits:
        policy = ExitPolicy.for_model(model, split, **options)
        return ExitPolicy(exits=policy.exits, split=split, thresholds=thresholds, **options)
    return ExitPolicy(exits=_ints(args.exits), split=split, thresholds=thresholds, **options)


def _heads(args, model) -> dict:
    from .exits import load_exit_heads

    return load_exit_heads(args.exit_heads, model) if args.exit_heads else {}


def cmd_generate(args) -> int:
    model = _load(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat=args.chat)
    if args.mode == "collab":
        return _generate_collab(args, model, kwargs)
    if args.mode == "edge":
        from .edge import generate_edge

        policy = _policy(args, model)
        result = generate_edge(model, args.prompt, policy, **kwargs)
        traces = result.extra["traces"]
        if args.json:
            print(json.dumps({**_result_json(args, result), "mode": "edge", "split": policy.split,
                              "exits": list(policy.exits), "thresholds": list(policy.thresholds),
                              "metric": policy.metric, "exit_layers": [t.exit_layer for t in traces],
                              "confidences": [t.confidence for t in traces],
                              "edge_layers_run": [t.layers_run for t in traces],
                              "head_checks": [t.head_checks for t in traces]}))  # fmt: skip
            return 0
        print(result.text)
        counts = {e: sum(t.exit_layer == e for t in traces) for e in (*policy.exits, policy.split)}
        print(f"\n[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s; tokens per exit layer: {counts}]")
        return 0
    if args.json:
        result = model.generate(args.prompt, **kwargs)
        print(json.dumps({**_result_json(args, result), "mode": "full"}))
        return 0
    stream = model.generate(args.prompt, stream=True, **kwargs)
    for event in stream:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    result = stream.result
    print(f"\n\n[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s, finish: {result.finish_reason}]")
    return 0


def _connect(address: str, key_file: str | None):
    from .client import TcpLink
    from .protocol import load_key

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--cloud wants HOST:PORT, got {address!r}")
    key = load_key(key_file)
    return lambda: TcpLink(host.strip("[]"), int(port), key=key)


def _generate_collab(args, model, kwargs) -> int:
    from .client import generate_collab

    if not args.cloud:
        raise ValueError("--mode collab needs --cloud HOST:PORT")
    if kwargs["temperature"]:
        raise ValueError("collaborative mode decodes greedily (--temperature 0)")
    policy = _policy(args, model)
    speculate = _speculate(args.speculate)
    result = generate_collab(model, args.prompt, policy, _connect(args.cloud, args.key_file),
                             max_new_tokens=args.max_new_tokens, dtype=args.dtype, deadline_s=args.deadline,
                             chat=args.chat, speculate=speculate, strict=args.strict)  # fmt: skip
    traces, extra = result.extra["traces"], result.extra
    sources = [t.source if t.source != "edge" else t.exit_layer for t in traces]
    if args.json:
        verify = {"round_trips": extra["round_trips"], "accepted_per_round_trip": extra["accepted_per_round_trip"]}
        print(json.dumps({**_result_json(args, result), "mode": "collab", "speculate": speculate,
                          **(verify if speculate else {}), "split": policy.split,
                          "exits": list(policy.exits), "thresholds": list(policy.thresholds), "dtype": args.dtype,
                          "source": sources, "exit_layers": [t.exit_layer for t in traces],
                          "bytes_sent": extra["bytes_sent"], "bytes_received": extra["bytes_received"],
                          "time": {"edge_compute_s": extra["edge_s"], "cloud_compute_s": extra["cloud_s"],
                                   "network_and_wait_s": max(0.0, extra["wall_s"] - extra["edge_s"] - extra["cloud_s"]),
                                   "wall_s": extra["wall_s"]},
                          "fallbacks": extra["fallbacks"], "reconnects": extra.get("reconnects", 0),
                          "cloud_failure": extra["cloud_failure"]}))  # fmt: skip
        return 0
    print(result.text)
    print(_collab_summary(result))
    return 0


def _speculate(text: str):
    """--speculate: 0 (the paper's mode), K in [1, 8] or auto (verify mode)."""
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k <= 8:
        raise ValueError(f"--speculate wants 0, 1..8 or auto, got {text!r}")
    return k


def _collab_summary(result) -> str:
    traces, extra = result.extra["traces"], result.extra
    n = max(1, len(traces))
    cloud = sum(t.source == "cloud" for t in traces)
    fallback = sum(t.source == "fallback" for t in traces)
    other = max(0.0, extra["wall_s"] - extra["edge_s"] - extra["cloud_s"])
    return (
        f"[{len(result.tokens)} tokens: {len(traces) - cloud - fallback} at the edge's exits, {cloud} by the cloud"
        f"{f', {fallback} at the edge after a cloud failure' if fallback else ''}; cloud share {cloud / n:.0%}]\n"
        f"[bytes sent {extra['bytes_sent']}, received {extra['bytes_received']}; time {extra['wall_s']:.2f} s ="
        f" edge {extra['edge_s']:.2f} + cloud {extra['cloud_s']:.2f} + network/waiting {other:.2f}]"
    )


def cmd_bench(args) -> int:
    from .bench import bench_model

    model = _load(args)
    result = bench_model(model, args.threads, args.repeats)
    if args.json:
        print(json.dumps({"model": model.path, **result}))
        return 0
    name = model.info()["name"]
    print(f"| {'model':<34} | {'threads':>7} | {'kernels':>7} | {'act':>4} | {'kv':>4} | {'test':>6} | {'t/s':>9} |")
    print(f"| {'-' * 34} | {'-' * 7}:| {'-' * 7}:| {'-' * 4}:| {'-' * 4}:| {'-' * 6}:| {'-' * 9}:|")
    for test in ("pp512", "tg128"):
        print(f"| {name[:34]:<34} | {result['threads']:>7} | {result['kernels']:>7} | {result['activations']:>4} |"
              f" {result['kv_dtype']:>4} | {test:>6} | {result[test]:>9.2f} |")  # fmt: skip
    return 0


def cmd_train_exits(args) -> int:
    from .train import train_and_save

    model = _load(args)
    report = train_and_save(model, args.out, _ints(args.exits), steps=args.steps, rank=args.rank,
                            data_files=args.data or (), self_text=args.self_text, progress=not args.no_progress)  # fmt: skip
    summary = {"out": args.out, "exits": report.exits, "positions": report.positions, "seconds": report.seconds,
               "final_kl": report.final_kl, "gate_accuracy_train": report.gate_accuracy}  # fmt: skip
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_finetune(args) -> int:
    """Tunes the model for its exits (needs torch: pip install cecollm[train]); writes the delta."""
    from dataclasses import fields

    from .finetune import Recipe
    from .tuned import finetune_exits, tuning_data

    model = _load(args)
    recipe = Recipe(exits=_ints(args.exits), method=args.method, rank=args.rank, steps=args.steps, batch=args.batch, lr=args.lr,
                    w_final=args.w_final, top1=args.top1, tau=args.tau, seed=args.seed)  # fmt: skip
    data = None
    if args.data and os.path.exists(args.data):
        with open(args.data) as f:
            data = json.load(f)
    else:
        data = tuning_data(model, train_samples=args.samples, free_text=args.free_text, progress=not args.no_progress)
        if args.data:
            with open(args.data, "w") as f:
                json.dump(data, f)
    result = finetune_exits(model, args.out, recipe, data, gguf_out=args.gguf_out, checkpoint=args.checkpoint,
                            device=args.device, progress=not args.no_progress)  # fmt: skip
    summary = {"delta": result.delta_path, "gguf": result.gguf_path, "seconds": round(result.seconds, 1),
               "recipe": {f.name: getattr(recipe, f.name) for f in fields(recipe)},
               "evaluation": result.log.get("evaluation", {})}  # fmt: skip
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_serve(args) -> int:
    import signal

    from .cloud import Cloud, CloudServer
    from .protocol import load_key

    import logging

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = _load(args)
    split = args.split if args.split is not None else model.n_layers // 2
    key = load_key(args.key_file)
    cloud = Cloud(model, split=split, kv_budget_bytes=int(args.kv_budget_mb * 2**20), max_sessions=args.max_sessions,
                  ttl_s=args.ttl, max_sessions_per_peer=args.max_sessions_per_peer)  # fmt: skip
    try:
        server = CloudServer(cloud, host=args.host, port=args.port, key=key, max_connections=args.max_connections,
                             handshake_timeout_s=args.handshake_timeout, frame_timeout_s=args.frame_timeout)  # fmt: skip
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.address
    print(f"cecollm cloud: layers [{split}, {model.n_layers}) of {model.info()['name']} on {host}:{port}"
          f" ({'HMAC key required' if key else 'no key: loopback only'})", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.shutdown()
    print("cecollm cloud: stopped", flush=True)
    return 0


def _result_json(args, result) -> dict:
    return {
        "prompt": args.prompt,
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.tokens,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "tokens_per_s": result.tokens_per_s,
    }


def cmd_sweep(args) -> int:
    from .sweep import eval_text, sweep

    model = _load(args)
    exit_sets = [_ints(group) for group in args.exit_sets.split(";")]
    result = sweep(model, thresholds=_floats(args.thresholds), exit_sets=exit_sets, splits=_ints(args.splits),
                   metric=args.metric, gen_tokens=args.gen_tokens, precheck_rows=args.precheck_rows,
                   exit_heads=_heads(args, model), texts=eval_text(args.split_text),
                   progress=not args.no_progress, ray=args.ray_address or (True if args.ray else None),
                   workers=args.workers)  # fmt: skip
    if args.csv:
        result.to_csv(args.csv)
    if args.out_json:
        result.to_json(args.out_json)
    print(result.to_json() if args.json else result.table(), flush=True)  # before plotting: nothing is lost
    if args.plot:
        result.plot(args.plot)
    return 0


def cmd_experiment(args) -> int:
    from .experiments import grid, run_grid

    settings = grid(schemes=args.schemes.split(","), thresholds=_floats(args.thresholds),
                    datasets=args.dataset.split(","), models=args.model.split(","), rtts=_floats(args.rtt),
                    bandwidths=[b * 1e6 / 8 for b in _floats(args.bandwidth_mbit)], splits=_ints(args.split),
                    exits=_ints(args.exits) if args.exits else None, exit_heads=args.exit_heads.split(",") if args.exit_heads else (None,),
                    dtypes=args.dtype.split(","), n=args.n,
                    tokens=args.tokens, speculate=args.speculate if args.speculate == "auto" else int(args.speculate))  # fmt: skip
    ray = args.ray_address or (True if args.ray else None)
    result = run_grid(settings, progress=not args.no_progress and not args.json, ray=ray, workers=args.workers,
                      threads=args.threads)  # fmt: skip
    if args.csv:
        result.to_csv(args.csv)
    if args.json:
        print(result.to_json())
        return 0
    cols = ("scheme", "dataset", "rtt_s", "time_per_token_s", "edge_token_share", "cloud_work_offloaded", "bytes_up",
            "rougeL", "chrf", "rougeL_vs_cloud")  # fmt: skip
    print("  ".join(f"{c:>14}" for c in cols))
    for row in result.rows:
        print("  ".join(f"{row[c]:>14.4g}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in cols))
    return 0


def cmd_demo(args) -> int:
    """Starts a cloud server on loopback and runs the edge collaboratively on a few prompts, in the
    paper's mode (confident tokens finish at the edge) and in verify mode (the cloud checks the edge's
    drafts; the output is the cloud model's). Default model: the exit-tuned preset."""
    import os
    import subprocess

    from .client import generate_collab
    from .exits import ExitPolicy

    args.model = args.model or "smollm2-135m-ee"
    model = _load(args)
    split = model.n_layers // 2
    policy = ExitPolicy.for_model(model, split, threshold=0.8)
    cmd = [sys.executable, "-m", "cecollm.cli", "serve", "--port", "0", "--split", str(split), "--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "CECOLLM_KEY": ""})
    try:
        banner = server.stdout.readline().strip()
        print(banner)
        address = banner.split(" on ")[1].split(" ")[0]
        print(f"model: {args.model}; edge: layers [0, {split}) with exits {list(policy.exits)}, threshold 0.8 (max_prob)")
        print("tags: [c] finished by the cloud, [eN] at the edge's exit after N layers, [f] edge fallback\n")
        for prompt in DEMO_PROMPTS:
            connect = _connect(address, None)
            paper = generate_collab(model, prompt, policy, connect, max_new_tokens=args.max_new_tokens, chat=True)
            verify = generate_collab(model, prompt, policy, connect, max_new_tokens=args.max_new_tokens, chat=True,
                                     dtype="f32", speculate="auto")  # fmt: skip
            print(f"> {prompt}")
            print("paper's mode (F16 uploads; an exited token is final):")
            print(_colored(model, paper))
            print(_collab_summary(paper))
            print(f"verify mode (the edge drafts, the cloud checks; the output is the cloud model's):\n{verify.text}")
            print(f"[{len(verify.tokens)} tokens in {verify.extra['round_trips']} round trips, "
                  f"{verify.extra['accepted_per_round_trip']:.2f} drafts accepted per round trip]\n")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
        print(server.stdout.read().strip())
    return 0


def _colored(model, result) -> str:
    """The text with each token's source: [c] cloud, [eN] the edge's exit N, [f] fallback at the edge."""
    pieces = []
    for trace in result.extra["traces"]:
        tag = {"cloud": "c", "fallback": "f"}.get(trace.source, f"e{trace.exit_layer}")
        pieces.append(f"{model.detokenize([trace.token])}[{tag}]")
    return "".join(pieces).strip()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cecollm", description="Cloud-edge collaborative LLM inference.")
    parser.add_argument("--version", action="version", version=f"cecollm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def subcommand(name, **kw):  # every subcommand's --help shows the defaults
        return add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    sub.add_parser = subcommand

    def common(p):
        p.add_argument("--model", default=None,
                       help="a llama GGUF, a Hugging Face checkpoint directory, or a preset: smollm2-135m (the default), "
                            "smollm2-135m-ee (tuned for exits)")  # fmt: skip
        p.add_argument("--quantize", choices=("q8_0", "q4_0", "q4_1", "f16", "f32"), default="q8_0",
                       help="how a Hugging Face checkpoint's weight matrices are stored once loaded")  # fmt: skip
        p.add_argument("--threads", type=positive_int, default=None, help="threads for the C core (default: all cores)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--activations", choices=("f32", "q8"), default="f32",
                       help="f32: exact fp32 activations; q8: 8-bit activations, integer dots (faster decode)")  # fmt: skip
        p.add_argument("--kv-dtype", choices=("f32", "f16"), default="f32", help="KV cache storage (f16: half the memory)")

    def exit_options(p):
        p.add_argument("--split", type=int, default=None, help="the edge owns layers [0, split) (default: half)")
        p.add_argument("--metric", choices=("max_prob", "margin", "entropy", "gate"), default="max_prob")
        p.add_argument("--exit-heads", default=None, help="trained exit heads (from train-exits)")
        p.add_argument("--precheck-rows", type=int, default=None,
                       help="skip exit checks that a head over this many leading tokens proves hopeless")  # fmt: skip

    def ray_options(p):
        p.add_argument("--ray", action="store_true", help="run on a local Ray cluster (pip install cecollm[cluster])")
        p.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. auto)")
        p.add_argument("--workers", type=positive_int, default=2, help="Ray actors, one CPU each, each loading the model once")

    p = sub.add_parser("info", help="architecture, layers, tensor types, size")
    common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--mode", choices=("full", "edge", "collab"), default="full",
                   help="full: all layers; edge: edge layers with exits, no network; collab: edge + cloud")  # fmt: skip
    p.add_argument("--cloud", default=None, help="HOST:PORT of a `cecollm serve` (collab mode)")
    p.add_argument("--key-file", default=None, help="shared key file (default: $CECOLLM_KEY)")
    p.add_argument("--dtype", choices=("f16", "q8_0", "f32"), default="f16", help="hidden states on the wire")
    p.add_argument("--deadline", type=float, default=2.0, help="seconds to wait for the cloud per token")
    p.add_argument("--strict", action="store_true",
                   help="a cloud failure ends the command with exit code 3 (default: warn once, finish at the edge)")  # fmt: skip
    p.add_argument("--speculate", default="0",
                   help="collab: 0 = the paper's mode (exited tokens are final); K (1..8) or auto = verify mode, "
                        "the cloud checks K drafted tokens per round trip and the output is the cloud model's")  # fmt: skip
    exit_options(p)
    p.add_argument("--exits", type=int_list, default=None, help="exit points, e.g. 6,10 (default: 2/5 and 2/3 of the split)")
    p.add_argument("--threshold", type=finite_float, default=0.8, help="one threshold for every exit")
    p.add_argument("--thresholds", type=float_list, default=None, help="one threshold per exit, e.g. 0.9,0.8")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="accuracy sweep over exit thresholds x exit layers x splits")
    common(p)
    exit_options(p)
    p.add_argument("--thresholds", type=float_list, default="0.5,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--exit-sets", default="6,10;4,8,12", help="semicolon-separated exit sets")
    p.add_argument("--splits", type=int_list, default="15")
    p.add_argument("--split-text", default="test", help="which split of the shipped text to score on")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens per prompt for generation scores (0: skip)")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--out-json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default=None, help="write the agreement plot (PNG)")
    p.add_argument("--no-progress", action="store_true")
    ray_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("experiment", help="the paper's evaluation: schemes x data sets x links (time, offload, bytes, quality)")
    p.add_argument("--schemes", default="cloud,edge,naive,collab", help="of cloud,edge,naive,collab,verify")
    p.add_argument("--thresholds", type=float_list, default="0.8,0.9,1.0", help="collab: one row per threshold")
    p.add_argument("--dataset", default="instructions", help="instructions and/or summaries, comma-separated")
    p.add_argument("--model", default="smollm2-135m-ee", help="preset(s) or GGUF path(s), comma-separated")
    p.add_argument("--n", type=int, default=100, help="prompts per data set")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per prompt")
    p.add_argument("--rtt", type=float_list, default="0.02", help="round-trip times in seconds, comma-separated")
    p.add_argument("--bandwidth-mbit", type=float_list, default="100", help="link bandwidths, comma-separated")
    p.add_argument("--split", type=int_list, default="15", help="splits, comma-separated")
    p.add_argument("--exits", type=int_list, default=None, help="exit layers (default: the model's own)")
    p.add_argument("--exit-heads", default=None, help="trained exit-head files (train-exits), comma-separated")
    p.add_argument("--dtype", default="f16", help="wire dtypes of hidden states: f16, q8_0, f32")
    p.add_argument("--speculate", default="auto", help="verify: drafts per round trip, or auto")
    p.add_argument("--threads", type=positive_int, default=None, help="threads for the C core (per worker with Ray)")
    ray_options(p)
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object with rows")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("bench", help="pp512 and tg128 tokens/s, as llama-bench reports them")
    common(p)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-exits", help="train exit heads and gates by distillation (needs torch)")
    common(p)
    p.add_argument("--exits", type=int_list, default="4,8,12,16")
    p.add_argument("--out", required=True, help="output side file (.safetensors)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per exit (0: untrained heads)")
    p.add_argument("--rank", type=int, default=32, help="rank of each exit's adapter")
    p.add_argument("--data", action="append", help="text file(s); default: the shipped train split")
    p.add_argument("--self-text", type=int, default=16, help="texts the model generates itself for training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_exits)

    p = sub.add_parser("finetune", help="tune the model's own weights for early exits (LITE-style; needs torch)")
    common(p)
    p.add_argument("--exits", type=int_list, default="4,8,12,15", help="exits trained through the shared final norm and head")
    p.add_argument("--out", required=True, help="the delta to write (.safetensors)")
    p.add_argument("--gguf-out", default=None, help="also write the tuned model as a GGUF")
    p.add_argument("--method", choices=("scales", "lora"), default="scales",
                   help="scales: tune each quantization block's scale and minimum (ships exactly in the base's types); "
                        "lora: a low-rank update per matrix, re-quantized")  # fmt: skip
    p.add_argument("--rank", type=int, default=16, help="lora: rank of each matrix's update")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--w-final", type=float, default=12.0, help="weight of the final layer's KL to the original")
    p.add_argument("--top1", type=float, default=0.0, help="weight of the exits' hard-label term")
    p.add_argument("--tau", type=float, default=0.5, help="temperature of the teacher the exits learn (sharpened < 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=2, help="answers per training instruction (1 greedy + sampled)")
    p.add_argument("--free-text", type=int, default=256, help="texts the model samples freely (protect the final layer)")
    p.add_argument("--data", default=None, help="tuning data JSON: read if it exists, else generated and written there")
    p.add_argument("--checkpoint", default=None, help="resumable training state (written every 200 steps)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("serve", help="run a cloud server for edge clients")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7433)
    p.add_argument("--split", type=int, default=None, help="the cloud owns layers [split, L) (default: half)")
    p.add_argument("--key-file", default=None, help="shared key file (default: $CECOLLM_KEY; none: loopback only)")
    p.add_argument("--kv-budget-mb", type=float, default=2048, help="memory for all sessions' KV and hidden states")
    p.add_argument("--max-sessions", type=int, default=256)
    p.add_argument("--max-sessions-per-peer", type=int, default=16)
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--handshake-timeout", type=float, default=5.0, help="seconds for the hello and authentication")
    p.add_argument("--frame-timeout", type=float, default=30.0, help="seconds for a frame's body once it started")
    p.add_argument("--ttl", type=float, default=600, help="seconds before an idle session expires")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="auth failures and limit hits are logged at WARNING")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="generate from a few prompts and report speed")
    common(p)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    from .client import CloudUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cecollm: error: {exc}", file=sys.stderr)
        return 2
    except CloudUnavailable as exc:
        print(f"cecollm: the cloud failed: {exc}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"cecollm: error: this needs {top}: pip install 'cecollm[{EXTRAS[top]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

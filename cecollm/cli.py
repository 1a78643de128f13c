"""The `cecollm` command line: human tables by default, one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    return load_model(args.model)


def cmd_info(args) -> int:
    info = _load(args).info()
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _policy(args, n_layers: int):
    from .exits import ExitPolicy

    split = args.split if args.split is not None else n_layers // 2
    exits = _ints(args.exits) if args.exits else tuple(e for e in (split * 2 // 5, split * 2 // 3) if 0 < e < split)
    thresholds = _floats(args.thresholds) if args.thresholds else (args.threshold,)
    return ExitPolicy(exits=exits, split=split, thresholds=thresholds, metric=args.metric,
                      precheck_rows=args.precheck_rows)  # fmt: skip


def cmd_generate(args) -> int:
    model = _load(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat=args.chat)
    if args.mode == "edge":
        from .edge import generate_edge

        policy = _policy(args, model.n_layers)
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
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            result = stop.value
            break
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n\n[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s, finish: {result.finish_reason}]")
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
    from .sweep import sweep

    model = _load(args)
    exit_sets = [_ints(group) for group in args.exit_sets.split(";")]
    result = sweep(model, thresholds=_floats(args.thresholds), exit_sets=exit_sets, splits=_ints(args.splits),
                   metric=args.metric, gen_tokens=args.gen_tokens, precheck_rows=args.precheck_rows,
                   progress=not args.no_progress)  # fmt: skip
    if args.csv:
        result.to_csv(args.csv)
    if args.out_json:
        result.to_json(args.out_json)
    if args.plot:
        result.plot(args.plot)
    print(result.to_json() if args.json else result.table())
    return 0


def cmd_demo(args) -> int:
    model = _load(args)
    print(f"cecollm demo: {model.info()['name']} ({model.path})")
    print("mode: full model, one process (collaborative mode arrives with the cloud server)\n")
    for prompt in DEMO_PROMPTS:
        t0 = time.perf_counter()
        result = model.generate(prompt, max_new_tokens=args.max_new_tokens, chat=True)
        elapsed = time.perf_counter() - t0
        print(f"> {prompt}\n{result.text.strip()}")
        print(f"  [{len(result.tokens)} tokens in {elapsed:.2f} s, decode {result.tokens_per_s:.1f} tokens/s]\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cecollm", description="Cloud-edge collaborative LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="path to a llama GGUF (default: SmolLM2-135M-Instruct)")
        p.add_argument("--threads", type=int, default=None, help="threads for the C core (default: all cores)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    def exit_options(p):
        p.add_argument("--split", type=int, default=None, help="the edge owns layers [0, split) (default: half)")
        p.add_argument("--metric", choices=("max_prob", "margin", "entropy"), default="max_prob")
        p.add_argument("--precheck-rows", type=int, default=None,
                       help="skip exit checks that a head over this many leading tokens proves hopeless")  # fmt: skip

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
    p.add_argument("--mode", choices=("full", "edge"), default="full",
                   help="full: all layers; edge: edge layers with early exits, no network")  # fmt: skip
    exit_options(p)
    p.add_argument("--exits", default=None, help="exit points, e.g. 6,10 (default: 2/5 and 2/3 of the split)")
    p.add_argument("--threshold", type=float, default=0.8, help="one threshold for every exit")
    p.add_argument("--thresholds", default=None, help="one threshold per exit, e.g. 0.9,0.8")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="accuracy sweep over exit thresholds x exit layers x splits")
    common(p)
    exit_options(p)
    p.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--exit-sets", default="6,10;4,8,12", help="semicolon-separated exit sets")
    p.add_argument("--splits", default="15")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens per prompt for generation scores (0: skip)")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--out-json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default=None, help="write the agreement plot (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="generate from a few prompts and report speed")
    common(p)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cecollm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

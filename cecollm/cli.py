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


def cmd_generate(args) -> int:
    model = _load(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat=args.chat)
    if args.json:
        result = model.generate(args.prompt, **kwargs)
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "prompt_tokens": result.prompt_tokens,
                    "tokens": result.tokens,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prefill_s": result.prefill_s,
                    "decode_s": result.decode_s,
                    "tokens_per_s": result.tokens_per_s,
                }
            )
        )
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
    p.set_defaults(func=cmd_generate)

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

"""How far each engine's logits are from transformers (fp32, CPU torch) on the same GGUF.

For cecollm with fp32 and with 8-bit activations, and for llama.cpp (llama-cpp-python, whose
matrix products quantize activations to 8 bits as cecollm's "q8" mode does): the largest |logit
difference| per prompt, the share of positions whose argmax agrees with the reference, and how many
of 32 greedy tokens each cecollm mode shares with fp32 before the first difference. cecollm is run
one position at a time (the decode path, where the activation mode applies).

    python benchmarks/accuracy.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

PROMPTS = [  # tests/test_reference.py's prompts and one story opening
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Ünïcödé, emoji 🙂 and numbers: 1234567 + 89 = ?",
    "Once upon a time, in a small village,",
]


def decode_logits(model, ids) -> np.ndarray:
    cache = model.new_cache(len(ids))
    steps = [model.core.head(cache.forward(model.core.embed(np.array([t], np.int32)), i))[0] for i, t in enumerate(ids)]
    return np.stack(steps)


def main():
    import torch
    import transformers
    from llama_cpp import Llama

    import cecollm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cecollm._core.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    engines = {"cecollm": cecollm.load_model(), "cecollm-q8": cecollm.load_model(activations="q8")}
    path = engines["cecollm"].path
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    llm = Llama(model_path=path, n_ctx=256, logits_all=True, n_threads=args.threads, verbose=False)

    def llama_cpp_logits(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    print(f"{'prompt':<24}{'engine':<12}{'max |dlogit|':>14}{'top-1 agree':>13}{'greedy prefix':>15}")
    for prompt in PROMPTS:
        ids = engines["cecollm"].tokenize(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        greedy = {e: m.generate(ids, max_new_tokens=32).tokens for e, m in engines.items()}
        runs = {e: decode_logits(m, ids) for e, m in engines.items()} | {"llama.cpp": llama_cpp_logits(ids)}
        for engine, logits in runs.items():
            agree = (logits.argmax(-1) == ref.argmax(-1)).mean()
            prefix = ""
            if engine in greedy:
                same = next((i for i, (a, b) in enumerate(zip(greedy["cecollm"], greedy[engine])) if a != b), None)
                prefix = f"{len(greedy['cecollm']) if same is None else same}/{len(greedy['cecollm'])}"
            label = repr(prompt[:20])
            print(f"{label:<24}{engine:<12}{np.abs(logits - ref).max():>14.2e}{agree:>13.2f}{prefix:>15}")


if __name__ == "__main__":
    main()

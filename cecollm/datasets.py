"""The data sets shipped in the package, written for cecollm (nothing is downloaded).

- instructions("train"): 345 instructions for fine-tuning (the targets are the model's own answers);
- instructions("eval"): 220 instructions with reference answers, disjoint from "train", for evaluation
  only (the first 100 are the held-out set of the exit-tuning targets);
- eval_text("train" | "test"): human-written paragraphs (perplexity, exit statistics).
"""

from __future__ import annotations

import json
from importlib import resources

SPLITS = {"train": "instructions_train.jsonl", "eval": "instructions_eval.jsonl"}


def instructions(split: str = "eval") -> list[dict]:
    """The instruction set `split` as dicts with id, category, instruction, input (and reference in eval)."""
    if split not in SPLITS:
        raise ValueError(f"no instruction split {split!r} (have {sorted(SPLITS)})")
    raw = resources.files("cecollm").joinpath("data", SPLITS[split]).read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def user_message(item: dict) -> str:
    """The text a user sends for an instruction: the instruction, then its input (if any) after a blank line."""
    return item["instruction"] + ("\n\n" + item["input"] if item.get("input") else "")

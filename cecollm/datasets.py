"""The data sets shipped in the package, written for cecollm (nothing is downloaded).

- instructions("train"): 345 instructions for fine-tuning (the targets are the model's own answers);
- instructions("eval"): 220 instructions with reference answers, disjoint from "train", for evaluation
  only (the first 100 are the held-out set of the exit-tuning targets);
- eval_text("train" | "test"): human-written paragraphs (perplexity, exit statistics);
- summaries("train" | "val" | "test" | "all"): 250 ACL abstracts, each with three one-sentence
  summaries (its challenge, approach and outcome) from ACLSum (Takeshita et al., NAACL 2024; the
  `aclsum` package, MIT; abstracts from the ACL Anthology, CC BY 4.0), built by data/build_summaries.py;
- examples(name, n): the evaluation sets as (prompt, references), for cecollm.experiments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

SPLITS = {"train": "instructions_train.jsonl", "eval": "instructions_eval.jsonl"}
SUMMARY_SPLITS = ("train", "val", "test")
SUMMARIZE = "Summarize the following abstract of a research paper in one sentence."
DATASETS = ("instructions", "summaries")


def _jsonl(name: str) -> list[dict]:
    raw = resources.files("cecollm").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def instructions(split: str = "eval") -> list[dict]:
    """The instruction set `split` as dicts with id, category, instruction, input (and reference in eval)."""
    if split not in SPLITS:
        raise ValueError(f"no instruction split {split!r} (have {sorted(SPLITS)})")
    return _jsonl(SPLITS[split])


def summaries(split: str = "test") -> list[dict]:
    """ACLSum split `split` ("all": every split) as dicts with id, split, title, abstract, summaries."""
    if split not in SUMMARY_SPLITS + ("all",):
        raise ValueError(f"no summaries split {split!r} (have {SUMMARY_SPLITS + ('all',)})")
    return [r for r in _jsonl("summaries.jsonl") if split in ("all", r["split"])]


def user_message(item: dict) -> str:
    """The text a user sends for an instruction: the instruction, then its input (if any) after a blank line."""
    return item["instruction"] + ("\n\n" + item["input"] if item.get("input") else "")


@dataclass(frozen=True)
class Example:
    """One evaluation prompt (a chat user message) and its reference answers."""

    id: str
    prompt: str
    references: tuple[str, ...]


def examples(name: str, n: int | None = None) -> list[Example]:
    """The first n examples of an evaluation set: "instructions" (the held-out instructions, one
    reference answer each) or "summaries" (ACLSum test abstracts first, three references each)."""
    if name == "instructions":
        items = [Example(r["id"], user_message(r), (r["reference"],)) for r in instructions("eval")]
    elif name == "summaries":
        docs = sorted(summaries("all"), key=lambda r: ("test", "val", "train").index(r["split"]))
        items = [Example(r["id"], f"{SUMMARIZE}\n\n{r['abstract']}", tuple(r["summaries"])) for r in docs]
    else:
        raise ValueError(f"no data set {name!r} (have {', '.join(DATASETS)})")
    if n is not None and not 1 <= n <= len(items):
        raise ValueError(f"n={n}: the data set {name!r} has {len(items)} examples")
    return items[:n]

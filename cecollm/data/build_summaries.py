"""Writes summaries.jsonl from the `aclsum` package (MIT; abstracts from the ACL Anthology, CC BY 4.0).

Each record: the paper's ACL Anthology id, title, abstract (the S2ORC text, untokenized) and the three
one-sentence ACLSum summaries of the paper (challenge, approach, outcome), used as references.
Not imported by cecollm; run once to regenerate the shipped file:

    pip download --no-deps aclsum==0.1.2 -d /tmp/aclsum && unzip -o -q /tmp/aclsum/*.whl -d /tmp/aclsum
    python cecollm/data/build_summaries.py /tmp/aclsum/aclsum/dataset > cecollm/data/summaries.jsonl
"""

import json
import os
import sys


def main(dataset_dir: str) -> None:
    for split in ("train", "val", "test"):
        with open(os.path.join(dataset_dir, f"{split}.jsonl"), encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                with open(os.path.join(dataset_dir, "paper_jsons", doc["id"] + ".json"), encoding="utf-8") as g:
                    paper = json.load(g)
                summary = doc["summary"]
                record = {"id": doc["id"], "split": split, "title": paper["title"].strip(),
                          "abstract": " ".join(paper["abstract"].split()),
                          "summaries": [summary[a].strip() for a in ("challenge", "approach", "outcome")]}  # fmt: skip
                print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])

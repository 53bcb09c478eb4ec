"""Training throughput on real data: loramill's worker step on the bundled chat examples (~127 tokens each), padded
micro batches of N examples against packed micro batches of a token budget (``train.batch_tokens``), and on long
conversations made of those examples (each about 1,900 tokens: 14 consecutive examples as one multi-turn chat).

Random-weight Llama shapes (bench/random_checkpoint.py) in 4-bit NF4, LoRA r=16 / alpha 32 on every linear layer,
gradient checkpointing, Liger's fused loss and compiled blocks (``--no-compile-blocks``: Liger's kernels alone),
packed rows in the attention a one-GPU run takes (``--attention``: ``train.attention``), the functions a Ray Train
worker runs (one base load per shape; the adapter is
unloaded between rows). Real (non-padding) tokens per second over the steps after 3 warm-up steps; peak GiB is
torch.cuda.max_memory_allocated during the row. Each file is repeated 40 times, as the Unsloth
anchor on the same files (reference/unsloth_realdata.py, run by bench_session.py in the same session) repeats it.

    python bench/bench_realdata.py --tokenizer TOKENIZER_DIR [--shapes llama-1b llama-8b] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_checkpoint import make_checkpoint  # noqa: E402

from lora.config import LoraSettings, ModelSource, Quantization, Training  # noqa: E402
from lora.data import load_examples  # noqa: E402
from lora.fast import (compile_decoder_layers, offload_checkpointed_inputs, use_fused_kernels,  # noqa: E402
                       use_packed_attention)
from lora.model import dispatch_backend, load_base_model, load_tokenizer, prepare_trainable  # noqa: E402
import lora.train  # noqa: E402
from lora.train import Batching, Shard, TrainState, build_optimizer, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3
FILE_REPEATS = 40
ROWS = {  # (data, batching): examples a micro batch for "padded", tokens a micro batch for "packed"
    "llama-1b": [("short", "padded", 16), ("short", "padded", 64), ("short", "packed", 2048), ("short", "packed", 8192),
                 ("short", "packed", 16384), ("short", "packed", 32768), ("long", "padded", 4),
                 ("long", "packed", 8192), ("long", "packed", 16384)],
    "llama-8b": [("short", "padded", 16), ("short", "packed", 16384), ("short", "packed", 32768),
                 ("long", "packed", 16384)],
}


def long_conversations(source: Path, target: Path, per_conversation: int = 14) -> Path:
    """Consecutive examples of ``source`` joined into one multi-turn chat each (one system message, kept)."""
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with target.open("w") as f:
        for start in range(0, len(records) - per_conversation + 1, per_conversation):
            messages = []
            for record in records[start : start + per_conversation]:
                turns = record["messages"]
                messages += [m for m in turns if m["role"] != "system" or not messages]
            f.write(json.dumps({"messages": messages}) + "\n")
    return target


def run_row(base, backend, examples, batching: str, size: int, steps: int, compile_blocks: bool,
            offload: bool, attention: str) -> dict:
    torch.cuda.reset_peak_memory_stats()
    budget = {"micro_batch_size": size} if batching == "padded" else {"batch_tokens": size}
    cfg = Training(max_steps=WARMUP + steps, learning_rate=1e-4, lr_schedule="constant", max_seq_len=2048,
                   gradient_checkpointing=True, eval_every=10**6, checkpoint_every=10**6, max_eval_examples=1,
                   group_by_length=True, offload_checkpoints=offload, **budget)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    model = prepare_trainable(base, lora, cfg.gradient_checkpointing)
    if compile_blocks:
        compile_decoder_layers(model, backend)
    if cfg.offload_checkpoints:  # as the worker does (pipelines/train_worker.py)
        offload_checkpointed_inputs(model, backend)
    attention = use_packed_attention(model, attention, backend, packed=batching == "packed", world_size=1)[0]
    cfg = cfg.model_copy(update={"attention": attention})
    shard = Shard(examples, examples[:1], rank=0, world_size=1)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
    state = TrainState()
    stamps: dict[int, tuple[float, int]] = {}

    def progress(step: int) -> None:
        torch.cuda.synchronize()
        stamps[step] = (time.perf_counter(), state.tokens)

    train(model, optimizer, scheduler, shard, cfg, state, lambda *a: None, pad_id=0, device=backend.device,
          progress=progress)
    (t0, tokens0), (t1, tokens1) = stamps[WARMUP], stamps[WARMUP + steps]
    result = dict(batching=batching, size=size, attention=attention,
                  real_tok_s=round((tokens1 - tokens0) / (t1 - t0)),
                  tokens_per_step=round((tokens1 - tokens0) / steps), step_s=round((t1 - t0) / steps, 3),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  padding=round(shard.padding_fraction(Batching.of(cfg)), 3), plan=Batching.of(cfg).describe())
    del optimizer, scheduler
    base = model.unload()  # as a Tune actor gives its base back (pipelines/train_worker.py)
    base.disable_input_require_grads()
    base.eval()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b"])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a chat-template tokenizer")
    parser.add_argument("--data", type=Path, default=REPO / "data/medical/train.jsonl")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    parser.add_argument("--rows", nargs="+", default=None, help="data:batching:size rows instead of the default set")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex_attention"],
                        help="train.attention (auto: flex attention for packed rows, SDPA for padded ones, as a "
                        "one-GPU run chooses)")
    parser.add_argument("--row-tokens", type=int, default=None, help="SDPA's packed row length "
                        "(lora.train.PACKED_ROW_TOKENS)")
    parser.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="compile each block, as train.compile_blocks does by default (Liger then keeps only its "
                        "fused loss); --no-compile-blocks: Liger's kernels alone, as before")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=False,
                        help="the checkpointed block inputs in host memory, as train.offload_checkpoints: true does")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines to write")
    args = parser.parse_args()
    if args.row_tokens:
        lora.train.PACKED_ROW_TOKENS = args.row_tokens
    args.root.mkdir(parents=True, exist_ok=True)
    files = {"short": args.data, "long": long_conversations(args.data, args.root / "long.jsonl")}
    tokenizer = load_tokenizer(ModelSource(id=str(args.tokenizer)), args.tokenizer)
    # The file repeated, as reference/unsloth_realdata.py repeats it: once, an epoch of 400 examples at a 16k-token
    # budget was 3-4 micro batches, the last one partial (11,974 real tokens a step against TRL's 15,888 on 2026-12-01)
    examples = {name: load_examples(str(path), {}, tokenizer, 2048, "drop")[0] * FILE_REPEATS
                for name, path in files.items()}

    rows = []
    for shape in args.shapes:
        path = make_checkpoint(shape, args.root, args.tokenizer)
        quantization = Quantization(mode="nf4")
        backend = dispatch_backend(quantization, use_gpu=True)
        base = load_base_model(path, ModelSource(id=str(path)), quantization, backend)
        kernels = use_fused_kernels(base, backend, block_kernels=not args.compile_blocks)
        kernels += "; torch.compile of each block" if args.compile_blocks else ""
        kernels += "; block inputs in host memory" if args.offload else ""
        rows_here = [(d, b, int(n)) for d, b, n in (r.split(":") for r in args.rows)] if args.rows else ROWS[shape]
        for data, batching, size in rows_here:
            try:
                row = run_row(base, backend, examples[data], batching, size, args.steps, args.compile_blocks,
                              args.offload, args.attention)
            except Exception as e:  # one failing row (out of memory) must not lose the others
                row = dict(batching=batching, size=size, error=f"{type(e).__name__}: {e}"[:300])
                gc.collect()
                torch.cuda.empty_cache()
            row = dict(system="loramill", shape=shape, data=data, kernels=kernels, file_repeats=FILE_REPEATS) | row
            print(json.dumps(row), flush=True)
            rows.append(row)
        del base
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

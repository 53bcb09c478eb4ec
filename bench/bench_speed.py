"""Training throughput of loramill's own step next to the plain transformers + peft + bitsandbytes path.

The plain path is ../shared/gpu/hf_baseline.py, copied unchanged to bench/reference/. loramill's side runs the
functions a Ray Train worker of `loramill train` runs (dispatch_backend, load_base_model, use_fused_kernels,
prepare_trainable, build_optimizer, lora.train.train), on the same shapes: random-weight Llama checkpoints
(bench/random_checkpoint.py), micro batch 4 x 2048 random tokens, LoRA r=16 / alpha 32 on every linear layer
but the head, gradient checkpointing, AdamW. tokens/s over the timed steps after 3 warm-up steps; peak GiB is
torch.cuda.max_memory_allocated from loading to the end, step peak GiB the same over the timed steps alone;
first_step_s runs from train()'s start (a one-example base evaluation) to the first step's end: compiling the
blocks shows there. Each row runs with the same CUDA context, one at a time.

    python bench/bench_speed.py [--shapes llama-1b llama-8b] [--modes qlora lora] [--steps 8] [--out FILE]
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
sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))

import hf_baseline  # noqa: E402
from turns import Turns  # noqa: E402
from random_checkpoint import make_checkpoint  # noqa: E402

from lora.config import LoraSettings, ModelSource, Quantization, Training  # noqa: E402
from lora.data import TokenizedExample  # noqa: E402
from lora.fast import compile_decoder_layers, offload_checkpointed_inputs, use_fused_kernels  # noqa: E402
from lora.model import dispatch_backend, load_base_model, parameter_counts, prepare_trainable  # noqa: E402
from lora.train import Shard, TrainState, build_optimizer, train  # noqa: E402
from step_profile import MemoryPhases, StepProfile  # noqa: E402

WARMUP = 3


# loramill's rows: the system's name and what it adds to the worker's step (Liger kernels, compiled blocks, block
# inputs offloaded to host memory), so each route is measured alone and together with the others.
LORAMILL_SYSTEMS = {
    "loramill-unfused": (),
    "loramill-liger": ("liger",),  # the worker's step on CUDA before train.compile_blocks
    # The worker's step on CUDA by default: Liger's loss only (its RMSNorm, SwiGLU and RoPE kernels are Triton calls
    # torch.compile does not trace) and each block compiled
    "loramill": ("liger-loss", "compile"),
    "loramill-offload": ("liger-loss", "compile", "offload"),  # with train.offload_checkpoints
    "loramill-uncompiled-offload": ("liger-loss", "offload"),  # and train.compile_blocks: false
    # the compiled blocks' LoRA layers through peft's own forward (the scale on the full-size side), as before
    # lora.fast.scale_lora_in_rank
    "loramill-offload-peft-scaling": ("liger-loss", "compile", "offload", "peft-scaling"),
    # the compiled blocks' 4-bit matmuls through bitsandbytes' own op, as before lora/nf4.py
    "loramill-bnb-matmul": ("liger-loss", "compile", "bnb-matmul"),
    # the compiled blocks' 4-bit weights dequantized by the torch ops inductor fuses, as before lora/nf4_kernel.py
    "loramill-offload-torch-dequant": ("liger-loss", "compile", "offload", "torch-dequant"),
    # the compiled blocks' projections each their own matmuls, as before lora/grouped.py (bf16 bases only differ)
    "loramill-ungrouped": ("liger-loss", "compile", "ungrouped"),
    "loramill-offload-ungrouped": ("liger-loss", "compile", "offload", "ungrouped"),
}


def loramill_step(path: Path, quant: bool, system: str, batch: int, seq: int, steps: int, r: int,
                  profile: Path | None = None, profile_parts: tuple[bool, bool] = (True, True),
                  memory_phases: bool = False, turns: int = 0) -> dict:
    torch.cuda.reset_peak_memory_stats()
    loading = time.perf_counter()
    quantization = Quantization(mode="nf4" if quant else "none")
    backend = dispatch_backend(quantization, use_gpu=True)
    model = load_base_model(path, ModelSource(id=str(path)), quantization, backend)
    routes = LORAMILL_SYSTEMS[system]
    fused = "liger" in routes or "liger-loss" in routes
    kernels = [use_fused_kernels(model, backend, block_kernels="liger" in routes) if fused else "none"]
    lora = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear")
    cfg = Training(max_steps=WARMUP + steps, learning_rate=1e-4, lr_schedule="constant", micro_batch_size=batch,
                   max_seq_len=seq, gradient_checkpointing=True, eval_every=10**6, checkpoint_every=10**6,
                   max_eval_examples=1, fused_kernels=fused, group_by_length=False)
    model = prepare_trainable(model, lora, cfg.gradient_checkpointing)
    if "compile" in routes:
        dequantization = ("bitsandbytes" if "bnb-matmul" in routes else
                          "torch" if "torch-dequant" in routes else "triton")
        kernels.append(compile_decoder_layers(model, backend, dequantization,
                                              lora_scaled_in_rank="peft-scaling" not in routes,
                                              grouped_projections="ungrouped" not in routes))
    if "offload" in routes:
        kernels.append(offload_checkpointed_inputs(model, backend))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(batch * (WARMUP + steps)):
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        examples.append(TokenizedExample(input_ids=ids, labels=ids))
    shard = Shard(examples, examples[:1], rank=0, world_size=1)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps)
    stamps: dict[int, float] = {}
    phases = MemoryPhases(model, optimizer) if memory_phases else None

    # The allocator's history cannot record Python stacks on the compiled step (StepProfile's doc)
    profiled = StepProfile(profile, *profile_parts, stacks="compile" not in routes) if profile else None
    turn = Turns() if turns else None  # bench_paired.py: the timed steps in windows of `turns`, when given the turn

    def progress(step: int) -> None:
        torch.cuda.synchronize()
        stamps[step] = time.perf_counter()
        if step == WARMUP:
            step_peak.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            if profiled:
                profiled.__enter__()
        if step == WARMUP + steps and profiled:
            profiled.steps = steps
            profiled.__exit__(None, None, None)
        if turn and step >= WARMUP and (step - WARMUP) % turns == 0:
            turn.hand_over(stamps[step]) if step < WARMUP + steps else turn.finish(stamps[step])

    step_peak: list[int] = []  # the peak from loading to the warm-up's end; then the timed steps' own

    started = time.perf_counter()
    try:
        state = train(model, optimizer, scheduler, shard, cfg, TrainState(), lambda *a: None,
                      pad_id=0, device=backend.device, progress=progress)
    except BaseException as error:
        if profiled:  # stop recording: the next row must not inherit it (its memory replay would hold this row's)
            profiled.__exit__(type(error), error, error.__traceback__)
        raise
    seconds = sum(turn.seconds) if turn else stamps[WARMUP + steps] - stamps[WARMUP]
    trainable, _ = parameter_counts(model)
    result = dict(system=system, path=path.name, quant=quant, bs=batch, seq=seq,
                  r=r, steps=steps, tok_s=round(batch * seq * steps / seconds), peak_gib=round(max(step_peak[0], torch.cuda.max_memory_allocated()) / 2**30, 2),
                  step_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  load_s=round(started - loading, 1), first_step_s=round(stamps[1] - started, 1),
                  trainable=trainable, step_s=round(seconds / steps, 3), kernels="; ".join(kernels),
                  last_train_loss=round(state.history[-1]["train_loss"], 4))
    if phases:  # its hooks reset torch's peak counter, so the phases' peaks replace the run's
        result |= dict(peak_gib="-", step_peak_gib="-", memory_phases=phases.line())
    print(json.dumps(result), flush=True)
    del model, optimizer, scheduler, state
    torch._dynamo.reset()  # the next row compiles afresh, as a run's worker process does
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-8b"])
    parser.add_argument("--modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--systems", nargs="+", default=["plain", "loramill-unfused", "loramill"],
                        choices=["plain", *LORAMILL_SYSTEMS])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    parser.add_argument("--out", type=Path, default=None, help="markdown table to write")
    parser.add_argument("--profile", type=Path, default=None,
                        help="folder: profile each loramill row's timed steps (kernel time by kind, memory at the "
                             "peak) into DIR/SYSTEM-SHAPE-MODE/summary.md; those rows' tok/s are then the profiled steps'")
    parser.add_argument("--memory-phases", action="store_true",
                        help="report GPU memory at each loramill row's last step's phases (forward, backward, "
                             "optimizer step): allocated as each starts and its peak")
    parser.add_argument("--profile-only", choices=["kernels", "memory"], default=None,
                        help="with --profile: record only the kernels, or only the allocator's history")
    parser.add_argument("--turns", type=int, default=0, help="steps per window when bench_paired.py runs this "
                        "process: each window waits for its turn (loramill systems only; --steps a multiple of it)")
    args = parser.parse_args()
    if args.turns and (args.steps % args.turns or "plain" in args.systems):
        parser.error("--turns: --steps must be a multiple of it, and the plain path does not take turns")
    args.root.mkdir(parents=True, exist_ok=True)

    rows = []
    for shape in args.shapes:
        path = make_checkpoint(shape, args.root, args.tokenizer)
        for mode in args.modes:
            quant = mode == "qlora"
            for system in args.systems:
                try:
                    if system == "plain":
                        row = hf_baseline.run(str(path), quant, bs=4, seq=2048, steps=args.steps, gc_on=True) | {"system": "plain"}
                    else:
                        profile = args.profile / f"{system}-{shape}-{mode}" if args.profile else None
                        parts = (args.profile_only != "memory", args.profile_only != "kernels")
                        row = loramill_step(path, quant, system, 4, 2048, args.steps, 16, profile, parts,
                                            args.memory_phases, args.turns)
                except Exception as e:  # one failing row (out of memory, a kernel) must not lose the others
                    row = dict(system=system, path=shape, quant=quant, error=f"{type(e).__name__}: {e}"[:300])
                    print(json.dumps(row), flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                rows.append(row | {"shape": shape, "mode": mode})
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)


def markdown(rows: list[dict]) -> str:
    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; batch 4 x 2048, r=16 all-linear, "
             "gradient checkpointing", "",
             "| shape | mode | system | tokens/s | peak GiB | step peak GiB | vs plain tok/s | vs plain memory | kernels |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    plain = {(r["shape"], r["mode"]): r for r in rows if r["system"] == "plain" and "tok_s" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['system']} | error: {r['error']} | | | | | |")
            continue
        base = plain.get((r["shape"], r["mode"]))
        speed = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        memory = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and r['peak_gib'] != "-" else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['system']} | {r['tok_s']:,} | {r['peak_gib']} | "
                     f"{r.get('step_peak_gib', '-')} | {speed} | "
                     f"{memory} | {r.get('kernels', '-')} |")
    phases = [f"- {r['shape']} {r['mode']} {r['system']}: {r['memory_phases']}" for r in rows if "memory_phases" in r]
    if phases:
        lines += ["", "GPU memory at the last step's phases (allocated as each starts -> its peak):", *phases]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

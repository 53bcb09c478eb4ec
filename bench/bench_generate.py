"""Generation latency and tokens/s of the base model, base + unmerged LoRA adapter, and the merged model.

Same prompts, same device, same dtype, one process; the variants take turns within each repeat so that drift
(other load, clocks) hits them alike. Every request generates exactly --max-new-tokens tokens (EOS is held off
with min_new_tokens), so each variant does the same work. Greedy decoding with the KV cache, batch size 1.

What to expect: merged == base in cost (same shapes, the update is folded into W); unmerged adds, per adapted
layer and token, x @ A^T @ B^T: r * (in + out) multiply-adds next to in * out, i.e. 8 * (576 + 576) / (576 * 576)
= 2.8% more FLOPs for SmolLM2-135M's q_proj at r=8, plus two small matmul launches per layer (7 x 30 = 210
layers), which is what batch-1 decoding on a GPU notices.

Without --ref the script builds its own adapter: LoRA r=8 (alpha 16) on every linear layer but the output head,
as the default config trains, with B drawn from N(0, 0.02) so the adapter changes outputs (an untrained B is 0).

    .venv/bin/python bench/bench_generate.py [--model builtin:smollm2-135m-instruct] [--prompts 4]
        [--max-new-tokens 32] [--repeats 3] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16]
        [--threads N] [--nf4] [--ref DOMAIN@vN --config configs/default.yaml] [--out bench/results/generate_cpu.md]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.config import LoraSettings, ModelSource, Quantization  # noqa: E402
from lora.generate import load_with_adapter  # noqa: E402
from lora.model import dispatch_backend, load_base_model, load_tokenizer, resolve_model_dir  # noqa: E402

PROMPTS = [
    "What should I do first if someone has a nosebleed?",
    "Can my landlord keep the deposit for normal wear and tear?",
    "My backup says error E-204. How do I fix it?",
    "How much water should an adult drink on a hot day?",
    "What is the notice period for ending a lease in Ardenia?",
    "How do I restore a single file from last week's backup?",
    "Explain the difference between a sprain and a strain.",
    "Who can witness a will?",
]


def main() -> None:
    args = parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_gpu = {"auto": torch.cuda.is_available(), "cuda": True, "cpu": False}[args.device]
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    full = Quantization(mode="none", compute_dtype=dtype)
    source, adapter_dir, adapter_label, workdir = adapter_and_model(args, use_gpu)
    model_dir = resolve_model_dir(source)
    tokenizer = load_tokenizer(source, model_dir)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    inputs = [encode(tokenizer, prompt) for prompt in prompts]

    def base(quant: Quantization = full) -> torch.nn.Module:
        model = load_base_model(model_dir, source, quant, dispatch_backend(quant, use_gpu))
        model.config.use_cache = True
        return model.eval()

    variants: dict[str, Callable[[], Any]] = {
        "base": base,
        "base + adapter (unmerged)": lambda: load_with_adapter(base(), adapter_dir),
        "merged": lambda: load_with_adapter(base(), adapter_dir).merge_and_unload().eval(),
    }
    if args.nf4:
        nf4 = Quantization(mode="nf4", compute_dtype=dtype)
        variants["nf4 base"] = lambda: base(nf4)
        variants["nf4 base + adapter (as trained)"] = lambda: load_with_adapter(base(nf4), adapter_dir)
    models = {name: build() for name, build in variants.items()}
    device = next(models["base"].parameters()).device

    for model in models.values():  # warm-up: allocator, kernels, lazy inits
        run(model, tokenizer, inputs[0].to(device), args.max_new_tokens, use_gpu)
    latencies: dict[str, list[list[float]]] = {name: [[] for _ in inputs] for name in models}
    tokens: dict[str, list[list[int]]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(args.repeats):
        for i, ids in enumerate(inputs):
            # Round-robin per request, starting at a different variant each time: a burst of outside load
            # lands on all variants alike instead of on whichever block was running.
            start = (repeat * len(inputs) + i) % len(names)
            for name in names[start:] + names[:start]:
                seconds, new = run(models[name], tokenizer, ids.to(device), args.max_new_tokens, use_gpu)
                latencies[name][i].append(seconds)
                if repeat == 0:
                    tokens[name].append(new)

    header = describe(args, source, adapter_label, dtype, device, models)
    table = results_table(latencies, tokens, args.max_new_tokens)
    print(header + "\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(header + "\n" + table + "\n")
        print(f"\nwritten to {args.out}")
    if workdir is not None:
        workdir.cleanup()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model.id (without --ref)")
    parser.add_argument("--prompts", type=int, default=4, help="requests per variant per repeat")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--rank", type=int, default=8, help="rank of the self-built adapter")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--nf4", action="store_true", help="also time the 4-bit base, with and without adapter")
    parser.add_argument("--ref", help="a published adapter (DOMAIN@vN, DOMAIN@alias) instead of a self-built one")
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="registry and model")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    return parser.parse_args()


def adapter_and_model(args: argparse.Namespace, use_gpu: bool):
    """(model source, adapter folder, its description, temp dir to clean up or None)."""
    if args.ref:
        from lora.config import load_config
        from pipelines import use
        from pipelines.registry_access import open_registry

        cfg = load_config(args.config)
        domain, _, ref = args.ref.partition("@")
        fetched = use.fetch(open_registry(cfg), domain, ref or None, use.default_cache_root())
        use.check_base(cfg, resolve_model_dir(cfg.model), fetched)
        config = (fetched.path / "adapter_config.json").read_text()
        return cfg.model, fetched.path, f"{fetched.label} from {cfg.publish.registry} ({_rank(config)})", None
    source = ModelSource(id=args.model)
    workdir = tempfile.TemporaryDirectory(prefix="loramill-bench-")
    build_adapter(source, LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.0), Path(workdir.name))
    label = f"self-built: r={args.rank}, alpha={2 * args.rank}, all linear layers but the head, B ~ N(0, 0.02)"
    return source, Path(workdir.name), label, workdir


def build_adapter(source: ModelSource, lora: LoraSettings, folder: Path) -> None:
    from lora.model import apply_lora

    quant = Quantization(mode="none", compute_dtype="float32")
    model = load_base_model(resolve_model_dir(source), source, quant, dispatch_backend(quant, use_gpu=False))
    torch.manual_seed(0)
    model = apply_lora(model, lora, gradient_checkpointing=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()


def encode(tokenizer: Any, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def run(model: Any, tokenizer: Any, ids: torch.Tensor, new_tokens: int, use_gpu: bool) -> tuple[float, list[int]]:
    """(seconds for one request of exactly ``new_tokens`` greedy tokens, the tokens)."""
    if use_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id)
    if use_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = output[0, ids.shape[1]:].tolist()
    if len(new) != new_tokens:
        raise RuntimeError(f"generated {len(new)} tokens, asked for exactly {new_tokens}")
    return seconds, new


def results_table(latencies: dict[str, list[list[float]]], tokens: dict[str, list[list[int]]], new_tokens: int) -> str:
    """Per variant: the median request, and "best": each prompt's fastest repeat, averaged over prompts.

    On a shared machine the best-of-repeats number is the steadier one: outside load only ever adds time.
    """
    def median_of(per_prompt: list[list[float]]) -> float:
        return statistics.median(t for times in per_prompt for t in times)

    def best_of(per_prompt: list[list[float]]) -> float:
        return statistics.fmean(min(times) for times in per_prompt)

    base, best_base = median_of(latencies["base"]), best_of(latencies["base"])
    rows = ["| variant | requests | median latency (s) | best-of-repeats latency (s) | tokens/s (median) | tokens/s (best) | "
            "latency vs base (median) | latency vs base (best) | same tokens as unmerged |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, per_prompt in latencies.items():
        median, best = median_of(per_prompt), best_of(per_prompt)
        same = "—" if name == "base + adapter (unmerged)" else _same(tokens[name], tokens["base + adapter (unmerged)"])
        rows.append(f"| {name} | {sum(map(len, per_prompt))} | {median:.3f} | {best:.3f} | {new_tokens / median:.1f} | "
                    f"{new_tokens / best:.1f} | {median / base - 1:+.1%} | {best / best_base - 1:+.1%} | {same} |")
    return "\n".join(rows)


def _same(a: list[list[int]], b: list[list[int]]) -> str:
    equal = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{equal}/{len(a)} prompts"


def describe(args, source: ModelSource, adapter: str, dtype: str, device: torch.device, models: dict) -> str:
    import peft
    import transformers

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    command = "python bench/bench_generate.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## Generation: base vs base + adapter vs merged",
        "",
        f"- command: `{command.strip()}`",
        f"- device: {where}; dtype {dtype}; batch 1, greedy, KV cache",
        f"- model: {source.id}; adapter: {adapter}",
        f"- {args.prompts} prompts x {args.repeats} repeats per variant, exactly {args.max_new_tokens} new tokens each;"
        f" variants round-robin per request; one warm-up request each",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        "",
    ])


def _rank(adapter_config: str) -> str:
    import json

    config = json.loads(adapter_config)
    return f"r={config.get('r')}, alpha={config.get('lora_alpha')}"


if __name__ == "__main__":
    main()

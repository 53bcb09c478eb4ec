"""LoRA vs DoRA vs adapter layers vs full fine-tuning on the default model, measured, beside the source's claims.

Issue 18 item 3. On builtin:smollm2-135m-instruct (float32 base, ``quant.mode=none``: merging is exact and every row
trains the same weights) and the medical domain, each row trains in a fresh subprocess of this script, with the same
steps, micro batch, data order and seed, from configs/default.yaml and these overrides:

    lora      lora.variant=lora               (r=8, alpha=16, all-linear: the defaults)   lr 1e-3
    dora      lora.variant=dora               (same r/alpha)                                lr 1e-3
    adapters  lora.method=adapter_layers      (lora.adapter_size=64: the default)           lr 1e-3
    full      every weight of the base trains                                               lr 5e-5

The learning rates were not tuned: 1e-3 is the demo config's, 5e-5 the upper end of what full fine-tuning of a small
LM commonly uses (30 steps leave no time for a smaller one to move). ``lora.method: full`` is reserved for sequence
classifiers in the config, so the full row trains the causal LM's own weights here, through the same loop
(``lora.train.train``, ``evaluate``, ``build_optimizer``).

Each row measures: trainable parameters and their share of the base; the saved folder's bytes (``save_adapter``: PEFT's
two files, the bottleneck's two files, or the full row's trained_weights.safetensors in float32); peak training memory
as the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the base is loaded) over
its RSS at that point; held-out loss on the first ``--eval-examples`` examples of eval.jsonl; and greedy generation
latency (batch 1, fixed prompt, exactly ``--new-tokens`` new tokens, KV cache on, median of ``--reps`` after one
warm-up) of the base, of base + adapter unmerged, and merged (``merge_and_unload``).

    flock /tmp/loramill-heavy.lock .venv/bin/python bench/quality/methods.py    # methods.md gives the wall time
    .venv/bin/python bench/quality/methods.py --render    # methods.md again from methods.json

Writes bench/quality/methods.md and bench/quality/methods.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = REPO / ".loramill" / "quality" / "methods"
DOMAIN = "medical"
PROMPT = "I twisted my ankle playing football an hour ago. What should I do for the next two days?"
ROWS = {
    # row: (label, overrides of configs/default.yaml, learning rate)
    "lora": ("LoRA (r=8, α=16, all-linear)", ["lora.variant=lora"], 1e-3),
    "dora": ("DoRA (r=8, α=16, all-linear)", ["lora.variant=dora"], 1e-3),
    "adapters": ("adapter layers (width 64)", ["lora.method=adapter_layers", "lora.adapter_size=64"], 1e-3),
    "full": ("full fine-tuning", [], 5e-5),
}
MB = 1e6
"""The source gives sizes in MB without saying which; decimal megabytes here."""

CLAIMS = {
    "parameters": "extra parameters 0.1–0.7% (LoRA) vs 3–4% (adapters)",
    "latency": "inference unchanged once merged (LoRA) vs 15–25% slower (adapters)",
    "memory": "training memory 3× (LoRA) vs 2× (adapters) lower than full fine-tuning",
    "size": "8–16 MB (LoRA) vs 50–100 MB (adapters) per adapter",
}


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the process started or since ``reset_peak_rss``) in KiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def reset_peak_rss() -> None:
    """Linux (>= 4.0): writing 5 to clear_refs sets the peak RSS (VmHWM) to the current RSS, so the peak read later
    is that of the training alone, not of loading the base (safetensors pages, a transient copy)."""
    Path("/proc/self/clear_refs").write_text("5")


def row_config(row: str, args: argparse.Namespace):
    from lora.config import load_config

    _, overrides, lr = ROWS[row]
    return load_config(REPO / "configs" / "default.yaml", [
        "quant.mode=none", f"train.max_steps={args.steps}", f"train.learning_rate={lr}",
        f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
        f"train.max_eval_examples={args.eval_examples}", *overrides])


def ms_per_token(models: dict, inputs, tokenizer, args: argparse.Namespace) -> dict[str, tuple[float, list[int]]]:
    """Per model: the median wall time of greedy generation of exactly ``new_tokens`` tokens (prefill included), per
    new token, and the tokens (to check that merging did not change them). The models take turns within each
    repetition, so a neighbour's load on the shared cores slows all of them alike."""
    import torch

    times = {name: [] for name in models}
    tokens = {}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # the first is a warm-up (allocations, kernel selection)
            for name, model in models.items():
                started = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
                if rep:
                    times[name].append(time.perf_counter() - started)
                tokens[name] = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {name: (1000 * statistics.median(times[name]) / args.new_tokens, tokens[name]) for name in models}


def folder_bytes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}


def measure_row(row: str, args: argparse.Namespace) -> dict:
    """Train one row and measure it; every number of the row's line in the table."""
    import torch

    from lora.data import load_examples
    from lora.generate import load_with_adapter
    from lora.model import (dispatch_backend, load_base_model, load_tokenizer, logical_model_id, parameter_counts,
                            prepare_trainable, resolve_model_dir)
    from lora.train import Shard, TrainState, build_optimizer, eval_share, save_adapter, total_steps, train

    torch.set_num_threads(os.cpu_count())
    cfg = row_config(row, args)
    domain = next(d for d in cfg.domains if d.name == DOMAIN)
    torch.manual_seed(cfg.train.seed)
    backend = dispatch_backend(cfg.quant, use_gpu=False)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    train_examples, _ = load_examples(domain.train, domain.storage_options, tokenizer, cfg.train.max_seq_len,
                                      cfg.train.overlong)
    eval_examples, _ = load_examples(domain.eval, domain.storage_options, tokenizer, cfg.train.max_seq_len,
                                     cfg.train.overlong)
    model = load_base_model(model_dir, cfg.model, cfg.quant, backend)
    _, base_parameters = parameter_counts(model)
    gc.collect()
    rss_after_load = rss_kib("VmRSS")
    reset_peak_rss()
    if row == "full":  # lora.method=full is for classifiers in the config; the causal LM's own weights train here
        model.requires_grad_(True)
    else:
        model = prepare_trainable(model, cfg.lora, cfg.train.gradient_checkpointing)
    trainable, _ = parameter_counts(model)
    shard = Shard(train_examples, eval_share(eval_examples, cfg.train.max_eval_examples, 0, 1), 0, 1)
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps(shard, cfg.train), cfg.lora.loraplus_ratio)
    state = train(model, optimizer, scheduler, shard, cfg.train, TrainState(), lambda *_: None,
                  pad_id=tokenizer.pad_token_id, device=backend.device)
    peak_rss = rss_kib("VmHWM")
    del optimizer, scheduler
    gc.collect()

    saved = WORK / row
    shutil.rmtree(saved, ignore_errors=True)
    save_adapter(model, saved, logical_model_id(cfg.model))

    result = {
        "row": row, "label": ROWS[row][0], "learning_rate": cfg.train.learning_rate,
        "trainable": trainable, "base_parameters": base_parameters,
        "trainable_percent": 100 * trainable / base_parameters,
        "saved_files": folder_bytes(saved), "saved_bytes": sum(folder_bytes(saved).values()),
        "saved_dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype).removeprefix("torch."),
        "rss_after_load_mib": rss_after_load / 1024, "peak_rss_mib": peak_rss / 1024,
        "training_growth_mib": (peak_rss - rss_after_load) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_eval_loss": state.base_eval_loss, "eval_loss": state.history[-1]["eval_loss"],
        "steps": state.step, "train_seconds": state.train_seconds, "tokens": state.tokens,
        "examples_seen": state.step * cfg.train.micro_batch_size * cfg.train.grad_accum,
    }

    # Served as loramill serves them: a fresh base with the saved folder loaded (lora.generate.load_with_adapter),
    # and a second one merged (merge_and_unload, as lora.serve.merge does). The full row's trained weights are its
    # "merged" model: the base's architecture, nothing added.
    def fresh_base():
        base = load_base_model(model_dir, cfg.model, cfg.quant, backend).eval()
        base.config.use_cache = True  # training's setting is off; generation wants its KV cache
        return base

    models = {"base": fresh_base()}
    if row == "full":
        model.config.use_cache = True
        models["merged"] = model.eval()
    else:
        del model
        models["unmerged"] = load_with_adapter(fresh_base(), saved)
        if row != "adapters":  # a GELU between two projections: no weight of the base can absorb it
            models["merged"] = load_with_adapter(fresh_base(), saved).merge_and_unload()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    latency = ms_per_token(models, inputs, tokenizer, args)
    shutil.rmtree(saved)
    for name in ("base", "unmerged", "merged"):
        result[f"latency_{name}_ms"] = latency[name][0] if name in latency else None
    result["merged_tokens_equal_unmerged"] = (latency["merged"][1] == latency["unmerged"][1]
                                              if {"merged", "unmerged"} <= set(latency) else None)
    trained = "unmerged" if "unmerged" in latency else "merged"
    result["trained_tokens_differ_from_base"] = latency[trained][1] != latency["base"][1]
    return result


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per row, then the report
# ---------------------------------------------------------------------------------------------


def run_rows(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for row in args.rows:
        out = WORK / f"{row}.json"
        command = [sys.executable, __file__, "--measure", row, "--out", str(out), *settings(args)]
        print(f"$ {shlex.join(command)}", flush=True)
        started = time.time()
        subprocess.run(command, cwd=REPO, check=True)
        results[row] = json.loads(out.read_text()) | {"process_seconds": time.time() - started}
        print(f"  {row}: done in {time.time() - started:.0f} s", flush=True)
    return results


def settings(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--eval-examples", str(args.eval_examples),
            "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]


def noise(results: dict[str, dict]) -> float:
    """How far apart two models that do the same arithmetic measure: the full row's trained model against the base
    (same architecture, same shapes), at least 5%. The tolerance for "unchanged"."""
    return max(0.05, abs(overhead(results["full"], "latency_merged_ms")))


def overhead(r: dict, key: str) -> float | None:
    return None if r[key] is None else r[key] / r["latency_base_ms"] - 1


def within(value: float, low: float, high: float) -> bool:
    return low <= value <= high


def verdicts(results: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Per claim: (holds here?, the measured evidence), computed from the numbers."""
    lora, adapters, full = results["lora"], results["adapters"], results["full"]
    out = {}

    lp, ap = lora["trainable_percent"], adapters["trainable_percent"]
    parts = [within(lp, 0.1, 0.7), within(ap, 3, 4)]
    out["parameters"] = (_word(parts), f"LoRA {lp:.2f}% ({'in' if parts[0] else 'outside'} 0.1–0.7%), adapters "
                         f"{ap:.2f}% ({'in' if parts[1] else 'outside'} 3–4%); LoRA "
                         f"{'fewer' if lp < ap else 'not fewer'} than adapters")

    tolerance = noise(results)
    merged = overhead(lora, "latency_merged_ms")
    slower = overhead(adapters, "latency_unmerged_ms")
    parts = [abs(merged) <= tolerance, within(slower, 0.15, 0.25)]
    same = overhead(results["full"], "latency_merged_ms")
    out["latency"] = (_word(parts), f"LoRA merged {merged:+.1%} vs the base ({'within' if parts[0] else 'outside'} "
                      f"±{tolerance:.0%}: the full-FT model, the same arithmetic as the base, measured {same:+.1%}; "
                      f"at least 5%); adapters {slower:+.1%} ({'in' if parts[1] else 'outside'} +15–25%); LoRA "
                      f"unmerged {overhead(lora, 'latency_unmerged_ms'):+.1%}")

    lr = full["training_growth_mib"] / lora["training_growth_mib"]
    ar = full["training_growth_mib"] / adapters["training_growth_mib"]
    lt = full["peak_rss_mib"] / lora["peak_rss_mib"]
    at = full["peak_rss_mib"] / adapters["peak_rss_mib"]
    parts = [lr >= 3, ar >= 2]
    out["memory"] = (_word(parts), f"training's RSS growth: full / LoRA {lr:.1f}× (claim 3×), full / adapters "
                     f"{ar:.1f}× (claim 2×); whole-process peak RSS (weights, libraries included): {lt:.2f}× and "
                     f"{at:.2f}×")

    ls, as_ = lora["saved_bytes"] / MB, adapters["saved_bytes"] / MB
    parts = [within(ls, 8, 16), within(as_, 50, 100)]
    out["size"] = (_word(parts), f"LoRA {ls:.1f} MB ({'in' if parts[0] else 'outside'} 8–16), adapters {as_:.1f} MB "
                   f"({'in' if parts[1] else 'outside'} 50–100), both float32")
    return out


def _word(parts: list[bool]) -> str:
    return "yes" if all(parts) else "partly" if any(parts) else "no"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f" ({value:+.0%})"


def render(results: dict[str, dict], args: argparse.Namespace, wall: float, date: str, where: str) -> str:
    command = shlex.join([".venv/bin/python", "bench/quality/methods.py", *settings(args)])
    any_row = next(iter(results.values()))
    lines = [
        "# Adaptation methods on SmolLM2-135M-Instruct: LoRA, DoRA, adapter layers, full fine-tuning",
        "",
        f"Generated by `flock /tmp/loramill-heavy.lock {command}` on {date} ({wall / 60:.1f} min in all). "
        f"Machine: {where}.",
        "",
        f"Base: builtin:smollm2-135m-instruct in float32 (`quant.mode=none`, for training and generation), "
        f"{any_row['base_parameters']:,} parameters. Domain: {DOMAIN} (data/{DOMAIN}/train.jsonl). Every row: "
        f"{args.steps} steps of micro batch 4 ({any_row['examples_seen']} examples, the same ones in the same "
        f"order, seed 0), max_seq_len 256, cosine schedule with 3 warm-up steps, AdamW; eval loss on the first "
        f"{args.eval_examples} examples of eval.jsonl. Learning rates were not tuned: 1e-3 for the adapters (the "
        f"demo config's), 5e-5 for full fine-tuning.",
        "",
        "| method | lr | trainable | % of base | saved on disk | training RSS growth | peak RSS | eval loss "
        "(base → trained) | ms/token base | unmerged | merged | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        saved = f"{r['saved_bytes'] / MB:.1f} MB ({r['saved_dtype']})"
        lines.append(
            f"| {r['label']} | {r['learning_rate']:g} | {r['trainable']:,} | {r['trainable_percent']:.2f}% | {saved} "
            f"| {r['training_growth_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {r['base_eval_loss']:.3f} → "
            f"{r['eval_loss']:.3f} | {_ms(r['latency_base_ms'])} | {_ms(r['latency_unmerged_ms'])}"
            f"{_pct(overhead(r, 'latency_unmerged_ms'))} | {_ms(r['latency_merged_ms'])}"
            f"{_pct(overhead(r, 'latency_merged_ms'))} | {r['train_seconds']:.0f} |")
    lines += ["", "## The source's claims, here", "",
              "| claim (second source document, as quoted in issue 18) | holds here? | measured |", "|---|---|---|"]
    for key, (word, evidence) in verdicts(results).items():
        lines.append(f"| {CLAIMS[key]} | {word} | {evidence} |")
    equal = {r["label"]: r["merged_tokens_equal_unmerged"] for r in results.values()
             if r["merged_tokens_equal_unmerged"] is not None}
    lines += [
        "",
        "## How each number was taken",
        "",
        "- **trainable, % of base**: parameters with `requires_grad` after `lora.model.prepare_trainable` (the full "
        "row: all of them; tied input and output embeddings count once), over the base's parameter count.",
        "- **saved on disk**: the bytes of the folder `lora.train.save_adapter` writes: "
        + "; ".join(f"{r['label']}: " + ", ".join(f"{name} {size:,}" for name, size in r["saved_files"].items())
                    for r in results.values()) + ". Weights are float32, as trained (bfloat16 would halve them).",
        "- **training RSS growth**: each row runs in its own fresh process. After the base is loaded the process's RSS "
        "(`VmRSS`) is read, its peak RSS reset (`/proc/self/clear_refs`), and after training the "
        "peak (`VmHWM`) read again: the growth is what training added (adapter, gradients, AdamW state, "
        "activations, the step-0 and final evaluations). Peak RSS is the whole process's (Python, torch, the float32 "
        "base). CPU memory, not GPU memory.",
        "- **eval loss**: token-weighted mean over the assistant tokens (`lora.train.evaluate`), base before step 1 "
        "and the trained model after the last step.",
        f"- **latency**: `model.generate` with greedy decoding, batch 1, KV cache on, the chat-templated prompt "
        f"\"{PROMPT}\" and exactly {args.new_tokens} new tokens; wall time over {args.new_tokens} (prefill "
        f"included), median of {args.reps} after one warm-up, all threads of the machine; the models of a row take "
        "turns within each repetition. Base: a freshly loaded base in the row's process, after training. Unmerged: "
        "another fresh base with the saved folder loaded as loramill serves it (`lora.generate.load_with_adapter`: "
        "PEFT, or the hooked bottlenecks). Merged: a third, the same with `merge_and_unload()`; adapter layers cannot "
        "merge (\"—\"); the full row's own weights are its \"merged\" model. Merged greedy tokens equal the "
        "unmerged ones: "
        + ", ".join(f"{label} {'yes' if same else 'no'}" for label, same in equal.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="rows to run (the claims need all four)")
    parser.add_argument("--render", action="store_true",
                        help="write methods.md again from methods.json, without training")
    parser.add_argument("--measure", choices=list(ROWS), help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.out.write_text(json.dumps(measure_row(args.measure, args), indent=1))
        return
    if args.render:
        saved = json.loads((HERE / "methods.json").read_text())
        report = render(saved["rows"], argparse.Namespace(**saved["settings"]), saved["wall_seconds"], saved["date"],
                        saved["machine"])
        (HERE / "methods.md").write_text(report)
        print(report)
        return
    started = time.time()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    results = run_rows(args)
    if set(results) != set(ROWS):
        print(json.dumps(results, indent=1))
        return
    wall, date, where = time.time() - started, time.strftime("%Y-%m-%d"), machine()
    report = render(results, args, wall, date, where)
    (HERE / "methods.md").write_text(report)
    (HERE / "methods.json").write_text(json.dumps(
        {"settings": vars(args) | {"out": None, "measure": None, "render": False}, "machine": where, "date": date,
         "wall_seconds": wall,
         "verdicts": {k: {"claim": CLAIMS[k], "holds": w, "measured": e} for k, (w, e) in verdicts(results).items()},
         "rows": results}, indent=1))
    print(report)


if __name__ == "__main__":
    main()

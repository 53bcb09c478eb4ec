"""Using adapters: several domains on one base (PEFT named adapters), and merging one into a 16/32-bit base.

One base model holds every domain's LoRA weights side by side (``load_adapters``); a request picks its domain
with ``set_adapter``, which flips which A/B pair each adapted layer adds, so the base is loaded once however
many domains it serves. ``merge`` folds one adapter into an unquantized copy of the base for serving stacks
that take no adapters, and measures what that costs in logits: against the same adapter unmerged, and against
the 4-bit base + adapter it was trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora import bottleneck
from lora.config import ConfigError, ModelSource, Quantization
from lora.generate import generate, load_with_adapter
from lora.model import dispatch_backend, load_base_model

PROBE_PROMPTS = (
    "What should I do first if someone has a nosebleed?",
    "Can my landlord keep the deposit for normal wear and tear?",
    "My backup says error E-204. How do I fix it?",
    "Summarize the difference between a virus and a bacterium in two sentences.",
)
"""The fixed prompts on which merge differences are measured: one per bundled domain and one general."""


# ---------------------------------------------------------------------------------------------
# Several domains on one base
# ---------------------------------------------------------------------------------------------


def load_adapters(base_model: nn.Module, adapters: Mapping[str, Path]) -> Any:
    """Wrap ``base_model`` once with every adapter in ``adapters`` (name -> folder), in eval mode.

    The base weights are shared: each further adapter adds only its own A/B matrices to the layers it targets.
    Adapter layers (``lora.bottleneck``) hook into the base's blocks beside any LoRA adapters. Pick the adapter per
    request with ``use_adapter`` / ``generate_with`` (outside it, a model holding both kinds runs the first LoRA
    adapter and the last adapter layers loaded, together).
    """
    if not adapters:
        raise ValueError("load_adapters needs at least one adapter folder")
    # PEFT adapters first: PeftModel wraps the base, and adapter layers hook into the base it wraps either way.
    ordered = sorted(adapters.items(), key=lambda item: bottleneck.is_adapter_layers(Path(item[1])))
    model = base_model
    for name, folder in ordered:
        if bottleneck.is_adapter_layers(Path(folder)):
            bottleneck.load(model, Path(folder), name)
        elif model is base_model:
            model = load_with_adapter(base_model, Path(folder), name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name, use_safetensors=True)
    return model.eval()


@contextlib.contextmanager
def use_adapter(model: Any, name: str | None) -> Iterator[Any]:
    """Route the block's forward passes through adapter ``name``; None: the base model alone.

    Switching flips a flag per adapted layer (no weights move), so it is cheap enough to do per request. It is
    state on the model: serve one request at a time per model object.
    """
    layers = bottleneck.attached(model)
    lora_names = set(getattr(model, "peft_config", {})) if hasattr(model, "disable_adapter") else set()
    layer_names = set(layers.adapters) if layers is not None else set()
    if name is not None and name not in lora_names | layer_names:
        raise KeyError(f"no adapter named {name!r} is loaded (loaded: {sorted(lora_names | layer_names)})")
    if layers is not None:
        layers.active = name if name in layer_names else None
    if name in lora_names:
        model.set_adapter(name, inference_mode=True)
        yield model
    elif lora_names:  # the base, or adapter layers alone: the LoRA adapters step aside
        with model.disable_adapter():
            yield model
    else:
        yield model


def generate_with(model: Any, tokenizer: Any, name: str | None, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer to ``prompt`` through adapter ``name`` (None: the base model)."""
    with use_adapter(model, name):
        return generate(model, tokenizer, prompt, max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Logits on fixed prompts
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_logits(model: Any, tokenizer: Any, prompts: Sequence[str] = PROBE_PROMPTS) -> list[torch.Tensor]:
    """Float32 CPU logits of each chat-templated prompt, one forward pass per prompt (no padding involved)."""
    device = next(model.parameters()).device
    logits = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        logits.append(model(input_ids=ids).logits[0].float().cpu())
    return logits


@dataclass(frozen=True)
class LogitDifference:
    """How far two models' logits on the same prompts are apart."""

    max_abs: float
    """The largest |Δlogit| over every position and vocabulary entry."""
    mean_abs: float
    """|Δlogit| averaged over every position and vocabulary entry."""
    top1_agreement: float
    """Fraction of positions where both models rank the same next token first (what greedy decoding sees)."""


def compare_logits(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> LogitDifference:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} logit tensors")
    x, y = torch.cat(list(a)), torch.cat(list(b))
    difference = (x - y).abs()
    return LogitDifference(
        max_abs=difference.max().item(),
        mean_abs=difference.mean().item(),
        top1_agreement=(x.argmax(-1) == y.argmax(-1)).float().mean().item(),
    )


# ---------------------------------------------------------------------------------------------
# Merge into an unquantized base
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeCosts:
    """Logit differences over the probe prompts; each says what one step away from the unmerged model costs."""

    dtype: str
    """The merged copy's dtype: float32 on CPU, bfloat16 on CUDA unless asked otherwise."""
    merged_vs_unmerged: LogitDifference
    """The merge itself: merged model vs base + adapter, unmerged, same dtype (fp32: ~1e-6 relative)."""
    merged_vs_as_trained: LogitDifference | None
    """Leaving the 4-bit base: merged model vs the 4-bit NF4 base + adapter the adapter was trained on."""
    base_vs_4bit_base: LogitDifference | None
    """For scale: the unquantized base vs the 4-bit base, both without adapter (the quantization error alone)."""
    probe_prompts: int
    probe_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    model_dir: Path | str,
    source: ModelSource,
    trained_quant: Quantization,
    adapter_dir: Path,
    tokenizer: Any,
    *,
    dtype: torch.dtype | None = None,
    use_gpu: bool = False,
) -> tuple[nn.Module, MergeCosts]:
    """A full copy of the base with the adapter folded in (``merge_and_unload``), and what merging cost.

    The base is loaded unquantized in ``dtype`` (default: float32 on CPU, bfloat16 on CUDA) even when the
    adapter was trained on a 4-bit base: merging into 4-bit weights would re-quantize W + BA and lose most of
    the update. ``trained_quant`` is how the adapter was trained; when it is 4-bit the merged model is also
    compared with that 4-bit base + adapter, so the report says what leaving the quantized base costs.

    Adapter layers cannot be merged (``ConfigError``): they are layers of their own in the forward path (a
    non-linearity between two projections), not a change of existing weights.
    """
    refuse_merging_adapter_layers(adapter_dir)
    full = Quantization(mode="none", compute_dtype=_dtype_name(dtype) if dtype is not None else "auto")
    backend = dispatch_backend(full, use_gpu)
    model = load_with_adapter(load_base_model(model_dir, source, full, backend), adapter_dir)
    unmerged = probe_logits(model, tokenizer)
    with use_adapter(model, None):
        base = probe_logits(model, tokenizer)
    merged_model = model.merge_and_unload()
    merged = probe_logits(merged_model, tokenizer)
    as_trained, quantized_base = _as_trained_logits(model_dir, source, trained_quant, adapter_dir, tokenizer, use_gpu)
    costs = MergeCosts(
        dtype=_dtype_name(backend.compute_dtype),
        merged_vs_unmerged=compare_logits(merged, unmerged),
        merged_vs_as_trained=None if as_trained is None else compare_logits(merged, as_trained),
        base_vs_4bit_base=None if quantized_base is None else compare_logits(base, quantized_base),
        probe_prompts=len(PROBE_PROMPTS),
        probe_tokens=sum(t.shape[0] for t in merged),
    )
    merged_model.config.use_cache = True  # training turned it off; a served model wants its KV cache
    return merged_model.eval(), costs


def refuse_merging_adapter_layers(adapter_dir: Path) -> None:
    """``ConfigError`` if ``adapter_dir`` holds adapter layers, which no weight of the base can absorb."""
    if bottleneck.is_adapter_layers(Path(adapter_dir)):
        raise ConfigError([f"lora.method: {adapter_dir} holds adapter layers (lora.method=adapter_layers): "
                           "bottleneck layers add a GELU between two projections after each attention and MLP, "
                           "which no weight of the base can absorb, so they cannot be merged. Serve the base with "
                           "the adapter (loramill generate, lora.generate.load_with_adapter), or train "
                           "lora.method=lora for a mergeable adapter"])


def _as_trained_logits(
    model_dir: Path | str, source: ModelSource, quant: Quantization, adapter_dir: Path, tokenizer: Any,
    use_gpu: bool,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """(4-bit base + adapter, 4-bit base) logits, or (None, None) when the adapter was trained unquantized."""
    if quant.mode == "none":
        return None, None
    backend = dispatch_backend(quant, use_gpu)
    model = load_with_adapter(load_base_model(model_dir, source, quant, backend), adapter_dir)
    with_adapter = probe_logits(model, tokenizer)
    with use_adapter(model, None):
        without = probe_logits(model, tokenizer)
    del model
    if use_gpu:
        torch.cuda.empty_cache()
    return with_adapter, without


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

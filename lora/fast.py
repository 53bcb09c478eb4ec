"""Fused kernels for the training step on CUDA, from liger-kernel; the plain transformers modules elsewhere.

What they buy for causal-LM LoRA: the fused linear cross-entropy computes the loss and its gradient chunk by chunk
from the last hidden states, so the ``tokens x vocabulary`` logits (4 GiB in float32 for 8k tokens of a 128k
vocabulary, plus their gradient) never exist; RMSNorm, SwiGLU and RoPE become one Triton kernel each instead of
several elementwise launches. LoRA keeps working: the fused MLP still calls the (LoRA-wrapped) projections.

More routes for the step on CUDA: torch.compile of each transformer block (fuses what the LoRA layers and the
block add around the matmuls), the checkpointed blocks' inputs kept in host memory (less GPU memory), and flex
attention for packed rows (a row as wide as the token budget, no attention across its examples). Each returns
what it did, or why not, for ``run_info.json``'s ``kernels``; bench/SPEED_NOTES.md has what each measured.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from lora.model import Backend
from lora.grouped import group_shared_input_projections, plain_lora
from lora.mixin import mix_in
from lora.nf4 import Dequantization, linear_4bit_as_torch_ops

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                 "cross_entropy": False}


def use_fused_kernels(model: nn.Module, backend: Backend, block_kernels: bool = True) -> str:
    """Patch ``model`` (a transformers causal LM, before LoRA) with Liger's kernels where they apply;
    ``block_kernels=False`` keeps the plain RMSNorm, SwiGLU and RoPE (for torch.compile, which does not trace them).

    Returns what was done, for the run's record: ``"liger <version>"`` or why the plain modules stay.
    """
    if backend.device.type != "cuda":
        return "none: Triton kernels need CUDA"
    try:
        import liger_kernel
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        return "none: liger-kernel is not installed (pip install 'loramill[gpu]')"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"none: liger-kernel has no kernels for {model_type}"
    if model.get_output_embeddings() is None:  # Liger replaces a causal LM's forward; a classifier keeps its own
        return "none: fused kernels are for causal language models"
    chosen = LIGER_KERNELS if block_kernels else LIGER_KERNELS | {"rope": False, "rms_norm": False, "swiglu": False}
    _apply_liger_kernel_to_instance(model=model, **chosen)
    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        from importlib.metadata import version as installed_version

        version = installed_version("liger-kernel")
    return f"liger {version}" + ("" if block_kernels else " (fused loss only)")


def fused_loss_in_evaluation(model: nn.Module) -> dict[str, bool]:
    """What a forward in eval mode passes for Liger's fused loss to compute it there too: Liger's forward fuses the
    loss only in training mode by default (``skip_logits = self.training``) and otherwise makes the logits and the
    plain loss upcasts them to float32: 16k tokens of a 128k vocabulary are 4 GiB in bf16 and 8 GiB more in float32,
    far above a training step's peak. Empty for a model without Liger's forward."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"skip_logits": True} if "skip_logits" in inspect.signature(causal_lm.forward).parameters else {}


def compile_decoder_layers(model: nn.Module, backend: Backend,
                           dequantization: Dequantization | Literal["bitsandbytes"] = "triton",
                           lora_scaled_in_rank: bool = True, grouped_projections: bool = True) -> str:
    """torch.compile each transformer block (after LoRA is applied): one graph for all blocks of a shape, so the
    LoRA update's scale-and-add, the residual adds and what Liger leaves unfused become fewer kernels. The blocks'
    gradient checkpointing stays outside the compiled region. The blocks' 4-bit layers dequantize through ops the
    graph launches itself (``lora/nf4.py``: loramill's Triton kernel, or the torch ops it fuses), and their LoRA
    layers apply the scale on the rank-r side (``scale_lora_in_rank``); on a base in full or half precision the
    projections that read the same input run as one matmul (``lora/grouped.py``). The bench's comparison rows set
    ``dequantization`` to ``torch`` or ``bitsandbytes`` (its own op), ``lora_scaled_in_rank`` false (peft's own
    forward) or ``grouped_projections`` false.

    Returns what was done, for the run's record, or why nothing was."""
    if backend.device.type != "cuda":
        return "none: compiled blocks are for CUDA"
    blocks = transformer_blocks(model)
    if not blocks:
        return "none: the model has no transformer blocks transformers can checkpoint"
    four_bit = _linear_4bit_layers(blocks) if dequantization != "bitsandbytes" and backend.four_bit else []
    routes = {linear_4bit_as_torch_ops(layer, dequantization) for layer in four_bit}
    for layer in _lora_layers(blocks) if lora_scaled_in_rank else []:
        scale_lora_in_rank(layer)
    groups = group_shared_input_projections(blocks) if grouped_projections else 0
    compile_blocks(blocks)
    return f"torch.compile of {len(blocks)} blocks" + (
        f" (their {len(four_bit)} 4-bit layers dequantized by {', '.join(sorted(routes))})" if four_bit else "") + (
        f" ({groups} groups of projections reading one input, one matmul each)" if groups else "")


def use_packed_attention(model: nn.Module, choice: str, backend: Backend, packed: bool,
                         world_size: int) -> tuple[str, str]:
    """Switch ``model`` to the attention ``train.attention`` asks for, ``auto`` resolved: flex attention for packed
    batches on CUDA with one worker, SDPA otherwise. Returns the attention (``lora.train.Batching`` makes the rows
    for it) and what was done and why, for the run's record."""
    if choice != "auto":
        attention, why = choice, "train.attention"
    elif not packed:
        attention, why = "sdpa", "micro batches of padded examples"
    elif backend.device.type != "cuda":
        attention, why = "sdpa", "flex attention has no backward pass on CPU"
    elif world_size > 1:
        attention, why = "sdpa", f"flex attention is used for one worker only ({world_size} here, not measured)"
    else:
        attention, why = "flex_attention", "one packed row a micro batch, its block mask keeping examples apart"
    if model.config._attn_implementation != attention:  # a borrowed base keeps what the run before it chose
        model.set_attn_implementation(attention)
    return attention, f"attention: {attention} ({why})"


RECOMPILE_LIMIT = 64
"""Compiled variants torch keeps of the blocks' forward in one process (its default is 8); a call that matches none
of them and finds the limit reached runs uncompiled, while run_info.json still says compiled. One run compiles 5 to 7
(training, the evaluations with the adapter and without it, their shapes), and a Tune actor trains trial after trial
on the same blocks (``reuse_actors``): each LoRA rank it has not trained yet adds 3 (measured on CPU). With the
default the third rank's calls ran uncompiled (tests/test_fast.py trains four); 64 covers a run and 19 more ranks."""


def compile_blocks(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """torch.compile each block, with room for the variants a process compiles (``RECOMPILE_LIMIT``); ``backend``
    ``aot_eager`` lets tests run without a C++ compiler."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend)


def _linear_4bit_layers(blocks: list[nn.Module]) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for block in blocks for m in block.modules()
            if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4"]


def _lora_layers(blocks: list[nn.Module]) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for block in blocks for m in block.modules() if isinstance(m, LoraLayer)]


def scale_lora_in_rank(layer: nn.Module) -> None:
    """Make ``layer`` (a peft LoRA layer) compute ``B(A(x) * scaling)`` where peft computes ``B(A(x)) * scaling``:
    the same product, with the scale on the rank-r side. It stays the same peft layer (its class becomes a subclass),
    with the same weights and adapter files."""
    mix_in(layer, LoraScaledInRank)


class LoraScaledInRank(nn.Module):
    """Mixed in before a peft LoRA layer class by ``scale_lora_in_rank``. Why: in peft's order the backward pass
    multiplies the whole ``tokens x out_features`` gradient by the scale, and inside a compiled block inductor keeps
    that scaled gradient as a buffer of its own next to the unscaled one, for every adapted layer. At the MLP's
    backward (8k tokens of a 1B Llama) that was two 128 MiB buffers more than the eager step holds, what kept the
    compiled step above Unsloth's memory (bench/SPEED_NOTES.md section 9). Scaling the rank-r activations instead
    costs a ``tokens x r`` multiply. Anything but the plain LoRA forward (adapters disabled or merged, per-example
    adapters, DoRA and the other variants, a bias in B, which the reordering would leave unscaled) goes through
    peft's own forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not plain_lora(self):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[adapter]
            low_rank = lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype)))
            result = result + self.lora_B[adapter](low_rank * self.scaling[adapter])
        return result.to(result_dtype)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers checkpoints one by one (a Llama's decoder layers); not the model itself,
    which also carries a ``gradient_checkpointing`` flag but checkpoints nothing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def offload_checkpointed_inputs(model: nn.Module, backend: Backend) -> str:
    """Keep each checkpointed block's input in pinned host memory instead of on the GPU until the backward pass
    recomputes the block (one hidden-state tensor a block: 64 MiB a block for 8k tokens of an 8B model, 2 GiB in
    all). Call after gradient checkpointing is enabled.

    Non-reentrant checkpointing saves the block's inputs through the saved-tensor hooks active around it, which is
    where these go; inside the block, checkpointing's own hooks take precedence, so nothing else moves.
    """
    if backend.device.type != "cuda":
        return "none: nothing to offload on CPU"
    checkpointed = [block for block in transformer_blocks(model) if block.gradient_checkpointing]
    if not checkpointed:
        return "none: gradient checkpointing is off"
    on_host = HostCheckpoints()
    for module in checkpointed:
        module._gradient_checkpointing_func = partial(_with_inputs_on_host, on_host, module._gradient_checkpointing_func)
    return f"inputs of {len(checkpointed)} checkpointed blocks in host memory"


def _with_inputs_on_host(on_host: HostCheckpoints, checkpoint: Callable, *args: Any, **kwargs: Any) -> Any:
    with torch.autograd.graph.saved_tensors_hooks(on_host.pack, on_host.unpack):
        return checkpoint(*args, **kwargs)


@dataclass(eq=False)
class _Saved:
    """One saved tensor's copy in host memory and, once the backward pass asks for it, its copy back."""

    device: torch.device
    host: torch.Tensor
    back: torch.Tensor | None = None
    arrived: torch.cuda.Event | None = None  # recorded on the side stream after the copy back


class HostCheckpoints:
    """Saved-tensor hooks keeping tensors in pinned host memory, their copies on a side CUDA stream so that they
    overlap the blocks' compute: out while the block that saved the tensor runs, back while the block after it in
    the backward pass runs (the backward unpacks the blocks' inputs in the reverse order of saving, so each unpack
    starts the copy of the tensor saved just before). On an H200 (bench/SPEED_NOTES.md): 0.99-1.00x the step's speed
    at 8B, 0.80-1.01x at 1B (two sessions), whose step is bound by the host; torch's ``save_on_cpu``, which copies
    synchronously, measured 0.74x at 1B, and copies queued on the compute stream itself 0.80-0.91x."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None  # made at the first CUDA tensor, on its device
        self.waiting: list[weakref.ref[_Saved]] = []  # saved and not yet unpacked, in the order saved

    def pack(self, tensor: torch.Tensor) -> _Saved:
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=tensor.is_cuda)
        if not tensor.is_cuda:
            return _Saved(tensor.device, host.copy_(tensor))
        self.stream = self.stream or torch.cuda.Stream(tensor.device)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # the allocator must not reuse its memory before the copy has read it
        saved = _Saved(tensor.device, host)
        self.waiting = [ref for ref in self.waiting if ref() is not None]  # graphs freed without a backward
        self.waiting.append(weakref.ref(saved))
        return saved

    def unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.device.type != "cuda":
            return saved.host.to(saved.device)
        self._copy_back(saved)
        alive = [ref() for ref in self.waiting]
        if saved in alive:
            position = alive.index(saved)
            del self.waiting[position]
            if position > 0 and alive[position - 1] is not None:
                self._copy_back(alive[position - 1])  # the next one this backward pass needs
        compute = torch.cuda.current_stream(saved.device)
        compute.wait_event(saved.arrived)
        saved.back.record_stream(compute)  # allocated on the side stream, used on this one
        return saved.back

    def _copy_back(self, saved: _Saved) -> None:
        if saved.arrived is None:
            with torch.cuda.stream(self.stream):
                saved.back = saved.host.to(saved.device, non_blocking=True)
            saved.arrived = self.stream.record_event()

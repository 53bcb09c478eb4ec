"""Fused kernels for the training step on CUDA, from liger-kernel; the plain transformers modules elsewhere.

What they buy for causal-LM LoRA: the fused linear cross-entropy computes the loss and its gradient chunk by chunk
from the last hidden states, so the ``tokens x vocabulary`` logits (4 GiB in float32 for 8k tokens of a 128k
vocabulary, plus their gradient) never exist; RMSNorm, SwiGLU and RoPE become one Triton kernel each instead of
several elementwise launches. LoRA keeps working: the fused MLP still calls the (LoRA-wrapped) projections.
"""

from __future__ import annotations

from torch import nn

from lora.model import Backend

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                 "cross_entropy": False}


def use_fused_kernels(model: nn.Module, backend: Backend) -> str:
    """Patch ``model`` (a transformers causal LM, before LoRA) with Liger's kernels where they apply.

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
    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        from importlib.metadata import version as installed_version

        version = installed_version("liger-kernel")
    return f"liger {version}"

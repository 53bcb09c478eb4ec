"""A 4-bit layer's weight dequantized by ops torch.compile sees: loramill's Triton kernel, or torch ops it fuses.

bitsandbytes' own path for a training-shaped matmul is a custom op implemented in Python (dequantize through a
ctypes call, then ``F.linear``), opaque to the compiler: each of the 224 4-bit matmuls of a 1B Llama's step (forward
and checkpoint recompute) and each dequantization of its backward costs the host tens of microseconds, and the 1B
QLoRA step was bound by the host (GPU busy half the time; bench/SPEED_NOTES.md section 6). Written as torch ops,
the same arithmetic becomes one generated kernel per weight inside the compiled block, launched from its graph.

The arithmetic is bitsandbytes' (``backends/default/ops.py``): two 4-bit codes a byte, the first in the high nibble;
each code looks up the NF4 table and is scaled by its block's absmax, in float32, then rounded to the weight's dtype.
With double quantization the absmaxes are themselves 8-bit codes of a 256-entry table, scaled per 256 blocks and
shifted by an offset. tests/test_fast.py checks the result bit for bit against ``bitsandbytes.functional``.

On CUDA with Triton (torch's CUDA builds bring it) the same arithmetic runs as loramill's own kernel
(``lora/nf4_kernel.py``), which the compiled graph launches as it launches its own kernels: at 8B the kernels
inductor generates for the torch ops took at least 2.6x the time Unsloth's block-wise kernel took for the same
dequantizations (bench/SPEED_NOTES.md section 10). The torch ops are the route without Triton.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from lora.mixin import mix_in

try:
    from lora.nf4_kernel import dequantize_nf4_kernel
except ImportError:  # no Triton (torch's CPU builds): the torch ops below
    dequantize_nf4_kernel = None

Dequantization = Literal["triton", "torch"]
"""How a compiled block's 4-bit layer dequantizes its weight: ``triton``, loramill's kernel (the torch ops where
Triton is not installed); ``torch``, the torch ops that inductor fuses (the bench's comparison row)."""


def dequantize_nf4(codes: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The weight (``quant_state.shape``) that bitsandbytes' ``dequantize_4bit`` returns, in the weight's own dtype
    (``quant_state.dtype``) as bitsandbytes rounds it, then cast to ``dtype``; by torch ops."""
    count = quant_state.shape.numel()
    packed = codes.reshape(-1).view(torch.uint8)
    indices = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:count]
    absmax = quant_state.absmax
    if quant_state.nested:
        outer = quant_state.state2
        absmax = _blockwise(outer.code[absmax.long()], outer.absmax, outer.blocksize) + quant_state.offset
    weight = _blockwise(quant_state.code[indices.long()], absmax.float(), quant_state.blocksize)
    return weight.reshape(quant_state.shape).to(quant_state.dtype).to(dtype)


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Broadcast, not a gathered block index: an index tensor would be one more input every layer's dequantization
    # reads, and inductor fuses kernels that share reads, which would make a block's weights exist all at once.
    count = values.numel()
    blocks = F.pad(values, (0, -count % blocksize)).view(-1, blocksize)
    return (blocks * scales.view(-1, 1)).view(-1)[:count]


def linear_4bit_as_torch_ops(layer: nn.Module, dequantization: Dequantization = "triton") -> str:
    """Make ``layer`` (a bitsandbytes ``Linear4bit``, frozen) compute through ops torch.compile sees: the same
    outputs. It stays a ``Linear4bit`` (its class becomes a subclass), with the same weights. Returns how it
    dequantizes, for the run's record."""
    if dequantization == "triton" and dequantize_nf4_kernel:
        mix_in(layer, TritonKernelLinear4bit)
        return "loramill's Triton kernel"
    mix_in(layer, TorchOpsLinear4bit)
    return "torch ops" + (" (no Triton installed)" if dequantization == "triton" else "")


class TorchOpsLinear4bit(nn.Module):
    """Mixed in before a ``Linear4bit`` class by ``linear_4bit_as_torch_ops``."""

    dequantize = staticmethod(dequantize_nf4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(self.compute_dtype or input_dtype)
        # Checkpointed: inside a compiled graph the partitioner would otherwise keep each dequantized weight from the
        # forward for the backward's matmul (a bf16 copy of every 4-bit weight of the block being recomputed).
        weight = checkpoint(self.dequantize, self.weight.data, self.weight.quant_state, x.dtype, use_reentrant=False)
        out = F.linear(x, weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(input_dtype)


class TritonKernelLinear4bit(TorchOpsLinear4bit):
    """``TorchOpsLinear4bit`` dequantizing with loramill's Triton kernel (CUDA only)."""

    @staticmethod
    def dequantize(codes: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4_kernel(codes, quant_state).to(dtype)

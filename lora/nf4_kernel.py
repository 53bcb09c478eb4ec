"""The compiled blocks' NF4 dequantization as a Triton kernel of loramill's own, registered as a torch op that
torch.compile sees into (``torch.library.triton_op``): the generated graph launches it directly, with no Python in
between, as it launches its own kernels.

Why not inductor's kernels for the same torch ops (``lora/nf4.py``): profiled on an H200 (8B shape, QLoRA), they
took at least 45 ms of a 752 ms step, where Unsloth's step spent 17 ms dequantizing the same weights as often, with
a kernel that decodes each block's scale once (bench/SPEED_NOTES.md section 10). Inductor's kernels compute every
element on its own: its byte, its block's 8-bit absmax, that absmax's table entry and outer scale, five loads for
one store. Here a program takes a tile of whole blocks (``WEIGHTS_PER_PROGRAM / blocksize`` rows of ``blocksize / 2``
bytes), decodes each row's scale once and writes both nibbles of every byte.

The arithmetic is bitsandbytes', rounding for rounding (tests/test_gpu.py compares it bit for bit with bitsandbytes'
CUDA kernels): with double quantization, absmax = float32(code2[q] * absmax2[block / 256]) + offset, two roundings,
so the multiply is ``mul_rn``, which the compiler may not fuse with the add into one FMA; then each element is
code[nibble] * absmax in float32, rounded to the weight's dtype, the high nibble first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

WEIGHTS_PER_PROGRAM = 4096
"""Weights a program writes (2,048 bytes in): 64 quantization blocks at bitsandbytes' default block size, 64."""


@triton.jit
def _dequantize_nf4_kernel(codes_ptr, absmax_ptr, outer_code_ptr, outer_absmax_ptr, offset_ptr, table_ptr,
                           out_ptr, n_bytes, n_weights, n_blocks, HALF_BLOCK: tl.constexpr,
                           OUTER_SHIFT: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    live = blocks < n_blocks
    if NESTED:  # the block's absmax is an 8-bit code of a 256-entry table, scaled per outer block
        absmax_code = tl.load(absmax_ptr + blocks, mask=live, other=0).to(tl.int32)
        outer_scale = tl.load(outer_absmax_ptr + (blocks >> OUTER_SHIFT), mask=live, other=0.0)
        scale = libdevice.mul_rn(tl.load(outer_code_ptr + absmax_code), outer_scale) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=live, other=0.0)
    byte_index = blocks[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    packed = tl.load(codes_ptr + byte_index, mask=byte_index < n_bytes, other=0).to(tl.int32)
    high = tl.load(table_ptr + (packed >> 4)) * scale[:, None]
    low = tl.load(table_ptr + (packed & 0xF)) * scale[:, None]
    dtype = out_ptr.dtype.element_ty
    weights = tl.interleave(high.to(dtype, fp_downcast_rounding="rtne"), low.to(dtype, fp_downcast_rounding="rtne"))
    weight_index = blocks[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    tl.store(out_ptr + weight_index, weights, mask=weight_index < n_weights)


@torch.library.triton_op("loramill::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int,
                       outer_code: torch.Tensor | None, outer_absmax: torch.Tensor | None,
                       offset: torch.Tensor | None, outer_blocksize: int, shape: list[int],
                       dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    nested = outer_code is not None
    n_weights = out.numel()
    n_blocks = triton.cdiv(n_weights, blocksize)
    blocks_per_program = max(1, WEIGHTS_PER_PROGRAM // blocksize)
    unused = absmax  # the nested-only pointers of a plain absmax (never read: NESTED is a compile-time constant)
    torch.library.wrap_triton(_dequantize_nf4_kernel)[(triton.cdiv(n_blocks, blocks_per_program),)](
        codes, absmax, outer_code if nested else unused, outer_absmax if nested else unused,
        offset if nested else unused, table, out, codes.numel(), n_weights, n_blocks,
        HALF_BLOCK=blocksize // 2, OUTER_SHIFT=outer_blocksize.bit_length() - 1 if nested else 0, NESTED=nested,
        BLOCKS=blocks_per_program)
    return out


def dequantize_nf4_kernel(codes: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight bitsandbytes' ``dequantize_4bit`` returns (in ``quant_state.dtype``) from its CUDA codes
    (``uint8``, two codes a byte) and quant state; block sizes are powers of two, as bitsandbytes makes them."""
    outer = quant_state.state2 if quant_state.nested else None
    outer_args = (outer.code, outer.absmax, quant_state.offset, outer.blocksize) if outer is not None else (
        None, None, None, 0)
    return _dequantize_nf4_op(codes.reshape(-1).view(torch.uint8), quant_state.absmax, quant_state.code,
                              quant_state.blocksize, *outer_args, list(quant_state.shape), quant_state.dtype)

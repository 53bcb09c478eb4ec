"""Time causal SDPA's forward + backward per backend at the long rows' attention shapes (CUDA only).

Which kernel torch picks for `scaled_dot_product_attention` decides a share of every training step; this says what
each backend would cost at the Llama shapes the bench trains (batch 4 × 2048, GQA as transformers passes it:
``enable_gqa`` without a mask, or the key/value heads repeated). Run on the GPU node:

    python3 bench/attention_backends.py --out bench/results/attention_h200.md
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}  # query heads, key/value heads, head dim
BACKENDS = {"torch's choice": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backend(backend: SDPBackend | None, heads: int, kv_heads: int, dim: int, batch: int, seq: int, gqa: bool,
                 steps: int) -> float | str:
    """Milliseconds of one forward + backward, or why the backend refused the inputs."""
    def heads_of(count: int) -> torch.Tensor:
        return torch.randn(batch, count, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = heads_of(heads), heads_of(kv_heads), heads_of(kv_heads)
    grad = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        repeats = heads // kv_heads
        key, value = (k, v) if gqa else (k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1))
        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=gqa)
        out.backward(grad)

    try:
        for _ in range(3):
            step()
    except RuntimeError as error:  # the backend does not take these inputs; torch says why in its warning
        return f"refused ({str(error).splitlines()[0][:60]})"
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    command = f"python3 bench/attention_backends.py --batch {args.batch} --seq {args.seq} --steps {args.steps}"
    lines = [f"# Causal SDPA forward + backward, batch {args.batch} × {args.seq}, bf16, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             f"`{command}`; milliseconds a layer, mean of {args.steps} after 3 warm-up", "",
             "| shape | key/value heads | " + " | ".join(BACKENDS) + " |", "|---|---|" + "---|" * len(BACKENDS)]
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        for gqa in (True, False):
            cells = []
            for backend in BACKENDS.values():
                ms = time_backend(backend, heads, kv_heads, dim, args.batch, args.seq, gqa, args.steps)
                cells.append(f"{ms:.3f}" if isinstance(ms, float) else ms)
            lines.append(f"| {shape} | {'enable_gqa' if gqa else 'repeated'} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

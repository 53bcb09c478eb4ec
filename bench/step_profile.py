"""Where a training step's GPU time and memory go: kernel time by kind, the GPU's idle share, and what is alive at
the memory peak. Used by bench_speed.py (``--profile DIR``) for loramill's step and by profile_unsloth.py for
Unsloth's, so both are summed the same way.

    with StepProfile(out_dir / "loramill-llama-1b-qlora") as profile:
        for _ in range(steps): step()
        profile.steps = steps
    # writes summary.md (and trace.json for chrome://tracing / Perfetto) into that folder
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import torch

# Kernel names by what they do, first match wins. cuBLAS/CUTLASS GEMMs appear as nvjet/sm90/cutlass/gemm; the
# 4-bit dequantize is bitsandbytes'; Triton kernels are torch.compile's and Liger's.
KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|sm90_|sm80_|cublas|splitk", re.I)),
    ("4-bit dequantize", re.compile(r"dequant|kDequantize|4bit|nf4", re.I)),
    ("loss (fused CE)", re.compile(r"cross_entropy|liger_cross|_ce_", re.I)),
    ("triton (compiled / Liger)", re.compile(r"^triton|triton_", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("eager elementwise / reductions", re.compile(r"elementwise|vectorized|reduce|unrolled|index|cat|fill", re.I)),
]


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "other")


class StepProfile:
    """Profile the steps run inside the ``with``; set ``steps`` before it ends. Records CUDA kernels with
    torch.profiler and the allocator's history, then writes ``summary.md`` and ``trace.json`` to ``folder``.
    ``stacks=False`` records the history without the Python frames of each allocation: recording them fails on a
    step with compiled blocks (``SystemError: <built-in method apply of FunctionMeta object ...> returned NULL``), so
    there what was alive at the peak is grouped by block size (inductor's buffers: match them to the generated
    code's ``empty_strided_cuda`` calls, ``TORCH_LOGS=output_code``)."""

    def __init__(self, folder: Path, kernels: bool = True, memory: bool = True, stacks: bool = True) -> None:
        self.folder, self.kernels, self.memory, self.stacks = folder, kernels, memory, stacks
        self.steps = 1
        self.recording = False

    def __enter__(self) -> StepProfile:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.synchronize()
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, **({"stacks": "python"} if self.stacks
                                                                                else {"context": None}))
        if self.kernels:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        self.recording = True
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stops recording; writes the summary when the steps ended without an exception. A second call does
        nothing (a failed step's caller stops it, so the next row does not inherit the allocator's recording)."""
        if not self.recording:
            return
        self.recording = False
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        parts = []
        if self.kernels:
            self.profiler.__exit__(*exc)
            if exc[0] is None:
                self.profiler.export_chrome_trace(str(self.folder / "trace.json"))
                parts.append(kernel_table(self.profiler, self.steps, wall))
        if self.memory:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            if exc[0] is None:
                parts.append(peak_table(snapshot))
        text = "\n".join(parts)
        (self.folder / "summary.md").write_text(text)
        print(text, flush=True)


class MemoryPhases:
    """GPU memory at a training step's phase boundaries, from hooks on the model's forward and the optimizer's step:
    what is allocated as each phase starts and the peak within it, in GiB (each step overwrites the last step's).
    Cheaper and sturdier than the allocator's history (which failed on the compiled step): it says which phase
    holds the peak and how much of it the step carries in from before (weights, adapters, optimizer state).
    The hooks reset torch's peak counter, so a caller's own ``max_memory_allocated`` reads only the last phase."""

    PHASES = ("forward", "backward", "optimizer step")

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.gib: dict[str, float] = {}
        model.register_forward_pre_hook(self._forward_starts)
        model.register_forward_hook(self._forward_ends)
        optimizer.register_step_pre_hook(self._backward_ends)
        optimizer.register_step_post_hook(lambda *_: self._end("optimizer step"))

    # Hooks return None: a module hook's other return values replace the forward's inputs or output.
    def _forward_starts(self, *_: object) -> None:
        if torch.is_grad_enabled():  # evaluation's forwards (no grad) are not a step's
            self._start("forward")

    def _forward_ends(self, *_: object) -> None:
        if torch.is_grad_enabled():
            self._end("forward")
            self._start("backward")

    def _backward_ends(self, *_: object) -> None:
        self._end("backward")
        self._start("optimizer step")

    def _start(self, phase: str) -> None:
        self.gib[f"{phase} starts"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()

    def _end(self, phase: str) -> None:
        self.gib[f"{phase} peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)

    def line(self) -> str:
        return "; ".join(f"{phase} {self.gib.get(f'{phase} starts', '-')} -> peak {self.gib.get(f'{phase} peak', '-')}"
                         for phase in self.PHASES) + " GiB"


def kernel_table(profiler: torch.profiler.profile, steps: int, wall_s: float) -> str:
    by_kind: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.device_time / 1000
        by_kind[kind_of(event.name)] += ms
        by_kernel[event.name][0] += ms
        by_kernel[event.name][1] += 1
    busy = sum(by_kind.values())
    step_ms = wall_s * 1000 / steps
    lines = [f"{steps} steps, {step_ms:.1f} ms a step; kernels busy {busy / steps:.1f} ms a step "
             f"({busy / (wall_s * 1000):.0%} of the wall time; the rest the GPU waits)", "",
             "| kind | ms a step | share of kernel time |", "|---|---:|---:|"]
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {ms / steps:.1f} | {ms / busy:.0%} |")
    lines += ["", "| kernel (top 25) | kind | ms a step | calls a step |", "|---|---|---:|---:|"]
    for name, (ms, calls) in sorted(by_kernel.items(), key=lambda item: -item[1][0])[:25]:
        lines.append(f"| `{name[:90]}` | {kind_of(name)} | {ms / steps:.2f} | {calls / steps:.0f} |")
    # The host side: where the Python thread spends a step when the GPU waits for it
    host = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    lines += ["", "| host op (top 20 by self time) | ms a step | calls a step |", "|---|---:|---:|"]
    for event in sorted(host, key=lambda e: -e.self_cpu_time_total)[:20]:
        lines.append(f"| `{event.key[:90]}` | {event.self_cpu_time_total / 1000 / steps:.2f} | {event.count / steps:.0f} |")
    return "\n".join(lines) + "\n"


def peak_table(snapshot: dict, top: int = 15) -> str:
    """Replay the allocator's history to the moment of most allocated bytes and group what was alive then by the
    innermost Python frame that allocated it (memory allocated before the history began is counted as a lump)."""
    events = [event for trace in snapshot["device_traces"] for event in trace
              if event["action"] in ("alloc", "free_completed")]
    sizes: dict[int, int] = {}
    current = peak = peak_at = 0
    for index, event in enumerate(events):  # first pass: when the peak was
        if event["action"] == "alloc":
            sizes[event["addr"]] = event["size"]
            current += event["size"]
            if current > peak:
                peak, peak_at = current, index
        elif event["addr"] in sizes:
            current -= sizes.pop(event["addr"])
    recorded_end = sum(sizes.values())
    live: dict[int, tuple[int, str]] = {}
    for event in events[:peak_at + 1]:  # second pass: what was alive then, and who allocated it
        if event["action"] == "alloc":
            frames = event.get("frames", [])
            where = origin(frames) if frames else f"no stack: {event['size'] / 2**20:,.2f} MiB blocks"
            live[event["addr"]] = (event["size"], where)
        else:
            live.pop(event["addr"], None)
    before = sum(block["size"] for segment in snapshot["segments"] for block in segment["blocks"]
                 if block["state"] == "active_allocated")
    grouped: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in live.values():
        grouped[where][0] += size
        grouped[where][1] += 1
    # Blocks alive at the end but allocated before recording began have no history: counted as one lump.
    untracked = max(before - recorded_end, 0)
    lines = [f"memory: {untracked / 2**30:.2f} GiB allocated before the profiled steps and alive through them "
             f"(weights, optimizer state, caches); at the steps' peak {peak / 2**30:.2f} GiB more, of which:", "",
             "| allocated at (innermost frame in our code or the library) | blocks | GiB at the peak |",
             "|---|---:|---:|"]
    for where, (size, count) in sorted(grouped.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| `{where}` | {count} | {size / 2**30:.3f} |")
    return "\n".join(lines) + "\n"


def origin(frames: list[dict]) -> str:
    """The first Python frame that is not torch's own machinery: the layer or function that asked for the memory."""
    for frame in frames:
        name = frame.get("filename", "")
        if name.endswith(".py") and "/torch/" not in name and "<" not in name:
            return f"{Path(name).parent.name}/{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return frames[0].get("name", "?")

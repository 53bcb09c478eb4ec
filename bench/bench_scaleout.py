"""Makespan and GPU-busy fraction of the whole pipeline (Tune sweep, final run, publish) for three domains on the
GPUs of one node: run it once per GPU count (CUDA_VISIBLE_DEVICES picks them) and compare.

It runs ``loramill run --tune`` (``pipelines.run.run(sweep=True)``) on the bundled domains with a random-weight
checkpoint (bench/random_checkpoint.py) and a file:// registry, and records:

- makespan: wall time of the pipeline, Ray start excluded;
- busy fraction = sum over every trial and final run of its time in optimizer steps / (GPUs x makespan);
- NVML utilisation per GPU (nvidia-smi sampled every 0.5 s): the share of time a kernel ran, whatever it was;
- packing: how many trainings ran at once (from the trials' own reports and the final runs' wall times).

    python bench/bench_scaleout.py --tokenizer DIR [--shape smollm2-135m] [--steps 60] [--trials 3]
        [--out bench/results/scaleout.md] [key=value ...]

Run with CUDA_DEVICE_ORDER=PCI_BUS_ID (the NVML sampler picks the visible GPUs by their PCI order).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from random_checkpoint import make_checkpoint  # noqa: E402

from lora.config import load_config  # noqa: E402
from pipelines import run as pipeline  # noqa: E402
from pipelines.ray_session import ensure_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trial and per final run")
    parser.add_argument("--trials", type=int, default=3, help="Tune trials per domain")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ckpt"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    checkpoint = make_checkpoint(args.shape, args.root, args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    overrides = [f"model.id={checkpoint}", "cluster.use_gpu=true", f"train.max_steps={args.steps}",
                 f"train.eval_every={max(1, args.steps // 2)}", f"train.checkpoint_every={args.steps}",
                 "train.warmup_steps=0", "train.micro_batch_size=8", "train.max_eval_examples=32",
                 f"tune.num_trials={args.trials}", "tune.search=random", f"cluster.storage_url={work / 'runs'}",
                 f"cluster.output_dir={work / 'output'}", f"publish.registry=file://{work / 'registry'}",
                 "publish.audit_prompts=0", *args.overrides]
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    gpus = torch.cuda.device_count() or 1  # 1: a CPU smoke run (cluster.use_gpu=false) counts as one device

    ensure_ray(cfg)
    sampler = NvmlSampler(work / "nvml.csv") if torch.cuda.is_available() else None
    started = time.time()
    outcomes = pipeline.run(cfg, sweep=True)
    makespan = time.time() - started
    if sampler:
        sampler.stop()

    trainings = trial_intervals(work / "runs") + [
        {"what": f"{o.training.domain} final", "end": (end := (o.training.output_dir / "result.json").stat().st_mtime),
         "start": end - o.training.wall_seconds, "train": o.training.train_seconds} for o in outcomes]
    utilisation = nvml_utilisation(work / "nvml.csv")
    busy = sum(t["train"] for t in trainings) / (gpus * makespan)
    overlap = concurrency(trainings, started, started + makespan)
    lines = [
        f"## Scale-out: {gpus} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: random-weight {args.shape}; 3 domains x ({args.trials} Tune trials + 1 final run), "
        f"{args.steps} steps each; micro_batch_size 8 counts only without a token budget (on a GPU "
        f"train.batch_tokens, when unset, packs up to 16,384 tokens a step); overrides: {' '.join(overrides[1:])}",
        "",
        "| GPUs | makespan s | trainings | sum of train s | busy fraction | NVML utilisation per GPU | trainings at once (mean / max) |",
        "|---:|---:|---:|---:|---:|---|---|",
        f"| {gpus} | {makespan:.0f} | {len(trainings)} | {sum(t['train'] for t in trainings):.0f} | {busy:.2f} | "
        + ", ".join(f"GPU{g}: {u:.0%}" for g, u in sorted(utilisation.items()))
        + f" | {overlap[0]:.2f} / {overlap[1]} |",
        "",
        "| training | start s | end s | train s |",
        "|---|---:|---:|---:|",
        *[f"| {t['what']} | {t['start'] - started:.0f} | {t['end'] - started:.0f} | {t['train']:.1f} |"
          for t in sorted(trainings, key=lambda t: t["start"])],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


class NvmlSampler:
    """``nvidia-smi`` utilisation of the GPUs this process sees, one query every 0.5 s, in a thread.

    One query per sample rather than ``nvidia-smi -lms``: a looping nvidia-smi writing to a file buffers its output,
    and terminating it lost the buffered samples. nvidia-smi ignores CUDA_VISIBLE_DEVICES, so the visible GPUs are
    passed with ``-i`` (nvidia-smi numbers them in PCI bus order: run with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""

    def __init__(self, out: Path, interval: float = 0.5) -> None:
        self.out, self.interval, self.lines = out, interval, []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        self.command = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                        *(["-i", visible] if visible else [])]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            tick = time.monotonic()
            query = subprocess.run(self.command, capture_output=True, text=True, check=False)
            self.lines += query.stdout.splitlines()
            self.done.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.out.write_text("\n".join(self.lines) + "\n")


def trial_intervals(runs: Path) -> list[dict]:
    """Every Tune trial under ``runs``: when it ran (its own reports' clock) and its time in optimizer steps."""
    trials = []
    for result_file in runs.glob("tune/**/result.json"):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not reports or "trial_seconds" not in reports[-1]:
            continue
        last = reports[-1]
        domain = result_file.parent.parent.name.rsplit("-", 1)[0]  # the experiment folder: <domain>-<hash>
        trials.append({"what": f"{domain} trial {last['trial_id']}",
                       "start": last["reported_at"] - last["trial_seconds"], "end": last["reported_at"],
                       "train": last.get("train_seconds", 0.0)})
    return trials


def nvml_utilisation(samples: Path) -> dict[int, float]:
    per_gpu: dict[int, list[float]] = {}
    for line in samples.read_text().splitlines() if samples.exists() else []:
        if line.count(",") != 1:
            continue
        index, utilisation = (field.strip() for field in line.split(","))
        if utilisation.isdigit():
            per_gpu.setdefault(int(index), []).append(int(utilisation) / 100)
    return {gpu: statistics.mean(values) for gpu, values in per_gpu.items()}


def concurrency(trainings: list[dict], start: float, end: float) -> tuple[float, int]:
    """(time-averaged, maximum) number of trainings running at once between ``start`` and ``end``."""
    events = sorted([(t["start"], 1) for t in trainings] + [(t["end"], -1) for t in trainings])
    running, peak, area, last = 0, 0, 0.0, start
    for at, change in events:
        area += running * (min(at, end) - last)
        last = min(at, end)
        running += change
        peak = max(peak, running)
    return area / (end - start), peak


if __name__ == "__main__":
    main()

"""FSDP2 across the GPUs of one node (issue 17 item 4): a base that one GPU cannot hold trains sharded, and resumes.

On the node (2 GPUs), through the real CLI (`loramill train configs/default.yaml -d medical key=value ...`):

- ``8b_fsdp``: the Llama-3.1-8B shape in bf16 (random weights; 14.96 GiB of weights) with LoRA, ``train.strategy=fsdp``
  on 2 workers, each process's CUDA allocations capped at ``--cap-gib`` (below the weights alone) by
  ``LORAMILL_CUDA_MEMORY_FRACTION`` (read by the training worker). Once the checkpoint at step ``EVERY`` is
  registered, one worker is SIGKILLed: Ray Train restarts both and they resume from that checkpoint.
- ``8b_one_gpu``: the same base on one worker under the same cap: it cannot load.

Rows of 1024 tokens: evaluation materialises float32 logits (Liger fuses the loss only when training), 1 GiB for 2048
tokens of a 128k vocabulary, which at 2048 did not fit under the cap (bench/results/fsdp_h200.md). QLoRA is not run:
``train.strategy=fsdp`` with ``quant.mode=nf4`` is a config error (FSDP2 stopped at the first 4-bit weight here).

Each rank's peak CUDA memory comes from bench_ddp's timing hook (``site``), each GPU's from nvidia-smi every 0.5 s.

    python bench/bench_fsdp.py node --budget 330      # on the node: $OUT/fsdp_h200.md and $OUT/logs.tgz
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CKPT = Path("/tmp/ckpt")
LOGS = Path("/tmp/fsdp_logs")
RUNS = Path("/tmp/fsdp_runs")
SITE = Path("/tmp/benchsite")
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()", "--log-format", "json", "--progress-every", "5"]
STEPS, EVERY = 30, 10
WEIGHTS_GIB_8B = 14.96
"""8,030,261,248 parameters x 2 bytes (bf16)."""


def overrides(label: str, shape: str, extra: dict) -> list[str]:
    base = {"model.id": str(CKPT / shape), "cluster.use_gpu": "true", "cluster.cpus_per_worker": "8",
            "cluster.storage_url": str(RUNS / label), "cluster.output_dir": str(LOGS / "output" / label),
            "train.max_eval_examples": "40", "train.max_steps": STEPS, "train.eval_every": EVERY,
            "train.checkpoint_every": EVERY}
    return [f"{k}={v}" for k, v in (base | extra).items()]


def gpu_pids() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False).stdout
    return [int(line) for line in out.split() if line.strip().isdigit()]


class Killer(threading.Thread):
    """SIGKILL one training worker (a process on a GPU) once Ray Train has registered the checkpoint at ``step``
    and every checkpoint folder on storage is registered (a report not yet collected would die with the worker)."""

    def __init__(self, storage: Path, step: int, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.storage, self.step, self.timeout_s = storage, step, timeout_s
        self.killed: dict | None = None

    def run(self) -> None:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline and self.killed is None:
            for snapshot in self.storage.glob("*/checkpoint_manager_snapshot.json"):
                try:
                    state = json.loads(snapshot.read_text())
                except (OSError, ValueError):
                    continue
                latest = state.get("latest_checkpoint_result")
                kept = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
                folders = {p.name for p in snapshot.parent.glob("checkpoint_*") if p.is_dir()}
                pids = gpu_pids()
                if latest and int(latest["metrics"]["step"]) >= self.step and folders <= kept and pids:
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = {"pid": pids[0], "registered_step": int(latest["metrics"]["step"]),
                                   "t": time.time()}
            time.sleep(0.2)


def train(label: str, args: list[str], env: dict, timeout: float, kill_at: int | None = None) -> dict:
    cmd = CLI + ["train", "configs/default.yaml", "-d", "medical", *args]
    started = time.time()
    killer = Killer(RUNS / label, kill_at, timeout) if kill_at else None
    if killer:
        killer.start()
    with open(LOGS / f"{label}.log", "w") as out, open(LOGS / f"{label}.err", "w") as err:
        full_env = os.environ | {"BENCH_TIMING_FILE": str(LOGS / f"{label}.timing.jsonl"),
                                 "PYTHONPATH": f"{SITE}:{os.environ.get('PYTHONPATH', '')}"} | env
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, env=full_env, timeout=max(5, timeout),
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    record = {"label": label, "rc": rc, "t0": started, "t1": time.time(), "wall_s": round(time.time() - started, 1),
              "command": " ".join(f"{k}={v}" for k, v in env.items()) + " loramill " + " ".join(cmd[len(CLI):]),
              "killed": killer.killed if killer else None}
    (LOGS / f"{label}.meta.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("label", "rc", "wall_s", "killed")}), flush=True)
    return record


def node(budget: float, cap_gib: float) -> None:
    deadline = time.time() + budget
    LOGS.mkdir(parents=True, exist_ok=True)
    tok = os.environ["LORAMILL_TEST_TOKENIZER_DIR"]
    subprocess.run([sys.executable, "bench/bench_ddp.py", "site", str(SITE)], check=True)
    smi_log = open(LOGS / "smi.csv", "w")  # noqa: SIM115  (written by nvidia-smi until the end)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,memory.used,memory.total,utilization.gpu",
                            "--format=csv,noheader,nounits", "-lms", "500"], stdout=smi_log)
    records = []
    try:
        subprocess.run(f"{sys.executable} bench/random_checkpoint.py llama-8b --tokenizer {tok} > "
                       f"{LOGS}/ckpt_8b.out 2>&1", shell=True, check=True)
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        # expandable_segments: under a hard cap, blocks the allocator holds but cannot split are lost (2.5 GiB at the
        # out-of-memory error of the first run).
        capped = {"LORAMILL_CUDA_MEMORY_FRACTION": f"{cap_gib * 2**30 / total:.5f}",
                  "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        eight_b = {"quant.mode": "none", "train.gradient_checkpointing": "true", "train.batch_tokens": 1024}
        records.append(train("8b_fsdp", overrides("8b_fsdp", "llama-8b", eight_b | {
            "train.strategy": "fsdp", "cluster.workers_per_domain": 2}), capped, deadline - time.time() - 90,
            kill_at=EVERY))
        if deadline - time.time() > 70:
            records.append(train("8b_one_gpu", overrides("8b_one_gpu", "llama-8b", eight_b | {
                "cluster.workers_per_domain": 1, "cluster.max_failures": 0}), capped, min(70, deadline - time.time())))
    finally:
        smi.terminate()
        smi_log.close()
        out = Path(os.environ.get("OUT", "/tmp/out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_h200.md").write_text(report(records, cap_gib))
        subprocess.run(["tar", "czf", str(out / "logs.tgz"), "--exclude=*.safetensors", "-C", str(LOGS.parent),
                        LOGS.name], check=False)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def gpu_peaks(t0: float, t1: float) -> dict[int, float]:
    """Each GPU's highest memory.used (GiB, nvidia-smi: the CUDA contexts and NCCL's buffers included) in [t0, t1]."""
    from datetime import datetime

    peaks: dict[int, float] = {}
    for line in (LOGS / "smi.csv").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            index, used = int(parts[1]), float(parts[2]) / 1024
        except (ValueError, IndexError):
            continue
        if t0 <= t <= t1:
            peaks[index] = max(peaks.get(index, 0.0), used)
    return peaks


def report(records: list[dict], cap_gib: float) -> str:
    lines = ["# FSDP2 on 2 H200s (`bench/bench_fsdp.py node`)", "",
             (f"Each process's CUDA allocations capped at {cap_gib} GiB (`LORAMILL_CUDA_MEMORY_FRACTION`), below the "
              f"{WEIGHTS_GIB_8B} GiB of the 8B shape's bf16 weights alone."), ""]
    for r in records:
        label = r["label"]
        lines += [f"## {label}: exit {r['rc']}, {r['wall_s']} s", "", "```", r["command"], "```", ""]
        run_dirs = list((LOGS / "output" / label / "medical").glob("*"))
        if run_dirs:
            result = json.loads((run_dirs[0] / "result.json").read_text())
            history = json.loads((run_dirs[0] / "history.json").read_text())
            info = json.loads((run_dirs[0] / "run_info.json").read_text())
            lines += [(f"- tokens/s (real tokens, both ranks, optimizer steps only): {result['tokens_per_second']:,.0f}; "
                       f"{result['steps']} steps in {result['train_seconds']:.1f} s"),
                      (f"- eval loss: base {result['base_eval_loss']:.4f} -> {result['eval_loss']:.4f}; evals "
                       + ", ".join(f"{h['step']}: {h['eval_loss']:.4f}" for h in history if "eval_loss" in h)),
                      ("- train loss by step: "
                       + ", ".join(f"{h['train_loss']:.3f}" for h in history if "train_loss" in h)),
                      f"- resumed from step: {info.get('resumed_from_step')}; batching: {info['batching']}",
                      f"- trainable {info['trainable_params']:,} of {info['total_params']:,} parameters"]
        if r["killed"]:
            lines.append(f"- SIGKILLed worker pid {r['killed']['pid']} {r['killed']['t'] - r['t0']:.0f} s in, "
                         f"with the checkpoint at step {r['killed']['registered_step']} registered")
        for x in _lines(LOGS / f"{label}.timing.jsonl"):
            if x["event"] == "train:end" and x.get("peak_allocated_bytes"):
                lines.append(f"- rank {x['rank']} (pid {x['pid']}): torch peak allocated "
                             f"{x['peak_allocated_bytes'] / 2**30:.2f} GiB, reserved "
                             f"{x['peak_reserved_bytes'] / 2**30:.2f} GiB, {x['steps_done']} steps done")
        peaks = gpu_peaks(r["t0"], r["t1"])
        if peaks:
            lines.append("- nvidia-smi peak memory.used: " + ", ".join(f"GPU {i} {g:.1f} GiB"
                                                                      for i, g in sorted(peaks.items())))
        errors = [line for line in (LOGS / f"{label}.err").read_text().splitlines()
                  if "Error" in line and "Traceback" not in line][-3:]
        if r["rc"] != 0 and errors:
            lines += ["- error:", "```", *errors, "```"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    on_node = sub.add_parser("node")
    on_node.add_argument("--budget", type=float, default=380)
    on_node.add_argument("--cap-gib", type=float, default=14.0)
    args = parser.parse_args()
    node(args.budget, args.cap_gib)


if __name__ == "__main__":
    main()

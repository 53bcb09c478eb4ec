"""Per-trial overhead of ``loramill tune`` on CPU: the wall time a trial costs beyond its optimizer steps.

Runs one real sweep through the tune stage (``pipelines.tune.run``: Tune function trainable, ``reuse_actors=True``,
per-process caches) on the default model, shortened so that it finishes in minutes, then reads every report
Tune recorded. Per trial it prints the time in optimizer steps (``train_seconds``), the wall time inside the trial
(``trial_seconds``, from the start of ``train_domain`` to the last report) and how that splits into setup (model,
data, tokenizer: a cache hit after an actor's first trial) and evaluations. For the sweep:

    overhead per trial = (slots x sweep wall - sum of train_seconds) / trials    (slots: trials at once)
    busy fraction      = sum of train_seconds / (slots x sweep wall)

Both count everything that is not an optimizer step: actor start and imports (once per actor), Ray Tune's
bookkeeping, checkpoints, the stage's preflight and its result files, and the evaluations the config asks for.

    .venv/bin/python bench/bench_tune_overhead.py [--config configs/default.yaml] [--trials 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.config import load_config  # noqa: E402
from pipelines import tune  # noqa: E402
from pipelines.ray_session import ensure_ray  # noqa: E402

# 6 steps of micro batch 2, evaluations at steps 0, 3 and 6 on 2 held-out examples, one checkpoint at the end:
# small enough that 4 trials of SmolLM2-135M in 4-bit take a few minutes on 2 cores.
SHORT = ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=6", "train.max_eval_examples=2",
         "train.micro_batch_size=2", "train.warmup_steps=0", "tune.search=random", "tune.lr_min=1e-4",
         "tune.lr_max=3e-3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--domain", default=None, help="default: the config's first domain")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="key=value, applied after the shortening ones")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    overrides = [*SHORT, f"tune.num_trials={args.trials}", f"cluster.storage_url={work / 'runs'}",
                 f"cluster.output_dir={work / 'output'}", *args.overrides]
    cfg = load_config(args.config, overrides)
    domain = args.domain or cfg.domains[0].name

    started = time.perf_counter()
    ensure_ray(cfg)
    ray_start = time.perf_counter() - started
    sweep_start = time.time()
    [sweep] = tune.run(cfg, [domain])
    wall = time.time() - sweep_start

    rows = chain_by_actor([trial_row(path) for path in sorted(Path(sweep.experiment).glob("*/result.json"))],
                          sweep_start)
    report(cfg, sweep, rows, wall, ray_start, overrides)


def trial_row(result_file: Path) -> dict:
    """One trial from the reports Tune wrote to its ``result.json``: where its in-trial time went.

    Between two reports the loop runs optimizer steps (counted in train_seconds) and then, for an eval report,
    one evaluation; so at each eval report (trial_seconds - train_seconds) grows by one evaluation. The first
    report (step 0) comes after setup and, unless the trial reused an earlier measurement of the base
    (``base_eval`` in its run_info.json, ``lora/base_eval.py``), the base model's evaluation, taken to cost the
    later ones' median.
    """
    reports = [json.loads(line) for line in result_file.read_text().splitlines()]
    not_training = [r["trial_seconds"] - r.get("train_seconds", 0.0) for r in reports]  # step 0 has none
    per_eval = [b - a for a, b, r in zip(not_training, not_training[1:], reports[1:]) if "eval_loss" in r]
    infos = sorted(result_file.parent.glob("checkpoint_*/run_info.json"))
    base_reused = bool(infos) and json.loads(infos[-1].read_text()).get("base_eval", "").startswith("reused")
    one_eval = statistics.median(per_eval) if per_eval else 0.0
    base_eval = 0.0 if base_reused else one_eval
    last = reports[-1]
    return {
        "trial": last["trial_id"],
        "actor": last["pid"],
        "started": last["reported_at"] - last["trial_seconds"],
        "ended": last["reported_at"],
        "steps": last["step"],
        "train": last.get("train_seconds", 0.0),
        "in_trial": last["trial_seconds"],
        "evals": len(per_eval) + (not base_reused),
        "eval": one_eval * len(per_eval) + base_eval,
        "setup": not_training[0] - base_eval,
    }


def chain_by_actor(rows: list[dict], sweep_start: float) -> list[dict]:
    """Each trial's slot: from the end of the previous trial on its actor (or the sweep's start, for an actor's
    first trial: that also holds the stage's preflight and the actor's start) to the end of its own."""
    previous: dict[int, float] = {}
    for row in sorted(rows, key=lambda r: r["started"]):
        row["cold"] = row["actor"] not in previous
        row["slot"] = row["ended"] - previous.get(row["actor"], sweep_start)
        previous[row["actor"]] = row["ended"]
    return sorted(rows, key=lambda r: r["started"])


def report(cfg, sweep, rows: list[dict], wall: float, ray_start: float, overrides: list[str]) -> None:
    slots, n = sweep.concurrency, len(rows)
    train = sum(r["train"] for r in rows)
    print(f"\nloramill tune overhead: {cfg.model.id}, quant {cfg.quant.mode}, domain {sweep.domain}, {n} trials, "
          f"{slots} at once ({cfg.cluster.cpus_per_worker:g} CPU each), {sweep.planned_steps} steps each")
    print("overrides: " + " ".join(overrides))
    print(f"\n{'trial':<13}{'actor':<8}{'steps':>6}{'train s':>9}{'evals':>6}{'eval s':>8}{'setup s':>9}"
          f"{'slot s':>8}{'overhead s':>12}")
    for r in rows:
        print(f"{r['trial']:<13}{'cold' if r['cold'] else 'reused':<8}{r['steps']:>6}{r['train']:>9.1f}"
              f"{r['evals']:>6}{r['eval']:>8.1f}{r['setup']:>9.1f}{r['slot']:>8.1f}{r['slot'] - r['train']:>12.1f}")
    reused = [r for r in rows if not r["cold"]]
    cold = [r for r in rows if r["cold"]]
    print(f"\nRay start (once per session, not in the sweep): {ray_start:.1f} s; sweep wall: {wall:.1f} s")
    if reused:
        overhead = statistics.mean(r["slot"] - r["train"] for r in reused)
        evals = statistics.mean(r["eval"] for r in reused)
        setup = statistics.mean(r["setup"] for r in reused)
        print(f"overhead per trial on a reused actor (slot - train): {overhead:.1f} s = evaluations {evals:.1f} s "
              f"+ setup {setup:.1f} s + Tune between trials {overhead - evals - setup:.1f} s")
    print(f"overhead of an actor's first trial: {statistics.mean(r['slot'] - r['train'] for r in cold):.1f} s "
          f"(setup {statistics.mean(r['setup'] for r in cold):.1f} s; includes preflight and actor start)")
    print(f"whole sweep, (slots x wall - sum of train) / trials: {(slots * wall - train) / n:.1f} s per trial")
    print(f"busy fraction (train / slots x wall): {train / (slots * wall):.2f}")


if __name__ == "__main__":
    main()

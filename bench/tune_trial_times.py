"""Where a Tune trial's seconds go, from the files a sweep wrote: no assumption about the base's evaluation.

``bench_tune_overhead.py`` splits a trial's step 0 into setup and a base evaluation priced at the median of the
later ones (none when run_info.json says the base's metrics were reused, ``lora/base_eval.py``). This reads the same
``result.json`` reports and each trial's ``run_info.json`` without pricing anything, and prints per trial, in seconds:

    to step 0   start of ``train_domain`` -> the step-0 report (setup, plus the base evaluation when measured)
    evals       the later evaluations (growth of trial_seconds - train_seconds between eval reports)
    in trial    start of ``train_domain`` -> last report;  train: optimizer steps
    gap         last report of the previous trial -> start of this one's ``train_domain`` (the final checkpoint's
                write, the trainable's return, Tune's bookkeeping, the next trial's start on the reused actor)
    cycle       last report of the previous trial -> last report of this one (= the bench's slot on a reused actor)

    python bench/tune_trial_times.py EXPERIMENT_DIR      # the folder holding the sweep's trial folders
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def trials(experiment: Path) -> list[dict]:
    rows = []
    for result in sorted(experiment.glob("*/result.json")):
        reports = [json.loads(line) for line in result.read_text().splitlines()]
        idle = [r["trial_seconds"] - r.get("train_seconds", 0.0) for r in reports]
        evals = sum(b - a for a, b, r in zip(idle, idle[1:], reports[1:]) if "eval_loss" in r)
        infos = sorted(result.parent.glob("checkpoint_*/run_info.json"))
        base = json.loads(infos[-1].read_text()).get("base_eval", "(not recorded)") if infos else "(no run_info)"
        last = reports[-1]
        rows.append({"trial": last["trial_id"], "pid": last["pid"], "start": last["reported_at"] - last["trial_seconds"],
                     "end": last["reported_at"], "to_step0": reports[0]["trial_seconds"], "evals": evals,
                     "n_evals": sum("eval_loss" in r for r in reports[1:]), "train": last.get("train_seconds", 0.0),
                     "in_trial": last["trial_seconds"], "base": base})
    rows.sort(key=lambda r: r["start"])
    for previous, row in zip([None, *rows], rows):
        same = previous is not None and previous["pid"] == row["pid"]
        row["gap"] = row["start"] - previous["end"] if same else None
        row["cycle"] = row["end"] - previous["end"] if same else None
    return rows


def main() -> None:
    rows = trials(Path(sys.argv[1]))
    print(f"{'trial':<13}{'to step 0':>10}{'evals':>10}{'train':>8}{'in trial':>10}{'gap':>7}{'cycle':>8}  base eval")
    for r in rows:
        gap = "cold" if r["gap"] is None else f"{r['gap']:.2f}"
        cycle = "-" if r["cycle"] is None else f"{r['cycle']:.2f}"
        print(f"{r['trial']:<13}{r['to_step0']:>10.2f}{r['evals']:>6.2f} ({r['n_evals']}){r['train']:>8.2f}"
              f"{r['in_trial']:>10.2f}{gap:>7}{cycle:>8}  {r['base'][:40]}")
    warm = [r for r in rows if r["gap"] is not None]
    if warm:
        mean = {k: sum(r[k] for r in warm) / len(warm) for k in ("to_step0", "evals", "train", "in_trial", "gap", "cycle")}
        print("reused-actor mean: " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items())
              + f"; cycle - train {mean['cycle'] - mean['train']:.2f}")


if __name__ == "__main__":
    main()

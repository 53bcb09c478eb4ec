"""QLoRA parity on the default model over 10x the demo's steps (issue 19 item 3): does the gap to float LoRA close?

configs/default.yaml trains 20 steps; here each bundled domain trains 200 (evaluated every 20, so that history.json
holds a curve), once on the NF4 + double-quant base (QLoRA, as shipped) and once on the unquantized base (LoRA),
everything else as the demo: same seed, data, LoRA and schedule (cosine over the 200 steps). Compute dtype float32
for both, so that the only difference is the 4-bit base (as in qlora_parity.md's 30-step CPU table); with
``--dtypes float32 bfloat16`` a bf16 pair too.

Two halves, because the GPU node reaches no hub and no registry:

- ``node``: on the GPU node, with the converted SmolLM2 folder carried there (``gpu_carry.py``; bench/quality/README.md
  has the calls). Refuses to train unless the folder's model.safetensors has the sha256 given (this machine's).
  The two runs of a pair (3 domains each) share the first GPU at once (``reviews_table.gpu_slots``: a Ray head
  offering it as 6 GPU slots), one pair after the other. Writes the runs' logs to ``--out``'s folder as they run
  and the record (qlora_parity_long.json) beside them at the end; a run that failed is recorded from its log's
  progress lines (its curve up to the last evaluation it printed, marked partial).
- ``logs``: here, a record made from a node run's logs alone, for a call whose time limit stopped ``node`` before
  it wrote its record (the logs still come back from ``$OUT``).
- ``render``: here, from one or more records (one section each): qlora_parity_long.md (the tables, the computed
  verdict, the commands, the machine) and qlora_parity_long.png (eval loss and relative gap against step, LoRA vs
  QLoRA, one panel per domain, from the first record).

    python3 bench/quality/qlora_parity_long.py node --model /tmp/models/smollm2-135m-instruct --model-sha256 HEX
    .venv/bin/python bench/quality/qlora_parity_long.py render bench/quality/qlora_parity_long_run3.json \\
        bench/quality/qlora_parity_long_run4.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, loramill, machine
from reviews_table import gpu_slots

HERE = Path(__file__).resolve().parent
WORK = REPO / ".loramill" / "quality" / "qlora-long"
STEPS, EVAL_EVERY = 200, 20
GAP_STEPS = (20, 100, 200)
PARITY = 0.02
"""The parity goal of qlora_parity.md: QLoRA's eval loss within +-2% of LoRA's."""
MODES = {"nf4": "QLoRA (NF4 + double quant)", "none": "LoRA (unquantized base)"}
SLOTS = 6
"""GPU slots: one pair (2 runs x 3 domains) at a time. Twelve runs at once (two pairs) ran the H200 out of memory:
each 135M-parameter run's process held 5-30 GiB (the caching allocator keeps what evaluation's float32 logits took),
and the OOM restarts changed the resumed runs' curves."""
# The CLI's progress line: "2026-11-30 08:57:31 legal step 100/200 train_loss 0.0012 eval_loss 0.0130 tokens/s ..."
PROGRESS = re.compile(r"^\S+ \S+ (\S+) step (\d+)/\d+(?: train_loss \S+)? eval_loss ([0-9.]+)")


def bench_config(model: Path) -> Path:
    """configs/default.yaml with absolute data paths, the carried model and scratch output folders."""
    raw = yaml.safe_load((REPO / "configs/default.yaml").read_text())
    for domain in raw["domains"]:
        for split in ("train", "eval"):
            domain[split] = str((REPO / "configs" / domain[split]).resolve())
    raw["model"]["id"] = str(model)
    raw["cluster"] |= {"output_dir": str(WORK / "output"), "storage_url": str(WORK / "runs")}
    path = WORK / "default-long.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def overrides(mode: str, dtype: str) -> list[str]:
    # train.batch_tokens: without it a GPU run sizes its micro batches from the GPU's free memory (up to 16,384
    # tokens), far from the demo's 4 examples a step; 512 tokens hold about 4 of these examples. The two records in
    # this folder were made before this line (their commands say so).
    return [f"quant.mode={mode}", f"quant.compute_dtype={dtype}", f"train.max_steps={STEPS}",
            f"train.eval_every={EVAL_EVERY}", "train.batch_tokens=512", "cluster.use_gpu=true",
            "cluster.cpus_per_worker=1"]


def finished_runs(config: Path, run_overrides: list[str]) -> dict[str, dict]:
    """Each domain's result and curve (steps with an evaluation; train loss at every step) of one `loramill train`."""
    from lora.config import load_config
    from pipelines.run_folder import data_fingerprint, run_name

    cfg = load_config(config, run_overrides)
    runs = {}
    for d in cfg.domains:
        folder = Path(cfg.cluster.output_dir) / d.name / run_name(cfg, d, data_fingerprint(d))
        result = json.loads((folder / "result.json").read_text())
        history = json.loads((folder / "history.json").read_text())
        runs[d.name] = {key: result[key] for key in ("steps", "base_eval_loss", "eval_loss", "train_seconds",
                                                     "wall_seconds", "tokens_per_second", "trainable_params")}
        runs[d.name]["eval_curve"] = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
        runs[d.name]["train_loss"] = {h["step"]: h["train_loss"] for h in history if "train_loss" in h}
    return runs


def log_curves(log: Path) -> dict[str, dict]:
    """Each domain's eval curve from a `loramill train` log's progress lines (the latest value of a step printed
    twice, as after a restart), and how many CUDA out-of-memory errors the log shows."""
    text = log.read_text()
    runs: dict[str, dict] = {}
    for line in text.splitlines():
        if match := PROGRESS.match(line):
            domain, step, loss = match.group(1), match.group(2), float(match.group(3))
            runs.setdefault(domain, {"eval_curve": {}, "partial": True})["eval_curve"][step] = loss
    for run in runs.values():
        run["base_eval_loss"] = run["eval_curve"].get("0")
        run["eval_loss"] = run["eval_curve"][max(run["eval_curve"], key=int)]
    return runs


def log_command(log: Path) -> list[str]:
    """The overrides of the `loramill train` a log starts with (common.loramill writes the command first)."""
    command = next(line for line in log.read_text().splitlines() if line.startswith("$ "))
    return shlex.split(command)[6:]  # $ PYTHON -m pipelines.cli train CONFIG ...


def node(model: Path, model_sha256: str, dtypes: list[str], out: Path) -> None:
    from lora.files import file_sha256

    found = file_sha256(model / "model.safetensors")
    if found != model_sha256:
        raise SystemExit(f"{model}/model.safetensors has sha256 {found}, not {model_sha256}: carry the folder "
                         "again (gpu_carry.py unpack checks every file)")
    started = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    config = bench_config(model)
    jobs = {(dtype, mode): overrides(mode, dtype) for dtype in dtypes for mode in MODES}
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    out.parent.mkdir(parents=True, exist_ok=True)

    def timed(dtype: str, mode: str) -> None:
        try:
            timings[f"{dtype} {mode}"] = loramill("train", str(config), *jobs[dtype, mode],
                                                  log=out.parent / f"{dtype}-{mode}.log")
        except SystemExit as failure:  # one pair failing still leaves the others' curves to report
            failures[f"{dtype} {mode}"] = str(failure)

    with gpu_slots(SLOTS), ThreadPoolExecutor(max_workers=len(MODES)) as pool:
        for dtype in dtypes:
            for future in [pool.submit(timed, dtype, mode) for mode in MODES]:
                future.result()
    runs: dict[str, dict] = {}
    for (dtype, mode), run_overrides in jobs.items():
        if f"{dtype} {mode}" in timings:
            runs.setdefault(dtype, {})[mode] = finished_runs(config, run_overrides)
    record = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "model_sha256": found,
        "wall_minutes": (time.time() - started) / 60, "steps": STEPS, "eval_every": EVAL_EVERY,
        "commands": [{"overrides": o, "pair": f"{dtype} {mode}", "wall_s": timings.get(f"{dtype} {mode}")}
                     for (dtype, mode), o in jobs.items()],
        "failures": failures, "runs": runs,
    }
    out.write_text(json.dumps(record, indent=1))
    add_logs(out.parent, out)  # the failed runs' curves so far, and every run's restarts
    print(f"wrote {out}; failures: {failures or 'none'}")


def add_logs(log_dir: Path, record_path: Path, like: Path | None = None) -> None:
    """Complete a record from the node run's logs (``{dtype}-{mode}.log`` in ``log_dir``): a run missing from it
    (failed, or stopped by the call's time limit) gets its curve from the log's progress lines, marked partial, and
    every run gets the number of log lines reporting a CUDA out-of-memory error (a restart of the worker group, which
    resumes from the latest checkpoint; one error may be reported on more than one line). Without a record at ``record_path`` yet, one is started with the date, machine and model hash
    of ``like`` (a record of the same node session)."""
    if record_path.exists():
        record = json.loads(record_path.read_text())
    else:
        record = {key: json.loads(like.read_text())[key] for key in ("date", "machine", "model_sha256", "steps",
                                                                     "eval_every")}
        record |= {"wall_minutes": None, "commands": [], "failures": {}, "runs": {}}
    for log in sorted(log_dir.glob("*-*.log")):
        dtype, mode = log.stem.split("-")
        pair = record["runs"].setdefault(dtype, {})
        if mode not in pair:
            pair[mode] = log_curves(log)
        if f"{dtype} {mode}" not in {c["pair"] for c in record["commands"]}:
            record["commands"].append({"overrides": log_command(log), "pair": f"{dtype} {mode}", "wall_s": None})
        for run in pair[mode].values():
            run["oom_errors_in_log"] = log.read_text().count("torch.OutOfMemoryError")
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{record_path}: " + ", ".join(
        f"{dtype} {mode}" + (" (partial)" if any(r.get("partial") for r in runs.values()) else "")
        for dtype, pair in record["runs"].items() for mode, runs in pair.items()))


def relative_gap(qlora: dict, lora: dict, step: int) -> float | None:
    """(QLoRA - LoRA) / LoRA eval loss at ``step``, None where a run did not reach it (JSON keeps steps as strings)."""
    q, f = qlora["eval_curve"].get(str(step)), lora["eval_curve"].get(str(step))
    return None if q is None or f is None else (q - f) / f


def absolute_gap(qlora: dict, lora: dict, step: int) -> float:
    """QLoRA - LoRA eval loss at ``step`` (both runs reached it)."""
    return qlora["eval_curve"][str(step)] - lora["eval_curve"][str(step)]


def batch_tokens(record: dict) -> str | None:
    """The ``train.batch_tokens`` a record's runs were given, None where their commands left it unset (node runs 1
    and 2: each step then took the GPU default's budget, not about 4 examples, and did not ask the question)."""
    found = {o.split("=", 1)[1] for c in record["commands"] for o in c["overrides"]
             if o.startswith("train.batch_tokens=")}
    return ", ".join(sorted(found)) or None


def shared_steps(pair: dict) -> list[int]:
    """The evaluated steps both runs of the pair reached on every domain."""
    curves = [run["eval_curve"] for runs in pair.values() for run in runs.values()]
    return sorted(set.intersection(*(set(map(int, c)) for c in curves)))


def verdict(pair: dict) -> tuple[str, list[str]]:
    """Whether the gap closes: from the first gap step to the last step both runs reached on every domain."""
    first, last = GAP_STEPS[0], shared_steps(pair)[-1]
    if last <= first:
        return f"not measured: no domain's two runs both reached step {first}", []
    lines, closed, narrowed = [], [], []
    for name, lora in pair["none"].items():
        start, end = relative_gap(pair["nf4"][name], lora, first), relative_gap(pair["nf4"][name], lora, last)
        closed.append(abs(end) <= PARITY)
        narrowed.append(abs(end) < abs(start))
        lines.append(f"- {name}: {start:+.2%} ({absolute_gap(pair['nf4'][name], lora, first):+.4f}) at step {first} "
                     f"→ {end:+.2%} ({absolute_gap(pair['nf4'][name], lora, last):+.4f}) at step {last}: "
                     + ("narrows" if narrowed[-1] else "does not narrow") + ", "
                     + ("within" if closed[-1] else "outside") + f" ±{PARITY:.0%}")
    reach = f"step {last}" + ("" if last == STEPS else f" (the last step both runs reached on every domain; "
                                                       f"the runs were stopped before step {STEPS})")
    if all(closed):
        summary = f"yes: at {reach} QLoRA is within ±{PARITY:.0%} of LoRA on every domain"
    elif all(narrowed):
        summary = (f"no, though it narrows: smaller at {reach} than at step {first} on every domain, but outside "
                   f"±{PARITY:.0%} on {closed.count(False)} of {len(closed)}")
    else:
        summary = (f"no: from step {first} to {reach} the gap narrows on {narrowed.count(True)} of "
                   f"{len(narrowed)} domains and ends within ±{PARITY:.0%} on {closed.count(True)}")
    return summary, lines


def percent(gap: float | None) -> str:
    return "not reached" if gap is None else f"{gap:+.2%}"


def pair_section(dtype: str, pair: dict) -> list[str]:
    """The table, the gap at every evaluation, the verdict and the restarts of one dtype's LoRA/QLoRA pair."""
    summary, per_domain = verdict(pair)
    steps = shared_steps(pair)
    restarts = {mode: next(iter(runs.values())).get("oom_errors_in_log", 0) for mode, runs in pair.items()}
    oom = ("Lines reporting a CUDA out-of-memory error in each run's log (an OOM restarts the worker group, which "
           "resumes from the latest checkpoint and so changes that run's curve): "
           + ", ".join(f"{MODES[mode]} {count}" for mode, count in restarts.items()) + ".")
    if not per_domain:
        return [f"### Compute dtype {dtype}", "", f"{summary}. {oom}", ""]
    lines = [f"### Compute dtype {dtype}", "",
             "| domain | base loss (unquantized) | base loss (NF4) | last step | LoRA there | QLoRA there | "
             "QLoRA − LoRA there | " + " | ".join(f"gap at {s}" for s in GAP_STEPS) + f" | within ±{PARITY:.0%} there |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(GAP_STEPS) + "---|"]
    for name, lora in pair["none"].items():
        qlora = pair["nf4"][name]
        last = max(set(map(int, lora["eval_curve"])) & set(map(int, qlora["eval_curve"])))
        end = relative_gap(qlora, lora, last)
        lines.append(f"| {name} | {lora['base_eval_loss']:.4f} | {qlora['base_eval_loss']:.4f} | {last} | "
                     f"{lora['eval_curve'][str(last)]:.4f} | {qlora['eval_curve'][str(last)]:.4f} | "
                     f"{absolute_gap(qlora, lora, last):+.4f} | "
                     + " | ".join(percent(relative_gap(qlora, lora, s)) for s in GAP_STEPS)
                     + f" | {'yes' if abs(end) <= PARITY else 'no'} |")
    lines += ["", "Relative gap, (QLoRA − LoRA) / LoRA eval loss, at every evaluation both runs reached:", "",
              "| domain | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, lora in pair["none"].items():
        lines.append(f"| {name} | " + " | ".join(f"{relative_gap(pair['nf4'][name], lora, s):+.1%}" for s in steps)
                     + " |")
    lines += ["", "Absolute gap, QLoRA − LoRA eval loss, at the same evaluations:", "",
              "| domain | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, lora in pair["none"].items():
        lines.append(f"| {name} | " + " | ".join(f"{absolute_gap(pair['nf4'][name], lora, s):+.4f}" for s in steps)
                     + " |")
    lines += ["", ("Near the end both runs are close to zero loss on these templated domains, where a relative gap "
                   "is a ratio of two small numbers: read it with the absolute difference beside it. Each run is "
                   "one seed (0): the run-to-run spread at a step was not measured, so a difference of a few percent "
                   "between two runs is not shown to exceed it."),
              "", f"**Does the gap close?** {summary}.", "", *per_domain, "", oom, ""]
    speed = step_times(pair)
    if speed:
        lines += [speed, ""]
    return lines


def step_times(pair: dict) -> str | None:
    """Seconds a training step and tokens a second of each run (``train_seconds``: the steps alone, evaluations and
    checkpoints not counted), from runs that finished; None where one did not."""
    runs = [run for runs in pair.values() for run in runs.values()]
    if any(run.get("partial") or not run.get("train_seconds") for run in runs):
        return None

    def spread(values: list[float], form: str) -> str:
        low, high = format(min(values), form), format(max(values), form)
        return low if low == high else f"{low}-{high}"

    parts = []
    for mode in ("none", "nf4"):
        runs = pair[mode].values()
        parts.append(f"{MODES[mode]} {spread([r['train_seconds'] / r['steps'] for r in runs], '.3f')} s a step, "
                     f"{spread([r['tokens_per_second'] for r in runs], ',.0f')} tokens/s "
                     f"({spread([r['tokens_per_second'] * r['train_seconds'] / r['steps'] for r in runs], '.0f')} "
                     "real tokens a step), "
                     f"{spread([r['wall_seconds'] for r in runs], '.0f')} s wall a domain")
    return ("Speed (each domain's run: its training steps alone, from result.json; the pair's six runs at once on "
            "one GPU): " + "; ".join(parts) + ".")


def render(record_paths: list[Path]) -> None:
    from lora.files import file_sha256
    from lora.model import builtin_smollm2

    records = [json.loads(path.read_text()) for path in record_paths]
    here_sha = file_sha256(builtin_smollm2() / "model.safetensors")
    for path, record in zip(record_paths, records):
        if record["model_sha256"] != here_sha:
            raise SystemExit(f"{path}: the model sha256 {record['model_sha256']} is not this machine's {here_sha}")
    given = {path.resolve() for path in record_paths}
    unset = [path.name for path, record in zip(record_paths, records) if batch_tokens(record) is None]
    left_out = sorted(path.name for path in HERE.glob("qlora_parity_long_run*.json")
                      if path.resolve() not in given and batch_tokens(json.loads(path.read_text())) is None)
    lines = [
        "# QLoRA parity over 10x the demo's steps: NF4 + double-quant base vs unquantized base, same LoRA",
        "",
        "Generated by `bench/quality/qlora_parity_long.py render " + " ".join(str(p) for p in record_paths)
        + "` from the records its `node` command wrote on the GPU node (bench/quality/README.md has the calls). "
        f"Base weights: SmolLM2-135M-Instruct as loramill converts it, model.safetensors sha256 `{here_sha[:16]}…` "
        "(this machine's, checked on the node before training and here before rendering).",
        "",
        (f"**Does the QLoRA − LoRA gap close with {STEPS} steps (10x the demo's)?** Computed from the relative gap "
         f"at step {GAP_STEPS[0]} and at the last step both runs reached, against the ±{PARITY:.0%} parity goal:"),
        "",
    ]
    for path, record in zip(record_paths, records):
        for dtype, pair in record["runs"].items():
            if set(pair) == set(MODES):
                lines.append(f"- compute dtype {dtype} ({path.name}, `train.batch_tokens="
                             f"{batch_tokens(record) or 'unset'}`): {verdict(pair)[0]}.")
    lines.append("")
    if unset:
        lines += [
            ("**Read this first: " + ", ".join(unset) + (" does" if len(unset) == 1 else " do")
             + " not answer the issue's question.** With `cluster.use_gpu=true` and `train.batch_tokens` unset, "
             "loramill sizes each micro batch by a token budget from the GPU's free memory (up to 16,384 tokens, "
             "over a hundred of these examples), not by `micro_batch_size`. So each step there took that many "
             "examples, not the demo's 4: by step 40-60 both runs of a pair are near zero eval loss on these "
             "templated sets, and the relative gaps are ratios of small numbers. Runs that shared one GPU also each "
             "sized their budget from the same free memory, which is how node run 1 ran out of memory."), ""]
    if left_out:
        lines += [("Not rendered here: " + ", ".join(left_out) + ", made before `node` passed "
                   "`train.batch_tokens` (each step took the GPU default's token budget, over a hundred examples, "
                   "so they do not ask the question); the files stay in bench/quality/."), ""]
    lines += [
        ("configs/default.yaml (LoRA r=8, alpha=16 on all linear layers, lr 0.001 cosine with 3 "
         "warmup steps, seed 0, eval loss on the first 32 held-out examples of each domain) with "
         f"`train.max_steps={STEPS}` (the demo trains 20) and `train.eval_every={EVAL_EVERY}`; `node` passes "
         "`train.batch_tokens=512` (since run 3): each micro batch one packed row of 512 tokens, about 4 of these "
         "examples (the demo's `micro_batch_size` is 4). The two runs of a pair differ only in `quant.mode`. Relative gap = "
         f"(QLoRA − LoRA) / LoRA eval loss; the parity goal is ±{PARITY:.0%}. The cosine schedule spans the "
         f"{STEPS} steps, so step 20 here is not the demo's end of training (its learning rate is still near the "
         "peak)."),
        "",
    ]
    for path, record in zip(record_paths, records):
        wall = f", node wall {record['wall_minutes']:.1f} min" if record["wall_minutes"] else ""
        dtypes = ", ".join(record["runs"])
        lines += [(f"## {path.name}: {record['date']}, compute dtype {dtypes}, "
                   f"`train.batch_tokens={batch_tokens(record) or 'unset'}`{wall}"), "",
                  f"Machine: {record['machine']}.", ""]
        for dtype, pair in record["runs"].items():
            if set(pair) != set(MODES):
                continue
            lines += pair_section(dtype, pair)
        if record["failures"]:
            lines += ["Failed runs (the last error line of each):", ""] + [
                f"- {pair}: `{next((x for x in reversed(why.splitlines()) if 'Error' in x), why.splitlines()[0])}`"
                for pair, why in record["failures"].items()] + [""]
        partial = [f"{dtype} {mode}" for dtype, pair in record["runs"].items() for mode, runs in pair.items()
                   if any(r.get("partial") for r in runs.values())]
        if partial:
            lines += ["Curves read from the logs' progress lines (the run failed or was stopped before it wrote "
                      "its history): " + ", ".join(partial) + ".", ""]
        lines += ["Commands (wall seconds each; a pair's two runs at once on the node's first GPU):", "", "```"]
        for command in record["commands"]:
            wall = f"{command['wall_s']:.0f} s" if command["wall_s"] else "did not finish"
            lines.append(f"# {wall}: {command['pair']}")
            lines.append(shlex.join(["loramill", "train", "configs/default.yaml", *command["overrides"],
                                     "model.id=/tmp/models/smollm2-135m-instruct"]))
        lines += ["```", ""]
    lines += ["![eval loss and relative gap against step, LoRA vs QLoRA](qlora_parity_long.png)", "",
              ("The figure: every pair whose two runs share more than the base evaluation, from every record "
               "rendered here (solid float32 compute, dashed bfloat16)."), ""]
    (HERE / "qlora_parity_long.md").write_text("\n".join(lines))
    plot(records, [run_label(path) for path in record_paths], HERE / "qlora_parity_long.png")
    print((HERE / "qlora_parity_long.md").read_text())


def run_label(path: Path) -> str:
    """``run3`` for qlora_parity_long_run3.json (the record's name otherwise)."""
    return path.stem.removeprefix("qlora_parity_long_")


def plot(records: list[dict], labels: list[str], path: Path) -> None:
    """Row 1: eval loss against step per domain (solid float32 compute, dashed bf16); row 2: the relative gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = {f"{dtype}, {label}": (dtype, pair) for label, record in zip(labels, records)
             for dtype, pair in record["runs"].items() if set(pair) == set(MODES) and len(shared_steps(pair)) > 1}
    domains = list(next(iter(pairs.values()))[1]["none"])
    fig, axes = plt.subplots(2, len(domains), figsize=(4.5 * len(domains), 7), sharex=True, squeeze=False)
    styles = {"float32": "-", "bfloat16": "--"}
    colors = {"none": "tab:blue", "nf4": "tab:orange"}
    for column, name in enumerate(domains):
        loss, gap = axes[0][column], axes[1][column]
        for which, (dtype, pair) in pairs.items():
            for mode, label in MODES.items():
                curve = pair[mode][name]["eval_curve"]
                loss.plot([int(s) for s in curve], list(curve.values()), styles[dtype], color=colors[mode],
                          marker=".", label=f"{label}, {which}")
            steps = shared_steps(pair)
            gap.plot(steps, [100 * relative_gap(pair["nf4"][name], pair["none"][name], s) for s in steps],
                     styles[dtype], color="black", marker=".", label=which)
        gap.axhspan(-100 * PARITY, 100 * PARITY, color="tab:green", alpha=0.15, label=f"±{PARITY:.0%}")
        loss.set_title(name)
        loss.set_ylabel("eval loss")
        loss.set_yscale("log")
        gap.set_ylabel("(QLoRA − LoRA) / LoRA, %")
        gap.set_xlabel("step")
        loss.grid(alpha=0.3)
        gap.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, up to {STEPS} steps: QLoRA vs LoRA eval loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    on_node = commands.add_parser("node")
    on_node.add_argument("--model", type=Path, required=True, help="the carried smollm2-135m-instruct folder")
    on_node.add_argument("--model-sha256", required=True, help="this machine's: sha256sum of its model.safetensors")
    on_node.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    on_node.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE)) / "qlora_parity_long.json")
    from_logs = commands.add_parser("logs")
    from_logs.add_argument("log_dir", type=Path, help="a node run's {dtype}-{mode}.log files")
    from_logs.add_argument("--record", type=Path, required=True, help="completed in place, or started")
    from_logs.add_argument("--like", type=Path, help="a record of the same node session, to start a new one from")
    rendering = commands.add_parser("render")
    rendering.add_argument("records", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "node":
        node(args.model.resolve(), args.model_sha256, args.dtypes, args.out)
    elif args.command == "logs":
        add_logs(args.log_dir, args.record, args.like)
    else:
        render(args.records)


if __name__ == "__main__":
    main()

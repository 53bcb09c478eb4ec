"""Where a publish's seconds go (issue 21 item 2): `pipelines.publish.run_all` of finished runs, timed by stage.

Publishes the runs given with ``--run DOMAIN=RUN_DIR`` together, as `loramill run` publishes its domains (their model
work in one Ray task where they share a base), ``--repeat`` times, each time as new versions of the same runs, in
this process, with the stages of ``pipelines.publish`` wrapped by timers (bench-only instrumentation; the pipeline is
unchanged). A stage's figure is its seconds summed over the runs of a round. The model work's own parts (loading
the base, gate evaluation, audit samples) come from the ``ModelWork.seconds`` the Ray task returns. Writes a
markdown table with the command, to stdout or ``--out``.

    python bench/bench_publish.py CONFIG --run D=RUN_DIR [--run D2=RUN_DIR2 ...] [--repeat 2] [--out FILE.md]
        [key=value ...]

Run it with the cluster the config names (local Ray by default): the model work runs where a training worker of
the domain would, on a GPU when ``cluster.use_gpu``. (Before 2026-11-30 the one-run form was
``--domain D --from RUN_DIR``.)
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.registry import Registry  # noqa: E402
from lora.config import load_config  # noqa: E402
from pipelines import publish  # noqa: E402

STAGES = {  # stage label -> (owner, attribute): the driver-side steps of `publish.run`, in order
    "read run, open registry": [(publish, "read_run"), (publish, "open_registry")],
    "already published? (manifests)": [(publish, "published_as")],
    "ΔW per module": [(publish, "adapter_deltas")],
    "gate incumbent (pull)": [(publish, "gate_incumbent")],
    "model work (Ray task)": [(publish, "model_work_results")],
    "plots": [(publish.audit_docs, "plot_losses"), (publish.audit_docs, "plot_deltas")],
    "reserve version + verify parent": [(Registry, "reserve")],
    "audit documents": [(publish.audit_docs, "build_audit"), (publish.audit_docs, "render_markdown"),
                        (publish.audit_docs, "model_card")],
    "upload + verify + latest": [(Registry, "publish_reserved")],
    "gate alias, tracking": [(publish, "finish"), (publish, "record_published")],
}


def instrument(seconds: dict[str, float], work: list) -> None:
    """Wrap every stage so that its wall time adds to ``seconds[label]``; keep the model work's own record."""
    for label, targets in STAGES.items():
        for owner, name in targets:
            original = getattr(owner, name)

            @functools.wraps(original)
            def timed(*args, _original=original, _label=label, **kwargs):
                started = time.perf_counter()
                try:
                    result = _original(*args, **kwargs)
                finally:
                    seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - started
                if _label == "model work (Ray task)":
                    work.extend(result.values())
                return result

            setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--run", dest="runs", action="append", required=True, metavar="DOMAIN=RUN_DIR",
                        type=lambda text: tuple(text.split("=", 1)))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    requests = [publish.Request(cfg, domain, Path(run_dir)) for domain, run_dir in args.runs]
    rounds = []
    for _ in range(args.repeat):
        seconds: dict[str, float] = {}
        work: list[publish.ModelWork] = []
        instrument(seconds, work)
        started = time.perf_counter()
        outcomes = publish.run_all(requests, new_version=True)
        total = time.perf_counter() - started
        for owner_targets in STAGES.values():  # undo the wrapping before the next round wraps again
            for owner, name in owner_targets:
                setattr(owner, name, getattr(owner, name).__wrapped__)
        versions = ", ".join(f"{o.published.domain} v{o.published.version}" for o in outcomes)
        rounds.append((versions, total, seconds, work[0] if work else None))
    domains = ", ".join(domain for domain, _ in args.runs)
    lines = [
        f"# Publish timing: {domains}, {date.today().isoformat()}",
        "",
        f"Command: `python bench/bench_publish.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}; base `{cfg.model.id}`, "
        f"quant `{cfg.quant.mode}`, LoRA r={cfg.lora.r} on `{cfg.lora.target_modules}`, "
        f"{cfg.publish.audit_prompts} audit prompts × {cfg.publish.audit_max_new_tokens} new tokens a run; "
        f"{len(requests)} run(s) published together each round.",
        "",
        "| stage (seconds, all runs of the round) | " + " | ".join(f"round {n + 1}" for n in range(len(rounds)))
        + " |",
        "|---|" + "---:|" * len(rounds),
    ]
    for label in STAGES:
        lines.append(f"| {label} | " + " | ".join(f"{s.get(label, 0.0):.1f}" for _, _, s, _ in rounds) + " |")
    parts = sorted({part for *_, w in rounds if w for part in w.seconds})
    for part in parts:
        lines.append(f"| · in the task: {part} | "
                     + " | ".join(f"{w.seconds.get(part, 0.0):.1f}" if w else "—" for *_, w in rounds) + " |")
    lines.append("| **total** | " + " | ".join(f"**{total:.1f}**" for _, total, _, _ in rounds) + " |")
    lines.append("| **per run** | " + " | ".join(f"**{total / len(requests):.1f}**" for _, total, _, _ in rounds)
                 + " |")
    lines.append("")
    for n, (versions, _, _, w) in enumerate(rounds):
        where = f"model work on `{w.device}`, Ray node {w.node_id}, pid {w.pid}" if w and w.device else "no model work"
        lines.append(f"Round {n + 1}: {versions}; {where}.  ")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Audit documentation of a model change (EU AI Act Annex IV), built only from the run's own records.

``build_audit`` gathers the facts into one ``AuditRecord`` (``audit.json``, schema-versioned); ``render_markdown``
renders the same record for people (``audit.md``), ``model_card`` as the Hugging Face ``README.md``; ``plot_*``
draw the PNGs. Nothing is parsed back from a rendering. Nothing here contacts Ray or the store: the publish stage
passes in what it read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# Figure objects, not pyplot: pyplot keeps global state that concurrent publishes in one process would share.
from matplotlib.figure import Figure

from lora.config import Config, Domain
from lora.diff import ModuleDelta
from pipelines.records import (
    SPLITS,
    AcceptanceGate,
    AuditRecord,
    Change,
    ChangeLog,
    Check,
    Compute,
    DesignChoices,
    GateDecision,
    IntendedUse,
    LoraShape,
    ManifestMetadata,
    Modification,
    ModuleChange,
    PredeterminedChanges,
    RetrainingEnvelope,
    RunRecord,
    Sample,
    SearchRecord,
    Validation,
    ValidationMetrics,
    WeightChange,
)

REQUIRED_SECTIONS = (
    "base_model_and_modification",
    "design_choices",
    "compute",
    "data",
    "predetermined_changes",
    "validation",
    "intended_use_and_limitations",
    "change_log",
    "samples",
)
# Energy estimate: device-hours x an assumed average draw. Stated in the audit with the number used.
ASSUMED_WATTS = {"cpu_core": 10.0, "gpu": 700.0}


@dataclass(frozen=True)
class Parent:
    """The version this one follows, as its manifest describes it."""

    version: int
    metadata: ManifestMetadata | None
    """None for a version published by an older loramill, whose manifest has no typed metadata."""


def build_audit(
    *,
    cfg: Config,
    domain: Domain,
    run: RunRecord,
    version: int,
    adapter_config: dict[str, Any],
    deltas: list[ModuleDelta],
    samples: list[Sample],
    search: SearchRecord | None,
    parent: Parent | None,
    gate: GateDecision,
    checks: list[Check],
    public_config: dict[str, Any],
    data_sources: dict[str, str],
    eval_set: str,
) -> AuditRecord:
    """Every required section, filled from the run's records; ``version`` and ``parent`` are those the registry
    reserved together (``Registry.reserve``), so the change log names the parent the manifest names."""
    info = run.info
    eval_loss, base_loss = run.eval_loss, run.base_eval_loss
    device_hours = run.wall_seconds * info.hardware.workers / 3600
    watts = ASSUMED_WATTS["gpu"] if info.hardware.use_gpu else ASSUMED_WATTS["cpu_core"] * max(
        1, info.hardware.cpus_per_worker)
    ranked = sorted(deltas, key=lambda d: d.frobenius_norm, reverse=True)
    # A parent's loss on other data says nothing about this one: compare only on the same eval set.
    known = parent.metadata if parent else None
    parent_loss = known.metrics.eval_loss if known and known.metrics.eval_set == eval_set else None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return AuditRecord(
        domain=domain.name,
        prepared_as_version=version,
        generated_at=now,
        base_model_and_modification=Modification(
            base_model=info.base_model,
            task=cfg.task,
            labels=domain.labels,
            method=method_name(cfg),
            quantization=cfg.quant.model_dump() | {"effective_compute_dtype": info.compute_dtype},
            lora=LoraShape(r=adapter_config["r"], alpha=adapter_config["lora_alpha"],
                           dropout=adapter_config["lora_dropout"],
                           target_modules=sorted(adapter_config["target_modules"]))
            if cfg.lora.method == "lora" else None,
            trainable_params=run.trainable_params,
            total_params=run.total_params,
            trainable_fraction=run.trainable_params / run.total_params,
        ),
        design_choices=_design_choices(cfg, search),
        compute=Compute(
            hardware=info.hardware,
            wall_seconds=run.wall_seconds,
            train_seconds=run.train_seconds,
            device_hours=device_hours,
            energy_kwh_estimate=device_hours * watts / 1000,
            energy_method=f"device-hours x assumed {watts:g} W per device "
                          f"({'GPU board power' if info.hardware.use_gpu else 'per CPU core used'}); not metered",
        ),
        data={split: info.data[split].model_copy(update={"url": data_sources[split]}) for split in SPLITS},
        predetermined_changes=PredeterminedChanges(
            retraining_envelope=envelope(cfg, info.base_model.id, search),
            acceptance_gate=AcceptanceGate(
                alias=cfg.publish.gate_alias,
                rule=f"eval_loss <= current {cfg.publish.gate_alias} eval_loss x (1 + {cfg.publish.gate_tolerance:g})"
                     " on the same eval set (the current version is re-evaluated when the eval data changed), and "
                     "eval_loss < base eval_loss",
            ),
            schedule=domain.schedule,
        ),
        validation=Validation(
            evaluated_at=now,
            eval_set=eval_set,
            eval_examples=_evaluated_examples(cfg, info.data["eval"].examples_kept),
            metrics=ValidationMetrics(
                eval_loss=eval_loss,
                eval_perplexity=math.exp(eval_loss),
                base_eval_loss=base_loss,
                base_eval_perplexity=math.exp(base_loss),
                delta_vs_base=eval_loss - base_loss,
                parent_eval_loss=parent_loss,
                delta_vs_parent=None if parent_loss is None else eval_loss - parent_loss,
                eval_accuracy=run.eval_accuracy,
                base_eval_accuracy=run.base_eval_accuracy,
                base_measured=info.base_eval,
            ),
            checks=checks,
            gate=gate,
        ),
        intended_use_and_limitations=IntendedUse(intended_use=domain.intended_use, limitations=domain.limitations),
        change_log=ChangeLog(
            parent_version=parent.version if parent else None,
            config_changes=_dict_diff(known.config, public_config) if known else {},
            data_changes={
                split: Change(from_=known.data[split].sha256, to=info.data[split].sha256)
                for split in SPLITS if known and known.data[split].sha256 != info.data[split].sha256
            },
            metric_deltas={"eval_loss": None if parent_loss is None else eval_loss - parent_loss},
            weight_change=WeightChange(
                total_frobenius_norm=math.sqrt(sum(d.frobenius_norm**2 for d in deltas)),
                modules=[ModuleChange.model_validate(d.to_dict()) for d in deltas],
                most_changed=[d.module for d in ranked[:5]],
                **({"measures": "the low-rank update B·A·α/r only: DoRA also rescales each output row of W + B·A·α/r "
                                "to a learned magnitude, which these norms leave out"}
                   if cfg.lora.variant == "dora" else {}),
            ),
        ),
        samples=samples,
        config=public_config,
    )


def envelope(cfg: Config, base_model_id: str, search: SearchRecord | None) -> RetrainingEnvelope:
    """What a scheduled retraining may change: the swept ranges when a sweep chose the values, else the values."""
    if search is None:
        return RetrainingEnvelope(
            lora_r=(cfg.lora.r, cfg.lora.r), lora_alpha=(cfg.lora.alpha, cfg.lora.alpha),
            learning_rate=(cfg.train.learning_rate, cfg.train.learning_rate), base_model=base_model_id,
            quantization=cfg.quant.mode)
    space = search.search_space
    return RetrainingEnvelope(
        lora_r=(min(space.ranks), max(space.ranks)), lora_alpha=(min(space.alphas), max(space.alphas)),
        learning_rate=space.learning_rate, base_model=base_model_id, quantization=cfg.quant.mode)


def _evaluated_examples(cfg: Config, kept: int) -> int:
    """The held-out examples each evaluation used: ``max_eval_examples`` caps the whole set."""
    return min(kept, cfg.train.max_eval_examples) if cfg.train.max_eval_examples else kept


def method_name(cfg: Config) -> str:
    """The training method as the audit and the model card name it: the adapter kind, its variant settings, and
    the 4-bit base (``QLoRA (...)``, which the model card's tags look for)."""
    lora = cfg.lora
    if lora.method == "adapter_layers":
        name = f"Adapter layers (bottlenecks of width {lora.adapter_size} after each block's attention and MLP)"
        return name + (" on a 4-bit NF4 base" if cfg.quant.mode == "nf4" else "")
    adapters = "DoRA" if lora.variant == "dora" else "LoRA"
    inits = {"pissa": "PiSSA", "olora": "OLoRA"}
    details = [text for applies, text in [
        (lora.scaling == "rslora", "rsLoRA scaling alpha/sqrt(r)"),
        (lora.init in inits, f"{inits.get(lora.init)} initialisation, published converted to a rank-{2 * lora.r} "
                             "LoRA for the original base"),
        (lora.loraplus_ratio != 1, f"LoRA+: B's learning rate x{lora.loraplus_ratio:g}"),
    ] if applies]
    if cfg.quant.mode == "nf4":
        return f"QLoRA (4-bit NF4 base, {adapters} adapters{''.join('; ' + d for d in details)})"
    return adapters + (f" ({'; '.join(details)})" if details else "")


def _design_choices(cfg: Config, search: SearchRecord | None) -> DesignChoices:
    if search is None:
        return DesignChoices(
            selection="fixed in the config (no tuning run)",
            chosen={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "learning_rate": cfg.train.learning_rate},
        )
    return DesignChoices(selection=f"lowest {search.metric} among the trials", chosen=search.best.model_dump(),
                         search=search.search_space, trials=search.trials)


def _dict_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, Change]:
    """``{"dotted.key": Change(from, to)}`` for every leaf that differs."""
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes |= _dict_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes[f"{prefix}{key}"] = Change(from_=a, to=b)
    return changes


# ---------------------------------------------------------------------------------------------
# For people
# ---------------------------------------------------------------------------------------------


def render_markdown(audit: AuditRecord, version: int) -> str:
    base = audit.base_model_and_modification
    design, compute, val, change = audit.design_choices, audit.compute, audit.validation, audit.change_log
    lines = [
        f"# Audit: `{audit.domain}` adapter v{version}",
        "",
        f"Generated {audit.generated_at} from the training run's own records (audit.json holds the same facts).",
        "",
        "## 1. Base model and modification (Annex IV 2(a))",
        f"- Base: `{base.base_model.id}` revision `{base.base_model.revision}`, "
        f"weights sha256 `{base.base_model.weights_sha256}`",
        f"- Method: {base.method}; quantization `{base.quantization['mode']}`, double quant "
        f"{base.quantization['double_quant']}, compute dtype {base.quantization['effective_compute_dtype']}",
        f"- LoRA r={base.lora.r}, alpha={base.lora.alpha}, dropout={base.lora.dropout}, "
        f"targets: {', '.join(base.lora.target_modules)}" if base.lora else "- No LoRA: adapter layers",
        f"- Trainable parameters: {base.trainable_params:,} of {base.total_params:,} "
        f"({base.trainable_fraction:.3%})",
        "",
        "## 2. Design choices (2(b))",
        f"- Selection: {design.selection}",
        f"- Chosen: `{json.dumps(design.chosen)}`",
    ]
    if design.search:
        lines += [f"- Search space: `{design.search.model_dump_json()}`", f"- Trials run: {len(design.trials or [])}"]
    lines += [
        "",
        "## 3. Compute (2(c))",
        f"- Hardware: {compute.hardware.device}, {compute.hardware.workers} worker(s), GPU: {compute.hardware.use_gpu}",
        f"- Wall time {compute.wall_seconds:.0f} s (in optimizer steps: {compute.train_seconds:.0f} s), "
        f"{compute.device_hours:.4f} device-hours",
        f"- Energy estimate: {compute.energy_kwh_estimate:.4f} kWh — {compute.energy_method}",
        "",
        "## 4. Data (2(d))",
        "| split | source | sha256 | examples read | kept | dropped (overlong) | truncated | tokens | loss tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, d in audit.data.items():
        lines.append(
            f"| {split} | `{d.url}` | `{d.sha256[:16]}…` | {d.examples_read} | {d.examples_kept} | "
            f"{d.dropped_overlong} | {d.truncated_overlong} | {d.tokens:,} | {d.target_tokens:,} |"
        )
    changes = audit.predetermined_changes
    lines += [
        "",
        "## 5. Pre-determined changes (2(f))",
        f"- Retraining envelope: `{changes.retraining_envelope.model_dump_json()}`",
        f"- Acceptance gate (`{changes.acceptance_gate.alias}`): {changes.acceptance_gate.rule}",
        f"- Schedule: {changes.schedule or 'on demand'}",
        "",
        "## 6. Validation (2(g))",
        f"Evaluated {val.evaluated_at} on {val.eval_examples} held-out examples (eval set `{val.eval_set[:16]}…`).",
        "",
        *_metrics_table(audit),
        "",
        f"Base metrics: {val.metrics.base_measured}.",
    ]
    gate = val.gate
    lines += ["", "Checks:", *[f"- {c.name}: **{c.status}** — {c.evidence}" for c in val.checks], "",
              f"Gate decision: **{gate.decision}** — {gate.reason}", ""]
    if gate.current_eval_loss is not None:
        lines += [f"Gate compared eval loss {gate.new_eval_loss:.4f} (this adapter) with {gate.current_eval_loss:.4f} "
                  f"({gate.alias} v{gate.current_version}) on eval set `{gate.eval_set[:16]}…`: {gate.compared_on}.",
                  ""]
    lines += ["![loss curves](loss_curves.png)", "",
              "## 7. Intended use and limitations (3)",
              f"- Intended use: {audit.intended_use_and_limitations.intended_use}",
              f"- Limitations: {audit.intended_use_and_limitations.limitations}", "",
              "## 8. Change log (6)",
              f"- Parent version: {f'v{change.parent_version}' if change.parent_version else 'none (first version)'}"]
    for key, diff in change.config_changes.items():
        lines.append(f"- config `{key}`: `{diff.from_}` → `{diff.to}`")
    for split, diff in change.data_changes.items():
        lines.append(f"- {split} data changed: sha256 `{diff.from_[:16]}…` → `{diff.to[:16]}…`")
    if change.metric_deltas["eval_loss"] is not None:
        lines.append(f"- eval loss vs parent (same eval set): {change.metric_deltas['eval_loss']:+.4f}")
    elif change.parent_version:
        lines.append("- eval loss vs parent: not compared (the parent was evaluated on another eval set)")
    weights = change.weight_change
    if weights.modules:
        lines += [f"- Weight change: total ‖ΔW‖_F = {weights.total_frobenius_norm:.4f} over "
                  f"{len(weights.modules)} modules ({weights.measures})", "",
                  "| most-changed module | ‖ΔW‖_F | effective rank |", "|---|---|---|"]
        by_name = {m.module: m for m in weights.modules}
        for name in weights.most_changed:
            lines.append(f"| `{name}` | {by_name[name].frobenius_norm:.4f} | {by_name[name].effective_rank:.2f} |")
        lines += ["", "![per-layer weight change](delta_w.png)"]
    else:  # adapter layers: layers of their own, no weight of the base changes
        lines += ["- Weight change: none; adapter layers add bottleneck layers and leave every base weight as it is"]
    lines += ["", "## 9. Samples: base vs adapter", ""]
    if not audit.samples:
        lines += ["None (publish.audit_prompts is 0).", ""]
    for sample in audit.samples:
        if sample.expected is not None:  # a classifier's predictions
            lines += [f"**Text:** {sample.prompt}", "", "| true label | base | adapter |", "|---|---|---|",
                      f"| {_cell(sample.expected)} | {_cell(sample.base)} | {_cell(sample.adapter)} |", ""]
            continue
        lines += [f"**Prompt:** {sample.prompt}", "", "| base | adapter |", "|---|---|",
                  f"| {_cell(sample.base)} | {_cell(sample.adapter)} |", ""]
    return "\n".join(lines) + "\n"


def _metrics_table(audit: AuditRecord) -> list[str]:
    """base / this adapter / parent rows: loss with perplexity, or with accuracy for a classifier."""
    m, parent = audit.validation.metrics, audit.change_log.parent_version
    if m.eval_accuracy is not None:
        column, base, base_value, value = "accuracy", "base (untrained head)", f"{m.base_eval_accuracy:.2%}", \
            f"{m.eval_accuracy:.2%}"
        parent_value = "-"
    else:
        column, base, base_value, value = "perplexity", "base", f"{m.base_eval_perplexity:.2f}", \
            f"{m.eval_perplexity:.2f}"
        parent_value = "-" if m.parent_eval_loss is None else f"{math.exp(m.parent_eval_loss):.2f}"
    rows = [f"| model | eval loss | {column} |", "|---|---|---|", f"| {base} | {m.base_eval_loss:.4f} | {base_value} |",
            f"| this adapter | {m.eval_loss:.4f} | {value} |"]
    if m.parent_eval_loss is not None:
        rows.append(f"| parent v{parent} | {m.parent_eval_loss:.4f} | {parent_value} |")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def model_card(audit: AuditRecord, version: int, license_id: str = "apache-2.0") -> str:
    """Hugging Face model card: YAML front matter + a short body pointing at audit.md."""
    base = audit.base_model_and_modification
    metrics = audit.validation.metrics
    classify = base.task == "sequence_classification"
    scores = ([{"type": "loss", "value": round(metrics.eval_loss, 4)}]
              + ([{"type": "accuracy", "value": round(metrics.eval_accuracy, 4)}] if classify else
                 [{"type": "perplexity", "value": round(metrics.eval_perplexity, 3)}]))
    front = {
        "base_model": base.base_model.id,
        "library_name": "peft" if base.lora else "loramill",  # PEFT cannot load adapter layers
        "license": license_id,
        "tags": (["lora", "qlora" if "QLoRA" in base.method else "lora-fp"] if base.lora else ["adapter-layers"])
        + ["loramill", audit.domain],
        "datasets": [audit.data["train"].url, audit.data["eval"].url],
        "model-index": [{
            "name": f"{audit.domain}-v{version}",
            "results": [{
                "task": {"type": "text-classification" if classify else "text-generation"},
                "dataset": {"name": audit.data["eval"].url, "type": "jsonl"},
                "metrics": scores,
            }],
        }],
    }
    import yaml

    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {audit.domain} adapter v{version}\n\n"
        f"A {base.method} adapter for `{base.base_model.id}`"
        f"{f' (r={base.lora.r}, alpha={base.lora.alpha})' if base.lora else ''}, trained by loramill.\n\n"
        f"- Intended use: {audit.intended_use_and_limitations.intended_use}\n"
        f"- Limitations: {audit.intended_use_and_limitations.limitations}\n"
        f"- Held-out eval loss {metrics.eval_loss:.4f} (base {metrics.base_eval_loss:.4f})\n\n"
        f"{_loading_snippet(base)}\n\n"
        "What changed, on what data, and why it was or was not promoted: see [audit.md](audit.md).\n"
    )


def _loading_snippet(base: Modification) -> str:
    if base.lora is None:  # PEFT does not read adapter layers' files
        return ("Load it with loramill (adapter layers hook into the base's decoder blocks; they cannot be merged):"
                "\n\n```python\nfrom lora.generate import load_with_adapter\n"
                "model = load_with_adapter(base_model, Path(\"path/to/this/folder\"))\n```")
    return ("Load it with PEFT:\n\n```python\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(base_model, \"path/to/this/folder\")\n```")


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    ax.plot(*zip(*evals), "o-", label="eval loss (step 0 = base model)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_deltas(deltas: list[ModuleDelta], path: Path) -> None:
    """‖ΔW‖_F of every adapted module as a heat map: a row per block (``layers.N``, in order), a column per kind of
    projection. One cell per module shows at a glance where the change sits, and draws in a quarter of the time of a
    labelled bar per module (0.3-0.5 s against 2.1 s for the default model's 210 modules, on one CPU core)."""
    def block_and_kind(module: str) -> tuple[tuple[int, str], str]:
        parent, _, kind = module.rpartition(".")
        found = re.search(r"layers\.(\d+)\.", module)
        return ((int(found.group(1)), f"L{found.group(1)}") if found else (-1, parent.removeprefix("model.")), kind)

    keyed = {block_and_kind(d.module): d.frobenius_norm for d in deltas}
    cells = {(label, kind): norm for ((_, label), kind), norm in keyed.items()}
    blocks = [label for _, label in sorted({block for block, _ in keyed})]  # blocks in model order, not as text
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for (block, kind), norm in cells.items():
        grid[blocks.index(block), kinds.index(kind)] = norm
    fig = Figure(figsize=(1.6 + 0.9 * len(kinds), max(3.0, 0.16 * len(blocks) + 1.2)), dpi=100,
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    step = max(1, len(blocks) // 32)  # at most about 32 row labels stay legible
    ax.set_yticks(range(0, len(blocks), step), blocks[::step], fontsize=7)
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="‖ΔW‖_F  (ΔW = B·A·α/r)")
    fig.savefig(path)

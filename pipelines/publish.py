"""Publish stage: a finished run -> a new immutable registry version with its audit, then the promotion gate.

``run`` reads: run folder -> parent version -> ΔW and samples -> gate decision -> audit files -> publish ->
promote. The gate is decided before publishing so that the immutable audit records the decision and its numbers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.registry import ConflictError, PublishedVersion, Registry, RegistryError
from infra.store import store_up
from lora.config import Config, ConfigError, Domain, is_local_path
from lora.data import read_jsonl, redact_url, to_labelled_text, to_messages
from lora.diff import adapter_deltas
from pipelines import audit as audit_docs
from pipelines.train import HISTORY_FILE, RESULT_FILE, RUN_INFO_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    published: PublishedVersion
    gate: dict[str, Any]
    """decision (promoted / not promoted / forced), reason, and the numbers compared."""


def open_registry(cfg: Config) -> Registry:
    """The configured registry; ``embedded`` starts (or joins) the project's SeaweedFS on 127.0.0.1."""
    if cfg.publish.registry == "embedded":
        info = store_up(Path(cfg.publish.store_dir))
        return Registry(f"s3://{info.bucket}/adapters", info.storage_options())
    return Registry(cfg.publish.registry, cfg.publish.storage_options or None)


def run(cfg: Config, domain_name: str, run_dir: Path, *, force: bool = False, tune: dict | None = None) -> Outcome:
    """Publish the run in ``run_dir`` as the next version of the domain and apply the gate."""
    check_publishable(cfg)
    domain = cfg.domain(domain_name)
    result, run_info, history = _read_run(run_dir)
    registry = open_registry(cfg)
    parent_audit = _latest_audit(registry, domain.name)
    public_config = public_view(cfg, domain)
    with tempfile.TemporaryDirectory(prefix="loramill-publish-") as staging_dir:
        staging = Path(staging_dir)
        for file in (run_dir / "adapter").iterdir():
            if file.name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(file, staging / file.name)
        adapter_config = json.loads((staging / "adapter_config.json").read_text())
        deltas = adapter_deltas(staging)
        samples = sample_answers(cfg, domain, staging)
        gate = decide_gate(registry, cfg, domain.name, result, force)
        checks = [
            {"check": "data files parsed and validated (format, roles or labels, UTF-8, line size)",
             "result": "passed"},
            {"check": "trainable parameters == sum of r*(in+out) over target layers"
                      + (" + the classification head" if cfg.task == "sequence_classification" else ""),
             "result": "passed"},
            {"check": "adapter eval loss below base eval loss",
             "result": "passed" if result["eval_loss"] < result["base_eval_loss"] else "failed"},
            {"check": f"promotion gate ({cfg.publish.gate_alias})", "result": gate["decision"]},
        ]
        audit = audit_docs.build_audit(
            cfg=cfg, domain=domain, result=result, run_info=run_info, history=history,
            adapter_config=adapter_config, deltas=deltas, samples=samples, tune=tune, parent=parent_audit,
            gate=gate, checks=checks, public_config=public_config,
            data_sources={"train": public_source(domain.train), "eval": public_source(domain.eval)},
        )
        version = _next_version_hint(registry, domain.name)
        (staging / "audit.json").write_text(json.dumps(audit, indent=1))
        (staging / "audit.md").write_text(audit_docs.render_markdown(audit, version))
        (staging / "README.md").write_text(audit_docs.model_card(audit, version))
        audit_docs.plot_losses(history, staging / "loss_curves.png")
        audit_docs.plot_deltas(deltas, staging / "delta_w.png")
        published = registry.publish(domain.name, staging, manifest_metadata(cfg, result, run_info, audit))
    if published.version != version:
        # Another publisher took the number we wrote into the documents; the manifest is authoritative and
        # the audit says which version it was prepared as. Rare; say so rather than hide it.
        gate["note"] = f"documents were prepared as v{version}; published as v{published.version}"
    if gate["decision"] in ("promoted", "forced"):
        try:
            registry.promote(domain.name, published.version, cfg.publish.gate_alias,
                             expected=gate["current_version"], record={"gate": gate, "by": "loramill publish"})
        except ConflictError:
            gate |= {"decision": "not promoted", "reason": f"{cfg.publish.gate_alias} moved while publishing; re-run "
                     f"`loramill promote {domain.name} v{published.version}`"}
    return Outcome(published, gate)


def check_publishable(cfg: Config) -> None:
    """The registry holds adapters: a run of ``lora.method`` last_layers or full (trained base weights) is refused."""
    if cfg.lora.method != "lora":
        raise ConfigError([f"lora.method: a {cfg.lora.method} run changes the base's own weights; the registry "
                           "publishes LoRA adapters only (lora.method=lora). Its weights stay in the run folder"])


def _read_run(run_dir: Path) -> tuple[dict, dict, list]:
    missing = [f for f in (RESULT_FILE, RUN_INFO_FILE, HISTORY_FILE, "adapter/adapter_model.safetensors")
               if not (run_dir / f).is_file()]
    if missing:
        raise RegistryError(f"{run_dir} is not a finished loramill run (missing {', '.join(missing)}); "
                            "pass the folder `loramill train` printed")
    return tuple(json.loads((run_dir / f).read_text()) for f in (RESULT_FILE, RUN_INFO_FILE, HISTORY_FILE))


def _latest_audit(registry: Registry, domain: str) -> dict[str, Any] | None:
    versions = registry.versions(domain)
    if not versions:
        return None
    with tempfile.TemporaryDirectory() as directory:
        pulled = registry.pull(domain, versions[-1], Path(directory) / "parent")
        audit = json.loads((pulled / "audit.json").read_text()) if (pulled / "audit.json").exists() else None
    if audit is not None:
        audit["version"] = versions[-1]
    return audit


def _next_version_hint(registry: Registry, domain: str) -> int:
    versions = registry.versions(domain)
    return versions[-1] + 1 if versions else 1


def decide_gate(registry: Registry, cfg: Config, domain: str, result: dict[str, Any], force: bool) -> dict[str, Any]:
    """Promote only if better than base, and not worse than the current gate alias by more than the tolerance."""
    alias = cfg.publish.gate_alias
    current = registry.alias(domain, alias)
    current_loss = registry.manifest(domain, current.version).metadata["metrics"]["eval_loss"] if current else None
    numbers = {"alias": alias, "current_version": current.version if current else None,
               "current_eval_loss": current_loss, "new_eval_loss": result["eval_loss"],
               "base_eval_loss": result["base_eval_loss"], "tolerance": cfg.publish.gate_tolerance}
    limit = None if current_loss is None else current_loss * (1 + cfg.publish.gate_tolerance)
    if result["eval_loss"] >= result["base_eval_loss"]:
        decision, reason = "not promoted", "eval loss is not below the base model's"
    elif limit is not None and result["eval_loss"] > limit:
        decision, reason = "not promoted", f"eval loss {result['eval_loss']:.4f} > {alias} v{current.version}'s " \
                                            f"{current_loss:.4f} x (1 + {cfg.publish.gate_tolerance:g})"
    elif limit is None:
        decision, reason = "promoted", f"no current {alias}; eval loss below base"
    else:
        decision, reason = "promoted", f"eval loss {result['eval_loss']:.4f} <= {limit:.4f} (tolerance)"
    if force and decision == "not promoted":
        decision, reason = "forced", f"--force overrode the gate ({reason})"
    return numbers | {"decision": decision, "reason": reason}


def sample_answers(cfg: Config, domain: Domain, adapter_dir: Path) -> list[dict[str, str]]:
    """The first ``audit_prompts`` held-out user prompts, answered by the base and by the adapter (for a
    classifier: the first held-out texts, with their true label and the labels base and adapter predict)."""
    if cfg.publish.audit_prompts == 0:
        return []
    from lora.generate import classify_side_by_side, load_with_adapter, side_by_side
    from lora.model import dispatch_backend, load_base_model, load_tokenizer, resolve_model_dir

    classify = cfg.task == "sequence_classification"
    prompts = []
    for line_number, record in read_jsonl(domain.eval, domain.storage_options, hashlib.sha256()):
        where = f"{domain.eval}:{line_number}"
        if classify:
            text, label = to_labelled_text(record, where, domain.labels)
            prompts.append((text, domain.labels[label]))
        else:
            _, messages = to_messages(record, where)
            prompts.append(next(m["content"] for m in reversed(messages) if m["role"] == "user"))
        if len(prompts) == cfg.publish.audit_prompts:
            break
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_dir = resolve_model_dir(cfg.model)
    backend = dispatch_backend(cfg.quant, use_gpu=False)
    tokenizer = load_tokenizer(cfg.model, model_dir, chat=not classify)
    torch.manual_seed(cfg.train.seed)  # the base's new classification head: initialised as in training
    base = load_base_model(model_dir, cfg.model, cfg.quant, backend, domain.labels, tokenizer.pad_token_id)
    model = load_with_adapter(base, adapter_dir)
    if classify:
        return classify_side_by_side(model, tokenizer, prompts, cfg.train.max_seq_len)
    return side_by_side(model, tokenizer, prompts, cfg.publish.audit_max_new_tokens)


def public_source(url: str) -> str:
    """A data location fit to publish: no credentials, and no absolute path of this machine."""
    if not is_local_path(url):
        return redact_url(url)
    path = Path(url).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return path.name


def public_view(cfg: Config, domain: Domain) -> dict[str, Any]:
    """The config as published: one domain, relative data paths, no storage options or local folders."""
    view = cfg.model_dump(exclude={"domains": True, "cluster": {"storage_url", "output_dir", "storage_options",
                                                                "address"},
                                   "publish": {"storage_options", "store_dir", "registry"}})
    if is_local_path(cfg.model.id) or cfg.model.id.startswith("file://"):
        view["model"]["id"] = public_source(cfg.model.id.removeprefix("file://"))
    view["domain"] = domain.model_dump(exclude={"storage_options"}) | {
        "train": public_source(domain.train), "eval": public_source(domain.eval)}
    return view


def manifest_metadata(cfg: Config, result: dict, run_info: dict, audit: dict) -> dict[str, Any]:
    config = audit["config"]
    return {
        "base_model": run_info["base_model"],
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "data": {split: {"url": audit["data"][split]["url"], "sha256": run_info["data"][split]["sha256"]}
                 for split in ("train", "eval")},
        "metrics": {"eval_loss": result["eval_loss"], "base_eval_loss": result["base_eval_loss"],
                    "steps": result["steps"]}
                   | ({"eval_accuracy": result["eval_accuracy"], "base_eval_accuracy": result["base_eval_accuracy"]}
                      if result.get("eval_accuracy") is not None else {}),
        "run_name": result["run_name"],
        "loramill_version": importlib.metadata.version("loramill"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None

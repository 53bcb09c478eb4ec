"""Use stage: published adapters -> answers (``loramill generate``) or a merged model folder (``loramill export``).

``generate`` reads: resolve each ref -> fetch it verified (cache or registry) -> check it was trained on the
config's base -> load the base once with every adapter -> answer each prompt per domain (and by the base).
``export`` reads: fetch -> check base -> merge into an unquantized base, measuring the cost -> write the folder
and its manifest in a temp folder next to the target -> re-verify -> rename into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from rich.text import Text

from infra.registry import MANIFEST, IntegrityError, Manifest, Registry, RegistryError, folder_matches_manifest
from lora.config import Config, ConfigError, Quantization
from lora.files import file_sha256
from lora.model import cache_dir, logical_model_id, resolve_model_dir, weights_sha256
from pipelines.records import TrainedOn
from pipelines.registry_access import open_registry

EXPORT_SCHEMA = 1
BASE = "base"
"""The column/key of the base model's answers in ``Answers.rows``."""


def default_cache_root() -> Path:
    """``$LORAMILL_CACHE/adapters`` (default ``~/.cache/loramill/adapters``): pulled versions, by domain and version."""
    return cache_dir() / "adapters"


@dataclass(frozen=True)
class Fetched:
    """One adapter version on local disk, verified against its manifest."""

    domain: str
    version: int
    ref: str | None
    path: Path
    manifest: Manifest
    source: str
    """Where the files came from: ``cache``, ``registry``, or ``registry (cache did not match)``."""

    @property
    def name(self) -> str:
        """The PEFT adapter name: unique even when two versions of one domain are loaded together."""
        return f"{self.domain}_v{self.version}"

    @property
    def label(self) -> str:
        return f"{self.domain} v{self.version}"


@dataclass
class Answers:
    base_model: str
    adapters: list[Fetched]
    rows: list[dict[str, str]] = field(default_factory=list)
    """Per prompt: {"prompt", "base"?, adapter name: answer, ...}."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def generate(
    cfg: Config,
    refs: list[tuple[str, str | None]],
    prompts: list[str],
    *,
    compare: bool = False,
    max_new_tokens: int = 128,
    cache_root: Path | None = None,
) -> Answers:
    """Answer every prompt with every adapter in ``refs`` ((domain, ref) pairs), all on one base model.

    Raises RegistryError for an unknown domain/version/alias (IntegrityError if a download does not verify) and
    ConfigError if an adapter was trained on another base than the config's model.
    """
    from lora.generate import generate as answer
    from lora.model import dispatch_backend, load_base_model, load_tokenizer
    from lora.serve import load_adapters, use_adapter

    if cfg.task != "causal_lm":
        raise ConfigError([f"task: {cfg.task} adapters classify, they do not generate; load them with "
                           "lora.generate.predict_labels (the audit shows sample predictions)"])
    registry = open_registry(cfg)
    fetched = [fetch(registry, domain, ref, cache_root or default_cache_root()) for domain, ref in refs]
    model_dir = resolve_model_dir(cfg.model)
    for adapter in fetched:
        check_base(cfg, model_dir, adapter)
    _quiet_transformers()
    backend = dispatch_backend(cfg.quant, use_gpu=torch.cuda.is_available())
    base = load_base_model(model_dir, cfg.model, cfg.quant, backend)
    base.config.use_cache = True
    model = load_adapters(base, {adapter.name: adapter.path for adapter in fetched})
    tokenizer = load_tokenizer(cfg.model, model_dir)
    answers = Answers(base_model=logical_model_id(cfg.model), adapters=fetched)
    for prompt in prompts:
        row = {"prompt": prompt}
        for name in ([None] if compare else []) + [adapter.name for adapter in fetched]:
            with use_adapter(model, name):
                row[name or BASE] = answer(model, tokenizer, prompt, max_new_tokens)
        answers.rows.append(row)
    return answers


def export(
    cfg: Config,
    domain: str,
    ref: str | None,
    to: Path,
    *,
    dtype: torch.dtype | None = None,
    cache_root: Path | None = None,
) -> ExportResult:
    """Write ``to``: the base with the adapter merged in (safetensors, config, tokenizer) and ``manifest.json``.

    The folder appears complete or not at all (written next to ``to``, renamed at the end). Raises
    RegistryError if ``to`` exists (nothing is touched) or the version does not, ConfigError on a base mismatch.
    """
    from lora.model import load_tokenizer
    from lora.serve import merge, refuse_merging_adapter_layers

    to = Path(to).absolute()
    _refuse_existing(to)
    registry = open_registry(cfg)
    adapter = fetch(registry, domain, ref, cache_root or default_cache_root())
    refuse_merging_adapter_layers(adapter.path)  # before the base is loaded: nothing of it could be used
    model_dir = resolve_model_dir(cfg.model)
    base_model = check_base(cfg, model_dir, adapter)
    _quiet_transformers()
    tokenizer = load_tokenizer(cfg.model, model_dir)
    quant, quant_source = trained_quant(cfg, adapter)
    use_gpu = torch.cuda.is_available()
    merged, costs = merge(model_dir, cfg.model, quant, adapter.path, tokenizer, dtype=dtype, use_gpu=use_gpu)
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".partial", dir=to.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _clean_config(staging)
        _default_permissions(staging)
        manifest = export_manifest(staging, base_model, registry, adapter, costs.to_dict() | {
            "trained_quant": quant.model_dump() | {"from": quant_source}})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        verify_export(staging)
        _refuse_existing(to)
        os.rename(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(to, manifest)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def fetch(registry: Registry, domain: str, ref: str | None, cache_root: Path) -> Fetched:
    """The version ``ref`` names, as a verified local folder ``<cache_root>/<domain>/v<N>``.

    A cached copy is used only if its files are exactly the manifest's, each with the manifest's size and sha256
    (re-read from the registry on every call); otherwise it is replaced by a fresh ``Registry.pull``, which
    verifies every file before the folder appears.
    """
    version = registry.resolve(domain, ref)  # validates the name: the cache path cannot leave cache_root
    manifest = registry.manifest(domain, version)
    folder = Path(cache_root) / domain / f"v{version}"
    source = "registry"
    if folder.exists():
        if folder_matches_manifest(folder, manifest):
            return Fetched(domain, version, ref, folder, manifest, "cache")
        _remove(folder)
        source = "registry (cache did not match)"
    try:
        registry.pull(domain, version, folder)
    except RegistryError:
        # Another process may have pulled the same version into the cache a moment ago.
        if not (folder.exists() and folder_matches_manifest(folder, manifest)):
            raise
    return Fetched(domain, version, ref, folder, manifest, source)


def check_base(cfg: Config, model_dir: Path | str, adapter: Fetched) -> dict[str, Any]:
    """The config's base model ({id, revision, weights_sha256}); ConfigError if the adapter names another.

    Ids are compared always, weight hashes when both sides know theirs, revisions only when a hash is missing
    (the same weights may be named by a tag and by a commit).
    """
    config_base = {"id": logical_model_id(cfg.model), "revision": cfg.model.revision,
                   "weights_sha256": weights_sha256(model_dir)}
    recorded = TrainedOn.of(adapter.manifest).base_model
    if recorded is not None:
        published = recorded.model_dump()
    else:
        adapter_config = json.loads((adapter.path / "adapter_config.json").read_text())
        published = {"id": adapter_config.get("base_model_name_or_path"), "revision": None, "weights_sha256": None}
    hashes = (published.get("weights_sha256"), config_base["weights_sha256"])
    revisions = (published.get("revision"), config_base["revision"])
    if published["id"] != config_base["id"]:
        differs = "model id"
    elif None not in hashes and hashes[0] != hashes[1]:
        differs = "weights sha256"
    elif None in hashes and None not in revisions and revisions[0] != revisions[1]:
        differs = "revision"
    else:
        return config_base
    raise ConfigError([
        f"model: {adapter.label} was trained on {_describe_base(published)}, but the config's model is "
        f"{_describe_base(config_base)} ({differs} differs): set model.id (and model.logical_id) to the adapter's "
        f"base, or use an adapter trained on {config_base['id']}"
    ])


def trained_quant(cfg: Config, adapter: Fetched) -> tuple[Quantization, str]:
    """How the adapter's base was loaded in training: as its manifest records it, else the config's."""
    recorded = TrainedOn.of(adapter.manifest).quant
    return (recorded, "manifest") if recorded is not None else (cfg.quant, "config")


def export_manifest(folder: Path, base_model: dict[str, Any], registry: Registry, adapter: Fetched,
                    merge_costs: dict[str, Any]) -> dict[str, Any]:
    """What ``manifest.json`` of an export holds: every file's sha256 and size, both sources, the merge costs."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return {
        "schema": EXPORT_SCHEMA,
        "kind": "merged-model",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": base_model,
        "adapter": {
            "domain": adapter.domain,
            "version": adapter.version,
            "ref": adapter.ref,
            "registry": registry.url,
            # The registry stores manifest.json as Manifest.to_json(): this is the stored file's sha256.
            "manifest_sha256": hashlib.sha256(adapter.manifest.to_json()).hexdigest(),
        },
        "merge_costs": merge_costs,
        "files": files,
    }


def verify_export(folder: Path) -> dict[str, Any]:
    """Re-hash an export folder against its manifest.json; IntegrityError names the first file that differs."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    present = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()} - {MANIFEST}
    if present != manifest["files"].keys():
        raise IntegrityError(f"{folder}: files {sorted(present ^ manifest['files'].keys())} are missing or extra")
    for name, entry in manifest["files"].items():
        path = Path(folder) / name
        if path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{folder}: {name} does not match manifest.json (changed after export)")
    return manifest


def answers_table(answers: Answers) -> Table:
    """Prompt, base answer (with --compare), then one column per adapter. Cells are plain text, not markup."""
    table = Table(title=f"loramill generate on {answers.base_model}", title_justify="left", show_lines=True)
    columns = [("prompt", "prompt")]
    if answers.rows and BASE in answers.rows[0]:
        columns.append((BASE, "base model"))
    columns += [(adapter.name, f"{adapter.label} ({adapter.source})") for adapter in answers.adapters]
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in answers.rows:
        table.add_row(*(Text(row[key]) for key, _ in columns))
    return table


def merge_cost_lines(manifest: dict[str, Any]) -> list[str]:
    """The export's measured differences, one comparison a line, for the terminal."""
    costs = manifest["merge_costs"]
    lines = [f"logits on {costs['probe_prompts']} fixed prompts ({costs['probe_tokens']} positions): "
             "max |Δ|, mean |Δ|, same top-1 token"]
    labels = {"merged_vs_unmerged": f"merged vs base + adapter unmerged ({costs['dtype']})",
              "merged_vs_as_trained": "merged vs 4-bit base + adapter, as trained",
              "base_vs_4bit_base": "for scale: full base vs 4-bit base, no adapter"}
    for key, label in labels.items():
        found = costs[key]
        lines.append(f"  {label:<48} " + ("n/a (trained without 4-bit)" if found is None else
                     f"{found['max_abs']:.2e}  {found['mean_abs']:.2e}  {found['top1_agreement']:.1%}"))
    return lines


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _refuse_existing(to: Path) -> None:
    if to.exists() or to.is_symlink():
        raise RegistryError(f"{to} already exists: export never overwrites; pass a new folder or remove it")


def _clean_config(folder: Path) -> None:
    """config.json as a serving stack should read it: no local path of this machine."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.pop("_name_or_path", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _default_permissions(folder: Path) -> None:
    """The modes a plain mkdir/open would give: mkdtemp makes the folder 0700 and safetensors its file 0600,
    which a serving process running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _describe_base(base: dict[str, Any]) -> str:
    parts = [str(base.get("id"))]
    if base.get("revision"):
        parts.append(f"revision {base['revision']}")
    parts.append(f"weights sha256 {base['weights_sha256'][:12]}…" if base.get("weights_sha256")
                 else "weights sha256 unknown")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def _remove(folder: Path) -> None:
    """Move aside, then delete: a reader never sees a half-deleted version folder under its real name."""
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.stale")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

"""Publish stage: a finished run -> a new immutable registry version with its audit, then the promotion gate.

``run`` reads: run record -> the version this very run was already published as, if any -> ΔW -> the model work
(audit samples, the gate's evaluation) as a Ray task with a training worker's resources -> gate decision (on one eval
set) -> the version number reserved together with its parent (the newest earlier version that
passes verification; its manifest) -> the audit record and its renderings -> publish with typed manifest metadata ->
promote. The gate is decided before publishing so that the immutable audit records the decision and its numbers.

Exactly once, as the user sees it: the version exists from its manifest on, so what fails after that point (the
re-verification, moving ``latest``, the promotion) is a warning on a published version, never a failed publish. A
retry of the same publish finds the version by the run's fingerprint and finishes those steps instead of publishing
the run a second time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
from pydantic import ValidationError

from infra.registry import (
    ConflictError,
    IntegrityError,
    Manifest,
    PublishedVersion,
    Registry,
    RegistryError,
    Reservation,
)
from lora.config import Config, ConfigError, Domain, is_local_path
from lora.data import read_jsonl, to_labelled_text, to_messages
from lora import bottleneck
from lora.diff import ModuleDelta, adapter_deltas
from lora.errors import DataError
from lora.files import file_sha256
from lora.redact import drop_storage_options, redact_url
from lora.train import HISTORY_FILE
from pipelines import audit as audit_docs
from pipelines.audit import Parent
from pipelines.cluster import added, check_fit, fits, worker_resources
from pipelines.gate import Candidate, Incumbent, decide, stored_incumbent
from pipelines.records import (
    RESULT_FILE,
    SPLITS,
    AuditRecord,
    Check,
    DataFingerprint,
    GateDecision,
    ManifestMetadata,
    Metrics,
    RunRecord,
    Sample,
    SearchRecord,
    TrainedOn,
    eval_set_fingerprint,
)
from pipelines.ray_session import ensure_ray
from pipelines.registry_access import open_registry
from pipelines.tracking import record_published

REPO_ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_FILE_SETS = (ADAPTER_FILES, bottleneck.FILES)
"""What loading an adapter needs, config first: a PEFT adapter's files, or adapter layers' (``lora.bottleneck``)."""


@dataclass
class Outcome:
    published: PublishedVersion
    gate: GateDecision
    already_published: bool = False
    """The run was published before (same ``RunFingerprint``): ``published`` is that version; nothing new was
    written."""
    warnings: list[str] = field(default_factory=list)
    """What did not happen after the commit point, each with its fix; the version exists all the same."""
    model_work: ModelWork | None = None
    """What this publish's model work measured, and where and when it ran; None for a run published before."""


@dataclass(frozen=True)
class RunFingerprint:
    """What makes two publishes the same run: the run's name (its config and data, and the start time of a forced
    fresh run, so a forced retraining is a new version even when its weights come out bit-identical), the adapter's
    bytes, the published config and the data bytes."""

    run_name: str
    adapter_sha256: tuple[str, ...]
    """Of ``adapter_file_names``, in that order."""
    config_sha256: str
    data_sha256: tuple[str, ...]
    """Of ``SPLITS``, in that order."""


@dataclass(frozen=True)
class Request:
    """A finished run to publish as the next version of its domain."""

    cfg: Config
    """The config the run was trained with (with a sweep's chosen values, for a tuned run)."""
    domain: str
    run_dir: Path
    search: SearchRecord | None = None
    """The Tune search that chose the run's values, for the audit."""


@dataclass
class Staged:
    """A run made ready for its model work: its files in a staging folder, its ΔW and the gate's incumbent."""

    request: Request
    domain: Domain
    record: RunRecord
    history: list[dict[str, float]]
    registry: Registry
    public_config: dict[str, Any]
    eval_set: str
    staging: Path
    adapter_config: dict[str, Any]
    deltas: list[ModuleDelta]
    incumbent: Incumbent | None
    current: Path | None
    """The incumbent's adapter, pulled to be evaluated on this run's eval set; None when it needs no measuring."""


def run(cfg: Config, domain_name: str, run_dir: Path, *, force: bool = False, search: SearchRecord | None = None,
        new_version: bool = False) -> Outcome:
    """Publish the run in ``run_dir`` as the next version of the domain and apply the gate (``run_all`` of one)."""
    return run_all([Request(cfg, domain_name, run_dir, search)], force=force, new_version=new_version)[0]


def run_all(requests: list[Request], *, force: bool = False, new_version: bool = False) -> list[Outcome]:
    """Publish each requested run as the next version of its domain and apply the gate; outcomes in that order
    (``Publishing`` with every run added at once: runs that share a base share one Ray task, one load of it and
    one batch of audit samples).

    Nothing is published unless every run's model work succeeded. A run already published (same
    ``RunFingerprint``) is not published again: its version is returned, with the steps after its commit point
    finished (verify, move ``latest``, the promotion its gate decided), unless ``new_version``.
    """
    for request in requests:
        check_publishable(request.cfg)
    with Publishing(force=force, new_version=new_version) as publishing:
        for request in requests:
            publishing.add(request)
        return publishing.finish()


@dataclass(frozen=True)
class PublishedBefore:
    """A run that is already a version of its domain (``published_as``): publishing it settles that version."""

    registry: Registry
    manifest: Manifest


@dataclass(frozen=True)
class ModelWorkTask:
    """A started ``model_work_task``: the positions of its runs in ``Publishing.entries`` and what it reserved."""

    positions: list[int]
    need: dict[str, float]
    ref: Any


class Publishing:
    """Runs published together, added as they are ready: ``add`` stages a run and starts the model work (audit
    samples, the gate's evaluation) of the runs staged so far when the cluster has room for it, so that it can run
    while other domains still train; ``finish`` waits for all of it and only then writes versions to the registry,
    in the order the runs were added. Nothing is written to the registry before ``finish``, and nothing at all
    unless every run's model work succeeded. Use it as a context manager: its staging folders live until exit."""

    def __init__(self, *, force: bool = False, new_version: bool = False) -> None:
        self.force, self.new_version = force, new_version
        self.folders = contextlib.ExitStack()
        self.entries: list[Staged | PublishedBefore] = []
        self.unstarted: list[int] = []
        """Positions in ``entries`` of staged runs whose model work has not started."""
        self.tasks: list[ModelWorkTask] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A publish that failed leaves no model work behind: it waits for the tasks still running (their results
        # are dropped) instead of cancelling them. Ray 2.60 aborts the driver when a cancel races the reply of a
        # task that is finishing ("Check failed: it != submissible_tasks_.end()" in TaskManager::CompletePendingTask),
        # as it did in CI when the task whose error `ray.get` had just raised was cancelled.
        if self.tasks:
            ray.wait([task.ref for task in self.tasks], num_returns=len(self.tasks))
        self.folders.close()

    def add(self, request: Request, spare: dict[str, float] | None = None) -> None:
        """Stage ``request``'s run, then start the model work of the staged runs that fits in ``spare``: the
        cluster resources nothing else claims now (None: none, it starts in ``finish``)."""
        entry = stage(request, self.folders, self.new_version)
        if isinstance(entry, Staged) and has_model_work(entry):
            self.unstarted.append(len(self.entries))
        self.entries.append(entry)
        if spare is not None:
            self.start_model_work(spare)

    def start_model_work(self, spare: dict[str, float] | None) -> None:
        """One task for each base among the runs whose model work has not started (``same_base``), started when
        it fits in ``spare`` next to this publishing's tasks still running (always, when ``spare`` is None)."""
        groups: dict[str, list[int]] = {}
        for n in self.unstarted:
            groups.setdefault(same_base(self.entries[n]), []).append(n)
        refs = [task.ref for task in self.tasks]
        finished = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        in_use: dict[str, float] = {}
        for task in self.tasks:
            if task.ref not in finished:
                in_use = added(in_use, task.need)
        for positions in groups.values():
            runs = [self.entries[n] for n in positions]
            need = worker_resources(runs[0].request.cfg, runs[0].domain)
            if spare is None or fits(need, in_use, spare):
                self.tasks.append(ModelWorkTask(positions, need, start_model_work_task(runs, need)))
                in_use = added(in_use, need)
                self.unstarted = [n for n in self.unstarted if n not in positions]

    def finish(self) -> list[Outcome]:
        """Start the model work not started yet, wait for all of it, then publish every run (or settle the version
        it was published as before); outcomes in the order the runs were added. Raises what ``model_work`` raised
        (``DataError``, ``BackendError``, ...), as it raised it, before anything is written."""
        self.start_model_work(None)
        works = model_work_results(self.tasks)
        return [settle_again(entry.registry, entry.manifest, self.force) if isinstance(entry, PublishedBefore)
                else complete(entry, works.get(n, ModelWork([], None)), self.force)
                for n, entry in enumerate(self.entries)]


def stage(request: Request, folders: contextlib.ExitStack, new_version: bool) -> Staged | PublishedBefore:
    """Everything a publish does before its model work, in temporary folders that ``folders`` removes; writes
    nothing to the registry. For a run that was published before (unless ``new_version``), that version."""
    cfg = request.cfg
    domain = cfg.domain(request.domain)
    record, history = read_run(request.run_dir)
    registry = open_registry(cfg)
    public_config = public_view(cfg, domain)
    if not new_version:
        earlier = published_as(registry, domain.name, fingerprint_of_run(record, request.run_dir, public_config))
        if earlier is not None:
            return PublishedBefore(registry, earlier)
    eval_set = eval_set_fingerprint(record.info.data["eval"].sha256, cfg.train)
    staging = Path(folders.enter_context(tempfile.TemporaryDirectory(prefix="loramill-publish-")))
    gate_dir = Path(folders.enter_context(tempfile.TemporaryDirectory(prefix="loramill-gate-")))
    names = adapter_file_names(request.run_dir / "adapter")
    for name in names:
        shutil.copy2(request.run_dir / "adapter" / name, staging / name)
    deltas = [] if bottleneck.is_adapter_layers(staging) else adapter_deltas(staging)  # layers change no W
    incumbent, current = gate_incumbent(registry, cfg, domain.name, record, eval_set, gate_dir / "current")
    return Staged(request, domain, record, history, registry, public_config, eval_set, staging,
                  json.loads((staging / names[0]).read_text()), deltas, incumbent, current)


def complete(staged: Staged, work: ModelWork, force: bool) -> Outcome:
    """Everything a publish does after its model work: the gate, the plots, the version reserved with its parent,
    the audit, the upload, the promotion."""
    cfg, domain, record, registry, staging = staged.request.cfg, staged.domain, staged.record, staged.registry, \
        staged.staging
    gate_decision = apply_gate(cfg, record, staged.eval_set, staged.incumbent, work.losses, force)
    audit_docs.plot_losses(staged.history, staging / "loss_curves.png")
    if staged.deltas:
        audit_docs.plot_deltas(staged.deltas, staging / "delta_w.png")
    # The version number and its parent are decided together, once the slow work is done and before any document
    # names either: the audit, its change log and the manifest all state this one decision.
    reservation = registry.reserve(domain.name)
    checks = [*record.info.checks, below_base_check(record, staged.eval_set), gate_check(gate_decision),
              samples_check(cfg, work), parent_check(reservation)]
    audit = audit_docs.build_audit(
        cfg=cfg, domain=domain, run=record, version=reservation.version, adapter_config=staged.adapter_config,
        deltas=staged.deltas, samples=work.samples, search=staged.request.search,
        parent=parent_of(registry, reservation), gate=gate_decision, checks=checks,
        public_config=staged.public_config, eval_set=staged.eval_set,
        data_sources={"train": public_source(domain.train), "eval": public_source(domain.eval)},
    )
    (staging / "audit.json").write_text(audit.to_json())
    (staging / "audit.md").write_text(audit_docs.render_markdown(audit, reservation.version))
    (staging / "README.md").write_text(audit_docs.model_card(audit, reservation.version))
    metadata = manifest_metadata(cfg, record, audit)
    published = registry.publish_reserved(reservation, staging, metadata.model_dump(mode="json"))
    outcome = finish(registry, published, gate_decision)
    outcome.warnings += record_published(cfg, record.run_name, published.version, published.url)
    outcome.model_work = work
    return outcome


def finish(registry: Registry, published: PublishedVersion, gate_decision: GateDecision, *,
           already_published: bool = False) -> Outcome:
    """After the commit point: move the gate alias as ``gate_decision`` says, and turn what could not be done
    into warnings with their fix; raises nothing the store does (the version exists)."""
    where = f"{published.domain} v{published.version}"
    warnings = []
    if published.unverified is not None:
        warnings.append(f"could not re-verify: {published.unverified}. The version exists; publish the same run "
                        f"again once the store answers: it returns {where} and finishes verifying it and moving "
                        "`latest`")
    promote = gate_decision.decision in ("promoted", "forced")
    if promote and not (already_published and moved_there(registry, published, gate_decision)):
        forced = " --force" if gate_decision.decision == "forced" else ""
        retry = f"re-run `loramill promote {published.domain} v{published.version}{forced}`"
        try:
            registry.promote(published.domain, published.version, gate_decision.alias,
                             expected=gate_decision.current_version,
                             record={"gate": gate_decision.model_dump(mode="json"), "by": "loramill publish"})
        except ConflictError:
            gate_decision = gate_decision.model_copy(update={
                "decision": "not promoted", "reason": f"{gate_decision.alias} moved while publishing; {retry}"})
        except RegistryError as error:
            gate_decision = gate_decision.model_copy(update={
                "decision": "not promoted", "reason": f"the gate passed ({gate_decision.reason}) but "
                f"{gate_decision.alias} could not be moved; {retry} or publish the same run again"})
            warnings.append(f"could not move {gate_decision.alias}: {error}")
    return Outcome(published, gate_decision, already_published, warnings)


def moved_there(registry: Registry, published: PublishedVersion, gate_decision: GateDecision) -> bool:
    """True if the gate alias was ever moved to this version (by the publish now retried, or since): its history
    answers. An alias that cannot be read is taken as not moved; the promotion then says why."""
    try:
        state = registry.alias(published.domain, gate_decision.alias)
    except RegistryError:
        return False
    return state is not None and any(entry.get("to") == published.version for entry in state.history)


# ---------------------------------------------------------------------------------------------
# The same run, published once
# ---------------------------------------------------------------------------------------------


def fingerprint_of_run(record: RunRecord, run_dir: Path, public_config: dict[str, Any]) -> RunFingerprint:
    return RunFingerprint(
        run_name=record.run_name,
        adapter_sha256=tuple(file_sha256(run_dir / "adapter" / name)
                             for name in adapter_file_names(run_dir / "adapter")),
        config_sha256=config_sha256(public_config),
        data_sha256=tuple(record.info.data[split].sha256 for split in SPLITS),
    )


def fingerprint_of_version(manifest: Manifest) -> RunFingerprint | None:
    """The fingerprint of the run a version was published from; None for one without loramill's metadata."""
    try:
        metadata = ManifestMetadata.of(manifest)
    except RegistryError:
        return None
    names = next((names for names in ADAPTER_FILE_SETS if all(name in manifest.files for name in names)), None)
    if names is None:
        return None
    return RunFingerprint(
        run_name=metadata.run_name,
        adapter_sha256=tuple(manifest.files[name].sha256 for name in names),
        config_sha256=metadata.config_sha256,
        data_sha256=tuple(metadata.data[split].sha256 for split in SPLITS),
    )


def published_as(registry: Registry, domain: str, fingerprint: RunFingerprint) -> Manifest | None:
    """The manifest of the newest version published from the run ``fingerprint`` describes, or None. A version
    whose manifest is malformed is not that run (``loramill pull`` and ``verify`` report it)."""
    for version in reversed(registry.versions(domain)):
        try:
            manifest = registry.manifest(domain, version)
        except IntegrityError:
            continue
        if fingerprint_of_version(manifest) == fingerprint:
            return manifest
    return None


def settle_again(registry: Registry, manifest: Manifest, force: bool) -> Outcome:
    """A run published before: its version, with what an interrupted first publish left undone finished. Its gate
    was decided then and is in its audit; ``force`` does not decide it again."""
    decided = ManifestMetadata.of(manifest).gate
    override = f"; `loramill promote {manifest.domain} v{manifest.version} --force` overrides it" \
        if force and decided.decision == "not promoted" else ""
    gate_decision = decided.model_copy(update={
        "reason": f"{decided.reason} (decided when v{manifest.version} was published{override})"})
    return finish(registry, registry.settle(manifest), gate_decision, already_published=True)


def check_publishable(cfg: Config) -> None:
    """The registry holds adapters (LoRA, or adapter layers): a run of ``lora.method`` last_layers or full (trained
    base weights) is refused."""
    if cfg.lora.method not in ("lora", "adapter_layers"):
        raise ConfigError([f"lora.method: a {cfg.lora.method} run changes the base's own weights; the registry "
                           "publishes adapters only (lora.method=lora or adapter_layers). Its weights stay in the run "
                           "folder"])


def read_run(run_dir: Path) -> tuple[RunRecord, list[dict[str, float]]]:
    """The run's record and its history; ``RegistryError`` if ``run_dir`` is not a finished loramill run."""
    adapter = [f"adapter/{name}" for name in adapter_file_names(run_dir / "adapter")]
    missing = [f for f in (RESULT_FILE, HISTORY_FILE, *adapter) if not (run_dir / f).is_file()]
    if missing:
        raise RegistryError(f"{run_dir} is not a finished loramill run (missing {', '.join(missing)}); "
                            "pass the folder `loramill train` printed")
    try:
        record = RunRecord.load(run_dir)
    except ValidationError as error:
        raise RegistryError(f"{run_dir / RESULT_FILE} is not a run record of this loramill ({error.error_count()} "
                            f"problem(s), first: {error.errors()[0]['loc']} {error.errors()[0]['msg']}); train it "
                            "again with `loramill train`") from None
    return record, json.loads((run_dir / HISTORY_FILE).read_text())


def parent_of(registry: Registry, reservation: Reservation) -> Parent | None:
    """The parent ``reservation`` decided, with the facts its manifest holds (none of its files are downloaded)."""
    if reservation.parent_version is None:
        return None
    return Parent(reservation.parent_version,
                  metadata_or_none(registry, reservation.domain, reservation.parent_version))


def metadata_or_none(registry: Registry, domain: str, version: int) -> ManifestMetadata | None:
    """A version's typed metadata, or None for one published by an older loramill (its facts are not read)."""
    try:
        return ManifestMetadata.of(registry.manifest(domain, version))
    except RegistryError:
        return None


# ---------------------------------------------------------------------------------------------
# The gate, on losses measured on the same eval set
# ---------------------------------------------------------------------------------------------


def gate_incumbent(registry: Registry, cfg: Config, domain: str, record: RunRecord, eval_set: str,
                   dest: Path) -> tuple[Incumbent | None, Path | None]:
    """The gate alias's current version (None if unset) and, when its stored loss is on other data, its adapter
    pulled to ``dest`` to be measured on this run's eval set. No adapter, and the incumbent says why, when it was
    trained on another base or quantization or fails verification: then the losses do not compare."""
    incumbent = stored_incumbent(registry, domain, cfg.publish.gate_alias, eval_set)
    if incumbent is None or incumbent.eval_loss is not None:
        return incumbent, None
    other_base = trained_elsewhere(registry.manifest(domain, incumbent.version), record, cfg)
    if other_base:  # its adapter does not load on this base as it was trained: nothing to measure
        return Incumbent(incumbent.version, None, f"{incumbent.compared_on}; {other_base}"), None
    try:
        return incumbent, registry.pull(domain, incumbent.version, dest)
    except IntegrityError as error:  # not measured, not fatal: a tampered version must not block new versions
        return Incumbent(incumbent.version, None, f"{incumbent.compared_on}; it fails verification, so it was not "
                                                  f"evaluated here: {error}"), None


def apply_gate(cfg: Config, record: RunRecord, eval_set: str, incumbent: Incumbent | None,
               losses: dict[str | None, float] | None, force: bool) -> GateDecision:
    """Decide the gate on a like-for-like pair: the stored losses when the alias's version was evaluated on this
    run's eval set, else ``losses``, both adapters and the base measured at this publish on this run's eval set."""
    candidate = Candidate(record.eval_loss, record.base_eval_loss, eval_set)
    if incumbent is not None and losses is not None:
        candidate = Candidate(losses["candidate"], losses[None], eval_set)
        incumbent = Incumbent(incumbent.version, losses["current"],
                              f"both adapters and the base evaluated at this publish on this run's eval set "
                              f"({incumbent.compared_on})")
    return decide(cfg.publish.gate_alias, cfg.publish.gate_tolerance, candidate, incumbent, force)


def trained_elsewhere(manifest: Manifest, record: RunRecord, cfg: Config) -> str | None:
    """Why the version of ``manifest`` was not trained on this run's base and quantization, or None if it was."""
    trained = TrainedOn.of(manifest)
    ours = record.info.base_model
    if trained.base_model is None or trained.quant is None:
        return f"v{manifest.version} does not record the base and quantization it was trained on"
    theirs = trained.base_model
    weights_differ = None not in (theirs.weights_sha256, ours.weights_sha256) \
        and theirs.weights_sha256 != ours.weights_sha256
    if theirs.id != ours.id or weights_differ:
        return f"v{manifest.version} was trained on another base ({theirs.id}, weights {theirs.weights_sha256})"
    if trained.quant.mode != cfg.quant.mode:
        return f"v{manifest.version} was trained with quant.mode={trained.quant.mode}, this run with {cfg.quant.mode}"
    return None


@dataclass(frozen=True)
class ModelWork:
    """What publishing's model work measured for one run, and where it ran."""

    samples: list[Sample]
    losses: dict[str | None, float] | None
    """Eval losses of the base (key None), ``candidate`` and ``current``; None when no ``current`` was measured."""
    device: str | None = None
    """Where the base was loaded (``cpu``, ``cuda:0``); None when there was no model work."""
    node_id: str | None = None
    """The Ray node of the task that did it."""
    pid: int | None = None
    """The process of that task."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each part of the task (``load``: tokenizer, base and adapters; ``gate_eval``; ``samples``)."""
    shared_with: tuple[str, ...] = ()
    """The other domains whose model work was done in the same task, on the same load of the base."""
    started_at: float | None = None
    """When the task began (seconds since the epoch): model work may run while other domains still train."""


@dataclass(frozen=True)
class WorkItem:
    """One run's part of a model-work task."""

    cfg: Config
    domain: Domain
    record: RunRecord
    candidate: Path
    current: Path | None


def has_model_work(staged: Staged) -> bool:
    """Audit samples to answer, or an incumbent to evaluate on the run's eval set."""
    return bool(staged.request.cfg.publish.audit_prompts) or staged.current is not None


def start_model_work_task(runs: list[Staged], need: dict[str, float]) -> Any:
    """``model_work`` of runs that share a base (``same_base``) as one Ray task with ``need``, the resources of one
    of the domain's training workers (a GPU when ``cluster.use_gpu``), so that the driver, often a small CPU-only
    head, never loads the base. Ray is started or joined here, as only model work needs it. ``ConfigError`` when no
    node can hold such a worker."""
    cfg, domain = runs[0].request.cfg, runs[0].domain
    ensure_ray(cfg)
    check_fit(cfg, [domain])
    need = dict(need)
    task = model_work_task.options(num_cpus=need.pop("CPU"), num_gpus=need.pop("GPU", 0), resources=need)
    # The adapters travel as bytes instead of the task being pinned to this node: on a cluster with a CPU-only
    # head the driver's node cannot hold a GPU worker, and the adapter folders are this process's temporary
    # folders. An 8B r=16 all-linear adapter is 168 MB, copied once through Ray's object store. The base and
    # the eval files are read where the task runs, as a training worker of the domain reads them.
    return task.remote([
        {"cfg": s.request.cfg.model_dump(), "domain": s.domain.name, "record": s.record,
         "adapters": {"candidate": adapter_files(s.staging)} | (
             {"current": adapter_files(s.current)} if s.current else {})}
        for s in runs])


def model_work_results(tasks: list[ModelWorkTask]) -> dict[int, ModelWork]:
    """Each task's ``ModelWork`` by the position of its run; raises what ``model_work`` raised, as it raised it."""
    works = {}
    try:
        for task in tasks:
            works.update(zip(task.positions, ray.get(task.ref), strict=True))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Exception):  # as pipelines/train.py: the error itself, not Ray's remote traceback
            raise error.cause from None
        raise
    return works


def same_base(staged: Staged) -> str:
    """Runs of equal keys can share a model-work task: the same base, quantization, worker and answer length. A
    classifier's head is its own domain's."""
    cfg = staged.request.cfg
    key = {"model": cfg.model.model_dump(), "quant": cfg.quant.model_dump(), "task": cfg.task,
           "worker": worker_resources(cfg, staged.domain), "max_new_tokens": cfg.publish.audit_max_new_tokens}
    if cfg.task == "sequence_classification":
        key["domain"] = staged.domain.name
    return json.dumps(key, sort_keys=True, default=str)


@ray.remote
def model_work_task(orders: list[dict[str, Any]]) -> list[ModelWork]:
    """``model_work`` where Ray placed it, on the adapters' files written to a temporary folder there."""
    started_at = time.time()
    import torch

    with tempfile.TemporaryDirectory(prefix="loramill-model-work-") as folder:
        items = []
        for n, order in enumerate(orders):
            cfg = Config.model_validate(order["cfg"])
            written = {}
            for role, files in order["adapters"].items():
                written[role] = Path(folder) / f"{n}-{role}"
                written[role].mkdir()
                for file_name, data in files.items():
                    (written[role] / file_name).write_bytes(data)
            items.append(WorkItem(cfg, cfg.domain(order["domain"]), order["record"], written["candidate"],
                                  written.get("current")))
        torch.set_num_threads(max(1, int(items[0].cfg.cluster.cpus_per_worker)))  # the CPUs reserved, as a worker
        works = model_work(items)
    here = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "started_at": started_at}
    return [replace(work, **here) for work in works]


def adapter_file_names(folder: Path) -> tuple[str, ...]:
    """The files of ``ADAPTER_FILE_SETS`` that ``folder`` is made of: adapter layers' if it holds their config, else
    PEFT's (also for a folder that holds neither: that is what a reader will find missing)."""
    return bottleneck.FILES if bottleneck.is_adapter_layers(folder) else ADAPTER_FILES


def adapter_files(folder: Path) -> dict[str, bytes]:
    """The bytes of an adapter folder's ``adapter_file_names``: all that loading it needs."""
    return {name: (folder / name).read_bytes() for name in adapter_file_names(folder)}


def model_work(items: list[WorkItem]) -> list[ModelWork]:
    """All of publishing's model work for runs that share a base (``same_base``), on one load of it, here: for each
    run, the audit samples (held-out prompts answered by the base and by its ``candidate`` adapter, every run's in
    one batch) and, with ``current``, the eval losses of the base (key None), ``candidate`` and ``current`` on the
    run's held-out set, with the examples, cap and batch size training used. ``DataError`` if an eval file changed
    since its run was trained."""
    prompts = [held_out_prompts(item.cfg, item.domain) for item in items]
    if not any(prompts) and all(item.current is None for item in items):
        return [ModelWork([], None) for _ in items]
    import torch
    import transformers

    from lora.generate import classify_side_by_side, side_by_side
    from lora.model import dispatch_backend, load_base_model, load_tokenizer, resolve_model_dir
    from lora.serve import load_adapters, use_adapter
    from lora.train import evaluate

    transformers.utils.logging.disable_progress_bar()
    cfg = items[0].cfg  # the base, quantization and task: the same for every run here
    classify = cfg.task == "sequence_classification"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    backend = dispatch_backend(cfg.quant, use_gpu=cfg.cluster.use_gpu)
    tokenizer = load_tokenizer(cfg.model, model_dir, chat=not classify)
    examples = [eval_examples(item.cfg, item.domain, item.record, tokenizer) if item.current else None
                for item in items]  # a changed file fails before the base is loaded
    torch.manual_seed(cfg.train.seed)  # a classifier's new head: initialised as in training
    base = load_base_model(model_dir, cfg.model, cfg.quant, backend, items[0].domain.labels, tokenizer.pad_token_id)
    adapters = {}
    for n, item in enumerate(items):
        adapters[f"candidate{n}"] = item.candidate
        if item.current:
            adapters[f"current{n}"] = item.current
    model = load_adapters(dequantized_for_cpu(base, backend), adapters)
    seconds["load"] = time.perf_counter() - started
    losses: list[dict[str | None, float] | None] = []
    started = time.perf_counter()
    for n, item in enumerate(items):
        if examples[n] is None:
            losses.append(None)
            continue
        measured: dict[str | None, float] = {}
        for key, name in ((None, None), ("candidate", f"candidate{n}"), ("current", f"current{n}")):
            with use_adapter(model, name):
                measured[key] = evaluate(model, examples[n], item.cfg.train.micro_batch_size,
                                         tokenizer.pad_token_id, backend.device)["eval_loss"]
        losses.append(measured)
    if any(examples):
        seconds["gate_eval"] = time.perf_counter() - started
    started = time.perf_counter()
    if classify:
        answers = {}
        for n, item in enumerate(items):
            with use_adapter(model, f"candidate{n}"):
                answers[f"candidate{n}"] = classify_side_by_side(model, tokenizer, prompts[n],
                                                                 item.cfg.train.max_seq_len)
    else:
        answers = side_by_side(model, tokenizer, {f"candidate{n}": p for n, p in enumerate(prompts) if p},
                               cfg.publish.audit_max_new_tokens)
    if any(prompts):
        seconds["samples"] = time.perf_counter() - started
    return [ModelWork([Sample.model_validate(answer) for answer in answers.get(f"candidate{n}", [])], losses[n],
                      str(backend.device), seconds=seconds,
                      shared_with=tuple(other.domain.name for other in items if other is not item))
            for n, item in enumerate(items)]


def dequantized_for_cpu(base: Any, backend: Any) -> Any:
    """A 4-bit base on a CPU, dequantized once to the compute dtype when that fits in half the free memory; else
    ``base`` as it is. bitsandbytes' CPU path dequantizes every weight in every forward pass, which dominates
    token-by-token decoding: dequantized once, the same weights give the same answers (the bundled domains' audit
    samples, compared) in two thirds of the time."""
    import psutil
    from transformers.utils import logging as transformers_logging

    if not backend.four_bit or backend.device.type != "cpu":
        return base
    size = base.num_parameters() * backend.compute_dtype.itemsize  # counts 4-bit weights unpacked
    if size > psutil.virtual_memory().available / 2:
        return base
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its warning "the modules are dequantized in float32" is the intent
    try:
        return base.dequantize(dtype=backend.compute_dtype)
    finally:
        transformers_logging.set_verbosity(verbosity)


def eval_examples(cfg: Config, domain: Domain, record: RunRecord, tokenizer: Any) -> list[Any]:
    """The run's held-out examples as training evaluated them; ``DataError`` if the file holds other bytes now."""
    from lora.data import load_examples, load_labelled_examples

    train = cfg.train
    if cfg.task == "sequence_classification":
        examples, stats = load_labelled_examples(domain.eval, domain.storage_options, tokenizer, train.max_seq_len,
                                                 train.overlong, domain.labels)
    else:
        examples, stats = load_examples(domain.eval, domain.storage_options, tokenizer, train.max_seq_len,
                                        train.overlong)
    if stats.sha256 != record.info.data["eval"].sha256:
        raise DataError(f"{redact_url(domain.eval)} changed since run {record.run_name} was trained on it; train "
                        "again before publishing, so that the audit describes the data the adapter was evaluated on")
    return examples[: train.max_eval_examples] if train.max_eval_examples else examples


# ---------------------------------------------------------------------------------------------
# Checks the audit states, each with its evidence
# ---------------------------------------------------------------------------------------------


def below_base_check(record: RunRecord, eval_set: str) -> Check:
    examples = record.info.data["eval"].examples_kept
    return Check(name="adapter eval loss below base eval loss",
                 status="passed" if record.eval_loss < record.base_eval_loss else "failed",
                 evidence=f"{record.eval_loss:.4f} vs base {record.base_eval_loss:.4f}, measured in training on "
                          f"eval set {eval_set[:12]} (from {examples} kept held-out examples)")


def gate_check(gate_decision: GateDecision) -> Check:
    status = "failed" if gate_decision.decision == "not promoted" else "passed"
    compared = "" if gate_decision.current_eval_loss is None else \
        f"; {gate_decision.new_eval_loss:.4f} vs {gate_decision.alias} v{gate_decision.current_version}'s " \
        f"{gate_decision.current_eval_loss:.4f} ({gate_decision.compared_on})"
    return Check(name=f"promotion gate ({gate_decision.alias})", status=status,
                 evidence=f"{gate_decision.decision}: {gate_decision.reason}{compared}")


def samples_check(cfg: Config, work: ModelWork) -> Check:
    name = "held-out prompts answered by base and adapter side by side"
    if not work.samples:
        return Check(name=name, status="not run", evidence="publish.audit_prompts is 0")
    shared = f", one load of the base and one batch with {', '.join(work.shared_with)}" if work.shared_with else ""
    return Check(name=name, status="passed", evidence=f"{len(work.samples)} prompts, greedy, on {work.device} in a "
                                                      f"Ray task on node {work.node_id}{shared} (section 9)")


def parent_check(reservation: Reservation) -> Check:
    """The parent the change log compares with was verified on the store; newer versions that failed were skipped
    (the check then fails: a published version was altered, and readers of the audit must see it)."""
    skipped = "; ".join(f"v{s.version} skipped: {s.reason}" for s in reservation.skipped_parents)
    if reservation.parent_version is None:
        evidence = f"no earlier version passed ({skipped})" if skipped else "the domain's first version"
    else:
        evidence = (f"parent v{reservation.parent_version}: every file re-hashed on the store matched its manifest "
                    f"when v{reservation.version} was reserved" + (f"; {skipped}" if skipped else ""))
    status = "failed" if skipped else "not run" if reservation.parent_version is None else "passed"
    return Check(name="earlier versions verified on the store", status=status, evidence=evidence)


def held_out_prompts(cfg: Config, domain: Domain) -> list[Any]:
    """The first ``audit_prompts`` held-out user prompts (for a classifier: the first held-out texts, each with its
    true label)."""
    if cfg.publish.audit_prompts == 0:
        return []
    classify = cfg.task == "sequence_classification"
    prompts: list[Any] = []
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
    return prompts


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
    view = drop_storage_options(cfg.model_dump(exclude={"domains": True,
                                                        "cluster": {"storage_url", "output_dir", "address"},
                                                        "publish": {"store_dir", "registry"}}))
    if is_local_path(cfg.model.id) or cfg.model.id.startswith("file://"):
        view["model"]["id"] = public_source(cfg.model.id.removeprefix("file://"))
    view["domain"] = drop_storage_options(domain.model_dump()) | {
        "train": public_source(domain.train), "eval": public_source(domain.eval)}
    return view


def manifest_metadata(cfg: Config, record: RunRecord, audit: AuditRecord) -> ManifestMetadata:
    """The facts later stages read from the manifest, taken from the audit so that both say the same."""
    validation = audit.validation
    return ManifestMetadata(
        task=cfg.task,
        base_model=record.info.base_model,
        quant=cfg.quant.model_dump(),
        config=audit.config,
        config_sha256=config_sha256(audit.config),
        data={split: DataFingerprint(url=audit.data[split].url, sha256=audit.data[split].sha256) for split in SPLITS},
        metrics=Metrics(eval_loss=record.eval_loss, base_eval_loss=record.base_eval_loss, steps=record.steps,
                        eval_set=validation.eval_set, eval_examples=validation.eval_examples,
                        eval_accuracy=record.eval_accuracy, base_eval_accuracy=record.base_eval_accuracy),
        envelope=audit.predetermined_changes.retraining_envelope,
        checks=validation.checks,
        gate=validation.gate,
        run_name=record.run_name,
        loramill_version=loramill_version(),
        git_commit=_git_commit(),
    )


def config_sha256(public_config: dict[str, Any]) -> str:
    """The published config's fingerprint, as the manifest records it."""
    return hashlib.sha256(json.dumps(public_config, sort_keys=True).encode()).hexdigest()


def loramill_version() -> str:
    """The installed loramill's version; from the source tree's pyproject.toml when it runs uninstalled (on
    ``PYTHONPATH``, as on a node that only has the checkout), which the version then says."""
    try:
        return importlib.metadata.version("loramill")
    except importlib.metadata.PackageNotFoundError:
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
        return f"{project['version']} (source tree, not installed)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None

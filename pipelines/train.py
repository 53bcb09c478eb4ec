"""Train stage: one Ray Train ``TorchTrainer`` per domain (DDP across its workers), domains concurrently.

``run`` is the stage: ``preflight`` (data, fingerprints, model cache, resources) -> one ``fit_domain`` Ray task per
domain, started as the cluster can hold its workers -> the run records. ``fit_domain`` drives one domain's run (a
Ray task, so that domains run side by side); the worker side is ``pipelines.train_worker``, the resources
``pipelines.cluster``, names and folders ``pipelines.run_folder``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lora.config import Config, Domain
from lora.model import check_bitsandbytes, resolve_model_dir
from pipelines.cluster import added, check_fit, domain_need, fits, storage, worker_resources
from pipelines.errors import TrainingFailed
from pipelines.progress import Display, shown_here
from pipelines.ray_session import ensure_ray, on_this_node
from pipelines.records import RunRecord
from pipelines.run_folder import collect_output, data_fingerprint, run_name
from pipelines.tracking import Tracking
from pipelines.train_worker import train_worker


def build_trainer(cfg: Config, domain: Domain, name: str, *, display: Display, tracking: Tracking,
                  callbacks: list | None = None) -> TorchTrainer:
    storage_path, filesystem = storage(cfg)
    resources = worker_resources(cfg, domain)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(), "domain": domain.name, "display": display, "tracking": tracking},
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
            # No "Attempting to start training worker group" or "Reporting training result" per report: the
            # progress display says how the run goes; warnings still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


# It reserves nothing: the trainer's workers reserve the domain's resources, and ``run`` counts only theirs when it
# offers what training leaves free to other work.
@ray.remote(num_cpus=0)
def fit_domain(cfg_dict: dict[str, Any], domain_name: str, data_sha256: dict[str, str],
               fresh: str | None, display: Display, tracking: Tracking) -> dict[str, Any]:
    """Fit one domain's TorchTrainer and copy its final checkpoint into the local output folder."""
    cfg = Config.model_validate(cfg_dict)
    domain = cfg.domain(domain_name)
    name = run_name(cfg, domain, data_sha256, fresh)
    started = time.time()
    result = build_trainer(cfg, domain, name, display=display, tracking=tracking.named(domain.name, name)).fit()
    return collect_output(cfg, domain, name, data_sha256, result.checkpoint, time.time() - started)


def preflight(cfg: Config, domains: list[Domain]) -> dict[str, dict[str, str]]:
    """Refuse what cannot run before any Ray work starts: data, bitsandbytes, GPUs, worker sizes. Returns each
    domain's data fingerprint (``data_fingerprint``)."""
    fingerprints = {domain.name: data_fingerprint(domain) for domain in domains}
    if cfg.quant.mode == "nf4":
        check_bitsandbytes(load=False)
    resolve_model_dir(cfg.model)  # fill the model cache here, once, rather than in every worker at once
    ensure_ray(cfg)
    check_fit(cfg, domains)
    return fingerprints


def select_domains(cfg: Config, names: list[str] | None) -> list[Domain]:
    return [cfg.domain(n) for n in names] if names else list(cfg.domains)


def run(cfg: Config, domain_names: list[str] | None = None, domain_configs: dict[str, Config] | None = None,
        *, fresh: bool = False,
        on_finished: Callable[[RunRecord, dict[str, float] | None], None] | None = None) -> list[RunRecord]:
    """Train every selected domain (concurrently as resources allow); results as they lie in ``output_dir``.

    ``domain_configs`` replaces ``cfg`` for the domains it names (e.g. with their tuned LoRA values). A run with
    the same config and data as an earlier one resumes it (a finished one trains no step); ``fresh`` starts new
    runs whatever exists. ``on_finished(record, spare)`` is called as each domain's run finishes, with the cluster
    resources that training leaves free from then on, or None while domains still wait for them: publishing starts
    its model work there, while the last domains train. What it raises stops the training still running.
    """
    domains = select_domains(cfg, domain_names)
    tracking = Tracking.open(cfg)  # before Ray starts: a wrong tracking.mlflow_uri fails in seconds
    fingerprints = preflight(cfg, domains)
    started_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") if fresh else None
    configs = {d.name: (domain_configs or {}).get(d.name, cfg) for d in domains}
    # Pinned to the driver's node: fit_domain writes output_dir there, and the driver reads it locally.
    driver_node = on_this_node()
    # Start a domain only when the cluster can hold its workers next to those already running: Ray Train gives a
    # worker group RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S to get its resources, and a domain queued behind
    # long runs would use up its restarts waiting.
    capacity = ray.cluster_resources()
    waiting, pending, in_use, results = list(domains), {}, {}, []
    with shown_here() as display:  # off a terminal: the runs' progress lines, printed here

        def start_what_fits() -> None:
            nonlocal in_use
            while waiting and (not pending
                               or fits(domain_need(configs[waiting[0].name], waiting[0]), in_use, capacity)):
                domain = waiting.pop(0)
                need = domain_need(configs[domain.name], domain)
                ref = fit_domain.options(scheduling_strategy=driver_node).remote(
                    configs[domain.name].model_dump(), domain.name, fingerprints[domain.name], started_at, display,
                    tracking)
                pending[ref] = (domain.name, need)
                in_use = added(in_use, need)

        start_what_fits()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name, need = pending.pop(done[0])
            in_use = {k: v - need.get(k, 0) for k, v in in_use.items()}
            try:
                output = ray.get(done[0])
                results.append(RunRecord.load(Path(output["output_dir"])))
                start_what_fits()
                if on_finished is not None:
                    on_finished(results[-1], None if waiting else
                                {k: v - in_use.get(k, 0) for k, v in capacity.items()})
            except BaseException as error:
                for other in pending:
                    ray.cancel(other)
                if not isinstance(error, ray.exceptions.RayTaskError):
                    raise
                if isinstance(error.cause, TrainingFailed):
                    raise error.cause from None
                raise TrainingFailed(
                    f"domain {name!r}: training failed after {cfg.cluster.max_failures} restart(s): {error.cause}"
                ) from None
    return sorted(results, key=lambda r: [d.name for d in domains].index(r.domain))

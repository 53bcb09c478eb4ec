"""Tune stage: a Ray Tune sweep per domain (``pipelines.sweep``), side by side as the cluster holds them.

``run`` reads: refuse what ASHA cannot schedule (``plan_schedule``) -> ``preflight`` (data, fingerprints, model
cache) -> refuse to start over an existing sweep without ``--resume`` -> trials at once per domain from the
cluster's resources -> one ``sweep_domain`` Ray task per domain, pinned to the driver's node -> the sweeps' results.
``best_config`` applies a sweep's best trial to the config (``loramill train --from-tune``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
from ray.tune import Tuner

from lora.config import Config, ConfigError, Domain
from lora.data import check_file
from pipelines.cluster import node_offers, storage, worker_resources
from pipelines.errors import TrainingFailed
from pipelines.progress import shown_here
from pipelines.ray_session import on_this_node
from pipelines.run_folder import run_name
from pipelines.tracking import Tracking
from pipelines.sweep import (
    BEST_FILE,
    TRIAL_DRIVER_CPU,
    BestTrial,
    Schedule,
    SweepResult,
    sweep_domain,
    sweep_runtime_env,
    tune_dir,
)
from pipelines.train import preflight, select_domains

log = logging.getLogger(__name__)


def experiment_name(cfg: Config, domain: Domain, data_sha256: dict[str, str]) -> str:
    """Same config, data bytes (``data_sha256``, from ``preflight``) and search space -> same name -> ``--resume``
    finds the sweep. The concurrency cap is left out: resuming on a bigger or smaller cluster is the same sweep."""
    identity = {"run": run_name(cfg, domain, data_sha256),
                "tune": cfg.tune.model_dump(exclude={"max_concurrent_trials"})}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{domain.name}-{digest}"


def experiment_path(cfg: Config, domain: Domain, data_sha256: dict[str, str]) -> tuple[str, Any]:
    """(``<storage>/tune/<domain>-<hash>``, pyarrow filesystem or None)."""
    storage_path, filesystem = storage(cfg)
    return f"{storage_path.rstrip('/')}/tune/{experiment_name(cfg, domain, data_sha256)}", filesystem


def plan_schedule(cfg: Config, domain: Domain) -> Schedule:
    """Refuse a schedule under which ASHA cannot compare trials; warn where it could never stop one."""
    steps = cfg.train.max_steps or _most_steps(cfg, domain)
    if cfg.train.eval_every >= steps:
        raise ConfigError([
            f"train.eval_every: {cfg.train.eval_every} leaves no evaluation before the last of the {steps} steps a "
            f"{domain.name} trial runs, so ASHA could never compare trials mid-run; lower train.eval_every "
            f"(e.g. {max(1, steps // 4)}) or raise train.max_steps"
        ])
    grace_steps = cfg.tune.grace_evals * cfg.train.eval_every
    warnings = []
    if grace_steps >= steps:
        warnings.append(
            f"tune.grace_evals: {cfg.tune.grace_evals} evaluation(s) = {grace_steps} steps is not below the {steps} "
            f"steps of a {domain.name} trial, so ASHA can stop no trial; lower tune.grace_evals to stop weak ones"
        )
    return Schedule(steps=steps, grace_steps=min(grace_steps, steps), warnings=warnings)


def _most_steps(cfg: Config, domain: Domain) -> int:
    """At most ``total_steps`` of an epochs-based run, counting raw examples (overlong ones are dropped only later);
    a packed micro batch (``train.batch_tokens``) holds at least one example a row."""
    examples = check_file(domain.train, domain.storage_options, domain.labels)
    t = cfg.train
    per_micro_batch = t.batch_tokens // t.max_seq_len if t.batch_tokens else t.micro_batch_size
    batches = examples // cfg.cluster.workers_per_domain // per_micro_batch
    return max(1, math.floor(batches * cfg.train.epochs / cfg.train.grad_accum))


def trials_at_once(cfg: Config, domain: Domain, nodes: list[dict[str, float]]) -> int:
    """How many of the domain's trials ``nodes`` hold at once: ``workers_per_domain`` workers a trial, each with
    the train stage's worker resources on one node, plus ``TRIAL_DRIVER_CPU`` for a trial that drives several."""
    c = cfg.cluster
    need = worker_resources(cfg, domain)
    workers = sum(min(math.floor(node.get(k, 0) / amount + 1e-9) for k, amount in need.items()) for node in nodes)
    trials = workers // c.workers_per_domain
    if c.workers_per_domain > 1:
        cpus = sum(node.get("CPU", 0) for node in nodes)
        trials = min(trials, math.floor(cpus / (c.workers_per_domain * c.cpus_per_worker + TRIAL_DRIVER_CPU)))
    return trials


def trials_per_domain(cfg: Config, domains: list[Domain]) -> dict[str, int]:
    """Trials at once per domain: ``tune.max_concurrent_trials``, else the cluster's share for each domain swept
    side by side. ``ConfigError`` when a trial can never be placed or the cap asks for more than ever fits; with
    an autoscaler (node types beyond the alive nodes) what ever fits is unknown, so the cap is trusted."""
    c = cfg.cluster
    alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    autoscaling = len(node_offers()) > len(alive)
    cap = cfg.tune.max_concurrent_trials
    held = ", ".join(f"{key} {value:g}" for key, value in sorted(ray.cluster_resources().items())
                     if not key.startswith("node:") and "memory" not in key)
    per_domain, problems = {}, []
    for domain in domains:
        fits = trials_at_once(cfg, domain, alive)
        need = f"{c.workers_per_domain} x {worker_resources(cfg, domain)}"
        if c.workers_per_domain > 1:
            need += f" + {TRIAL_DRIVER_CPU} CPU to drive them"
        if fits == 0 and not autoscaling:
            problems.append(f"cluster: a {domain.name} trial needs {need}; this cluster ({held}) cannot hold one; "
                            "lower cluster.cpus_per_worker or cluster.workers_per_domain")
        elif cap is not None and cap > fits and not autoscaling:
            problems.append(f"tune.max_concurrent_trials: {cap} {domain.name} trials at once need {cap} x ({need}); "
                            f"this cluster ({held}) holds at most {fits}; lower it or leave it unset")
        per_domain[domain.name] = cap or max(1, fits // len(domains))
    if problems:
        raise ConfigError(problems)
    return per_domain


def check_resumable(cfg: Config, domains: list[Domain], fingerprints: dict[str, dict[str, str]],
                    resume: bool) -> None:
    """Without ``--resume``, refuse to start over a sweep that exists: its finished trials would be orphaned."""
    if resume:
        return
    for domain in domains:
        path, filesystem = experiment_path(cfg, domain, fingerprints[domain.name])
        if Tuner.can_restore(path, storage_filesystem=filesystem):
            raise ConfigError([f"tune: a {domain.name} sweep with this config exists at {path}; pass --resume to "
                               "continue it (finished trials are kept), or delete that folder to start over"])


def run(cfg: Config, domain_names: list[str] | None = None, resume: bool = False) -> list[SweepResult]:
    """Sweep every selected domain (side by side as resources allow); the sweeps as written to ``output_dir``."""
    if cfg.lora.method != "lora":
        raise ConfigError([f"lora.method: {cfg.lora.method} has no rank or alpha to sweep; tune LoRA runs "
                           "(lora.method=lora)"])
    domains = select_domains(cfg, domain_names)
    schedules = {d.name: plan_schedule(cfg, d) for d in domains}
    tracking = Tracking.open(cfg)  # before Ray starts: a wrong tracking.mlflow_uri fails in seconds
    fingerprints = preflight(cfg, domains)
    check_resumable(cfg, domains, fingerprints, resume)
    per_domain = trials_per_domain(cfg, domains)
    for schedule in schedules.values():
        for warning in schedule.warnings:
            log.warning(warning)
    # Pinned to the driver's node, as the train stage's runs: sweep_domain writes output_dir there for the driver.
    on_driver = on_this_node()
    with shown_here() as display:  # off a terminal: the trials' progress lines, printed here
        pending = {
            sweep_domain.options(scheduling_strategy=on_driver, runtime_env=sweep_runtime_env(display)).remote(
                cfg.model_dump(), d.name, experiment_path(cfg, d, fingerprints[d.name])[0],
                schedules[d.name].model_dump(), per_domain[d.name], resume, display, tracking): d.name
            for d in domains
        }
        results = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                results[name] = SweepResult.load(Path(ray.get(done[0])))
            except ray.exceptions.RayTaskError as e:
                for other in pending:
                    ray.cancel(other)
                if isinstance(e.cause, TrainingFailed):
                    raise e.cause from None
                raise TrainingFailed(f"domain {name!r}: the sweep failed: {e.cause}") from None
    return [results[d.name] for d in domains]


def best_config(cfg: Config, domain_name: str) -> Config:
    """``cfg`` with the best trial of ``domain_name``'s latest sweep applied (its LoRA values and learning rate).
    Raises ``ConfigError`` when that domain has no sweep result."""
    path = tune_dir(cfg, cfg.domain(domain_name).name) / BEST_FILE
    if not path.is_file():
        raise ConfigError([f"--from-tune: no tune result for domain {domain_name!r} (looked for {path}); "
                           f"run `loramill tune CONFIG --domain {domain_name}` first"])
    best = BestTrial.model_validate_json(path.read_text())
    raw = cfg.model_dump()
    raw["lora"] |= best.lora
    raw["train"]["learning_rate"] = best.learning_rate
    return Config.model_validate(raw)

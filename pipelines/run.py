"""The one-command pipeline: for every domain, (tune →) train → evaluate → gate → publish with the audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora.config import Config
from pipelines import publish, train


@dataclass
class DomainOutcome:
    training: train.DomainResult
    outcome: publish.Outcome


def run(cfg: Config, domain_names: list[str] | None = None, *, sweep: bool = False) -> list[DomainOutcome]:
    """Train all selected domains (concurrently on Ray), then publish each finished run.

    With ``sweep``, each domain's Tune search runs first and its best trial's values train the final run; the
    audit then records the search space, the trials and the choice.
    """
    publish.check_publishable(cfg)
    publish.open_registry(cfg)  # fail on an unreachable or misconfigured registry before hours of training
    tuned: dict[str, dict[str, Any]] = {}
    domain_configs: dict[str, Config] = {}
    if sweep:
        from pipelines import tune

        for result in tune.run(cfg, domain_names):
            tuned[result.domain] = audit_facts(cfg, result)
            domain_configs[result.domain] = tune.best_config(cfg, result.domain)
    results = train.run(cfg, domain_names, domain_configs)
    return [
        DomainOutcome(r, publish.run(domain_configs.get(r.domain, cfg), r.domain, r.output_dir,
                                     tune=tuned.get(r.domain)))
        for r in results
    ]


def audit_facts(cfg: Config, sweep: Any) -> dict[str, Any]:
    """What the audit's design-choices and change-envelope sections need from a sweep."""
    settings = cfg.tune
    best = next(t for t in sweep.trials if t.trial_id == sweep.best)
    return {
        "metric": "eval_loss",
        "search_space": {
            "search": settings.search,
            "ranks": settings.ranks,
            "alphas": sorted({t.alpha for t in sweep.trials}),
            "alpha_per_rank": settings.alpha_per_rank,
            "learning_rate": [settings.lr_min, settings.lr_max],
        },
        "lr_min": settings.lr_min,
        "lr_max": settings.lr_max,
        "trials": [{"trial_id": t.trial_id, "r": t.r, "alpha": t.alpha, "learning_rate": t.learning_rate,
                    "eval_loss": t.eval_loss, "steps": t.steps, "status": t.status} for t in sweep.trials],
        "best": {"trial_id": best.trial_id, "r": best.r, "alpha": best.alpha, "learning_rate": best.learning_rate,
                 "eval_loss": best.eval_loss},
    }

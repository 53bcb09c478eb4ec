"""The one-command pipeline: for every domain, (tune →) train → evaluate → gate → publish with the audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora.config import Config
from pipelines import publish, train
from pipelines.records import RunRecord, SearchRecord, SearchSpace, TrialSummary
from pipelines.registry_access import open_registry


@dataclass
class DomainOutcome:
    training: RunRecord
    outcome: publish.Outcome


def run(cfg: Config, domain_names: list[str] | None = None, *, sweep: bool = False,
        fresh: bool = False) -> list[DomainOutcome]:
    """Train all selected domains (concurrently on Ray) and publish the finished runs (``publish.Publishing``):
    each run is staged as it finishes, and the model work of the runs finished so far starts as soon as the
    domains still training leave room for it; versions are written once every domain has trained.

    With ``sweep``, each domain's Tune search runs first and its best trial's values train the final run; the
    audit then records the search space, the trials and the choice. ``fresh`` trains new runs even where an
    identical one (same config, same data bytes) exists, instead of resuming it.
    """
    publish.check_publishable(cfg)
    open_registry(cfg)  # fail on an unreachable or misconfigured registry before hours of training
    searches: dict[str, SearchRecord] = {}
    domain_configs: dict[str, Config] = {}
    if sweep:
        from pipelines import tune

        for result in tune.run(cfg, domain_names):
            searches[result.domain] = search_record(cfg, result)
            domain_configs[result.domain] = tune.best_config(cfg, result.domain)
    with publish.Publishing() as publishing:
        finished: list[str] = []

        def publish_when_trained(record: RunRecord, spare: dict[str, float] | None) -> None:
            finished.append(record.domain)
            publishing.add(publish.Request(domain_configs.get(record.domain, cfg), record.domain, record.output_dir,
                                           searches.get(record.domain)), spare)

        results = train.run(cfg, domain_names, domain_configs, fresh=fresh, on_finished=publish_when_trained)
        outcomes = dict(zip(finished, publishing.finish(), strict=True))
    return [DomainOutcome(r, outcomes[r.domain]) for r in results]


def search_record(cfg: Config, sweep: Any) -> SearchRecord:
    """What the audit's design-choices and change-envelope sections need from a sweep (``sweep.SweepResult``)."""
    settings = cfg.tune
    trials = [TrialSummary(trial_id=t.trial_id, r=t.r, alpha=t.alpha, learning_rate=t.learning_rate,
                           eval_loss=t.eval_loss, steps=t.steps, status=t.status) for t in sweep.trials]
    return SearchRecord(
        search_space=SearchSpace(search=settings.search, ranks=settings.ranks,
                                 alphas=sorted({t.alpha for t in sweep.trials}), alpha_per_rank=settings.alpha_per_rank,
                                 learning_rate=(settings.lr_min, settings.lr_max)),
        trials=trials,
        best=next(t for t in trials if t.trial_id == sweep.best),
    )

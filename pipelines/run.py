"""The one-command pipeline: for every domain, train → evaluate → gate → publish with the audit."""

from __future__ import annotations

from dataclasses import dataclass

from lora.config import Config
from pipelines import publish, train


@dataclass
class DomainOutcome:
    training: train.DomainResult
    outcome: publish.Outcome


def run(cfg: Config, domain_names: list[str] | None = None) -> list[DomainOutcome]:
    """Train all selected domains (concurrently on Ray), then publish each finished run."""
    publish.open_registry(cfg)  # fail on an unreachable or misconfigured registry before hours of training
    results = train.run(cfg, domain_names)
    return [DomainOutcome(r, publish.run(cfg, r.domain, r.output_dir)) for r in results]

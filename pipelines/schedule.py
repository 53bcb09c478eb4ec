"""Schedule stage: retrain a domain when its data changed, inside the change envelope its latest version declared.

A tick, per domain: fingerprint the data (sha256 of the train and eval files, as the train stage records them) →
compare with the latest published version's manifest → check the config against the retraining envelope that
version's manifest declares → take the domain's ``retrain`` lock → look again (a concurrent tick may have just
published) → train the domains still due, together, and publish each as ``loramill run`` does. ``tick`` is one pass
over every domain (or those named), for system cron or a Kubernetes CronJob, which hold the schedule; ``loop`` runs
ticks at each domain's own ``schedule`` (cron, read in UTC).

A domain whose data is refused, or whose training or publish fails, is reported as failed and the others go on:
each domain's outcome is one line (``Decision.summary``), and ``loramill schedule --once`` exits non-zero if any
failed, for cron's or Kubernetes' alerting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from croniter import croniter

from infra.registry import ConflictError, Registry, RegistryError
from infra.store import StoreError
from lora.config import Config, ConfigError, Domain
from lora.errors import BackendError, DataError
from lora.model import logical_model_id
from pipelines import publish, train
from pipelines.errors import TrainingFailed
from pipelines.registry_access import open_registry
from pipelines.records import SPLITS, ManifestMetadata, RetrainingEnvelope
from pipelines.run_folder import data_fingerprint
from pipelines.train import select_domains

LOCK_NAME = "retrain"
MAX_SLEEP_S = 60.0
"""Sleep in short pieces and re-read the clock, so a suspended or re-set machine does not oversleep a due time."""
FAILURES = (ConfigError, DataError, BackendError, RegistryError, StoreError, TrainingFailed)
"""What fails a domain's retraining (or a whole tick) with a message that names the problem; anything else is a
bug and propagates."""


@dataclass
class Decision:
    """What a tick did with one domain."""

    domain: str
    retrain: bool
    reason: str
    published: int | None = None
    """The version this tick published, or found this very run already published as (``already_published``)."""
    already_published: bool = False
    warnings: list[str] = field(default_factory=list)
    """What the publish could not do after its commit point (``publish.Outcome.warnings``)."""
    failed: str | None = None
    """Why the domain's data, training or publish failed, in one line."""

    def summary(self) -> str:
        """The domain's outcome in one line, for logs and alerts: skipped (why), published vN, or failed: why."""
        if self.failed is not None:
            return f"{self.domain}: failed: {self.failed}"
        if self.published is None:
            return f"{self.domain}: skipped ({self.reason})"
        before = " (this run was published before; nothing new was written)" if self.already_published else ""
        return f"{self.domain}: published v{self.published}{before}" + "".join(f"; {w}" for w in self.warnings)


def tick(
    cfg: Config,
    domain_names: list[str] | None = None,
    *,
    lock_ttl_s: float,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Decision]:
    """One pass over the named domains (default: all): retrain the ones whose data changed.

    ``lock_ttl_s`` must exceed a retraining run: a tick that dies holding a domain's lock blocks the domain until
    the lock expires, and a run that outlasts its lock can be joined by a second one. A domain whose lock another
    tick holds is skipped; one whose data is refused, or whose training or publish fails, is returned as failed.
    Raises ``ConfigError`` before training anything if a domain due for retraining is configured outside its latest
    version's retraining envelope, or the config cannot be published.
    """
    publish.check_publishable(cfg)
    domains = select_domains(cfg, domain_names)
    registry = open_registry(cfg)
    fingerprints, refused = {}, {}
    for domain in domains:
        try:
            fingerprints[domain.name] = data_fingerprint(domain)
        except DataError as error:
            refused[domain.name] = Decision(domain.name, False, "its data was refused", failed=one_line(error))
    decisions = {name: decide(registry, name, data, force) for name, data in fingerprints.items()}
    refuse_outside_envelope(cfg, registry, [d for d in decisions.values() if d.retrain])
    with contextlib.ExitStack() as locks:
        final = {}
        for name, decision in decisions.items():
            final[name] = claim(locks, registry, decision, fingerprints[name], force, lock_ttl_s) \
                if decision.retrain else decision
            echo(f"{name}: {'retrain' if final[name].retrain else 'skip'} — {final[name].reason}")
        retrain([decision for decision in final.values() if decision.retrain], cfg, force)
    return [refused.get(d.name) or final[d.name] for d in domains]


def retrain(due: list[Decision], cfg: Config, force: bool) -> None:
    """Train the due domains together, then publish each; record in each decision what it came to."""
    if not due:
        return
    try:
        # Forced with unchanged data, the run's identity is that of the published one: start it afresh.
        runs = train.run(cfg, [decision.domain for decision in due], fresh=force)
    except FAILURES as error:  # the domains train together: one that fails for good stops the others
        for decision in due:
            decision.failed = one_line(error)
        return
    by_domain = {decision.domain: decision for decision in due}
    for finished in runs:
        decision = by_domain[finished.domain]
        try:
            outcome = publish.run(cfg, finished.domain, finished.output_dir)
        except FAILURES as error:
            decision.failed = one_line(error)
            continue
        decision.published = outcome.published.version
        decision.already_published = outcome.already_published
        decision.warnings = outcome.warnings


def one_line(error: Exception) -> str:
    """An error's message on one line (a config error lists its problems on several)."""
    return " ".join(str(error).split())


def claim(locks: contextlib.ExitStack, registry: Registry, decision: Decision, data: dict[str, str], force: bool,
          lock_ttl_s: float) -> Decision:
    """Hold the domain's lock until ``locks`` closes and decide again under it; skip if another tick holds it."""
    try:
        locks.enter_context(registry.lock(decision.domain, LOCK_NAME, lock_ttl_s))
    except ConflictError as held:
        return Decision(decision.domain, False, f"another tick is at it: {held}")
    # The tick that held the lock until a moment ago may have published this very data.
    return decide(registry, decision.domain, data, force)


def loop(cfg: Config, domain_names: list[str] | None = None, *, lock_ttl_s: float,
         echo: Callable[[str], None] = print) -> None:
    """Tick each domain at its cron times until interrupted (KeyboardInterrupt propagates; locks are released)."""
    domains = scheduled_domains(cfg, domain_names)
    unscheduled = [f"domains.{cfg.domains.index(d)}.schedule: {d.name} has none; give it a cron expression such as "
                   "'0 3 * * 1', or leave the domain out" for d in domains if d.schedule is None]
    if unscheduled:
        raise ConfigError(unscheduled)
    while True:
        now = datetime.now(UTC)
        due_at, names = next_due(domains, now)
        wait = _duration((due_at - now).total_seconds())
        echo(f"next: {', '.join(names)} at {due_at:%Y-%m-%d %H:%M} UTC (in {wait})")
        while (left := (due_at - datetime.now(UTC)).total_seconds()) > 0:
            time.sleep(min(left, MAX_SLEEP_S))
        try:
            for decision in tick(cfg, names, lock_ttl_s=lock_ttl_s, echo=echo):
                echo(decision.summary())
        except FAILURES as error:
            # A refused or failed tick is reported and comes round again at the next due time.
            echo(f"tick failed for {', '.join(names)}: {error}")


def next_due(domains: list[Domain], after: datetime) -> tuple[datetime, list[str]]:
    """The first cron time strictly after ``after`` (UTC), and the domains due then."""
    times = {d.name: croniter(d.schedule, after).get_next(datetime) for d in domains}
    first = min(times.values())
    return first, [name for name, at in times.items() if at == first]


def scheduled_domains(cfg: Config, names: list[str] | None) -> list[Domain]:
    """The named domains, or every domain with a schedule: what the loop ticks."""
    if names:
        return [cfg.domain(name) for name in names]
    scheduled = [d for d in cfg.domains if d.schedule]
    if not scheduled:
        raise ConfigError(["domains: no domain has a `schedule`; set one (cron, e.g. '0 3 * * 1') or pass --domain"])
    return scheduled


def decide(registry: Registry, domain: str, data: dict[str, str], force: bool) -> Decision:
    """Retrain when there is no version yet, the data differs from the latest version's, or when forced."""
    versions = registry.versions(domain)
    if not versions:
        return Decision(domain, True, "no published version yet")
    latest = versions[-1]
    published = ManifestMetadata.of(registry.manifest(domain, latest)).data
    changed = [split for split in SPLITS if published[split].sha256 != data[split]]
    if changed:
        return Decision(domain, True, f"{' and '.join(changed)} data changed since v{latest} "
                                      f"({', '.join(data[s][:12] for s in changed)})")
    if force:
        return Decision(domain, True, f"--force (data unchanged since v{latest})")
    return Decision(domain, False, f"data unchanged since v{latest} ({data['train'][:12]}, {data['eval'][:12]})")


def refuse_outside_envelope(cfg: Config, registry: Registry, due: list[Decision]) -> None:
    """``ConfigError`` listing every setting outside the retraining envelope of a due domain's latest version."""
    problems = []
    for decision in due:
        versions = registry.versions(decision.domain)
        if versions:
            metadata = ManifestMetadata.of(registry.manifest(decision.domain, versions[-1]))
            problems += outside_envelope(cfg, decision.domain, versions[-1], metadata.envelope)
    if problems:
        raise ConfigError(problems)


def outside_envelope(cfg: Config, domain: str, version: int, envelope: RetrainingEnvelope) -> list[str]:
    """One ``dotted.path: why`` line per config value outside the envelope that ``version`` declared."""
    fix = ("a change this large is a new model, not a retraining: run `loramill run` by hand (its audit declares a "
           "new envelope) or set the value back")
    problems = []
    for path, value, (low, high) in (("lora.r", cfg.lora.r, envelope.lora_r),
                                     ("lora.alpha", cfg.lora.alpha, envelope.lora_alpha),
                                     ("train.learning_rate", cfg.train.learning_rate, envelope.learning_rate)):
        if not low <= value <= high:
            problems.append(f"{path}: {value:g} is outside {domain}'s retraining envelope [{low:g}, {high:g}] "
                            f"declared by v{version}; {fix}")
    for path, value, fixed in (("model.id", logical_model_id(cfg.model), envelope.base_model),
                               ("quant.mode", cfg.quant.mode, envelope.quantization)):
        if value != fixed:
            problems.append(f"{path}: {value!r} differs from {fixed!r}, fixed by {domain}'s retraining "
                            f"envelope declared by v{version}; {fix}")
    return problems


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 1440} d {minutes // 60 % 24} h {minutes % 60} min" if minutes >= 1440 else \
        f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{max(seconds, 0):.0f} s"

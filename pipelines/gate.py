"""The promotion gate: the gate alias moves to a new version only if it beats the base and is not worse than the
alias's current version by more than the tolerance, both losses measured on the same eval set.

Light (no torch): ``loramill promote`` decides here from the versions' manifests. Publish measures the pair itself
when production's stored loss was on other data (``pipelines.publish.apply_gate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.registry import Registry, RegistryError
from pipelines.records import GateDecision, ManifestMetadata, Metrics


@dataclass(frozen=True)
class Candidate:
    """The losses of the version that wants the alias, and what they were measured on."""

    eval_loss: float
    base_eval_loss: float
    eval_set: str


@dataclass(frozen=True)
class Incumbent:
    """The alias's current version, and its eval loss on the candidate's eval set if that is known."""

    version: int
    eval_loss: float | None
    """None when it was measured only on another eval set: the two losses do not compare."""
    compared_on: str


def decide(alias: str, tolerance: float, candidate: Candidate, incumbent: Incumbent | None,
           force: bool) -> GateDecision:
    """Promote only if better than base, and not worse than ``incumbent`` by more than ``tolerance``."""
    limit = None if incumbent is None or incumbent.eval_loss is None else incumbent.eval_loss * (1 + tolerance)
    if candidate.eval_loss >= candidate.base_eval_loss:
        decision, reason = "not promoted", "eval loss is not below the base model's"
    elif incumbent is None:
        decision, reason = "promoted", f"no current {alias}; eval loss below base"
    elif limit is None:
        decision, reason = "not promoted", (f"{alias} v{incumbent.version} was evaluated on another eval set, so "
                                            f"the losses do not compare ({incumbent.compared_on})")
    elif candidate.eval_loss > limit:
        decision, reason = "not promoted", (f"eval loss {candidate.eval_loss:.4f} > {alias} v{incumbent.version}'s "
                                            f"{incumbent.eval_loss:.4f} x (1 + {tolerance:g})")
    else:
        decision, reason = "promoted", f"eval loss {candidate.eval_loss:.4f} <= {limit:.4f} (tolerance)"
    if force and decision == "not promoted":
        decision, reason = "forced", f"--force overrode the gate ({reason})"
    return GateDecision(
        alias=alias, decision=decision, reason=reason, current_version=incumbent and incumbent.version,
        current_eval_loss=incumbent and incumbent.eval_loss, new_eval_loss=candidate.eval_loss,
        base_eval_loss=candidate.base_eval_loss, tolerance=tolerance, eval_set=candidate.eval_set,
        compared_on=incumbent.compared_on if incumbent else "no current version",
    )


def stored_incumbent(registry: Registry, domain: str, alias: str, eval_set: str,
                     candidate: ManifestMetadata | None = None) -> Incumbent | None:
    """The alias's current version (None if unset) with its loss on ``eval_set``, from the manifests alone.

    Its ``eval_loss`` is None when no stored loss of it was measured on ``eval_set``: neither its own, nor one
    that ``candidate``'s publish measured against that same version.
    """
    current = registry.alias(domain, alias)
    if current is None:
        return None
    try:
        stored: Metrics | None = ManifestMetadata.of(registry.manifest(domain, current.version)).metrics
    except RegistryError:  # published by an older loramill: its loss is on an eval set nobody recorded
        stored = None
    if stored is not None and stored.eval_set == eval_set:
        return Incumbent(current.version, stored.eval_loss, f"stored losses, same eval set {eval_set[:12]}")
    measured = candidate.gate if candidate else None
    if measured and measured.current_version == current.version and measured.eval_set == eval_set \
            and measured.current_eval_loss is not None:
        return Incumbent(current.version, measured.current_eval_loss,
                         f"v{current.version} measured on eval set {eval_set[:12]} at the candidate's publish")
    stored_on = stored.eval_set[:12] if stored else "an unrecorded eval set"
    return Incumbent(current.version, None, f"v{current.version} was evaluated on {stored_on}, the candidate on "
                                            f"{eval_set[:12]}")


def candidate_of(metadata: ManifestMetadata) -> Candidate:
    return Candidate(metadata.metrics.eval_loss, metadata.metrics.base_eval_loss, metadata.metrics.eval_set)

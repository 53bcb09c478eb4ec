"""Aliases: `<domain>/aliases/<alias>.json`, moved by compare-and-swap on the document's ETag, with history."""

from __future__ import annotations

import random
import time
from typing import Any, Literal

from pydantic import ValidationError

from infra.registry.connection import Connection
from infra.registry.documents import AliasState, now
from infra.registry.errors import ConflictError, IntegrityError
from infra.registry.rules import LATEST

_CAS_ATTEMPTS = 50
_READ_ATTEMPTS = 5


def read_alias(conn: Connection, domain: str, alias: str) -> tuple[AliasState | None, str | None]:
    """(state, etag) of a validated domain's validated alias; (None, None) if it was never set."""
    path = conn.path(domain, "aliases", f"{alias}.json")
    seen: bytes | None = None
    for _ in range(_READ_ATTEMPTS):
        found = conn.read(path, f"reading alias {alias} of {domain}")
        if found is None:
            return None, None
        try:
            return AliasState.model_validate_json(found[0]), found[1]
        except ValidationError:
            if found[0] == seen:
                break
            # Seen on SeaweedFS with eight publishers moving `latest` at once (and readers of it switching the
            # serving view): a GET racing an overwrite answered bytes that do not parse. Only the same bad bytes
            # read twice are a malformed document.
            seen = found[0]
            time.sleep(random.uniform(0, 0.05))
    raise IntegrityError(f"{conn.url(path)} is malformed: restore it from the store's history")


def move_alias(
    conn: Connection,
    domain: str,
    alias: str,
    version: int,
    *,
    expected: int | None | Literal["any"],
    record: dict[str, Any],
    forward_only: bool = False,
) -> AliasState:
    """Point `alias` at `version`, appending the move to its history; see Registry.promote for `expected`.

    With `forward_only`, an alias already at `version` or past it is left alone.
    """
    path = conn.path(domain, "aliases", f"{alias}.json")
    for attempt in range(_CAS_ATTEMPTS):
        state, etag = read_alias(conn, domain, alias)
        current = state.version if state is not None else None
        if expected != "any" and current != expected:
            raise ConflictError(
                f"alias {alias!r} of {domain} points at {_ref(current)}, not {_ref(expected)} as expected: "
                f"someone else moved it; re-read it and decide again"
            )
        if forward_only and state is not None and current is not None and current >= version:
            return state
        generation = state.generation + 1 if state is not None else 1
        moved_at = now()
        entry = {"at": moved_at, "from": current, "to": version, "generation": generation, **record}
        new = AliasState(
            domain=domain,
            alias=alias,
            version=version,
            generation=generation,
            updated_at=moved_at,
            history=[*(state.history if state is not None else []), entry],
        )
        data = new.to_json()
        conn.guard(data, f"alias {alias}")
        if conn.put_if(path, data, etag, f"moving alias {alias} of {domain}"):
            return new
        if expected != "any":
            # Someone wrote between our read and our write: the state the caller decided on is gone.
            raise ConflictError(
                f"alias {alias!r} of {domain} was moved by someone else while promoting to v{version}: "
                f"re-read it and decide again"
            )
        # Lost the race: back off a little (jittered, so the losers do not collide again) and re-read.
        time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
    raise ConflictError(f"alias {alias!r} of {domain} kept changing during {_CAS_ATTEMPTS} attempts: retry later")


def advance_latest(conn: Connection, domain: str, version: int) -> None:
    """Move `latest` to `version` unless a concurrent publish already moved it past."""
    move_alias(conn, domain, LATEST, version, expected="any", record={"by": "publish"}, forward_only=True)


def _ref(version: int | None | str) -> str:
    return "nothing (not set)" if version is None else f"v{version}"

"""Scheduler locks: `<domain>/locks/<name>.json`, created only if absent, taken over by compare-and-swap once
expired, released only by their holder."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from infra.registry.connection import Connection
from infra.registry.documents import owner
from infra.registry.errors import ConflictError, IntegrityError, RegistryError
from infra.registry.rules import validate_name


@contextlib.contextmanager
def hold_lock(conn: Connection, domain: str, name: str, ttl_s: float) -> Iterator[None]:
    """Hold the lock `name` of `domain` for the `with` block; see Registry.lock."""
    path = conn.path(validate_name(domain), "locks", f"{validate_name(name, 'lock')}.json")
    if ttl_s <= 0:
        raise RegistryError(f"lock ttl must be positive, got {ttl_s}")
    token = uuid.uuid4().hex
    acquired = datetime.now(UTC)
    doc = {
        "owner": owner(),
        "token": token,
        "acquired_at": acquired.isoformat(),
        "expires_at": (acquired + timedelta(seconds=ttl_s)).isoformat(),
    }
    data = json.dumps(doc, sort_keys=True).encode()
    conn.guard(data, "the lock")
    _take_lock(conn, domain, name, path, data)
    try:
        yield
    finally:
        current = conn.read(path, f"reading lock {name}")
        if current is not None and json.loads(current[0]).get("token") == token:
            conn.call(f"releasing lock {name}", lambda: conn.backend.delete_if(path, current[1]))


def _take_lock(conn: Connection, domain: str, name: str, path: str, data: bytes) -> None:
    for _ in range(3):
        if conn.put_if(path, data, None, f"taking lock {name}"):
            return
        current = conn.read(path, f"reading lock {name}")
        if current is None:
            continue  # released between our two calls: try to create it again
        try:
            held = json.loads(current[0])
            holder, expires_at = held["owner"], datetime.fromisoformat(held["expires_at"])
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{conn.url(path)} is not a lock document: delete it") from None
        if expires_at > datetime.now(UTC):
            raise ConflictError(
                f"lock {name!r} of {domain} is held by {holder} until {expires_at.isoformat()}: "
                f"wait for it to finish or expire"
            )
        if conn.put_if(path, data, current[1], f"taking over expired lock {name}"):
            return
    raise ConflictError(f"lock {name!r} of {domain} is contended: another process took it first")

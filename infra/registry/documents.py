"""The registry's stored documents (manifest, alias state) and the records its reads return, as pydantic models;
and the checks on what a caller may add to a document."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra.registry.errors import RegistryError

SCHEMA = 1
_RESERVED_MANIFEST_KEYS = frozenset(
    {"schema", "schema_version", "domain", "version", "parent_version", "created_at", "files"}
)
_RESERVED_HISTORY_KEYS = frozenset({"at", "from", "to", "generation"})


class FileEntry(BaseModel):
    """One file of a version, as recorded in its manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """`manifest.json`: the commit marker of a version. Caller metadata sits next to the fixed fields."""

    model_config = ConfigDict(extra="allow", frozen=True)
    schema_version: int = Field(SCHEMA, alias="schema")
    domain: str
    version: int = Field(ge=1)
    parent_version: int | None
    """The newest complete version below this one when it was published, or None for the first."""
    created_at: str
    """UTC, ISO 8601."""
    files: dict[str, FileEntry]

    @property
    def metadata(self) -> dict[str, Any]:
        """What the publisher passed: base model, hashes, data fingerprints, metrics, versions, git commit."""
        return dict(self.model_extra or {})

    @property
    def size_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True).encode()


class AliasState(BaseModel):
    """`aliases/<alias>.json`: where an alias points, and every move it made, oldest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = Field(SCHEMA, alias="schema")
    domain: str
    alias: str
    version: int
    generation: int
    """+1 on every move: the document never repeats, so neither does its ETag (no ABA in compare-and-swap)."""
    updated_at: str
    history: list[dict[str, Any]]
    """One entry per move: {"at", "from", "to", "generation"} plus the caller's record (who, forced, gates)."""

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True).encode()


class PublishedVersion(BaseModel):
    """What `publish` created: a complete version, re-verified on the store unless `unverified` says why not."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    url: str
    manifest: Manifest
    unverified: str | None = None
    """Why the steps after the commit point (re-read and re-hash, move `latest`) did not run, e.g. the store went
    away; the version exists all the same. None when they ran."""


class VersionInfo(BaseModel):
    """One row of `loramill list`."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    created_at: str
    parent_version: int | None
    files: int
    size_bytes: int
    aliases: list[str]
    metrics: dict[str, Any]


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The publisher's manifest metadata as plain JSON; RegistryError if it is not, or uses a manifest key."""
    clash = sorted(_RESERVED_MANIFEST_KEYS & metadata.keys())
    if clash:
        raise RegistryError(f"metadata keys {clash} are reserved for the manifest itself: rename them")
    return _json_roundtrip(metadata, "metadata")


def check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A promoter's alias-history record as plain JSON; RegistryError if it is not, or uses a registry key."""
    clash = sorted(_RESERVED_HISTORY_KEYS & record.keys())
    if clash:
        raise RegistryError(f"record keys {clash} are set by the registry: rename them")
    return _json_roundtrip(record, "record")


def _json_roundtrip(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be plain JSON (no NaN, no objects): {exc}") from None


def now() -> str:
    """The time stamp written into documents: UTC, ISO 8601, microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def owner() -> str:
    """Who writes a claim or takes a lock: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"

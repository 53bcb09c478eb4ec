"""The registry's stored documents (manifest, alias state) and the records its reads return, as pydantic models;
and the checks on what a caller may add to a document."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.registry.backend import ObjectLock
from infra.registry.errors import RegistryError

SCHEMA = 1
_RESERVED_MANIFEST_KEYS = frozenset(
    {"schema", "schema_version", "domain", "version", "parent_version", "skipped_parents", "created_at", "files"}
)
_RESERVED_HISTORY_KEYS = frozenset({"at", "from", "to", "generation"})


class FileEntry(BaseModel):
    """One file of a version, as recorded in its manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class SkippedVersion(BaseModel):
    """An earlier version passed over as a parent because it failed verification when a later one was reserved."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    reason: str
    """The IntegrityError's message: which file or document, and how it differs."""


class Manifest(BaseModel):
    """`manifest.json`: the commit marker of a version. Caller metadata sits next to the fixed fields."""

    model_config = ConfigDict(extra="allow", frozen=True)
    schema_version: int = Field(SCHEMA, alias="schema")
    domain: str
    version: int = Field(ge=1)
    parent_version: int | None
    """The newest earlier version that passed verification when this version's number was reserved; None if
    there was none (`Registry.reserve`)."""
    skipped_parents: list[SkippedVersion] = []
    """Earlier versions newer than the parent that failed verification at that moment, newest first. Absent from
    manifests written before it existed."""
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


class Retention(BaseModel):
    """Write-once versions on a bucket with S3 Object Lock: every object of a version is written with this
    retention, so that no client can delete or alter the bytes published until it ends (an overwrite only adds a
    newer object version, which verification refuses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["governance", "compliance"]
    """governance: users granted s3:BypassGovernanceRetention can still remove a version early; compliance: nobody
    can, not even the account's root user, until the period ends."""
    days: int = Field(ge=1)
    """How long each version is kept, counted from when its number is reserved."""


class Reservation(BaseModel):
    """A claimed version number and the parent decided with it (`Registry.reserve`): what the manifest records,
    and what documents written into the version before publishing must name."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    parent_version: int | None
    skipped_parents: list[SkippedVersion]
    claim: bytes
    """The claim document's bytes: at commit, proof that the claim is still this publisher's."""
    lock: ObjectLock | None
    """The retention every object of the version is written with (`Retention`), or None."""


class PublishedVersion(BaseModel):
    """What `publish` created: a complete version, re-verified on the store unless `unverified` says why not."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    url: str
    manifest: Manifest
    unverified: str | None = None
    """Why the steps after the commit point (re-read and re-hash, move `latest`, copy into the serving view) did
    not all run, e.g. the store went away; the version exists all the same. None when they ran."""


class VersionInfo(BaseModel):
    """One row of `loramill list`. The manifest's facts are None when its manifest cannot be read (`problem`)."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    created_at: str | None
    parent_version: int | None
    files: int | None
    size_bytes: int | None
    aliases: list[str]
    metrics: dict[str, Any]
    lock: ObjectLock | None
    """The retention its manifest was written with (S3 Object Lock), or None."""
    problem: str | None
    """Why the version must not be used, as last found: its manifest or its folder's listing is wrong now, a later
    publish found it failing verification (and skipped it as parent), or (`describe(verify=True)`) a file's hash
    differs now. None when nothing was found."""


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

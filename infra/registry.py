"""The adapter registry's storage layer: versioned, immutable, verified LoRA adapters on object storage.

A registry lives at `s3://bucket/prefix` (through s3fs) or `file:///abs/path`; both behave the same:

    <domain>/v<N>/.claim             who reserved version N and when: created with If-None-Match: *
    <domain>/v<N>/<adapter files>    created with If-None-Match: *, so a version's files are never overwritten
    <domain>/v<N>/manifest.json      written last: a version exists if and only if its manifest does
    <domain>/aliases/<alias>.json    the version an alias points at, and every move it made (its history);
                                     moved by compare-and-swap on the object's ETag
    <domain>/locks/<name>.json       scheduler locks that expire

Readers list manifests, never "directories": SeaweedFS keeps listing an emptied folder as a common prefix.
Credentials never reach a message, a repr or a stored byte (publish and promote refuse documents holding them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions
import s3fs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "LATEST",
    "AliasState",
    "ConflictError",
    "FileEntry",
    "IntegrityError",
    "Manifest",
    "PublishedVersion",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "validate_name",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
MAX_NAME_LENGTH = 64
LATEST = "latest"
MANIFEST = "manifest.json"
CLAIM = ".claim"
SCHEMA = 1
REQUIRED_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})
# What an adapter folder may hold: safetensors weights, configs, tokenizer files (tokenizer.model is
# sentencepiece protobuf, chat_template.jinja is text), model cards and audit reports.
ALLOWED_SUFFIXES = frozenset(
    {".safetensors", ".json", ".jsonl", ".md", ".txt", ".jinja", ".model", ".yaml", ".yml", ".csv", ".png", ".svg"}
)
# Named separately for a sharper message: loading these unpickles, which can run arbitrary code.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_REF_RE = re.compile(r"^v?([0-9]+)$")
# One part of a file name inside a version, or of the URL prefix: no hidden parts, so never '.' or '..'.
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")
_CHUNK = 16 * 2**20
_CAS_ATTEMPTS = 50
_RESERVED_MANIFEST_KEYS = frozenset(
    {"schema", "schema_version", "domain", "version", "parent_version", "created_at", "files"}
)
_RESERVED_HISTORY_KEYS = frozenset({"at", "from", "to", "generation"})

T = TypeVar("T")


class RegistryError(Exception):
    """A registry operation failed; the message names the problem and the fix, never a credential."""


class ConflictError(RegistryError):
    """Another writer got there first: the alias moved away from the expected version, or a lock is held."""


class IntegrityError(RegistryError):
    """What is on the store does not match its manifest, or holds a file the registry does not allow."""


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
    """What `publish` created: a complete, verified version."""

    model_config = ConfigDict(frozen=True)
    domain: str
    version: int
    url: str
    manifest: Manifest


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


def validate_name(value: str, kind: str = "domain") -> str:
    """Return `value` if it is a valid domain, alias or lock name, else raise RegistryError naming the fix.

    Valid: 1-64 characters, lowercase letters, digits, '-' or '_', starting with a letter or digit. Such a
    name cannot hold '/', '.' or '..', so keys built from it stay under the registry prefix.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or len(value) > MAX_NAME_LENGTH:
        raise RegistryError(
            f"{kind} name {value!r} is invalid: use 1-{MAX_NAME_LENGTH} lowercase letters, digits, '-' or '_', "
            f"starting with a letter or digit"
        )
    return value


class Registry:
    """Versioned adapters under one URL. Safe to share between threads and to run from many processes."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        """Open the registry at `url`; nothing is contacted until the first operation.

        `storage_options` go to s3fs (`endpoint_url`, `key`, `secret`, ...); without them s3fs reads the AWS_*
        environment variables. Transient failures (connection refused, timeouts, 5xx) are retried `retries`
        times in all, sleeping `backoff_s`, 2x, 4x, ... in between. Raises RegistryError for a malformed URL.
        """
        if retries < 1:
            raise RegistryError(f"retries must be at least 1, got {retries}")
        self.url, scheme, self._root = _parse_url(url)
        self._retries = retries
        self._backoff_s = backoff_s
        options = dict(storage_options or {})
        self._secrets = _credential_strings(options)
        self._backend: _Backend
        if scheme == "s3":
            self._backend = _S3Backend(self._root.split("/", 1)[0], options)
        else:
            if options:
                raise RegistryError(f"storage_options apply to s3:// URLs only, not to {self.url}")
            self._backend = _LocalBackend(Path(self._root))
        self._checked = False

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # ---------------------------------------------------------------- reading

    def location(self, domain: str, version: int | None = None) -> str:
        """The URL of a domain's folder, or of one version's folder."""
        parts = [validate_name(domain)] + ([f"v{_positive(version)}"] if version is not None else [])
        return self._url(self._path(*parts))

    def domains(self) -> list[str]:
        """Domains with at least one complete version, sorted."""
        found = {rel.split("/", 1)[0] for rel in self._walk(self._root, "listing domains") if _is_manifest(rel)}
        return sorted(name for name in found if _NAME_RE.match(name))

    def versions(self, domain: str) -> list[int]:
        """Complete versions of `domain` (those with a manifest), ascending. Incomplete uploads are invisible."""
        listing = self._walk(self._path(validate_name(domain)), f"listing versions of {domain}")
        return sorted(_version_of(rel) for rel in listing if _is_manifest(rel, depth=2))

    def manifest(self, domain: str, version: int) -> Manifest:
        """The manifest of a complete version. Raises RegistryError if there is none, IntegrityError if malformed."""
        path = self._path(validate_name(domain), f"v{_positive(version)}", MANIFEST)
        found = self._call(f"reading {domain} v{version}", lambda: self._backend.read(path))
        if found is None:
            raise RegistryError(
                f"{domain} has no complete version v{version} (versions: {self.versions(domain) or 'none'})"
            )
        try:
            manifest = Manifest.model_validate_json(found[0])
        except ValidationError as exc:
            raise IntegrityError(
                f"{self._url(path)} is malformed ({exc.error_count()} errors, first: {exc.errors()[0]['msg']}): "
                f"do not use this version"
            ) from None
        if manifest.domain != domain or manifest.version != version:
            raise IntegrityError(
                f"{self._url(path)} describes {manifest.domain} v{manifest.version}, not {domain} v{version}: "
                f"it was copied or edited; do not use this version"
            )
        for name in manifest.files:
            problem = _file_problem(name)
            if problem:
                raise IntegrityError(f"{domain} v{version}: the manifest lists {name!r}, which {problem}")
        return manifest

    def alias(self, domain: str, alias: str) -> AliasState | None:
        """The alias's current state and history, or None if it was never set."""
        state, _ = self._read_alias(validate_name(domain), validate_name(alias, "alias"))
        return state

    def aliases(self, domain: str) -> dict[str, AliasState]:
        """Every alias of `domain`, by name."""
        listing = self._walk(self._path(validate_name(domain), "aliases"), f"listing aliases of {domain}")
        names = sorted(rel[: -len(".json")] for rel in listing if rel.endswith(".json") and "/" not in rel)
        found = {name: self.alias(domain, name) for name in names if _NAME_RE.match(name)}
        return {name: state for name, state in found.items() if state is not None}

    def resolve(self, domain: str, ref: str | int | None = None) -> int:
        """The complete version that `ref` names: `vN`, `N`, an alias, or None for `latest`.

        None follows the `latest` alias, or takes the newest complete version if no publish got as far as
        setting it. Raises RegistryError if the version does not exist or the alias is not set.
        """
        validate_name(domain)
        if ref is None:
            state = self.alias(domain, LATEST)
            if state is not None:
                return state.version
            versions = self.versions(domain)
            if not versions:
                raise RegistryError(f"{domain} has no complete version yet: publish one first")
            return versions[-1]
        match = _VERSION_REF_RE.match(str(ref))
        if match:
            version = int(match.group(1))
            versions = self.versions(domain)
            if version not in versions:
                raise RegistryError(f"{domain} has no complete version v{version} (versions: {versions or 'none'})")
            return version
        state = self.alias(domain, str(ref))
        if state is None:
            raise RegistryError(
                f"{domain} has no alias {ref!r} (aliases: {sorted(self.aliases(domain)) or 'none'}): "
                f"pass vN, N or an existing alias"
            )
        return state.version

    def describe(self, domain: str | None = None) -> list[VersionInfo]:
        """One row per complete version (of `domain`, or of every domain): sizes, aliases and metrics."""
        rows = []
        for name in [validate_name(domain)] if domain is not None else self.domains():
            by_version: dict[int, list[str]] = {}
            for alias_name, state in self.aliases(name).items():
                by_version.setdefault(state.version, []).append(alias_name)
            for version in self.versions(name):
                manifest = self.manifest(name, version)
                metrics = manifest.metadata.get("metrics")
                rows.append(
                    VersionInfo(
                        domain=name,
                        version=version,
                        created_at=manifest.created_at,
                        parent_version=manifest.parent_version,
                        files=len(manifest.files),
                        size_bytes=manifest.size_bytes,
                        aliases=sorted(by_version.get(version, [])),
                        metrics=metrics if isinstance(metrics, dict) else {},
                    )
                )
        return rows

    def verify(self, domain: str, version: int) -> Manifest:
        """Re-read the manifest and re-hash every file on the store; return the manifest if all match.

        Raises IntegrityError naming the first file that is missing, changed, extra or of a refused type.
        """
        manifest = self.manifest(domain, version)
        self._check_listing(manifest)
        for name, entry in manifest.files.items():
            path = self._path(domain, f"v{version}", name)
            found = self._call(f"hashing {domain} v{version}/{name}", lambda: _hash(self._backend.open(path)))
            _check_file(manifest, name, found)
        return manifest

    def pull(self, domain: str, ref: str | int | None, dest: Path) -> Path:
        """Download a version into `dest` (which must not exist) and return `dest`.

        Files land in a temporary folder next to `dest`; each file's size and sha256 are checked against the
        manifest before the folder is renamed to `dest`, so `dest` appears complete or not at all. Raises
        IntegrityError, naming the file, if the version folder holds anything not in the manifest or of a
        refused type, or if a file does not match; RegistryError if `dest` exists.
        """
        dest = Path(dest)
        if dest.exists():
            raise RegistryError(f"{dest} already exists: pull never overwrites; pass a new folder or remove it")
        version = self.resolve(domain, ref)
        manifest = self.manifest(domain, version)
        self._check_listing(manifest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            for name, entry in manifest.files.items():
                local = staging / name
                local.parent.mkdir(parents=True, exist_ok=True)
                path = self._path(domain, f"v{version}", name)
                self._call(f"downloading {domain} v{version}/{name}", lambda: self._backend.download(path, local))
                with open(local, "rb") as handle:
                    _check_file(manifest, name, _hash(handle))
            if dest.exists():
                raise RegistryError(f"{dest} appeared while pulling: pull never overwrites; nothing was changed")
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    # ---------------------------------------------------------------- writing

    def publish(self, domain: str, local_dir: Path, metadata: Mapping[str, Any] | None = None) -> PublishedVersion:
        """Publish the adapter folder `local_dir` as the next version of `domain` and move `latest` to it.

        Steps: check the folder (adapter_config.json and adapter_model.safetensors required; only allowed file
        types, never pickles), claim the next version number with a conditional create, upload every file
        (create-only), write manifest.json last, re-read it and re-hash every file on the store, then move
        `latest` forward. `metadata` is merged into the manifest; it must be JSON and hold no credential.
        Concurrent publishers get distinct versions. Raises RegistryError (or IntegrityError if the check after
        writing fails).
        """
        validate_name(domain)
        files = _scan_adapter_dir(Path(local_dir))
        extra = _check_metadata(metadata or {})
        self._guard(json.dumps(extra).encode(), "the metadata")
        version, claim = self._claim_version(domain)
        for name, entry in files.items():
            self._upload(domain, version, Path(local_dir) / name, name, entry)
        manifest = self._commit(domain, version, claim, files, extra)
        self.verify(domain, version)
        self._advance_latest(domain, version)
        return PublishedVersion(domain=domain, version=version, url=self.location(domain, version), manifest=manifest)

    def promote(
        self,
        domain: str,
        version: int,
        alias: str,
        *,
        expected: int | None | Literal["any"] = "any",
        record: Mapping[str, Any] | None = None,
    ) -> AliasState:
        """Point `alias` at complete `version` by compare-and-swap, appending the move to the alias history.

        `expected` is the version the caller believes the alias points at now (None: not set yet); if another
        writer moved it first, ConflictError is raised and nothing changes, so of promoters expecting the same
        state exactly one wins. "any" skips that check but still never loses a concurrent move. `record`
        (who, forced, gate numbers, reason) is stored in the history entry; it must be JSON, hold no
        credential and not use the keys at/from/to/generation.
        """
        validate_name(domain)
        _validate_alias(alias)
        extra = _check_record(record or {})
        if version not in self.versions(domain):
            raise RegistryError(f"{domain} has no complete version v{version}: publish it before promoting it")
        return self._move_alias(domain, alias, version, expected=expected, record=extra)

    def gc(self, domain: str | None = None, *, grace_s: float = 3600.0) -> list[str]:
        """Delete abandoned uploads: version folders without a manifest where nothing was written for `grace_s`.

        Also aborts multipart uploads below the domain started more than `grace_s` ago: a publisher killed inside
        one leaves its parts on the server, invisible to listings, even when its retry then completed the version.
        Returns the URLs of the removed folders, then of the files whose unfinished uploads were aborted. Complete
        versions are never touched. The grace period protects uploads still in progress; keep it well above the
        longest publish.
        """
        removed = []
        for name in [validate_name(domain)] if domain is not None else self._all_domain_names():
            by_version: dict[int, dict[str, _Object]] = {}
            for rel, obj in self._walk(self._path(name), f"listing {name}").items():
                if _in_version(rel):
                    by_version.setdefault(_version_of(rel), {})[rel] = obj
            now = time.time()
            for version, objects in sorted(by_version.items()):
                if f"v{version}/{MANIFEST}" in objects:
                    continue
                if now - max(obj.mtime for obj in objects.values()) < grace_s:
                    continue
                paths = [self._path(name, rel) for rel in objects]
                self._call(f"removing abandoned {name} v{version}", lambda: self._backend.delete(paths))
                removed.append(self.location(name, version))
            aborted = self._call(f"aborting unfinished uploads of {name}",
                                 lambda: self._backend.abort_uploads(self._path(name), now - grace_s))
            removed += [self._url(path) for path in aborted]
        return removed

    @contextlib.contextmanager
    def lock(self, domain: str, name: str, ttl_s: float) -> Iterator[None]:
        """Hold the lock `name` of `domain` for the `with` block; it expires `ttl_s` after being taken.

        Raises ConflictError if another holder has it and it has not expired. An expired lock is taken over by
        compare-and-swap, so two waiters cannot both get it. Released (only if still ours) on exit.
        """
        path = self._path(validate_name(domain), "locks", f"{validate_name(name, 'lock')}.json")
        if ttl_s <= 0:
            raise RegistryError(f"lock ttl must be positive, got {ttl_s}")
        token = uuid.uuid4().hex
        acquired = datetime.now(UTC)
        doc = {
            "owner": _owner(),
            "token": token,
            "acquired_at": acquired.isoformat(),
            "expires_at": (acquired + timedelta(seconds=ttl_s)).isoformat(),
        }
        data = json.dumps(doc, sort_keys=True).encode()
        self._guard(data, "the lock")
        self._take_lock(domain, name, path, data)
        try:
            yield
        finally:
            current = self._call(f"reading lock {name}", lambda: self._backend.read(path))
            if current is not None and json.loads(current[0]).get("token") == token:
                self._call(f"releasing lock {name}", lambda: self._backend.delete_if(path, current[1]))

    # ---------------------------------------------------------------- internals

    def _claim_version(self, domain: str) -> tuple[int, bytes]:
        """Reserve the next version by conditional create of `v<N>/.claim`; return it and the claim's bytes.

        Starts above every version folder seen, complete or not; the conditional create settles races.
        """
        listing = self._walk(self._path(domain), f"listing {domain}")
        version = max((_version_of(rel) for rel in listing if _in_version(rel)), default=0) + 1
        claim = json.dumps({"claimed_at": _now(), "owner": _owner(), "token": uuid.uuid4().hex}).encode()
        for _ in range(1000):
            if self._put_if(self._path(domain, f"v{version}", CLAIM), claim, None, f"claiming {domain} v{version}"):
                return version, claim
            version += 1
        raise RegistryError(f"could not claim a version of {domain} after 1000 tries: is something looping?")

    def _commit(
        self, domain: str, version: int, claim: bytes, files: dict[str, FileEntry], metadata: dict[str, Any]
    ) -> Manifest:
        """Write the manifest (create-only): from here on the version exists."""
        claim_path = self._path(domain, f"v{version}", CLAIM)
        current = self._call(f"reading {domain} v{version} claim", lambda: self._backend.read(claim_path))
        if current is None or current[0] != claim:
            # gc removed an upload that outlived its grace period: committing would expose missing files.
            raise RegistryError(
                f"the claim on {domain} v{version} was removed while uploading (gc ran with a grace period "
                f"shorter than this upload): publish again"
            )
        earlier = [v for v in self.versions(domain) if v < version]
        manifest = Manifest.model_validate(
            {
                "schema": SCHEMA,
                "domain": domain,
                "version": version,
                "parent_version": earlier[-1] if earlier else None,
                "created_at": _now(),
                "files": files,
                **metadata,
            }
        )
        path = self._path(domain, f"v{version}", MANIFEST)
        if not self._put_if(path, manifest.to_json(), None, f"writing {domain} v{version} manifest"):
            raise RegistryError(f"{self._url(path)} already exists: versions are never overwritten")
        return manifest

    def _upload(self, domain: str, version: int, local: Path, name: str, entry: FileEntry) -> None:
        what = f"uploading {domain} v{version}/{name}"
        path = self._path(domain, f"v{version}", name)
        if self._call(what, lambda: self._backend.upload_new(local, path)):
            return
        # The folder is ours by claim, so an existing file is our own retried upload whose first response was
        # lost; anything else there must not be overwritten.
        if self._call(what, lambda: _hash(self._backend.open(path))) != entry:
            raise RegistryError(f"{self._url(path)} already exists: version folders are never overwritten")

    def _check_listing(self, manifest: Manifest) -> None:
        """Every file on the store is in the manifest, allowed, present, and of the recorded size."""
        where = f"{manifest.domain} v{manifest.version}"
        folder = self._path(manifest.domain, f"v{manifest.version}")
        listing = self._walk(folder, f"listing {where}")
        for rel in sorted(listing):
            if rel in (MANIFEST, CLAIM):
                continue
            if rel not in manifest.files:
                problem = _file_problem(rel) or "is not a file the registry allows here"
                raise IntegrityError(
                    f"{where}: {rel!r} is on the store but not in the manifest ({rel} {problem}); refusing the "
                    f"whole version. Remove {self._url(self._path(manifest.domain, f'v{manifest.version}', rel))}"
                )
        for name, entry in manifest.files.items():
            if name not in listing:
                raise IntegrityError(f"{where}: {name!r} is in the manifest but missing on the store")
            if listing[name].size != entry.size:
                raise IntegrityError(
                    f"{where}: {name!r} is {listing[name].size} bytes on the store, the manifest says {entry.size}: "
                    f"the file was changed after publishing; do not use this version"
                )

    def _read_alias(self, domain: str, alias: str) -> tuple[AliasState | None, str | None]:
        path = self._path(domain, "aliases", f"{alias}.json")
        found = self._call(f"reading alias {alias} of {domain}", lambda: self._backend.read(path))
        if found is None:
            return None, None
        try:
            return AliasState.model_validate_json(found[0]), found[1]
        except ValidationError:
            raise IntegrityError(f"{self._url(path)} is malformed: restore it from the store's history") from None

    def _move_alias(
        self,
        domain: str,
        alias: str,
        version: int,
        *,
        expected: int | None | Literal["any"],
        record: dict[str, Any],
        forward_only: bool = False,
    ) -> AliasState:
        path = self._path(domain, "aliases", f"{alias}.json")
        for attempt in range(_CAS_ATTEMPTS):
            state, etag = self._read_alias(domain, alias)
            current = state.version if state is not None else None
            if expected != "any" and current != expected:
                raise ConflictError(
                    f"alias {alias!r} of {domain} points at {_ref(current)}, not {_ref(expected)} as expected: "
                    f"someone else moved it; re-read it and decide again"
                )
            if forward_only and state is not None and current is not None and current >= version:
                return state
            generation = state.generation + 1 if state is not None else 1
            now = _now()
            entry = {"at": now, "from": current, "to": version, "generation": generation, **record}
            new = AliasState(
                domain=domain,
                alias=alias,
                version=version,
                generation=generation,
                updated_at=now,
                history=[*(state.history if state is not None else []), entry],
            )
            data = new.to_json()
            self._guard(data, f"alias {alias}")
            if self._put_if(path, data, etag, f"moving alias {alias} of {domain}"):
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

    def _advance_latest(self, domain: str, version: int) -> None:
        """Move `latest` to `version` unless a concurrent publish already moved it past."""
        self._move_alias(domain, LATEST, version, expected="any", record={"by": "publish"}, forward_only=True)

    def _take_lock(self, domain: str, name: str, path: str, data: bytes) -> None:
        for _ in range(3):
            if self._put_if(path, data, None, f"taking lock {name}"):
                return
            current = self._call(f"reading lock {name}", lambda: self._backend.read(path))
            if current is None:
                continue  # released between our two calls: try to create it again
            try:
                held = json.loads(current[0])
                owner, expires_at = held["owner"], datetime.fromisoformat(held["expires_at"])
            except (ValueError, KeyError, TypeError):
                raise IntegrityError(f"{self._url(path)} is not a lock document: delete it") from None
            if expires_at > datetime.now(UTC):
                raise ConflictError(
                    f"lock {name!r} of {domain} is held by {owner} until {expires_at.isoformat()}: "
                    f"wait for it to finish or expire"
                )
            if self._put_if(path, data, current[1], f"taking over expired lock {name}"):
                return
        raise ConflictError(f"lock {name!r} of {domain} is contended: another process took it first")

    def _put_if(self, path: str, data: bytes, etag: str | None, what: str) -> bool:
        """Conditional write: create (`etag` None) or replace the object whose ETag is `etag`. False if beaten."""
        if self._call(what, lambda: self._backend.write_if(path, data, etag)):
            return True
        # A request retried after a lost response fails its precondition against its own first attempt:
        # if what is there now is exactly our bytes, we did win.
        current = self._call(what, lambda: self._backend.read(path))
        return current is not None and current[0] == data

    def _walk(self, path: str, what: str) -> dict[str, _Object]:
        return self._call(what, lambda: self._backend.walk(path))

    def _all_domain_names(self) -> list[str]:
        names = {rel.split("/", 1)[0] for rel in self._walk(self._root, "listing domains") if "/" in rel}
        return sorted(name for name in names if _NAME_RE.match(name))

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run one store operation, retrying transient failures with exponential backoff; map the rest.

        The first call checks the bucket, so a missing bucket or refused credentials get their own message.
        """
        if not self._checked:
            self._retrying("checking the bucket", self._backend.check)
            self._checked = True
        return self._retrying(what, operation)

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        for attempt in range(1, self._retries + 1):
            try:
                return operation()
            except RegistryError:
                raise
            except (OSError, botocore.exceptions.BotoCoreError, aiohttp.ClientError) as exc:
                kind = _classify(exc)
                if kind == "transient" and attempt < self._retries:
                    time.sleep(self._backoff_s * 2 ** (attempt - 1))
                    continue
                raise self._error(kind, what, exc, attempt) from exc
        raise AssertionError("unreachable: the loop returns or raises")

    def _error(self, kind: str, what: str, exc: BaseException, attempts: int) -> RegistryError:
        endpoint = self._backend.describe()
        if kind == "transient":
            return RegistryError(
                f"cannot reach the object store at {endpoint} while {what}: {_reason(exc)} (gave up after "
                f"{attempts} tries). Is the server running? `loramill store up` starts the local one; check "
                f"endpoint_url or AWS_ENDPOINT_URL_S3"
            )
        if kind == "denied":
            return RegistryError(
                f"the object store at {endpoint} refused the credentials while {what} ({_reason(exc)}): check "
                f"key/secret in storage_options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"(`loramill store status` shows the local store's)"
            )
        if kind == "no_bucket":
            return RegistryError(_no_bucket_message(self._root.split("/", 1)[0], endpoint))
        return RegistryError(f"object store error at {endpoint} while {what}: {_reason(exc)}")

    def _guard(self, data: bytes, what: str) -> None:
        """Refuse to store a document that holds one of the credentials this registry was opened with."""
        if any(secret.encode() in data for secret in self._secrets):
            raise RegistryError(
                f"{what} contains an object-store credential; refusing to write it to the registry. "
                f"Remove the key/secret from it"
            )

    def _path(self, *parts: str) -> str:
        """`<root>/<parts...>`; raises if the result would leave the registry prefix (it cannot, by the name
        rules: this is the check that keeps it so)."""
        path = posixpath.join(self._root, *parts)
        if posixpath.normpath(path) != path or not path.startswith(self._root + "/") or "/../" in f"{path}/":
            raise RegistryError(f"refusing key {path!r}: it is not strictly inside the registry prefix")
        return path

    def _url(self, path: str) -> str:
        return f"{self._backend.scheme}://{path}"


# -------------------------------------------------------------------- storage backends


@dataclass(frozen=True)
class _Object:
    size: int
    mtime: float
    """Seconds since the epoch."""


class _Backend(Protocol):
    """The few storage primitives the registry needs; conditional writes are where S3 and files differ."""

    scheme: str

    def describe(self) -> str: ...

    def check(self) -> None: ...

    def read(self, path: str) -> tuple[bytes, str] | None:
        """(content, etag), or None if missing."""
        ...

    def write_if(self, path: str, data: bytes, etag: str | None) -> bool:
        """Create (`etag` None) or replace if the current etag matches; False when the precondition fails."""
        ...

    def delete_if(self, path: str, etag: str) -> bool: ...

    def upload_new(self, local: Path, path: str) -> bool:
        """Upload a file that must not exist yet; False if it does."""
        ...

    def download(self, path: str, local: Path) -> None: ...

    def open(self, path: str) -> IO[bytes]: ...

    def walk(self, path: str) -> dict[str, _Object]:
        """Every file below `path`, keyed by its path relative to `path`."""
        ...

    def delete(self, paths: list[str]) -> None: ...

    def abort_uploads(self, path: str, started_before: float) -> list[str]:
        """Abort unfinished multipart uploads below `path` started before `started_before` (epoch seconds);
        return their paths."""
        ...


class _S3Backend:
    scheme = "s3"

    def __init__(self, bucket: str, options: dict[str, Any]) -> None:
        self.bucket = bucket
        self.endpoint = str(
            options.get("endpoint_url")
            or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS S3"
        )
        config = dict(options.pop("config_kwargs", None) or {})
        # The registry retries with its own bounded backoff; botocore's hidden retries would multiply it
        # (a refused connection took ~5 s per call with them).
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", 5)
        # Other processes change listings under us: never answer from s3fs's listing cache.
        options.setdefault("use_listings_cache", False)
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config, **options)

    def describe(self) -> str:
        return self.endpoint

    def check(self) -> None:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except OSError as exc:
            error = _client_error(exc)
            if isinstance(exc, FileNotFoundError) or (error is not None and _status(error) == 404):
                raise RegistryError(_no_bucket_message(self.bucket, self.endpoint)) from None
            raise

    def read(self, path: str) -> tuple[bytes, str] | None:
        for _ in range(3):
            try:
                with self.fs.open(path, "rb") as handle:
                    return handle.read(), handle.details["ETag"]
            except FileNotFoundError:
                return None
            except OSError as exc:
                # s3fs reads with If-Match on the ETag it saw in HEAD: 412 means it changed in between.
                if not _precondition_failed(exc):
                    raise
        raise RegistryError(f"s3://{path} keeps changing while being read: retry later")

    def write_if(self, path: str, data: bytes, etag: str | None) -> bool:
        bucket, key = path.split("/", 1)
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as exc:
            # AWS and moto answer If-Match on a missing key with 404, SeaweedFS with 412.
            if _precondition_failed(exc) or (etag is not None and isinstance(exc, FileNotFoundError)):
                return False
            raise
        return True

    def delete_if(self, path: str, etag: str) -> bool:
        bucket, key = path.split("/", 1)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except OSError as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return False
            raise
        return True

    def upload_new(self, local: Path, path: str) -> bool:
        try:
            # mode="create" sends If-None-Match: * on the PUT, or on CompleteMultipartUpload for big files.
            self.fs.put_file(str(local), path, mode="create")
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def download(self, path: str, local: Path) -> None:
        self.fs.get_file(path, str(local))

    def open(self, path: str) -> IO[bytes]:
        # One ranged GET per 16 MiB read, no read-ahead copy: ~0.8 s for 160 MB on loopback.
        return self.fs.open(path, "rb", block_size=_CHUNK, cache_type="none")

    def walk(self, path: str) -> dict[str, _Object]:
        found = self.fs.find(path, detail=True)
        return {
            name[len(path) + 1 :]: _Object(size=int(info["size"]), mtime=info["LastModified"].timestamp())
            for name, info in found.items()
            if info["type"] == "file" and name.startswith(path + "/")
        }

    def delete(self, paths: list[str]) -> None:
        self.fs.rm(paths)

    def abort_uploads(self, path: str, started_before: float) -> list[str]:
        bucket, _, prefix = path.partition("/")
        answer = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
        aborted = []
        for upload in answer.get("Uploads", []):
            if upload["Initiated"].timestamp() < started_before:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(f"{bucket}/{upload['Key']}")
        return aborted


class _LocalBackend:
    """file:// registries. Temporary files and flock files live in `<root>/.tmp` and `<root>/.locks`, outside
    every domain, so listings of version folders only ever show published files."""

    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def check(self) -> None:
        return None  # folders are created on first write

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, path: str, data: bytes, etag: str | None) -> bool:
        target = Path(path)
        if etag is None:
            return self._link_new(target, lambda tmp: tmp.write_bytes(data))
        with self._flock(target):
            current = self.read(path)
            if current is None or current[1] != etag:
                return False
            tmp = self._tmp_path()
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return True

    def delete_if(self, path: str, etag: str) -> bool:
        with self._flock(Path(path)):
            current = self.read(path)
            if current is None or current[1] != etag:
                return False
            Path(path).unlink()
        return True

    def upload_new(self, local: Path, path: str) -> bool:
        return self._link_new(Path(path), lambda tmp: shutil.copyfile(local, tmp))

    def download(self, path: str, local: Path) -> None:
        shutil.copyfile(path, local)

    def open(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def walk(self, path: str) -> dict[str, _Object]:
        base = Path(path)
        private = {self.root / ".tmp", self.root / ".locks"}
        found = {}
        for directory, subdirs, names in os.walk(base):
            subdirs[:] = [name for name in subdirs if Path(directory) / name not in private]
            for name in names:
                full = Path(directory) / name
                try:
                    stat = full.stat()
                except FileNotFoundError:
                    continue  # removed while we listed (gc, a released lock)
                found[full.relative_to(base).as_posix()] = _Object(size=stat.st_size, mtime=stat.st_mtime)
        return found

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        # Remove the folders the files left empty, deepest first, up to (not including) the domain folder.
        for directory in sorted({Path(p).parent for p in paths}, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def abort_uploads(self, path: str, started_before: float) -> list[str]:
        return []  # files are written whole to .tmp and linked into place: there are no partial uploads

    def _link_new(self, target: Path, fill: Callable[[Path], object]) -> bool:
        """Create `target` atomically with its full content: write a temp file, then hard-link it into place.
        link() fails if the target exists (like O_CREAT|O_EXCL), and readers never see a half-written file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_path()
        try:
            fill(tmp)
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _tmp_path(self) -> Path:
        folder = self.root / ".tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    @contextlib.contextmanager
    def _flock(self, target: Path) -> Iterator[None]:
        """Exclusive flock keyed by the target's path. The kernel drops it if the holder dies: no stale locks."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(str(target).encode()).hexdigest()[:32]
        with open(folder / key, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


# -------------------------------------------------------------------- helpers


def _parse_url(url: str) -> tuple[str, str, str]:
    """(normalized URL, scheme, root) where root is `bucket[/prefix]` or an absolute path."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise RegistryError(f"registry URL {url!r} must not have a query or fragment")
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket or re.match(r"^\d+\.\d+\.\d+\.\d+$", bucket):
            raise RegistryError(
                f"bucket name {bucket!r} in {url!r} is invalid: S3 buckets are 3-63 lowercase letters, digits, "
                f"'.' or '-', starting and ending with a letter or digit"
            )
        prefix = [part for part in parts.path.split("/") if part]
        _check_prefix(prefix, url)
        root = "/".join([bucket, *prefix])
        return f"s3://{root}", "s3", root
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise RegistryError(f"registry URL {url!r} must be absolute: file:///abs/path (three slashes)")
        prefix = [part for part in parts.path.split("/") if part]
        if not prefix:
            raise RegistryError(f"registry URL {url!r} points at the filesystem root: use a folder")
        _check_prefix(prefix, url)
        root = "/" + "/".join(prefix)
        return f"file://{root}", "file", root
    raise RegistryError(f"registry URL {url!r} is not supported: use s3://bucket/prefix or file:///abs/path")


def _check_prefix(parts: list[str], url: str) -> None:
    for part in parts:
        if not _PATH_PART_RE.match(part):
            raise RegistryError(
                f"path part {part!r} of {url!r} is invalid: use letters, digits, '.', '_' or '-', not starting "
                f"with '.' (no '..')"
            )


def _validate_alias(alias: str) -> str:
    validate_name(alias, "alias")
    if _VERSION_REF_RE.match(alias):
        raise RegistryError(f"alias name {alias!r} looks like a version number: pick a word, e.g. 'prod'")
    return alias


def _positive(version: int | None) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistryError(f"version {version!r} is invalid: versions are integers from 1")
    return version


def _file_problem(rel: str) -> str | None:
    """Why `rel` may not be stored in a version folder, or None if it may."""
    if not all(_PATH_PART_RE.match(part) for part in rel.split("/")):
        return "is not a plain relative file name (letters, digits, '.', '_', '-'; no hidden or '..' parts)"
    suffix = posixpath.splitext(rel)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        return (
            f"is a pickle-based format ({suffix}) that can run code when loaded: store weights as .safetensors "
            f"(save_pretrained(..., safe_serialization=True))"
        )
    if suffix not in ALLOWED_SUFFIXES:
        return f"has a type the registry does not store ({suffix or 'no suffix'}; allowed: {sorted(ALLOWED_SUFFIXES)})"
    return None


def _scan_adapter_dir(local_dir: Path) -> dict[str, FileEntry]:
    """Hash every file of an adapter folder; refuse symlinks, refused types and a folder missing the adapter."""
    if not local_dir.is_dir():
        raise RegistryError(f"{local_dir} is not a folder: pass the folder written by save_pretrained")
    files = {}
    for path in sorted(local_dir.rglob("*")):
        rel = path.relative_to(local_dir).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise RegistryError(f"{rel} in {local_dir} is a symlink or special file: copy the real file in")
        if path.is_dir():
            continue
        problem = _file_problem(rel) or ("is reserved for the registry" if rel == MANIFEST else None)
        if problem:
            raise RegistryError(f"{rel} in {local_dir} {problem}")
        with open(path, "rb") as handle:
            files[rel] = _hash(handle)
    missing = sorted(REQUIRED_FILES - files.keys())
    if missing:
        raise RegistryError(
            f"{local_dir} lacks {missing}: it is not a PEFT adapter folder (save_pretrained writes them)"
        )
    return files


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(_RESERVED_MANIFEST_KEYS & metadata.keys())
    if clash:
        raise RegistryError(f"metadata keys {clash} are reserved for the manifest itself: rename them")
    return _json_roundtrip(metadata, "metadata")


def _check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(_RESERVED_HISTORY_KEYS & record.keys())
    if clash:
        raise RegistryError(f"record keys {clash} are set by the registry: rename them")
    return _json_roundtrip(record, "record")


def _json_roundtrip(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be plain JSON (no NaN, no objects): {exc}") from None


def _check_file(manifest: Manifest, name: str, found: FileEntry) -> None:
    """Raise IntegrityError unless `found` (hashed from the store or the download) matches the manifest."""
    expected = manifest.files[name]
    if found.size != expected.size:
        raise IntegrityError(
            f"{manifest.domain} v{manifest.version}: {name!r} is {found.size} bytes, the manifest says "
            f"{expected.size}: the file or the manifest was changed after publishing; do not use this version"
        )
    if found.sha256 != expected.sha256:
        raise IntegrityError(
            f"{manifest.domain} v{manifest.version}: {name!r} has sha256 {found.sha256[:16]}..., the manifest "
            f"says {expected.sha256[:16]}...: the file or the manifest was changed after publishing; do not use "
            f"this version"
        )


def _hash(handle: IO[bytes]) -> FileEntry:
    """sha256 and size of a stream, read in 16 MiB chunks; closes it."""
    digest = hashlib.sha256()
    size = 0
    with handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _is_manifest(rel: str, depth: int = 3) -> bool:
    """`[<domain>/]v<N>/manifest.json`, depth counting the domain part when present."""
    parts = rel.split("/")
    return len(parts) == depth and parts[-1] == MANIFEST and bool(_VERSION_DIR_RE.match(parts[-2]))


def _in_version(rel: str) -> bool:
    """True for a file inside a version folder: `v<N>/...`, relative to the domain folder."""
    return "/" in rel and bool(_VERSION_DIR_RE.match(rel.split("/", 1)[0]))


def _version_of(rel: str) -> int:
    """N of a path relative to the domain folder that starts `v<N>/`."""
    head = rel.split("/", 1)[0]
    match = _VERSION_DIR_RE.match(head)
    if match is None:
        raise RegistryError(f"internal: {rel!r} is not inside a version folder")
    return int(match.group(1))


def _credential_strings(options: Mapping[str, Any]) -> tuple[str, ...]:
    values = [options.get(name) for name in ("key", "secret", "token")]
    values += [os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    # Short strings would match by accident; real keys and secrets are 16+ characters.
    return tuple(value for value in values if isinstance(value, str) and len(value) >= 8)


def _client_error(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """The botocore ClientError behind `exc`: s3fs re-raises them as OSError subclasses with the cause set."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, botocore.exceptions.ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _precondition_failed(exc: BaseException) -> bool:
    """True for a failed If-Match/If-None-Match. s3fs turns 412 into FileExistsError only when the server
    names the failed condition (AWS, moto); SeaweedFS does not, so look at the status code underneath.
    409 is AWS's "a concurrent conditional write is in progress": also lost, so re-read and retry."""
    if isinstance(exc, FileExistsError):
        return True
    error = _client_error(exc)
    if error is None:
        return False
    code = error.response.get("Error", {}).get("Code", "")
    return _status(error) in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _classify(exc: BaseException) -> Literal["transient", "denied", "no_bucket", "other"]:
    error = _client_error(exc)
    if error is not None:
        code = error.response.get("Error", {}).get("Code", "")
        status = _status(error)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
            return "transient"
        if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return "denied"
        if code == "NoSuchBucket":
            return "no_bucket"
        return "other"
    transient = (
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        aiohttp.ClientError,
        ConnectionError,
        TimeoutError,
    )
    return "transient" if isinstance(exc, transient) else "other"


def _reason(exc: BaseException) -> str:
    error = _client_error(exc)
    if error is not None:
        code = error.response.get("Error", {}).get("Code", "") or str(_status(error))
        return f"{code} (HTTP {_status(error)})"
    return f"{type(exc).__name__}: {exc}"


def _no_bucket_message(bucket: str, endpoint: str) -> str:
    return (
        f"bucket {bucket!r} does not exist at {endpoint}: create it (`loramill store up` creates 'loramill') "
        f"or fix the registry URL"
    )


def _ref(version: int | None | str) -> str:
    return "nothing (not set)" if version is None else f"v{version}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

"""`Registry`: versioned adapters under one URL. The protocol (claim, upload, manifest last, verify, move
`latest`, copy into the serving view) lives here; names, documents, hashing, aliases, locks and the stores live in
the sibling modules."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from infra.registry.aliases import advance_latest, move_alias, read_alias
from infra.registry.backend import Backend, ObjectLock, StoredObject
from infra.registry.connection import Connection
from infra.registry.documents import (
    SCHEMA,
    AliasState,
    FileEntry,
    Manifest,
    PublishedVersion,
    Reservation,
    Retention,
    SkippedVersion,
    VersionInfo,
    check_metadata,
    check_record,
    now,
    owner,
)
from infra.registry.errors import ConflictError, IntegrityError, RegistryError
from infra.registry.integrity import check_file, check_listing, check_manifest_files, hash_stream, scan_adapter_dir
from infra.registry.local import LocalBackend
from infra.registry.locks import hold_lock
from infra.registry.rules import (
    LATEST,
    LEGACY_CLAIM,
    MANIFEST,
    SERVE,
    VIEW_FILES,
    check_location,
    claim_key,
    claimed_version,
    in_version,
    is_manifest,
    positive,
    validate_alias,
    validate_name,
    version_of,
    version_ref,
    view_name,
)
from lora.names import is_valid_name
from lora.redact import credential_values


# How often one switch of an alias view follows an alias that keeps moving under it before giving up.
_VIEW_ATTEMPTS = 20


class Registry:
    """Versioned adapters under one URL. Safe to share between threads and to run from many processes."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
        retention: Retention | None = None,
    ) -> None:
        """Open the registry at `url`; nothing is contacted until the first operation.

        `storage_options` go to s3fs (`endpoint_url`, `key`, `secret`, ...); without them s3fs reads the AWS_*
        environment variables. Transient failures (connection refused, timeouts, 5xx) are retried `retries`
        times in all, sleeping `backoff_s`, 2x, 4x, ... in between. With `retention`, every object of a version
        is written under S3 Object Lock (the bucket must have it enabled). Raises RegistryError for a malformed
        URL, or for `retention` on a file:// registry.
        """
        if retries < 1:
            raise RegistryError(f"retries must be at least 1, got {retries}")
        options = dict(storage_options or {})
        self.url, scheme, root = check_location(url, options)
        if retention is not None and scheme != "s3":
            raise RegistryError(f"retention needs S3 Object Lock; {self.url} is a folder, whose owner can always "
                                "change it: use an s3:// bucket created with Object Lock, or no retention")
        self.retention = retention
        backend: Backend
        if scheme == "s3":
            # Imported here: s3fs, aiohttp and botocore take a while to load, and file:// registries need none.
            from infra.registry.s3 import S3Backend

            backend = S3Backend(root.split("/", 1)[0], options)
        else:
            backend = LocalBackend(Path(root))
        self._conn = Connection(
            backend, root, retries=retries, backoff_s=backoff_s, secrets=credential_values(options)
        )

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # ---------------------------------------------------------------- reading

    def location(self, domain: str, version: int | None = None) -> str:
        """The URL of a domain's folder, or of one version's folder."""
        parts = [validate_name(domain)] + ([f"v{positive(version)}"] if version is not None else [])
        return self._conn.url(self._conn.path(*parts))

    def view_location(self, domain: str | None = None, ref: str | int | None = None) -> str:
        """The URL of the serving view (the folder to point vLLM or Ray Serve at), or of one adapter in it:
        `domain` at version `ref` (N or `vN`) or at alias `ref`."""
        if domain is None:
            return self._conn.url(self._conn.path(SERVE))
        number = version_ref(str(ref))
        name = view_name(validate_name(domain), f"v{positive(number)}" if number is not None
                         else validate_alias(str(ref)))
        return self._conn.url(self._conn.path(SERVE, name))

    def domains(self) -> list[str]:
        """Domains with at least one complete version, sorted."""
        listing = self._conn.walk(self._conn.root, "listing domains")
        found = {rel.split("/", 1)[0] for rel in listing if is_manifest(rel)}
        return sorted(name for name in found if is_valid_name(name))

    def versions(self, domain: str) -> list[int]:
        """Complete versions of `domain` (those with a manifest), ascending. Incomplete uploads are invisible."""
        listing = self._conn.walk(self._conn.path(validate_name(domain)), f"listing versions of {domain}")
        return sorted(version_of(rel) for rel in listing if is_manifest(rel, depth=2))

    def manifest(self, domain: str, version: int) -> Manifest:
        """The manifest of a complete version. Raises RegistryError if there is none, IntegrityError if malformed."""
        path = self._conn.path(validate_name(domain), f"v{positive(version)}", MANIFEST)
        found = self._conn.read(path, f"reading {domain} v{version}")
        if found is None:
            raise RegistryError(
                f"{domain} has no complete version v{version} (versions: {self.versions(domain) or 'none'})"
            )
        try:
            manifest = Manifest.model_validate_json(found[0])
        except ValidationError as exc:
            raise IntegrityError(
                f"{self._conn.url(path)} is malformed ({exc.error_count()} errors, first: {exc.errors()[0]['msg']}): "
                f"do not use this version"
            ) from None
        if manifest.domain != domain or manifest.version != version:
            raise IntegrityError(
                f"{self._conn.url(path)} describes {manifest.domain} v{manifest.version}, not {domain} v{version}: "
                f"it was copied or edited; do not use this version"
            )
        check_manifest_files(manifest)
        return manifest

    def alias(self, domain: str, alias: str) -> AliasState | None:
        """The alias's current state and history, or None if it was never set."""
        state, _ = read_alias(self._conn, validate_name(domain), validate_name(alias, "alias"))
        return state

    def aliases(self, domain: str) -> dict[str, AliasState]:
        """Every alias of `domain`, by name."""
        listing = self._conn.walk(self._conn.path(validate_name(domain), "aliases"), f"listing aliases of {domain}")
        names = sorted(rel[: -len(".json")] for rel in listing if rel.endswith(".json") and "/" not in rel)
        found = {name: self.alias(domain, name) for name in names if is_valid_name(name)}
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
        version = version_ref(str(ref))
        if version is not None:
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

    def describe(self, domain: str | None = None, *, verify: bool = False) -> list[VersionInfo]:
        """One row per complete version (of `domain`, or of every domain): sizes, aliases, metrics, the retention
        its manifest was written with, and `problem`.

        Without `verify` nothing is downloaded: a version's problem is what its manifest and its folder's listing
        show (missing, extra or resized files), else what a later publish found when it skipped the version as a
        parent. With `verify`, every file is re-hashed on the store (`verify`) and that result replaces the later
        publish's finding.
        """
        rows = []
        for name in [validate_name(domain)] if domain is not None else self.domains():
            by_version: dict[int, list[str]] = {}
            for alias_name, state in self.aliases(name).items():
                by_version.setdefault(state.version, []).append(alias_name)
            listing = self._conn.walk(self._conn.path(name), f"listing {name}")
            manifests: dict[int, Manifest | IntegrityError] = {}
            for version in sorted(version_of(rel) for rel in listing if is_manifest(rel, depth=2)):
                try:
                    manifests[version] = self.manifest(name, version)
                except IntegrityError as error:
                    manifests[version] = error
            found_later = {
                skipped.version: f"failed verification when v{later.version} was published: {skipped.reason}"
                for later in manifests.values() if isinstance(later, Manifest)
                for skipped in later.skipped_parents
            }
            for version, manifest in manifests.items():
                aliases = sorted(by_version.get(version, []))
                if isinstance(manifest, IntegrityError):
                    rows.append(VersionInfo(domain=name, version=version, created_at=None, parent_version=None,
                                            files=None, size_bytes=None, aliases=aliases, metrics={}, lock=None,
                                            problem=str(manifest)))
                    continue
                folder = {rel.split("/", 1)[1]: obj for rel, obj in listing.items() if rel.startswith(f"v{version}/")}
                try:
                    if verify:
                        self.verify(name, version)
                    else:
                        check_listing(manifest, folder, self.location(name, version))
                    problem = None if verify else found_later.get(version)
                except IntegrityError as error:
                    problem = str(error)
                metrics = manifest.metadata.get("metrics")
                path = self._conn.path(name, f"v{version}", MANIFEST)
                lock = self._conn.call(f"reading the retention of {name} v{version}",
                                       lambda: self._conn.backend.lock_of(path))
                rows.append(
                    VersionInfo(
                        domain=name,
                        version=version,
                        created_at=manifest.created_at,
                        parent_version=manifest.parent_version,
                        files=len(manifest.files),
                        size_bytes=manifest.size_bytes,
                        aliases=aliases,
                        metrics=metrics if isinstance(metrics, dict) else {},
                        lock=lock,
                        problem=problem,
                    )
                )
        return rows

    def verify(self, domain: str, version: int) -> Manifest:
        """Re-read the manifest and re-hash every file on the store; return the manifest if all match.

        Raises IntegrityError naming the first file that is missing, changed, extra or of a refused type.
        """
        manifest = self.manifest(domain, version)
        self._check_listing(manifest)
        for name in manifest.files:
            path = self._conn.path(domain, f"v{version}", name)
            found = self._conn.call(f"hashing {domain} v{version}/{name}",
                                    lambda: hash_stream(self._conn.backend.open(path)))
            check_file(manifest, name, found)
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
            for name in manifest.files:
                local = staging / name
                local.parent.mkdir(parents=True, exist_ok=True)
                path = self._conn.path(domain, f"v{version}", name)
                self._conn.call(f"downloading {domain} v{version}/{name}",
                                lambda: self._conn.backend.download(path, local))
                with open(local, "rb") as handle:
                    check_file(manifest, name, hash_stream(handle))
            if dest.exists():
                raise RegistryError(f"{dest} appeared while pulling: pull never overwrites; nothing was changed")
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    # ---------------------------------------------------------------- writing

    def reserve(self, domain: str) -> Reservation:
        """Claim the next version number of `domain` and decide its parent, in that order and in one place.

        The number is claimed with a conditional create of `claims/v<N>.json` beside the version folders, so that
        a version folder holds only its manifest's files (concurrent publishers get distinct numbers). The parent
        is then the newest complete version below N that passes `verify` now; newer ones that fail are skipped and
        named with the reason. The manifest records exactly this parent, so documents a
        publisher writes into the version from the reservation (the audit's change log) say the same. A
        reservation never published is an abandoned upload: gc removes its claim after the grace period.
        Raises RegistryError if the store cannot be reached, or `retention` is set and the bucket has no Object Lock.
        """
        validate_name(domain)
        lock = self._lock_from_now()
        version, claim = self._claim_version(domain)
        parent: int | None = None
        skipped: list[SkippedVersion] = []
        for earlier in reversed([v for v in self.versions(domain) if v < version]):
            try:
                self.verify(domain, earlier)
            except IntegrityError as error:
                skipped.append(SkippedVersion(version=earlier, reason=str(error)))
                continue
            parent = earlier
            break
        return Reservation(domain=domain, version=version, parent_version=parent, skipped_parents=skipped,
                           claim=claim, lock=lock)

    def publish(self, domain: str, local_dir: Path, metadata: Mapping[str, Any] | None = None) -> PublishedVersion:
        """Publish the adapter folder `local_dir` as the next version of `domain` and move `latest` to it.

        Checks the folder and `metadata` first, then `reserve`s the version, then `publish_reserved`. Concurrent
        publishers get distinct versions. Raises RegistryError before the commit point: then no version was
        created. After it, see `settle`.
        """
        files, extra = self._check_upload(validate_name(domain), Path(local_dir), metadata)
        return self._upload_and_settle(self.reserve(domain), Path(local_dir), files, extra)

    def publish_reserved(
        self, reservation: Reservation, local_dir: Path, metadata: Mapping[str, Any] | None = None
    ) -> PublishedVersion:
        """Publish `local_dir` as the version `reservation` claimed, with the parent it decided.

        Steps: check the folder (adapter_config.json and adapter_model.safetensors required; only allowed file
        types, never pickles), upload every file (create-only), write manifest.json last (the commit point), then
        `settle` the version. `metadata` is merged into the manifest; it must be JSON and hold no credential.
        Raises RegistryError before the commit point: then no version was created. After it, see `settle`.
        """
        files, extra = self._check_upload(reservation.domain, Path(local_dir), metadata)
        return self._upload_and_settle(reservation, Path(local_dir), files, extra)

    def settle(self, manifest: Manifest) -> PublishedVersion:
        """What follows a version's commit point: re-read its manifest, re-hash every file on the store, then move
        `latest` forward to it (never back), then copy its adapter into the serving view: `serve/<domain>.v<N>/`,
        and `serve/<domain>.latest/` switched to whatever `latest` points at.

        The version exists from its manifest on, so a store that cannot be reached here does not make the publish
        a failure: the result says why in `unverified`, and settling it again later finishes the job. Raises
        IntegrityError if the store holds other bytes than the manifest records (then nothing reaches the view).
        """
        domain, version = manifest.domain, manifest.version
        published = PublishedVersion(domain=domain, version=version, url=self.location(domain, version),
                                     manifest=manifest)
        try:
            self.verify(domain, version)
            advance_latest(self._conn, domain, version)
            with tempfile.TemporaryDirectory(prefix="loramill-view-") as staging:
                self._write_version_view(manifest, Path(staging))
                self._switch_alias_view(domain, LATEST, Path(staging))
        except IntegrityError:
            raise
        except RegistryError as error:
            return published.model_copy(update={"unverified": str(error)})
        return published

    def promote(
        self,
        domain: str,
        version: int,
        alias: str,
        *,
        expected: int | None | Literal["any"] = "any",
        record: Mapping[str, Any] | None = None,
    ) -> AliasState:
        """Point `alias` at complete `version` by compare-and-swap, appending the move to the alias history, then
        switch the alias's serving view `serve/<domain>.<alias>/` to the version's adapter.

        `expected` is the version the caller believes the alias points at now (None: not set yet); if another
        writer moved it first, ConflictError is raised and nothing changes, so of promoters expecting the same
        state exactly one wins. "any" skips that check but still never loses a concurrent move. `record`
        (who, forced, gate numbers, reason) is stored in the history entry; it must be JSON, hold no
        credential and not use the keys at/from/to/generation. Raises IntegrityError, before the alias moves,
        if the version fails `verify`; RegistryError naming the fix if the alias moved but its view could not be
        switched.
        """
        validate_name(domain)
        validate_alias(alias)
        extra = check_record(record or {})
        if version not in self.versions(domain):
            raise RegistryError(f"{domain} has no complete version v{version}: publish it before promoting it")
        self.verify(domain, version)
        state = move_alias(self._conn, domain, alias, version, expected=expected, record=extra)
        try:
            with tempfile.TemporaryDirectory(prefix="loramill-view-") as staging:
                self._switch_alias_view(domain, alias, Path(staging))
        except RegistryError as error:
            raise RegistryError(
                f"{alias} of {domain} now points at v{version}, but its serving view "
                f"{self.view_location(domain, alias)} was not switched ({error}): run `loramill promote {domain} "
                f"v{version} {alias}` again"
            ) from error
        return state

    def gc(self, domain: str | None = None, *, grace_s: float = 3600.0) -> list[str]:
        """Delete abandoned uploads: claims and version folders without a manifest where nothing was written for
        `grace_s`; and the claims that loramill before the serving view left inside complete versions.

        Also aborts multipart uploads below the domain started more than `grace_s` ago: a publisher killed inside
        one leaves its parts on the server, invisible to listings, even when its retry then completed the version.
        Returns the URLs of the removed folders, then of the files whose unfinished uploads were aborted. Complete
        versions are never touched. The grace period protects uploads still in progress; keep it well above the
        longest publish.
        """
        removed = []
        for name in [validate_name(domain)] if domain is not None else self._all_domain_names():
            by_version: dict[int, dict[str, StoredObject]] = {}
            for rel, obj in self._conn.walk(self._conn.path(name), f"listing {name}").items():
                version = version_of(rel) if in_version(rel) else claimed_version(rel)
                if version is not None:
                    by_version.setdefault(version, {})[rel] = obj
            listed_at = time.time()
            for version, objects in sorted(by_version.items()):
                if f"v{version}/{MANIFEST}" in objects:
                    legacy = f"v{version}/{LEGACY_CLAIM}"
                    if legacy in objects:
                        path = self._conn.path(name, legacy)
                        self._conn.call(f"removing {name} {legacy}", lambda: self._conn.backend.delete([path]))
                        removed.append(self._conn.url(path))
                    continue
                if listed_at - max(obj.mtime for obj in objects.values()) < grace_s:
                    continue
                paths = [self._conn.path(name, rel) for rel in objects]
                self._conn.call(f"removing abandoned {name} v{version}", lambda: self._conn.backend.delete(paths))
                removed.append(self.location(name, version))
            folder = self._conn.path(name)
            aborted = self._conn.call(f"aborting unfinished uploads of {name}",
                                      lambda: self._conn.backend.abort_uploads(folder, listed_at - grace_s))
            removed += [self._conn.url(path) for path in aborted]
        return removed

    @contextlib.contextmanager
    def lock(self, domain: str, name: str, ttl_s: float) -> Iterator[None]:
        """Hold the lock `name` of `domain` for the `with` block; it expires `ttl_s` after being taken.

        Raises ConflictError if another holder has it and it has not expired. An expired lock is taken over by
        compare-and-swap, so two waiters cannot both get it. Released (only if still ours) on exit.
        """
        with hold_lock(self._conn, domain, name, ttl_s):
            yield

    # ---------------------------------------------------------------- internals

    def _check_upload(
        self, domain: str, local_dir: Path, metadata: Mapping[str, Any] | None
    ) -> tuple[dict[str, FileEntry], dict[str, Any]]:
        """The folder's files and the manifest metadata, both refused before anything is written."""
        files = scan_adapter_dir(local_dir)
        extra = check_metadata(metadata or {})
        self._conn.guard(json.dumps(extra).encode(), "the metadata")
        return files, extra

    def _upload_and_settle(
        self, reservation: Reservation, local_dir: Path, files: dict[str, FileEntry], extra: dict[str, Any]
    ) -> PublishedVersion:
        for name, entry in files.items():
            self._upload(reservation, local_dir / name, name, entry)
        return self.settle(self._commit(reservation, files, extra))

    def _lock_from_now(self) -> ObjectLock | None:
        """The Object Lock for a version reserved now; RegistryError if retention is asked of a bucket without it."""
        if self.retention is None:
            return None
        if not self._conn.call("reading the bucket's Object Lock configuration", self._conn.backend.object_lock):
            bucket = self._conn.root.split("/", 1)[0]
            raise RegistryError(
                f"retention is set but bucket {bucket!r} at {self._conn.backend.describe()} has no Object Lock: create "
                f"the bucket with Object Lock enabled (or enable versioning and then Object Lock on it), or drop "
                f"the retention (publish.retention_days); the embedded store enables it when it starts: "
                f"`loramill store down`, then publish again"
            )
        until = datetime.now(UTC) + timedelta(days=self.retention.days)
        return ObjectLock(mode="GOVERNANCE" if self.retention.mode == "governance" else "COMPLIANCE", until=until)

    def _claim_version(self, domain: str) -> tuple[int, bytes]:
        """Reserve the next version by conditional create of `claims/v<N>.json`; return it and the claim's bytes.

        Starts above every claim and version folder seen, complete or not; the conditional create settles races.
        Claims stay after the commit, so a number is never handed out twice, and carry no Object Lock, so gc can
        remove an abandoned one before a version's retention would end.
        """
        listing = self._conn.walk(self._conn.path(domain), f"listing {domain}")
        taken = [version_of(rel) if in_version(rel) else claimed_version(rel) for rel in listing]
        version = max((number for number in taken if number is not None), default=0) + 1
        claim = json.dumps({"claimed_at": now(), "owner": owner(), "token": uuid.uuid4().hex}).encode()
        for _ in range(1000):
            if self._conn.put_if(self._conn.path(domain, claim_key(version)), claim, None,
                                 f"claiming {domain} v{version}"):
                return version, claim
            version += 1
        raise RegistryError(f"could not claim a version of {domain} after 1000 tries: is something looping?")

    def _commit(self, reservation: Reservation, files: dict[str, FileEntry], metadata: dict[str, Any]) -> Manifest:
        """Write the manifest (create-only): from here on the version exists."""
        domain, version = reservation.domain, reservation.version
        current = self._conn.read(self._conn.path(domain, claim_key(version)), f"reading {domain} v{version} claim")
        if current is None or current[0] != reservation.claim:
            # gc removed an upload that outlived its grace period: committing would expose missing files.
            raise RegistryError(
                f"the claim on {domain} v{version} was removed while uploading (gc ran with a grace period "
                f"shorter than this upload): publish again"
            )
        manifest = Manifest.model_validate(
            {
                "schema": SCHEMA,
                "domain": domain,
                "version": version,
                "parent_version": reservation.parent_version,
                "skipped_parents": reservation.skipped_parents,
                "created_at": now(),
                "files": files,
                **metadata,
            }
        )
        path = self._conn.path(domain, f"v{version}", MANIFEST)
        if not self._conn.put_if(path, manifest.to_json(), None, f"writing {domain} v{version} manifest",
                                 reservation.lock):
            raise RegistryError(f"{self._conn.url(path)} already exists: versions are never overwritten")
        return manifest

    def _upload(self, reservation: Reservation, local: Path, name: str, entry: FileEntry) -> None:
        domain, version = reservation.domain, reservation.version
        what = f"uploading {domain} v{version}/{name}"
        path = self._conn.path(domain, f"v{version}", name)
        if self._conn.call(what, lambda: self._conn.backend.upload_new(local, path, reservation.lock)):
            return
        # The folder is ours by claim, so an existing file is our own retried upload whose first response was
        # lost; anything else there must not be overwritten.
        if self._conn.call(what, lambda: hash_stream(self._conn.backend.open(path))) != entry:
            raise RegistryError(f"{self._conn.url(path)} already exists: version folders are never overwritten")

    def _write_version_view(self, manifest: Manifest, staging: Path) -> None:
        """`serve/<domain>.v<N>/`: created once, under the retention of the version's manifest (Object Lock), so it
        is kept as long as the version. One found with other bytes (a reader's mistake) is written over."""
        domain, version = manifest.domain, manifest.version
        if not servable(manifest):
            return
        source = self._fetch_adapter(manifest, staging)
        manifest_path = self._conn.path(domain, f"v{version}", MANIFEST)
        lock = self._conn.call(f"reading the retention of {domain} v{version}",
                               lambda: self._conn.backend.lock_of(manifest_path))
        folder = view_name(domain, f"v{version}")
        for name in VIEW_FILES:
            path = self._conn.path(SERVE, folder, name)
            what = f"writing the serving view {folder}/{name}"
            if self._conn.call(what, lambda: self._conn.backend.upload_new(source / name, path, lock)):
                continue
            if self._conn.call(what, lambda: hash_stream(self._conn.backend.open(path))) != manifest.files[name]:
                self._conn.call(what, lambda: self._conn.backend.put(source / name, path, lock))

    def _switch_alias_view(self, domain: str, alias: str, staging: Path) -> None:
        """Make `serve/<domain>.<alias>/` hold the adapter of the version `alias` points at.

        The two files are overwritten in place (S3 has no rename), weights before config. Every writer re-reads the
        alias after writing and writes again if it moved meanwhile, so the last writes are always of the version
        the alias points at last, however concurrent moves interleave.
        """
        folder = view_name(domain, alias)
        for _ in range(_VIEW_ATTEMPTS):
            state = self.alias(domain, alias)
            if state is None:
                return
            manifest = self.manifest(domain, state.version)
            paths = [self._conn.path(SERVE, folder, name) for name in VIEW_FILES]
            if not servable(manifest):  # no stale adapter left under the alias's name: the view has none
                listed = self._conn.walk(self._conn.path(SERVE, folder), f"listing the serving view {folder}")
                stale = [path for name, path in zip(VIEW_FILES, paths, strict=True) if name in listed]
                if stale:
                    self._conn.call(f"removing the serving view {folder}", lambda: self._conn.backend.delete(stale))
            else:
                source = self._fetch_adapter(manifest, staging)
                for name, path in zip(VIEW_FILES, paths, strict=True):
                    self._conn.call(f"writing the serving view {folder}/{name}",
                                    lambda: self._conn.backend.put(source / name, path))
            moved = self.alias(domain, alias)
            if moved is not None and moved.generation == state.generation:
                return
        raise ConflictError(f"alias {alias!r} of {domain} kept moving while its serving view was switched "
                            f"{_VIEW_ATTEMPTS} times: the last mover switches it")

    def _fetch_adapter(self, manifest: Manifest, staging: Path) -> Path:
        """The version's adapter files, downloaded once into `staging/v<N>/` and checked against the manifest
        there: the bytes that reach the view are the bytes that were hashed. IntegrityError if one differs."""
        domain, version = manifest.domain, manifest.version
        folder = staging / f"v{version}"
        if folder.is_dir():
            return folder
        partial = staging / f"v{version}.partial"
        partial.mkdir()
        for name in VIEW_FILES:
            path = self._conn.path(domain, f"v{version}", name)
            self._conn.call(f"downloading {domain} v{version}/{name}",
                            lambda: self._conn.backend.download(path, partial / name))
            with open(partial / name, "rb") as handle:
                check_file(manifest, name, hash_stream(handle))
        partial.rename(folder)
        return folder

    def _check_listing(self, manifest: Manifest) -> None:
        """Every file on the store is in the manifest, allowed, present, and of the recorded size."""
        folder = self._conn.path(manifest.domain, f"v{manifest.version}")
        listing = self._conn.walk(folder, f"listing {manifest.domain} v{manifest.version}")
        check_listing(manifest, listing, self._conn.url(folder))

    def _all_domain_names(self) -> list[str]:
        names = {rel.split("/", 1)[0] for rel in self._conn.walk(self._conn.root, "listing domains") if "/" in rel}
        return sorted(name for name in names if is_valid_name(name) and name != SERVE)


def servable(manifest: Manifest) -> bool:
    """Whether model servers can load the version: a PEFT adapter (`VIEW_FILES`). Adapter layers
    (`lora.method: adapter_layers`) are published with their own files, which vLLM and Ray Serve do not read, so
    they get no serving view."""
    return all(name in manifest.files for name in VIEW_FILES)

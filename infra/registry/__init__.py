"""The adapter registry's storage layer: versioned, immutable, verified LoRA adapters on object storage.

A registry lives at `s3://bucket/prefix` (through s3fs) or `file:///abs/path`; both behave the same:

    <domain>/claims/v<N>.json        who reserved version N and when: created with If-None-Match: *, kept after
                                     the commit (a number is never handed out twice), no Object Lock
    <domain>/v<N>/<adapter files>    created with If-None-Match: *, so a version's files are never overwritten
    <domain>/v<N>/manifest.json      written last: a version exists if and only if its manifest does; it names
                                     the parent decided when N was claimed (the newest earlier version that
                                     passed verification then) and the newer ones skipped because they failed.
                                     A version folder holds exactly the manifest's files and the manifest
    <domain>/aliases/<alias>.json    the version an alias points at, and every move it made (its history);
                                     moved by compare-and-swap on the object's ETag
    <domain>/locks/<name>.json       scheduler locks that expire
    serve/<domain>.v<N>/             the serving view: adapter_config.json and adapter_model.safetensors only,
    serve/<domain>.<alias>/          copied from a verified version; what vLLM and Ray Serve LLM point at. A
                                     version's folder is written once; an alias's is switched when it moves

Readers list manifests, never "directories": SeaweedFS keeps listing an emptied folder as a common prefix.
With a `Retention` (S3 buckets with Object Lock), every object under `v<N>/` and `serve/<domain>.v<N>/` is written
with a retain-until date and mode, so that no client can delete or change the published bytes before it passes;
claims and alias views are not: gc removes abandoned claims for good, and on a bucket with Object Lock (always
versioned) every switch of an alias view keeps the replaced bytes as an older object version, which a lifecycle
rule can expire only if it carries no retention.
Credentials never reach a message, a repr or a stored byte (publish and promote refuse documents holding them).

The package, from the bottom up:

    errors        RegistryError, ConflictError, IntegrityError
    rules         names, version references, URLs, which files a version may hold
    documents     the manifest, the alias state and the rows reads return (pydantic)
    backend       the storage primitives a store implements; local (file://) and s3 (s3fs, imported only for
                  s3:// registries) implement them
    integrity     hashing, scanning an adapter folder, checking a version against its manifest
    connection    keys under the root, retried calls, the credential guard
    aliases       compare-and-swap moves with history
    locks         expiring scheduler locks
    facade        Registry, the one entry point
"""

from infra.registry.documents import (
    AliasState,
    FileEntry,
    Manifest,
    PublishedVersion,
    Reservation,
    Retention,
    SkippedVersion,
    VersionInfo,
)
from infra.registry.errors import ConflictError, IntegrityError, RegistryError
from infra.registry.facade import Registry
from infra.registry.integrity import folder_matches_manifest
from infra.registry.rules import LATEST, MANIFEST, validate_name
from lora.names import MAX_NAME_LENGTH, NAME_PATTERN

__all__ = [
    "LATEST",
    "MANIFEST",
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "AliasState",
    "ConflictError",
    "FileEntry",
    "IntegrityError",
    "Manifest",
    "PublishedVersion",
    "Registry",
    "RegistryError",
    "Reservation",
    "Retention",
    "SkippedVersion",
    "VersionInfo",
    "folder_matches_manifest",
    "validate_name",
]

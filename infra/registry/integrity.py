"""Hashing, scanning an adapter folder, and checking what is stored against its manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from infra.registry.backend import StoredObject
from infra.registry.documents import FileEntry, Manifest
from infra.registry.errors import IntegrityError, RegistryError
from infra.registry.rules import ADAPTER_LAYER_FILES, LEGACY_CLAIM, MANIFEST, REQUIRED_FILES, file_problem

CHUNK = 16 * 2**20


def hash_stream(handle: IO[bytes]) -> FileEntry:
    """sha256 and size of a stream, read in 16 MiB chunks; closes it."""
    digest = hashlib.sha256()
    size = 0
    with handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def scan_adapter_dir(local_dir: Path) -> dict[str, FileEntry]:
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
        problem = file_problem(rel) or ("is reserved for the registry" if rel == MANIFEST else None)
        if problem:
            raise RegistryError(f"{rel} in {local_dir} {problem}")
        with open(path, "rb") as handle:
            files[rel] = hash_stream(handle)
    missing = sorted(REQUIRED_FILES - files.keys())
    if missing and not ADAPTER_LAYER_FILES <= files.keys():
        raise RegistryError(
            f"{local_dir} lacks {missing}: it is not a PEFT adapter folder (save_pretrained writes them), nor one "
            f"of adapter layers ({', '.join(sorted(ADAPTER_LAYER_FILES))})"
        )
    return files


def folder_matches_manifest(folder: Path, manifest: Manifest) -> bool:
    """True if the local ``folder`` holds exactly the manifest's files (no symlinks), each with its size and sha256:
    a cached copy of a version that may be used as it is."""
    present = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    if present.keys() != manifest.files.keys():
        return False
    for name, entry in manifest.files.items():
        path = present[name]
        if path.is_symlink() or path.stat().st_size != entry.size:
            return False
        with open(path, "rb") as handle:
            if hash_stream(handle).sha256 != entry.sha256:
                return False
    return True


def check_manifest_files(manifest: Manifest) -> None:
    """Raise IntegrityError if the manifest lists a file the registry would not store."""
    for name in manifest.files:
        problem = file_problem(name)
        if problem:
            raise IntegrityError(f"{manifest.domain} v{manifest.version}: the manifest lists {name!r}, which {problem}")


def check_listing(manifest: Manifest, listing: Mapping[str, StoredObject], folder_url: str) -> None:
    """Every file in the version folder's `listing` is in the manifest, allowed, present, and of the recorded size.

    `folder_url` is the version folder's URL, for naming what to remove.
    """
    where = f"{manifest.domain} v{manifest.version}"
    for rel in sorted(listing):
        if rel in (MANIFEST, LEGACY_CLAIM):
            continue
        if rel not in manifest.files:
            problem = file_problem(rel) or "is not a file the registry allows here"
            raise IntegrityError(
                f"{where}: {rel!r} is on the store but not in the manifest ({rel} {problem}); refusing the "
                f"whole version. Remove {folder_url}/{rel}"
            )
    for name, entry in manifest.files.items():
        if name not in listing:
            raise IntegrityError(f"{where}: {name!r} is in the manifest but missing on the store")
        if listing[name].size != entry.size:
            raise IntegrityError(
                f"{where}: {name!r} is {listing[name].size} bytes on the store, the manifest says {entry.size}: "
                f"the file was changed after publishing; do not use this version"
            )


def check_file(manifest: Manifest, name: str, found: FileEntry) -> None:
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

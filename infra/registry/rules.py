"""What the registry accepts: names, version references, URLs, and the files a version may hold; and how keys
inside a domain folder are read (`v<N>/...`, `claims/v<N>.json`) and serving-view folders named. Pure functions,
no I/O."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from infra.registry.errors import RegistryError
from lora.names import NAME_RULE, SERVING_VIEW, is_valid_name

LATEST = "latest"
MANIFEST = "manifest.json"
CLAIMS = "claims"
# Where loramill before the serving view wrote claims: inside the version folder. Tolerated there when reading, and
# removed from complete versions by gc, so that registries written then become manifest-only folders too.
LEGACY_CLAIM = ".claim"
SERVE = SERVING_VIEW
REQUIRED_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})
# What a folder of adapter layers holds instead (lora/bottleneck.py FILES; the registry does not import torch).
ADAPTER_LAYER_FILES = frozenset({"bottleneck_config.json", "bottleneck_model.safetensors"})
# What a serving-view folder holds, in the order it is written: weights before config, so that a reader who reads
# the config first and sees the new one also gets the new weights (README: the serving view).
VIEW_FILES = ("adapter_model.safetensors", "adapter_config.json")
# What an adapter folder may hold: safetensors weights, configs, tokenizer files (tokenizer.model is
# sentencepiece protobuf, chat_template.jinja is text), model cards and audit reports.
ALLOWED_SUFFIXES = frozenset(
    {".safetensors", ".json", ".jsonl", ".md", ".txt", ".jinja", ".model", ".yaml", ".yml", ".csv", ".png", ".svg"}
)
# Named separately for a sharper message: loading these unpickles, which can run arbitrary code.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})

_VERSION_REF_RE = re.compile(r"^v?([0-9]+)$")
# One part of a file name inside a version, or of the URL prefix: no hidden parts, so never '.' or '..'.
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")
_CLAIM_RE = re.compile(rf"^{CLAIMS}/v([1-9][0-9]*)\.json$")


def validate_name(value: str, kind: str = "domain") -> str:
    """Return `value` if it is a valid domain, alias or lock name, else raise RegistryError naming the fix.

    The rule is lora.names's (1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit). Such a
    name cannot hold '/', '.' or '..', so keys built from it stay under the registry prefix. The domain name
    `serve` is reserved: `<prefix>/serve/` holds the serving view, which model servers list as adapters.
    """
    if not is_valid_name(value):
        raise RegistryError(f"{kind} name {value!r} is invalid: use {NAME_RULE}")
    if kind == "domain" and value == SERVE:
        raise RegistryError(f"domain name {SERVE!r} is reserved: <registry>/{SERVE}/ holds the serving view that "
                            f"vLLM and Ray Serve read; rename the domain (e.g. '{SERVE}-desk')")
    return value


def validate_alias(alias: str) -> str:
    validate_name(alias, "alias")
    if _VERSION_REF_RE.match(alias):
        raise RegistryError(f"alias name {alias!r} looks like a version number: pick a word, e.g. 'prod'")
    return alias


def version_ref(ref: str) -> int | None:
    """N if `ref` names a version by number (`vN` or `N`), else None (it is an alias)."""
    match = _VERSION_REF_RE.match(ref)
    return int(match.group(1)) if match else None


def positive(version: int | None) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistryError(f"version {version!r} is invalid: versions are integers from 1")
    return version


def parse_url(url: str) -> tuple[str, str, str]:
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


def check_location(url: str, storage_options: Mapping[str, Any]) -> tuple[str, str, str]:
    """`parse_url`, and storage options only where they apply: every refusal of a registry location, made before
    anything is contacted."""
    normalized, scheme, root = parse_url(url)
    if scheme != "s3" and storage_options:
        raise RegistryError(f"storage_options apply to s3:// URLs only, not to {normalized}")
    return normalized, scheme, root


def _check_prefix(parts: list[str], url: str) -> None:
    for part in parts:
        if not _PATH_PART_RE.match(part):
            raise RegistryError(
                f"path part {part!r} of {url!r} is invalid: use letters, digits, '.', '_' or '-', not starting "
                f"with '.' (no '..')"
            )


def file_problem(rel: str) -> str | None:
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


def is_manifest(rel: str, depth: int = 3) -> bool:
    """`[<domain>/]v<N>/manifest.json`, depth counting the domain part when present."""
    parts = rel.split("/")
    return len(parts) == depth and parts[-1] == MANIFEST and bool(_VERSION_DIR_RE.match(parts[-2]))


def in_version(rel: str) -> bool:
    """True for a file inside a version folder: `v<N>/...`, relative to the domain folder."""
    return "/" in rel and bool(_VERSION_DIR_RE.match(rel.split("/", 1)[0]))


def claim_key(version: int) -> str:
    """The claim of version N, relative to the domain folder."""
    return f"{CLAIMS}/v{version}.json"


def claimed_version(rel: str) -> int | None:
    """N for `claims/v<N>.json` (relative to the domain folder), else None."""
    match = _CLAIM_RE.match(rel)
    return int(match.group(1)) if match else None


def view_name(domain: str, ref: str) -> str:
    """The serving-view folder of a version (`ref` is `v<N>`) or an alias: `<domain>.<ref>`. A name never holds
    '.', so the first dot splits it back unambiguously, and an alias never looks like `v<N>` (validate_alias)."""
    return f"{domain}.{ref}"


def version_of(rel: str) -> int:
    """N of a path relative to the domain folder that starts `v<N>/`."""
    head = rel.split("/", 1)[0]
    match = _VERSION_DIR_RE.match(head)
    if match is None:
        raise RegistryError(f"internal: {rel!r} is not inside a version folder")
    return int(match.group(1))

"""Credential redaction, in one place: what reaches a terminal, a log, a run folder or a published document.

Stdlib only: the CLI's light commands, the data reader, the training stage and the registry all import it.
Credentials live in two places: a URL's ``user:password@`` part, and the ``storage_options`` of a config section
(or AWS_* environment variables).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MASK = "***"
STORAGE_OPTIONS = "storage_options"
"""The config field holding object-store options (endpoint_url, key, secret, ...), in every section that has one."""
_PUBLIC_OPTIONS = frozenset({"endpoint_url"})
_SECRET_OPTIONS = ("key", "secret", "token")
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CREDENTIAL_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
_MIN_SECRET_LENGTH = 8
"""Shorter strings would match by accident; real keys and secrets are 16+ characters."""


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part: data sources are published, credentials never are."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if sep and "@" in netloc:
        # The host follows the last '@' (as urllib reads it): a password may hold '@' itself.
        rest = netloc.rpartition("@")[2] + slash + path
    return f"{scheme}{sep}{rest}"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each (non-empty) secret masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def scrub_url(text: str, url: str) -> str:
    """``text`` (an error from fsspec or a server) with the ``user:password`` part of ``url`` masked."""
    netloc = url.partition("://")[2].partition("/")[0]
    userinfo = netloc.rpartition("@")[0]
    return scrub(text.replace(url, redact_url(url)), [userinfo])


def credential_values(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The secrets an object-store client opened with ``options`` may use: its key/secret/token, or the AWS_*
    environment variables it falls back to. What holds one of them must never be written or shown."""
    values = [options.get(name) for name in _SECRET_OPTIONS] + [os.environ.get(name) for name in AWS_SECRET_ENV]
    return tuple(value for value in values if isinstance(value, str) and len(value) >= _MIN_SECRET_LENGTH)


def names_a_credential(name: str) -> bool:
    """True for an option or setting name that may hold a credential (``secret``, ``aws_access_key_id``, ...)."""
    return bool(_CREDENTIAL_NAME.search(name))


def mask_storage_options(tree: Any) -> Any:
    """A copy of ``tree`` (a config's ``model_dump()``) with every ``storage_options`` value masked except
    ``endpoint_url``: fit for terminals and CI logs, while still showing which options are set."""
    return _map_options(tree, lambda options: {key: value if key in _PUBLIC_OPTIONS else MASK
                                               for key, value in options.items()})


def drop_storage_options(tree: Any) -> Any:
    """A copy of ``tree`` (a config's ``model_dump()``) without any ``storage_options``: fit for files that get
    shared and copied (run folders, published configs)."""
    return _map_options(tree, None)


def _map_options(tree: Any, replace: Callable[[Mapping[str, Any]], dict[str, Any]] | None) -> Any:
    """``tree`` with each ``storage_options`` mapping replaced by ``replace(options)``, or removed if it is None."""
    if isinstance(tree, list):
        return [_map_options(item, replace) for item in tree]
    if not isinstance(tree, Mapping):
        return tree
    mapped = {}
    for key, value in tree.items():
        if key != STORAGE_OPTIONS:
            mapped[key] = _map_options(value, replace)
        elif replace is not None:
            mapped[key] = replace(value)
    return mapped

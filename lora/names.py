"""The name rule for domains, aliases and locks: one definition, for the config and the registry alike.

Stdlib only. A valid name cannot hold '/', '.' or '..', so a registry key or a run folder built from it stays
under its prefix.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 64
NAME_PATTERN = rf"^[a-z0-9][a-z0-9_-]{{0,{MAX_NAME_LENGTH - 1}}}$"
NAME_RULE = f"1-{MAX_NAME_LENGTH} lowercase letters, digits, '-' or '_', starting with a letter or digit"
"""The rule in words, for error messages."""
SERVING_VIEW = "serve"
"""The one domain name refused: a registry's ``<prefix>/serve/`` folder holds its serving view for model servers."""

_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(value: object) -> bool:
    """True if `value` is a string that follows the name rule."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None

"""What registry operations raise. Every message names the problem and the fix, never a credential."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry operation failed; the message names the problem and the fix, never a credential."""


class ConflictError(RegistryError):
    """Another writer got there first: the alias moved away from the expected version, or a lock is held."""


class IntegrityError(RegistryError):
    """What is on the store does not match its manifest, or holds a file the registry does not allow."""


def no_bucket_message(bucket: str, endpoint: str) -> str:
    return (
        f"bucket {bucket!r} does not exist at {endpoint}: create it (`loramill store up` creates 'loramill') "
        f"or fix the registry URL"
    )

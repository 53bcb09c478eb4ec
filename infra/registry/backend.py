"""The few storage primitives the registry needs, which each store (local folders, S3) implements; conditional
writes are where they differ."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Literal, Protocol

ErrorKind = Literal["transient", "denied", "no_bucket", "other"]
"""How the registry treats a failed store call: retry it, or report the credentials, the bucket, or the error."""


@dataclass(frozen=True)
class StoredObject:
    size: int
    mtime: float
    """Seconds since the epoch."""


@dataclass(frozen=True)
class ObjectLock:
    """S3 Object Lock retention of one object version: until `until`, no client can delete or change it; in
    GOVERNANCE mode a user granted s3:BypassGovernanceRetention still can, in COMPLIANCE mode nobody can."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    until: datetime


class Backend(Protocol):
    scheme: str
    errors: tuple[type[BaseException], ...]
    """What its calls raise when the store fails (as opposed to a bug): the registry classifies and retries these."""

    def describe(self) -> str:
        """Where the store is, for messages: the endpoint or the folder."""
        ...

    def classify(self, exc: BaseException) -> ErrorKind: ...

    def reason(self, exc: BaseException) -> str:
        """One line on why a call failed, for messages."""
        ...

    def check(self) -> None: ...

    def read(self, path: str) -> tuple[bytes, str] | None:
        """(content, etag), or None if missing."""
        ...

    def write_if(self, path: str, data: bytes, etag: str | None, lock: ObjectLock | None = None) -> bool:
        """Create (`etag` None) or replace if the current etag matches; False when the precondition fails. `lock`
        is only ever given to a store whose `object_lock` is True."""
        ...

    def delete_if(self, path: str, etag: str) -> bool: ...

    def upload_new(self, local: Path, path: str, lock: ObjectLock | None = None) -> bool:
        """Upload a file that must not exist yet; False if it does."""
        ...

    def put(self, local: Path, path: str, lock: ObjectLock | None = None) -> None:
        """Upload a file over whatever is at `path`: readers see the old object or the new one, never a mix."""
        ...

    def object_lock(self) -> bool:
        """True if the store can write objects under an `ObjectLock`."""
        ...

    def lock_of(self, path: str) -> ObjectLock | None:
        """The retention the object was written with, or None."""
        ...

    def download(self, path: str, local: Path) -> None: ...

    def open(self, path: str) -> IO[bytes]: ...

    def walk(self, path: str) -> dict[str, StoredObject]:
        """Every file below `path`, keyed by its path relative to `path`."""
        ...

    def delete(self, paths: list[str]) -> None: ...

    def abort_uploads(self, path: str, started_before: float) -> list[str]:
        """Abort unfinished multipart uploads below `path` started before `started_before` (epoch seconds);
        return their paths."""
        ...


def classify_os_error(exc: BaseException) -> ErrorKind:
    """A failure that carries no server answer: retry connection trouble, report the rest."""
    return "transient" if isinstance(exc, (ConnectionError, TimeoutError)) else "other"


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

"""One registry's way to its store: keys under the root, every call retried and mapped to a RegistryError, and
the guard that keeps credentials out of what is stored."""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from typing import TypeVar

from infra.registry.backend import Backend, ObjectLock, StoredObject
from infra.registry.errors import RegistryError, no_bucket_message

T = TypeVar("T")


class Connection:
    def __init__(self, backend: Backend, root: str, *, retries: int, backoff_s: float, secrets: tuple[str, ...]):
        """`root` is `bucket[/prefix]` or an absolute path; `secrets` are the credentials the registry was opened
        with, which no stored document may hold."""
        self.backend = backend
        self.root = root
        self._retries = retries
        self._backoff_s = backoff_s
        self._secrets = secrets
        self._checked = False

    def path(self, *parts: str) -> str:
        """`<root>/<parts...>`; raises if the result would leave the registry prefix (it cannot, by the name
        rules: this is the check that keeps it so)."""
        path = posixpath.join(self.root, *parts)
        if posixpath.normpath(path) != path or not path.startswith(self.root + "/") or "/../" in f"{path}/":
            raise RegistryError(f"refusing key {path!r}: it is not strictly inside the registry prefix")
        return path

    def url(self, path: str) -> str:
        return f"{self.backend.scheme}://{path}"

    def call(self, what: str, operation: Callable[[], T]) -> T:
        """Run one store operation, retrying transient failures with exponential backoff; map the rest.

        The first call checks the bucket, so a missing bucket or refused credentials get their own message.
        """
        if not self._checked:
            self._retrying("checking the bucket", self.backend.check)
            self._checked = True
        return self._retrying(what, operation)

    def walk(self, path: str, what: str) -> dict[str, StoredObject]:
        return self.call(what, lambda: self.backend.walk(path))

    def read(self, path: str, what: str) -> tuple[bytes, str] | None:
        return self.call(what, lambda: self.backend.read(path))

    def put_if(self, path: str, data: bytes, etag: str | None, what: str, lock: ObjectLock | None = None) -> bool:
        """Conditional write: create (`etag` None) or replace the object whose ETag is `etag`, under `lock` if
        given. False if beaten."""
        if self.call(what, lambda: self.backend.write_if(path, data, etag, lock)):
            return True
        # A request retried after a lost response fails its precondition against its own first attempt:
        # if what is there now is exactly our bytes, we did win.
        current = self.read(path, what)
        return current is not None and current[0] == data

    def guard(self, data: bytes, what: str) -> None:
        """Refuse to store a document that holds one of the credentials this registry was opened with."""
        if any(secret.encode() in data for secret in self._secrets):
            raise RegistryError(
                f"{what} contains an object-store credential; refusing to write it to the registry. "
                f"Remove the key/secret from it"
            )

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        for attempt in range(1, self._retries + 1):
            try:
                return operation()
            except RegistryError:
                raise
            except self.backend.errors as exc:
                kind = self.backend.classify(exc)
                if kind == "transient" and attempt < self._retries:
                    time.sleep(self._backoff_s * 2 ** (attempt - 1))
                    continue
                raise self._error(kind, what, exc, attempt) from exc
        raise AssertionError("unreachable: the loop returns or raises")

    def _error(self, kind: str, what: str, exc: BaseException, attempts: int) -> RegistryError:
        endpoint = self.backend.describe()
        reason = self.backend.reason(exc)
        if kind == "transient":
            return RegistryError(
                f"cannot reach the object store at {endpoint} while {what}: {reason} (gave up after "
                f"{attempts} tries). Is the server running? `loramill store up` starts the local one; check "
                f"endpoint_url or AWS_ENDPOINT_URL_S3"
            )
        if kind == "denied":
            return RegistryError(
                f"the object store at {endpoint} refused the credentials while {what} ({reason}): check "
                f"key/secret in storage_options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"(`loramill store status` shows the local store's)"
            )
        if kind == "no_bucket":
            return RegistryError(no_bucket_message(self.root.split("/", 1)[0], endpoint))
        return RegistryError(f"object store error at {endpoint} while {what}: {reason}")

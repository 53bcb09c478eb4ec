"""The backend of file:// registries: conditional writes by hard links and flock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from infra.registry.backend import ErrorKind, ObjectLock, StoredObject, classify_os_error, describe_error


class LocalBackend:
    """file:// registries. Temporary files and flock files live in `<root>/.tmp` and `<root>/.locks`, outside
    every domain, so listings of version folders only ever show published files."""

    scheme = "file"
    errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def classify(self, exc: BaseException) -> ErrorKind:
        return classify_os_error(exc)

    def reason(self, exc: BaseException) -> str:
        return describe_error(exc)

    def check(self) -> None:
        return None  # folders are created on first write

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, path: str, data: bytes, etag: str | None, lock: ObjectLock | None = None) -> bool:
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

    def upload_new(self, local: Path, path: str, lock: ObjectLock | None = None) -> bool:
        return self._link_new(Path(path), lambda tmp: shutil.copyfile(local, tmp))

    def put(self, local: Path, path: str, lock: ObjectLock | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_path()
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)  # rename(2): readers open the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)

    def object_lock(self) -> bool:
        return False  # a folder has no retention that its owner could not undo

    def lock_of(self, path: str) -> ObjectLock | None:
        return None

    def download(self, path: str, local: Path) -> None:
        shutil.copyfile(path, local)

    def open(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def walk(self, path: str) -> dict[str, StoredObject]:
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
                found[full.relative_to(base).as_posix()] = StoredObject(size=stat.st_size, mtime=stat.st_mtime)
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

"""Local file rules written once: folders that appear whole or not at all, a file's sha256, an inter-process lock.

Standard library only, so that light commands and every layer (lora/, pipelines/, infra/) can import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(target: Path, suffix: str) -> Path:
    """A unique hidden name next to ``target``: the same filesystem, so renaming it onto ``target`` is atomic."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_folder(target: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block ends, it becomes ``target``.

    Readers see no folder or a complete one, never a half-written one. If ``target`` exists by then (a concurrent
    writer won the race, or it was there before), ours is discarded and theirs kept: writers of the same content,
    such as several workers filling one cache entry, all succeed. ``replace=True`` is for callers that overwrite:
    the old folder is renamed away and ours renamed in (``target`` is missing for that instant), then the old one is
    deleted. On any exception in the block nothing is left behind and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, ".partial")
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0o700 mode would stick to the published folder
    replaced: list[Path] = []
    try:
        yield staging
        while True:
            try:
                os.rename(staging, target)  # refuses a non-empty target folder instead of merging into it
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if not replace:
                break  # a concurrent writer won: keep theirs; ours is removed below
            replaced.append(_sibling(target, ".old"))
            with contextlib.suppress(FileNotFoundError):  # another replacer moved it away first: just retry
                os.rename(target, replaced[-1])
    finally:
        for folder in (staging, *replaced):
            shutil.rmtree(folder, ignore_errors=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``path`` through a temporary sibling and ``os.replace``: readers see the old file or the new one."""
    path = Path(path)
    staging = _sibling(path, ".partial")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def file_sha256(path: Path | str) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path | str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; other processes wait.

    The kernel drops the lock when its holder dies, so a killed process leaves no stale lock behind. A lock is
    per open file, so threads of one process exclude each other too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield

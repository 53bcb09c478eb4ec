"""lora/files.py: atomic folders under concurrent writers, replace mode, clean-up on failure, the lock, hashing,
and nothing imported beyond the standard library."""

import hashlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora.files import atomic_folder, exclusive_lock, file_sha256


def _write_as(target: Path, writer: int, barrier, replace: bool = False) -> None:
    barrier.wait()  # all writers fill their folders at the same moment, then race to rename
    with atomic_folder(target, replace=replace) as folder:
        for part in range(5):
            (folder / f"part{part}").write_text(f"writer {writer}\n" * 1000)


def _race(target: Path, writers: int, replace: bool = False) -> list[int | None]:
    context = multiprocessing.get_context("fork")  # the writers need nothing of the test process but lora.files
    barrier = context.Barrier(writers)
    processes = [context.Process(target=_write_as, args=(target, n, barrier, replace)) for n in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=60)
    return [p.exitcode for p in processes]


@pytest.mark.parametrize("replace", [False, True], ids=["keep-the-winner", "replace"])
def test_concurrent_writers_all_succeed_and_leave_one_complete_folder(tmp_path, replace):
    target = tmp_path / "cache" / "model"
    assert _race(target, writers=6, replace=replace) == [0] * 6
    files = sorted(p.name for p in target.iterdir())
    assert files == [f"part{n}" for n in range(5)]
    # One writer's folder, whole: not a mix of several writers' files.
    assert len({(target / name).read_text() for name in files}) == 1
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no .partial or .old folder left


def test_keep_mode_keeps_an_existing_folder_and_replace_mode_swaps_it(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as folder:
        (folder / "a").write_text("first")
    with atomic_folder(target) as folder:
        (folder / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    with atomic_folder(target, replace=True) as folder:
        (folder / "b").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    if sys.platform == "linux":
        umask = os.umask(0)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700


def test_a_failed_write_leaves_nothing_and_the_old_folder_untouched(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as folder:
            (folder / "half").write_text("x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as folder:
        (folder / "a").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target, replace=True) as folder:
            (folder / "a").write_text("never")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exclusive_lock_admits_one_holder_at_a_time(tmp_path):
    inside, most = [0], [0]
    count_lock = threading.Lock()

    def hold():
        with exclusive_lock(tmp_path / "locks" / "x.lock"):
            with count_lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with count_lock:
                inside[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


def test_file_sha256(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_it_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import lora.files; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lora']"

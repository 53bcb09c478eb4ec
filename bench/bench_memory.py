"""Wall time and peak memory of one command, Ray's processes included.

Samples every 0.5 s: system memory in use above the level before the start, and the summed RSS of the command's
process tree (a local Ray's GCS, raylet and workers are descendants of the driver; the sum counts shared pages
more than once, so it overstates). How the README's main-command figures were measured:

    .venv/bin/python bench/bench_memory.py .venv/bin/loramill run configs/default.yaml
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    baseline = psutil.virtual_memory().used
    started = time.time()
    command = subprocess.Popen(sys.argv[1:])
    root = psutil.Process(command.pid)
    peak_used = peak_rss = 0
    while command.poll() is None:
        peak_used = max(peak_used, psutil.virtual_memory().used - baseline)
        try:
            tree = [root, *root.children(recursive=True)]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:  # a process ended between listing and reading it
            pass
        time.sleep(0.5)
    print(f"exit {command.returncode}; wall {time.time() - started:.0f} s; peak memory in use above start "
          f"{peak_used / 2**30:.2f} GiB; peak RSS of the process tree {peak_rss / 2**30:.2f} GiB", flush=True)
    sys.exit(command.returncode)


if __name__ == "__main__":
    main()

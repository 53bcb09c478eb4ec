"""Shared by the quality scripts: run a loramill command, find a run's output, describe the machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The CLI's module rather than the console script: on a GPU node the project runs from PYTHONPATH, not installed.
LORAMILL = [sys.executable, "-m", "pipelines.cli"]


def loramill(*args: str, log: Path) -> float:
    """Run ``loramill ARGS`` from the repository root, appending its output to ``log``; wall seconds. Exits on
    failure with the log's tail."""
    command = [*LORAMILL, *args]
    print(f"$ {shlex.join(['loramill', *args])}", flush=True)
    started = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"loramill {args[0]} failed (exit {code}); end of {log}:\n{tail}")
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def machine() -> str:
    """CPU model and core count (as on the 2-core development machine), torch version."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"

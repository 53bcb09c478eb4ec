"""Logs for machines: `loramill train --log-format json` writing to files, as under cron or `ray job submit`. The
plain-text log is checked on the first run of a fresh machine (tests/test_cold_cache.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from pipelines.progress import ProgressLine

LORAMILL = Path(sys.executable).with_name("loramill")


def run_cli(ray_cluster, args: list[str], stdout: IO, stderr: IO) -> int:
    # Joins the session's cluster (as tests/test_cold_cache.py does): one Ray on the machine.
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    return subprocess.run([str(LORAMILL), *args], env=env, stdout=stdout, stderr=stderr, timeout=600,
                          check=False).returncode


def assert_plain(text: str) -> None:
    escape = text.find("\x1b")
    assert escape == -1, text[max(0, escape - 500):escape + 500]
    assert "\r" not in text  # no bar redraws


def test_json_log_is_one_object_per_line(ray_cluster, tiny_config_file):
    config = tiny_config_file(domains=("medical",))
    out, err = config.parent / "stdout.jsonl", config.parent / "stderr.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        code = run_cli(ray_cluster, ["--log-format", "json", "--progress-every", "0", "train", str(config)],
                       stdout, stderr)
    assert code == 0, err.read_text()[-5000:]
    assert_plain(out.read_text() + err.read_text())
    objects = [json.loads(line) for line in out.read_text().splitlines()]  # every line of stdout
    progress = [ProgressLine.model_validate(o) for o in objects if o["event"] in ("eval", "progress")]
    assert [(p.event, p.step) for p in progress] == [
        ("eval", 0), ("progress", 1), ("eval", 2), ("progress", 3), ("eval", 4)]
    assert all(p.domain == "medical" and p.total_steps == 4 and p.trial is None for p in progress)
    assert progress[0].train_loss is None and progress[0].eval_loss > 0  # the base model, before step 1
    assert all(p.train_loss > 0 and p.tokens_per_second > 0 and p.eta_seconds >= 0 for p in progress[1:])
    assert progress[-1].eta_seconds == 0
    [trained] = [o for o in objects if o["event"] == "trained"]
    assert trained["domain"] == "medical" and trained["steps"] == 4
    assert trained["eval_loss"] == progress[-1].eval_loss
    assert trained["batching"].startswith("padded: 4 examples a micro batch")

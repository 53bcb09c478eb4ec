"""Logs for machines: `loramill train --log-format json` writing to files, as under cron or `ray job submit`. The
plain-text log is checked on the first run of a fresh machine (tests/test_cold_cache.py)."""

import json
import os
import queue
import re
import subprocess
import sys
from pathlib import Path
from typing import IO

from pipelines.progress import Display, ProgressLine, RunProgress

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
    progress = [ProgressLine.model_validate(o) for o in objects if o["event"] in ("start", "eval", "progress")]
    assert [(p.event, p.step) for p in progress] == [
        ("start", 0), ("eval", 0), ("progress", 1), ("eval", 2), ("progress", 3), ("eval", 4)]
    assert all(p.domain == "medical" and p.total_steps == 4 and p.trial is None for p in progress)
    start, base, *trained_steps = progress
    assert (start.train_loss, start.eval_loss, start.tokens_per_second, start.eta_seconds) == (None,) * 4
    assert base.train_loss is None and base.eval_loss > 0  # the base model, before step 1
    assert all(p.train_loss > 0 and p.tokens_per_second > 0 and p.eta_seconds >= 0 for p in trained_steps)
    assert progress[-1].eta_seconds == 0
    [trained] = [o for o in objects if o["event"] == "trained"]
    assert trained["domain"] == "medical" and trained["steps"] == 4
    assert trained["eval_loss"] == progress[-1].eval_loss
    assert trained["batching"].startswith("padded: 4 examples a micro batch")


def test_a_run_announces_its_start_and_a_resumed_run_says_from_where():
    inbox = queue.Queue()  # the driver's Ray queue has the same put(); lines arrive in this process
    display = Display("text", inbox=inbox)
    RunProgress(display, "medical", total_steps=20, done_steps=0)
    RunProgress(display.for_trial("trial_00001"), "medical", total_steps=20, done_steps=10)
    fresh, resumed = inbox.get_nowait(), inbox.get_nowait()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d medical step 0/20 started", fresh.text())
    assert resumed.text().endswith(" trial_00001 step 10/20 resumed") and resumed.event == "start"

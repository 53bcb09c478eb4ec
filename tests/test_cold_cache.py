"""A fresh machine's first run: three domains train at once on an empty model cache, with the real default model,
and nothing in the output shows a traceback (the cache is filled once, on the driver, before any worker starts).

The run writes its output to a file, as under cron or `ray job submit`: plain text, a line per run at each
evaluation and (``--progress-every 0``) after every step, and the results table as plain text."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, _domain_entry

DOMAINS = ("medical", "legal", "support")
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\w+) step (\d+)/2( train_loss \d+\.\d{4})?( eval_loss \d+\.\d{4})?"
                  r"( tokens/s \d+)?( eta \d+:\d\d:\d\d)?")


@pytest.mark.slow
def test_first_run_on_a_cold_cache_is_clean(ray_cluster, tmp_path):
    data = tmp_path / "data"
    for name in DOMAINS:
        (data / name).mkdir(parents=True)
        for split, n in (("train", 4), ("eval", 2)):
            lines = (DATA / name / f"{split}.jsonl").read_text().splitlines()[:n]
            (data / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"id": "builtin:smollm2-135m-instruct"},
        "train": {"max_steps": 2, "micro_batch_size": 2, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 0,
                  "max_eval_examples": 2},
        # 3 domains x 1 worker x 0.5 CPU fit the 2 cores of the smallest machine this runs on: all start at once.
        "cluster": {"workers_per_domain": 1, "cpus_per_worker": 0.5, "max_failures": 0,
                    "storage_url": str(tmp_path / "runs"), "output_dir": str(tmp_path / "output")},
        "domains": [_domain_entry(name, data) for name in DOMAINS],
    }))
    cache = tmp_path / "cache"
    cache.mkdir()
    # Joins the session's cluster: a second local Ray on the machine would make Ray Train's own helpers (its
    # placement-group cleaner finds "the" cluster by auto-detection) fail with tracebacks of their own.
    env = os.environ | {"LORAMILL_CACHE": str(cache), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    loramill = Path(sys.executable).with_name("loramill")
    log = tmp_path / "train.log"
    with log.open("w") as both:  # `>> train.log 2>&1`, as the README's cron line
        result = subprocess.run([str(loramill), "--progress-every", "0", "train", str(config)], env=env,
                                stdout=both, stderr=both, timeout=900, check=False)
    output = log.read_text()
    assert result.returncode == 0, output[-5000:]
    for bad in ("Traceback", "Directory not empty"):
        assert bad not in output, output[max(0, output.find(bad) - 2000) : output.find(bad) + 3000]
    escape = output.find("\x1b")
    assert escape == -1, output[max(0, escape - 500) : escape + 500]
    assert "\r" not in output  # no bar redraws
    lines = [m for m in map(LINE.fullmatch, output.splitlines()) if m]
    for name in DOMAINS:
        steps = [(int(m[2]), bool(m[4])) for m in lines if m[1] == name]
        # The base model evaluated, a line after step 1 (every step, with --progress-every 0), then the evaluation.
        assert steps == [(0, True), (1, False), (2, True)], output[-5000:]
        # Before the base's evaluation, a line says the run has its model and starts (minutes after the command).
        assert output.index(f" {name} step 0/2 started\n") < output.index(f" {name} step 0/2 eval_loss"), output
        assert all(m[3] and m[5] and m[6] for m in lines if m[1] == name and int(m[2]) > 0)
        assert f"{name} batching: padded: 2 examples a micro batch" in output  # under the table, as plain text
    assert "loramill train" in output and "adapter eval loss" in output
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.startswith(".")) == [
        "smollm2-135m-instruct"]
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".partial")]
    for name in DOMAINS:
        [run_dir] = (tmp_path / "output" / name).iterdir()
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

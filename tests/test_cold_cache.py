"""A fresh machine's first run: three domains train at once on an empty model cache, with the real default model,
and nothing in the output shows a traceback (the cache is filled once, on the driver, before any worker starts)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, _domain_entry

DOMAINS = ("medical", "legal", "support")


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
        "train": {"max_steps": 1, "micro_batch_size": 2, "eval_every": 1, "checkpoint_every": 1, "warmup_steps": 0,
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
    result = subprocess.run([str(loramill), "train", str(config)], env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for bad in ("Traceback", "Directory not empty"):
        assert bad not in output, output[max(0, output.find(bad) - 2000) : output.find(bad) + 3000]
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.startswith(".")) == [
        "smollm2-135m-instruct"]
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".partial")]
    for name in DOMAINS:
        [run_dir] = (tmp_path / "output" / name).iterdir()
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

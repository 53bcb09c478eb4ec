"""Multi-node, in simulation on one machine: a second raylet with a resource of its own joins the session's Ray
cluster. A domain that asks for that resource (``domains[].resources_per_worker``) trains on that node, the other on
either, and both checkpoint to shared storage: an ``s3://`` prefix on the session's SeaweedFS. A domain asking for a
resource no node has is refused before anything starts, with what each node offers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from ray._common.utils import get_ray_address_file  # where `ray start` records it (no public API)

from lora.config import ConfigError, load_config
from pipelines.cluster import check_fit
from tests.conftest import read_json
from tests.test_train_ray import invoke

NODE_RESOURCE = "simulated_gpu_node"


def _alive_nodes(ray) -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@pytest.fixture
def second_node(ray_cluster):
    """The node id of a second raylet (1 CPU and ``NODE_RESOURCE``), joined for this test and stopped after it."""
    ray = ray_cluster
    before = _alive_nodes(ray)
    # `ray start` records the cluster it joined in Ray's temp folder, where a later ray.init() of this machine (the
    # CLI run by other tests) would find it and connect instead of starting its own: put back what was there.
    current_cluster = Path(get_ray_address_file(None))
    recorded = current_cluster.read_text() if current_cluster.exists() else None
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--address", ray.get_runtime_context().gcs_address,
         "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--resources", json.dumps({NODE_RESOURCE: 1}),
         "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # pipelines.ray_session turns Ray's multi-node switch off for loramill's own processes; a joining node needs it.
        env=os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
    )
    deadline = time.monotonic() + 120
    while not (joined := _alive_nodes(ray) - before):
        assert process.poll() is None and time.monotonic() < deadline, "the second raylet did not join"
        time.sleep(1)
    [node_id] = joined
    try:
        yield node_id
        _stop_node(process)
        deadline = time.monotonic() + 120
        while node_id in _alive_nodes(ray) and time.monotonic() < deadline:
            time.sleep(1)
    finally:  # even when stopping the node failed: later tests' ray.init() must not find this node's record
        if recorded is None:
            current_cluster.unlink(missing_ok=True)
        else:
            current_cluster.write_text(recorded)


def _stop_node(process: subprocess.Popen) -> None:
    """Stop `ray start --block` and the node's processes: SIGINT (it stops its raylet and workers itself), then, if it
    has not finished within 20 s, SIGKILL to all of them. On a loaded 2-core CI machine one such stop was still
    running after 120 s, and another after 60 s (the SIGKILL then ended it)."""
    node = psutil.Process(process.pid)
    processes = [node, *node.children(recursive=True)]  # the raylet and its workers, listed while they are children
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        for left in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                left.kill()
        process.wait(timeout=30)


def test_domains_land_where_the_config_says_and_checkpoint_to_shared_storage(second_node, ray_cluster,
                                                                           tiny_config_file, s3_store):
    import fsspec

    storage = f"s3://{s3_store.bucket}/runs-{uuid.uuid4().hex[:8]}"
    config = tiny_config_file(domains=("legal", "support"), train={"max_steps": 2, "eval_every": 1},
                              cluster={"storage_url": storage, "storage_options": s3_store.storage_options()})
    raw = yaml.safe_load(config.read_text())
    raw["domains"][0]["resources_per_worker"] = {NODE_RESOURCE: 1}  # legal: only the second node has it
    config.write_text(yaml.safe_dump(raw))

    result = invoke("train", config)
    assert result.exit_code == 0, result.output

    nodes = {}
    for domain in ("legal", "support"):
        [run_dir] = (config.parent / "output" / domain).iterdir()
        nodes[domain] = read_json(run_dir / "run_info.json")["hardware"]["node_id"]
    assert nodes["legal"] == second_node  # support asks for nothing special: either node may take it
    assert nodes["support"] in {second_node, ray_cluster.get_runtime_context().get_node_id()}

    fs, root = fsspec.core.url_to_fs(storage, **s3_store.storage_options())
    for domain in ("legal", "support"):
        [run] = [p for p in fs.ls(root) if Path(p).name.startswith(f"{domain}-")]
        checkpoints = [p for p in fs.ls(run) if Path(p).name.startswith("checkpoint_") and fs.isdir(p)]
        assert checkpoints, f"no checkpoint of {domain} in {storage}"
        assert fs.exists(f"{sorted(checkpoints)[-1]}/adapter/adapter_model.safetensors")

    unfit = load_config(config, ["domains.1.resources_per_worker={gpu_h100: 1}"])
    with pytest.raises(ConfigError) as refused:
        check_fit(unfit, unfit.domains)
    assert ("domains.1 (support): needs {CPU: 1, gpu_h100: 1} per worker; no node has that; nodes offer: "
            f"{{CPU: 1, {NODE_RESOURCE}: 1}}, {{CPU: 2}}") in str(refused.value)
    assert "legal" not in str(refused.value)

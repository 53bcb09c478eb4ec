"""Placement on a simulated two-node cluster; run by tests/test_operate.py in a process of its own, because
``ray.cluster_utils.Cluster`` cannot share a process with the test session's ``ray.init()``.

Two nodes on 127.0.0.1 stand for two node types: the head declares the custom resource ``cpu_big``, the other node
``gpu_a10``. Each domain of the config (argv[1]) gets the ScalingConfig that ``pipelines.train.build_trainer`` builds
for it, and a one-step Ray Train run with that ScalingConfig reports the node its worker ran on. Then the train stage
is run for a domain that no node can hold (``--override`` argv[2:] give it ``gpu_h100``), and what it raised is
recorded. Prints one JSON line: {"nodes": {resource: node id}, "ran_on": {domain: node id}, "unfit": message}.
Set RAY_TMPDIR before starting it: Cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray
import ray.train
from ray.cluster_utils import Cluster
from ray.train import RunConfig
from ray.train.torch import TorchTrainer

from lora.config import Config, ConfigError, load_config
from pipelines import run_folder, train
from pipelines.progress import TERMINAL
from pipelines.tracking import OFF

NODE_TYPES = {"cpu_big": {"num_cpus": 2}, "gpu_a10": {"num_cpus": 2}}


def report_node() -> None:
    # Ray Train keeps the metrics of reports that carry a checkpoint: an empty one will do.
    with tempfile.TemporaryDirectory() as empty:
        ray.train.report({"node_id": ray.get_runtime_context().get_node_id()},
                         checkpoint=ray.train.Checkpoint.from_directory(empty))


@ray.remote(num_cpus=0.01)
def node_of_worker(cfg_dict: dict[str, Any], domain_name: str, storage: str) -> str:
    """Where the domain's Ray Train worker lands: the stage's ScalingConfig, a trivial train function."""
    cfg = Config.model_validate(cfg_dict)
    domain = cfg.domain(domain_name)
    name = run_folder.run_name(cfg, domain, run_folder.data_fingerprint(domain))
    scaling = train.build_trainer(cfg, domain, name, display=TERMINAL, tracking=OFF).scaling_config
    trainer = TorchTrainer(report_node, scaling_config=scaling,
                           run_config=RunConfig(name=f"placement-{domain_name}", storage_path=storage))
    return trainer.fit().metrics["node_id"]


def main(config: str, unfit_overrides: list[str]) -> dict[str, Any]:
    cluster = Cluster()
    nodes = {}
    for resource, args in NODE_TYPES.items():
        node = cluster.add_node(node_ip_address="127.0.0.1", include_dashboard=False, resources={resource: 1},
                                **args)
        nodes[resource] = node.node_id
    ray.init(address=cluster.address, logging_config=ray.LoggingConfig(log_level="WARNING"))
    try:
        cfg = load_config(config)
        train.preflight(cfg, cfg.domains)
        with tempfile.TemporaryDirectory() as storage:
            pending = {d.name: node_of_worker.remote(cfg.model_dump(), d.name, storage) for d in cfg.domains}
            ran_on = {name: ray.get(ref) for name, ref in pending.items()}
        try:
            train.run(load_config(config, unfit_overrides))
            unfit = "no error"
        except ConfigError as error:
            unfit = str(error)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": nodes, "ran_on": ran_on, "unfit": unfit}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))

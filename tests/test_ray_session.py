"""pipelines/ray_session.py: the one private Ray API loramill uses still exists and still has the fields read."""

from pipelines.ray_session import autoscaler_node_types


def test_autoscaler_node_types_read_the_config_ray_keeps(ray_cluster):
    """On the test cluster (no autoscaler) there are none. With a cluster config stored where KubeRay and the
    cluster launcher's autoscaler store it, its node types are read; a node type capped at 0 nodes is left out.
    Fails when a Ray upgrade moves ``ray._private.state.state.get_cluster_config`` or changes its message."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    assert autoscaler_node_types() == []
    config = autoscaler_pb2.ClusterConfig()
    for resources, max_count in (({"CPU": 8, "GPU": 1}, 4), ({"CPU": 64}, 0)):
        group = config.node_group_configs.add()
        group.resources.update(resources)
        group.max_count = max_count
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                     namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        assert autoscaler_node_types() == [{"CPU": 8, "GPU": 1}]
    finally:  # the session's other tests see a cluster without an autoscaler again
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    assert autoscaler_node_types() == []


def test_threads_of_one_process_join_ray_once(ray_cluster):
    """Several threads that need Ray at once (publishes run side by side in one process): each ``ensure_ray`` call
    returns connected, and none fails as a second ``ray.init``. Runs in a fresh process that joins the session's
    cluster, so that this process's connection stays as it is."""
    import os
    import subprocess
    import sys

    from tests.conftest import DATA, _domain_entry

    script = f"""
from concurrent.futures import ThreadPoolExecutor
import ray
from lora.config import Config
from pipelines.ray_session import ensure_ray
cfg = Config.model_validate({{"domains": [{_domain_entry("medical", DATA)!r}],
                              "cluster": {{"address": {ray_cluster.get_runtime_context().gcs_address!r}}}}})
with ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda _: ensure_ray(cfg), range(4)))
print("connected", ray.is_initialized())
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "connected True" in result.stdout, result.stderr[-3000:]


def test_many_processes_that_reserve_no_cpu_bring_no_worker_pool_warning(ray_cluster, capfd):
    """Three domains at once on two cores start about 20 Ray processes (Ray Train's controller, worker and helper
    actors reserve no CPU). The local cluster loramill starts lets eight start at a time, so the raylet's "N PYTHON
    worker processes have been started" warning (from four times that many) stays out of the run's output."""
    import time

    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            import os

            return os.getpid()

    actors = [Idle.remote() for _ in range(22)]
    try:
        assert len(set(ray.get([a.pid.remote() for a in actors]))) == 22
        time.sleep(3)  # the driver prints the raylet's messages from a thread of its own
    finally:
        for actor in actors:
            ray.kill(actor)
    captured = capfd.readouterr()  # Ray prints the raylet's messages to stdout
    assert "worker processes have been started" not in captured.out + captured.err

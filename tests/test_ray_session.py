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

"""Connect to Ray, or start a local one on 127.0.0.1 that talks to nobody outside this machine."""

from __future__ import annotations

import logging
import os
import threading

# Set before Ray is imported anywhere in the process: usage stats would try to reach an outside server, and
# token auth (which ray.init turns on by writing ~/.ray/auth_token) breaks later `ray start` + `ray job submit`.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train gives a worker group 60 s to start. A worker imports torch, transformers and bitsandbytes (~10 s
# alone); on a loaded 2-core machine that took over 60 s and the start was retried again and again.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
TRAIN_POLL_INTERVAL_S = "0.5"
"""Ray Train's controller polls its workers every 2 s by default, and each change of a run's state (workers up,
training done, workers gone) waits for the next poll: a 4-step run on the tiny test model took 20.0 s from fit() to
its result, 14.8 s when polled every 0.5 s (tests/test_logs.py's JSON-log run, on 2 cores). It also registers a
checkpoint sooner. A local Ray started here passes it on to every worker; the cluster configs the repository ships
set it on their nodes (tests/test_cluster_configs.py)."""
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)

import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from lora.config import Config  # noqa: E402
from pipelines import progress  # noqa: E402


_STARTING = threading.Lock()
"""Held while Ray is joined or started: publishes running in threads of one process would otherwise both see Ray
down and call ``ray.init`` twice, and the second call fails."""


def ensure_ray(cfg: Config) -> None:
    """Join ``cluster.address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``), else start Ray locally."""
    with _STARTING:
        if not ray.is_initialized():
            _init_ray(cfg)


def _init_ray(cfg: Config) -> None:
    # Off a terminal, Ray's own INFO lines ("View the dashboard at ...") would bring colour codes into the log.
    driver_log_level = logging.INFO if progress.mode() == "bars" else logging.WARNING
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=driver_log_level)
        return
    # A cluster of this one machine is never drained for preemption, so Ray Train's preemption watcher has nothing
    # to watch; its actor only printed a core_worker error line ("constructor arguments in the object store and
    # max_restarts > 0") into every run's output. The local raylet, and so every worker, inherits this setting.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (~1 GiB) serves the state API that Ray Train's placement-group cleaner polls; without it
    # the cleaner logs a warning every second. None: started when its packages (ray[default]) are installed, as
    # they are by `pip install loramill`; minimal Ray installs (some GPU images) still run.
    # Each Ray Train run starts about six processes (its controller, worker and helper actors), most reserving no
    # CPU. Ray starts at most one a CPU at a time and, from four times that many live ones, prints "N PYTHON worker
    # processes have been started" warnings into the run's output: on two cores, three domains at once reach it.
    # Starting up to eight at a time moves that point to 32 processes, about five runs at once.
    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=cpus,
        _system_config={"worker_maximum_startup_concurrency": max(cpus, 8)},
        include_dashboard=None,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        logging_config=ray.LoggingConfig(log_level="WARNING"),
        logging_level=driver_log_level,
    )


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Pin a task to the driver's node: for tasks that write files (run outputs, sweep results) the driver reads."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def autoscaler_node_types() -> list[dict[str, float]]:
    """The resources of each node type the autoscaler may still start (KubeRay, cluster launcher); [] without one.

    The one private Ray API loramill uses, kept here alone: Ray has no public call for it. Ray Train's worker-group
    start check (``get_max_resources_from_cluster_config``) and Ray Data's autoscaler read the same config.
    tests/test_ray_session.py fails when a Ray upgrade moves it or changes its fields.
    """
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]

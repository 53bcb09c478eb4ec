"""Where a domain's workers may run: what each reserves, what the nodes offer, and where checkpoints go."""

from __future__ import annotations

from typing import Any

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
import ray

from lora.config import Config, ConfigError, Domain
from pipelines.ray_session import autoscaler_node_types


def worker_resources(cfg: Config, domain: Domain) -> dict[str, float]:
    """What each of the domain's Ray Train workers reserves: CPUs, the GPU, and the domain's custom resources."""
    return {"CPU": cfg.cluster.cpus_per_worker} | ({"GPU": 1} if cfg.cluster.use_gpu else {}) | \
        domain.resources_per_worker


def domain_need(cfg: Config, domain: Domain) -> dict[str, float]:
    return {k: v * cfg.cluster.workers_per_domain for k, v in worker_resources(cfg, domain).items()}


def fits(need: dict[str, float], in_use: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(in_use.get(k, 0) + v <= capacity.get(k, 0) + 1e-9 for k, v in need.items())


def added(in_use: dict[str, float], need: dict[str, float]) -> dict[str, float]:
    """``in_use`` with ``need`` reserved too."""
    return {k: in_use.get(k, 0) + need.get(k, 0) for k in in_use.keys() | need.keys()}


def node_offers() -> list[dict[str, float]]:
    """The resources of every alive node, and of every node type the autoscaler may still start.

    Node types come from the cluster config the autoscaler reports (KubeRay, cluster launcher), the source Ray
    Train's own pre-start check reads; a cluster without an autoscaler has none.
    """
    return [node["Resources"] for node in ray.nodes() if node["Alive"]] + autoscaler_node_types()


def check_fit(cfg: Config, domains: list[Domain]) -> None:
    """``ConfigError`` for every domain whose worker fits on no node: Ray would otherwise wait for one forever."""
    offers = node_offers()
    problems = []
    for domain in domains:
        need = worker_resources(cfg, domain)
        if any(all(offer.get(key, 0) >= amount for key, amount in need.items()) for offer in offers):
            continue
        shown = sorted({_resource_text(offer) for offer in offers})
        fix = ("set cluster.use_gpu=false" if cfg.cluster.use_gpu and not any(o.get("GPU") for o in offers)
               else "lower cluster.cpus_per_worker or the domain's resources_per_worker, or add such a node")
        problems.append(f"domains.{cfg.domains.index(domain)} ({domain.name}): needs {_resource_text(need)} per "
                        f"worker; no node has that; nodes offer: {', '.join(shown)}; {fix}")
    if problems:
        raise ConfigError(problems)


def _resource_text(resources: dict[str, float]) -> str:
    """``{CPU: 2, gpu_a10: 1}``: without the memory and ``node:<ip>`` entries Ray adds to every node."""
    shown = {k: v for k, v in resources.items() if v and not k.startswith("node:") and "memory" not in k}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def storage(cfg: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train checkpoints."""
    url = cfg.cluster.storage_url
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://"), None
    import pyarrow.fs
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **cfg.cluster.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))

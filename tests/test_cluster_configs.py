"""Every cluster and Kubernetes file the repo ships (ray-cluster.yaml, infra/**): parsed, and checked for what makes
a run work or leak — images and versions, GPU requests, the entrypoint the CLI must accept, credentials only
through Secrets."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import typer
import yaml
from croniter import croniter

from lora.config import load_config
from pipelines.cli import app
from pipelines.ray_session import TRAIN_POLL_INTERVAL_S

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted({REPO / "ray-cluster.yaml", *REPO.glob("infra/**/*.yaml"), *REPO.glob("infra/**/*.yml")})
RAY_VERSION = ray.__version__
IMAGE_TAG = importlib.metadata.version("loramill")
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kind_of(path: Path, doc: dict[str, Any]) -> str:
    return "ray-cluster-launcher" if path.name == "ray-cluster.yaml" else f"{doc.get('apiVersion')}/{doc.get('kind')}"


def test_every_cluster_yaml_is_one_this_file_checks():
    found = {f"{path.relative_to(REPO)}: {kind_of(path, doc)}" for path in CLUSTER_YAMLS for doc in documents(path)}
    assert found == {
        "ray-cluster.yaml: ray-cluster-launcher",
        "infra/k8s/rayjob.yaml: ray.io/v1/RayJob",
        "infra/k8s/raycronjob.yaml: ray.io/v1/RayCronJob",
    }, "a cluster YAML was added or removed: give it checks here"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_credentials_come_only_from_secrets(path):
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), "an AWS access key id"
    for doc in documents(path):
        assert doc.get("kind") != "Secret", "Secrets are created with kubectl, not shipped with values"
        for value in strings(doc):  # entrypoints, commands: no `...secret=`, `storage_options.key=` and the like
            assert not re.search(r"(key|secret|token|password)[a-z_]*\s*=", value, re.IGNORECASE), value
        for entry in env_entries(doc):
            if CREDENTIAL_NAME.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry


# ---------------------------------------------------------------------------------------------
# ray-cluster.yaml
# ---------------------------------------------------------------------------------------------


def test_ray_cluster_launcher_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    raw = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    validate_config(fillout_defaults(raw))  # Ray's own schema, as `ray up` checks it
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types, "no GPU worker type"
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] == 1
        assert re.match(r"(g5|g6e?|p4d|p5)\.", node_type["node_config"]["InstanceType"])
        # At least one running: the train stage's fit check sees running nodes only.
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"] <= raw["max_workers"]

    setup = raw["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if '"torch==2.13.0"' in c)
    repo_at = next(i for i, c in enumerate(setup) if "-e ~/loramill" in c)
    assert torch_at < repo_at, "torch must be installed first"
    assert raw["file_mounts"]["~/loramill"] == "."

    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("--disable-usage-stats" in c for c in starts if "ray start" in c)
    poll = f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={TRAIN_POLL_INTERVAL_S} ray start"
    assert all(poll in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------------
# infra/k8s
# ---------------------------------------------------------------------------------------------


def test_kuberay_rayjob_runs_the_pipeline_on_gpu_workers():
    [job] = documents(REPO / "infra/k8s/rayjob.yaml")
    check_rayjob_spec(job["spec"], command="run")


def test_kuberay_raycronjob_ticks_the_scheduler():
    [cron] = documents(REPO / "infra/k8s/raycronjob.yaml")
    assert croniter.is_valid(cron["spec"]["schedule"]) and cron["spec"]["suspend"] is False
    args = check_rayjob_spec(cron["spec"]["jobTemplate"], command="schedule")
    assert "--once" in args


def test_dockerfile_builds_what_the_manifests_run():
    dockerfile = (REPO / "infra/k8s/Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu\n" in dockerfile
    install = dockerfile.index('pip install --no-cache-dir "torch==2.13.0"')
    assert install < dockerfile.index("pip install --no-cache-dir -e /app"), "torch must be installed first"
    for folder in ("lora", "pipelines", "infra", "configs", "data"):
        assert f"COPY --chown=ray:users {folder} {folder}\n" in dockerfile


def check_rayjob_spec(spec: dict[str, Any], command: str) -> list[str]:
    """The checks a RayJob spec (or a RayCronJob's template) must pass; returns its entrypoint's arguments."""
    args = shlex.split(spec["entrypoint"])
    assert args[:3] == ["loramill", command, "/app/configs/default.yaml"]
    # The CLI accepts the arguments, and the overrides make a valid config from the one the image holds.
    typer.main.get_command(app).commands[command].make_context(command, args[2:])
    cfg = load_config(REPO / "configs/default.yaml", [a for a in args[3:] if "=" in a])
    assert cfg.publish.registry.startswith("s3://") and cfg.cluster.storage_url.startswith("s3://")
    assert cfg.cluster.use_gpu
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
    for container in head + workers:
        assert container["image"].endswith(f"/loramill:{IMAGE_TAG}"), container["image"]
        names = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert names[name]["valueFrom"]["secretKeyRef"] == {"name": "loramill-s3", "key": name}
        assert names["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]["value"] == TRAIN_POLL_INTERVAL_S
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head)
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    return args


def strings(node: Any) -> list[str]:
    """Every string value anywhere in a document."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def env_entries(node: Any) -> list[dict[str, Any]]:
    """Every container env entry anywhere in a document."""
    if isinstance(node, dict):
        found = [e for e in node.get("env", []) if isinstance(e, dict)] if isinstance(node.get("env"), list) else []
        return found + [e for value in node.values() for e in env_entries(value)]
    if isinstance(node, list):
        return [e for item in node for e in env_entries(item)]
    return []

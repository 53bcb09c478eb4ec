"""Submit stage: ``loramill run CONFIG`` as a Ray job on a running cluster, its logs streamed back.

``run`` reads: check the config here → find the head → pin this machine's folders → submit → follow the logs.

Credentials never travel with the job. Ray keeps a job's entrypoint and ``runtime_env`` (``env_vars`` included) in
its job table and returns them unredacted to every ``get_job_info`` / ``list_jobs`` caller of the SDK and CLI (the
dashboard masks ``env_vars`` for browsers only: ray/dashboard/runtime_env_redaction.py), so a secret passed there is
readable by anyone who can reach the dashboard, for as long as the job is listed. Instead the job finds its
credentials where it runs:

- ``publish.registry: embedded``: the job re-opens the embedded store from ``publish.store_dir``, whose identity
  file ``s3.json`` (mode 0600) only its owner can read. That needs the Ray head on this machine, run by the same
  user, so the store folder is pinned to the absolute path resolved here and a remote head is refused.
- an ``s3://`` registry: from the cluster's own environment — the environment ``ray start`` ran in, an instance
  role, or a Kubernetes Secret (infra/k8s/).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pipelines.ray_session  # noqa: F401  (sets Ray's environment before ray is imported)
from infra.store import store_up
from lora.config import Config, ConfigError, is_local_path, load_config
from lora.redact import AWS_SECRET_ENV, names_a_credential

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the job does not need: hidden folders are tool state and outputs (.venv, .git, .loramill with the store and
# runs, test caches); the rest are build outputs. `.?*`, not `.*`: Ray matches the working dir itself as ".", which
# `.*` would exclude whole. Ray also skips what .gitignore lists, but only by default
# (RAY_RUNTIME_ENV_IGNORE_GITIGNORE turns that off), so the upload stays small without it.
WORKING_DIR_EXCLUDES = [".?*", "__pycache__", "*.egg-info", "build", "dist", "runs"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
AGENT_WAIT_S = 60.0
"""How long ``submit`` waits for a head's job agent: a head started seconds ago answers "No available agent to submit
job, please try again later" until its dashboard agent is up."""


@dataclass
class Submission:
    job_id: str
    entrypoint: str
    status: str | None
    """The final status when the caller waited, else None (the job is still queued or running)."""
    message: str | None = None
    """Ray's last word on the job (why it failed), when waited for."""


def run(
    config: Path,
    overrides: list[str],
    *,
    address: str,
    domains: list[str] | None = None,
    working_dir: Path = REPO_ROOT,
    wait: bool = False,
    echo: Callable[[str], None] = print,
) -> Submission:
    """Submit ``loramill run`` of ``config`` (a file inside ``working_dir``, which is uploaded) to the cluster.

    Raises ``ConfigError`` for a config that would fail on the cluster, and ``ConnectionError`` when no Ray
    dashboard answers at ``address``. With ``wait``, streams the job's logs through ``echo`` until it ends.
    """
    from ray.job_submission import JobSubmissionClient

    cfg = load_config(config, overrides)  # a bad config fails here in a second, not on the cluster
    for name in domains or []:
        cfg.domain(name)
    refuse_credential_overrides(overrides)
    config_in_job = _relative_to(config, working_dir)
    client = JobSubmissionClient(address)
    pins = pinned_paths(cfg, head_is_local(address))
    if cfg.publish.registry == "embedded":
        store_up(Path(cfg.publish.store_dir))  # the job joins this store; started here, it outlives the job
    for note in credential_notes(cfg):
        echo(note + "\n")
    domain_args = [arg for name in domains or [] for arg in ("--domain", name)]
    entrypoint = shlex.join(["loramill", "run", config_in_job, *pins, *overrides, *domain_args])
    job_id = submit_when_an_agent_answers(
        client,
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES},
        metadata={"loramill_config": config_in_job},
        submission_id=f"loramill-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}",
    )
    submission = Submission(job_id, entrypoint, status=None)
    echo(f"submitted {job_id} to {address}\n")
    if wait:
        follow_logs(client, job_id, echo)
        info = _final_info(client, job_id)
        submission.status, submission.message = str(info.status), info.message
    return submission


def submit_when_an_agent_answers(client: JobSubmissionClient, wait_s: float = AGENT_WAIT_S, **job: object) -> str:
    """``client.submit_job(**job)``, tried again each second for up to ``wait_s`` while the head says it has no job
    agent yet (Ray's own advice in that error); any other error, or the wait's end, raises it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent to submit job" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def head_is_local(address: str) -> bool:
    """Whether the head at ``address`` runs on this machine: reached on loopback and itself on a loopback IP.

    A head behind ``kubectl port-forward`` or an SSH tunnel is reached on 127.0.0.1 too, but reports its own IP.
    """
    from ray.util.state import list_nodes

    if urlsplit(address if "://" in address else f"http://{address}").hostname not in LOOPBACK:
        return False
    return all(node.node_ip in LOOPBACK for node in list_nodes(address=address) if node.is_head_node)


def pinned_paths(cfg: Config, local_head: bool) -> list[str]:
    """Overrides that point the job at this machine's store and output folders (absolute, resolved here).

    Without them the config's relative folders would resolve inside Ray's temporary copy of the working dir: a
    second, empty store would start there and the runs would vanish with the Ray session.
    """
    embedded = cfg.publish.registry == "embedded"
    if embedded and not local_head:
        raise ConfigError([
            "publish.registry: 'embedded' is this machine's own store on 127.0.0.1, which a job on another "
            "machine cannot reach; publish to an s3:// registry and give the cluster its credentials (see "
            "infra/k8s/), or submit to a Ray head started on this machine with --node-ip-address=127.0.0.1"
        ])
    if not local_head:
        return []
    folders = {"cluster.storage_url": cfg.cluster.storage_url, "cluster.output_dir": cfg.cluster.output_dir}
    if embedded:
        folders["publish.store_dir"] = cfg.publish.store_dir
    # JSON strings are YAML strings: a path with ': ' or '#' survives the override parser.
    return [f"{key}={json.dumps(path)}" for key, path in folders.items() if is_local_path(path)]


def refuse_credential_overrides(overrides: list[str]) -> None:
    """``ConfigError`` for an override that sets a credential: it would be stored in the job's entrypoint."""
    problems = [f"{key}: a credential on the command line is stored in the job's entrypoint, which Ray shows to "
                "anyone who lists jobs; give the cluster the credential instead (its environment, a Kubernetes Secret)"
                for key in (override.partition("=")[0] for override in overrides) if names_a_credential(key)]
    if problems:
        raise ConfigError(problems)


def credential_notes(cfg: Config) -> list[str]:
    """Say so when this shell holds AWS credentials that the job will not get, or the config file holds some."""
    notes = []
    held = [name for name in AWS_SECRET_ENV if os.environ.get(name)]
    if held and cfg.publish.registry != "embedded":
        notes.append(f"note: {', '.join(held)} from this shell are not sent with the job (Ray shows a job's "
                     "environment to anyone who lists jobs); the cluster must hold them: the `ray start` environment, "
                     "an instance role or a Kubernetes Secret")
    options = [("publish", cfg.publish.storage_options), ("cluster", cfg.cluster.storage_options)]
    options += [(f"domains.{i}", domain.storage_options) for i, domain in enumerate(cfg.domains)]
    in_file = [f"{where}.storage_options.{key}" for where, values in options for key in values
               if names_a_credential(key)]
    if in_file:
        notes.append(f"note: the config file holds {', '.join(in_file)}; it travels in the uploaded working dir, which "
                     "Ray keeps and unpacks on every node: prefer the cluster's environment")
    return notes


def follow_logs(client: JobSubmissionClient, job_id: str, echo: Callable[[str], None]) -> None:
    """Stream the job's logs until it ends (the dashboard closes the stream then)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk)

    asyncio.run(tail())


def _final_info(client: JobSubmissionClient, job_id: str, timeout_s: float = 30.0) -> JobDetails:
    """The job's details once its status is terminal; the log stream can close a moment before the status flips."""
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def _relative_to(config: Path, working_dir: Path) -> str:
    """The config's path inside the uploaded folder, as the job (whose cwd is that folder) will open it."""
    path, root = config.resolve(), working_dir.resolve()
    if not path.is_relative_to(root):
        raise ConfigError([
            f"{config}: the job reads its config from the uploaded working dir {root}, and this file lies outside "
            "it; move the config under that folder (e.g. configs/) or pass --working-dir"
        ])
    return path.relative_to(root).as_posix()

"""Faults really injected, on the real local Ray and the real S3 server (SeaweedFS), with nothing lost.

- a Ray Train worker SIGKILLed mid-run: the run restarts from its latest checkpoint and ends where an uninterrupted
  run ends;
- the object store SIGKILLed mid-publish: no half version ever becomes visible, publish retries and completes once
  the server is back (or fails with a RegistryError), and gc leaves nothing of the incomplete upload;
- the store failing after a publish's commit point: the version exists and the publish says so (exit 0, a warning);
  publishing the same run again returns that version and finishes what was left, `--force-new-version` makes another;
- credentials: none reaches the CLI output, Ray's logs, an exception, or any byte on the store;
- resources: data files are streamed (flat memory), and a worker larger than every node is refused up front.

Concurrent publishers and promoters, and tampering on the server, are in tests/test_registry.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from infra.registry import Registry, RegistryError
from infra.store import StoreInfo, store_down, store_up
from lora.config import load_config
from lora.data import MAX_LINE_BYTES, check_file
from lora.errors import DataError
from pipelines.cli import app
from tests.conftest import read_json

runner = CliRunner()


# ------------------------------------------------------------------ a Ray Train worker killed mid-training


def _checkpoint_steps(run_dir: Path) -> dict[str, int]:
    """Checkpoint folder -> the step it holds, for every checkpoint written to storage so far."""
    steps = {}
    for folder in run_dir.glob("checkpoint_*"):
        try:
            steps[folder.name] = read_json(folder / "history.json")[-1]["step"]
        except (OSError, ValueError):
            pass  # still being written
    return steps


def _checkpoint_folders(run_dir: Path) -> set[str]:
    """Names of the checkpoint folders on storage (next to them lies checkpoint_manager_snapshot.json)."""
    return {folder.name for folder in run_dir.glob("checkpoint_*") if folder.is_dir()}


def _registered(run_dir: Path) -> tuple[int | None, set[str]]:
    """(step of the newest checkpoint Ray Train's controller has registered, the folders of those it keeps).

    The controller writes this snapshot after registering each checkpoint; a restart resumes from its newest.
    """
    try:
        snapshot = read_json(run_dir / "checkpoint_manager_snapshot.json")
    except (OSError, ValueError):
        return None, set()
    latest = snapshot.get("latest_checkpoint_result")
    kept = {result["checkpoint_dir_name"] for result in snapshot.get("checkpoint_results", [])}
    return (None if latest is None else int(latest["metrics"]["step"])), kept


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # Other Ray clusters may run on this machine: ask ours, by its GCS address.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors if actor.pid]


class WorkerKiller(threading.Thread):
    """Once the controller has registered a checkpoint at or after `after_step`, SIGKILL the training worker."""

    def __init__(self, run_dir: Path, after_step: int, timeout_s: float = 240) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.after_step, self.timeout_s = run_dir, after_step, timeout_s
        self.killed_pid: int | None = None
        self.registered_at_kill: int | None = None
        self.folders_at_kill: set[str] = set()
        self.kept_at_kill: set[str] = set()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._watch_and_kill()
        except Exception as exc:  # reported by the test, not lost in a thread
            self.error = repr(exc)

    def _watch_and_kill(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        pids: list[int] = []
        while time.monotonic() < deadline:
            if not pids:
                pids = _train_worker_pids()
            step, kept = _registered(self.run_dir)
            # Kill only while every checkpoint folder on storage is registered: the controller collects reports
            # every 2 s (Ray Train's health-check interval), and one it has not collected dies with the worker.
            settled = _checkpoint_folders(self.run_dir) <= kept
            if pids and settled and step is not None and step >= self.after_step:
                os.kill(pids[0], signal.SIGKILL)
                self.killed_pid, self.registered_at_kill = pids[0], step
                self.folders_at_kill = _checkpoint_folders(self.run_dir)
                self.kept_at_kill = kept
                return
            time.sleep(0.02)
        self.error = f"no registered checkpoint at step >= {self.after_step} within {self.timeout_s} s"


def uninterrupted_reports(config: Path) -> list[dict]:
    """The metrics one worker reports for the config's first domain, trained by the same worker code in this
    process: without Ray, without a fault."""
    from pipelines.train_worker import WorkerSession, train_domain

    cfg = load_config(config)
    reports: list[dict] = []
    session = WorkerSession(0, 1, 0, lambda: None, lambda metrics, checkpoint=None: reports.append(metrics))
    threads = torch.get_num_threads()
    try:
        train_domain(cfg, cfg.domains[0], session)
    finally:
        torch.set_num_threads(threads)
    return reports


def test_worker_killed_mid_training_resumes_from_the_latest_checkpoint(ray_cluster, tiny_config_file):
    every, steps = 3, 9
    config = tiny_config_file(
        domains=("medical",),
        # grad_accum 3: a checkpoint interval (3 steps) outlasts the controller's 2 s report collection.
        train={"max_steps": steps, "checkpoint_every": every, "eval_every": steps, "learning_rate": 0.01,
               "micro_batch_size": 4, "grad_accum": 3, "max_seq_len": 256, "warmup_steps": 0},
        cluster={"max_failures": 2},
    )
    from pipelines.run_folder import data_fingerprint, run_name

    cfg = load_config(config)
    run_dir = Path(cfg.cluster.storage_url) / run_name(cfg, cfg.domains[0], data_fingerprint(cfg.domains[0]))
    killer = WorkerKiller(run_dir, after_step=every)
    killer.start()
    result = runner.invoke(app, ["train", str(config)])
    killer.join(timeout=5)

    assert killer.error is None and killer.killed_pid is not None, killer.error
    assert result.exit_code == 0, result.output
    resumed_at = killer.registered_at_kill
    assert resumed_at is not None and every <= resumed_at < steps
    # At the kill no checkpoint newer than `resumed_at` had been written: the worker was between it and the next.
    assert killer.folders_at_kill <= killer.kept_at_kill

    [out] = (Path(cfg.cluster.output_dir) / "medical").iterdir()
    history = read_json(out / "history.json")
    assert [h["step"] for h in history] == list(range(steps + 1))  # every step once: none lost, none doubled
    facts = read_json(out / "result.json")
    assert facts["steps"] == steps

    # The final checkpoint's state says where the restarted attempt began: the checkpoint registered at the kill,
    # so the steps redone are fewer than one checkpoint interval.
    final = max(_checkpoint_steps(run_dir).items(), key=lambda item: item[1])[0]
    state = torch.load(run_dir / final / "trainer_state.pt", weights_only=True)["state"]
    assert state["resumed_from_step"] == [resumed_at]
    assert state["step"] == steps

    reference = [r for r in uninterrupted_reports(config) if "eval_loss" in r][-1]["eval_loss"]
    assert facts["eval_loss"] == pytest.approx(reference, rel=1e-3, abs=1e-3)
    assert facts["eval_loss"] < facts["base_eval_loss"]


# ------------------------------------------------------------------ the object store killed mid-publish

ADAPTER_MB = 120
"""Large enough that the upload takes a while on loopback, so the kill lands inside it."""


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A PEFT-shaped folder with a ~96 MB random safetensors file."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("big-adapter")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(0, 2**31 - 1, (ADAPTER_MB * 2**20 // 4,), dtype=torch.int32, generator=generator)
    save_file({"base_model.model.lora_A.weight": weights}, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def fragile_store(tmp_path_factory):
    """A SeaweedFS of this module's own (the session's store is not disturbed), yielding its data folder."""
    root = tmp_path_factory.mktemp("fragile-store")
    store_up(root, s3_port=0)
    yield root
    store_down(root, grace_s=1)


def _raw_fs(info: StoreInfo):
    import s3fs

    return s3fs.S3FileSystem(**info.storage_options(), skip_instance_cache=True, use_listings_cache=False,
                             config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 1})


def _objects(fs, path: str) -> list[str]:
    """Objects (files) under `path`, relative to it: SeaweedFS also lists emptied folders, which hold nothing."""
    found = fs.find(path, detail=True)
    return sorted(name.removeprefix(path + "/") for name, entry in found.items() if entry["type"] == "file")


def _uploads(fs, bucket: str, prefix: str) -> list[str]:
    """Keys of the unfinished multipart uploads under `prefix`."""
    answer = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
    return sorted(upload["Key"] for upload in answer.get("Uploads", []))


def _kill_mid_upload(info: StoreInfo, prefix: str, restart_after_s: float | None, root: Path, *,
                     after_commit: bool = False) -> dict:
    """Start a thread that SIGKILLs the server while `<prefix>/medical/v1/adapter_model.safetensors` uploads (or,
    `after_commit`, once v1's manifest is written: while publish re-hashes the weights on the server), and restarts
    it on the same data folder `restart_after_s` later (None: leaves it down)."""
    import boto3

    client = boto3.client("s3", endpoint_url=info.endpoint_url, aws_access_key_id=info.access_key,
                          aws_secret_access_key=info.secret, region_name="us-east-1")
    # Kill only once the server lists the weights' multipart upload: then the kill lands inside it, however the
    # upload and this thread are scheduled (an earlier trigger raced the upload's start on a loaded machine).
    weights_key = f"{prefix}/medical/v1/adapter_model.safetensors"
    facts: dict = {}

    def upload_started() -> bool:
        try:
            answer = client.list_multipart_uploads(Bucket=info.bucket, Prefix=weights_key)
        except Exception:
            return False
        return any(upload["Key"] == weights_key for upload in answer.get("Uploads", []))

    def committed() -> bool:
        try:
            client.head_object(Bucket=info.bucket, Key=f"{prefix}/medical/v1/manifest.json")
        except Exception:
            return False
        return True

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not (committed() if after_commit else upload_started()):
                time.sleep(0.005)
                continue
            os.killpg(info.pid, signal.SIGKILL)  # the server's whole process group, no goodbye
            facts["killed_at"] = time.monotonic()
            if restart_after_s is not None:
                time.sleep(restart_after_s)
                facts["restarted"] = store_up(root)
                facts["restarted_at"] = time.monotonic()
            return
        facts["error"] = "the publish never started uploading v1"

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    facts["thread"] = thread
    return facts


def test_store_killed_mid_publish_then_back_publish_completes_once(fragile_store, big_adapter):
    info = store_up(fragile_store)
    prefix = f"killed-{time.monotonic_ns()}"
    url = f"s3://{info.bucket}/{prefix}"
    # Backoff 0.5, 1, 2, 4, 8 s: 15 s of retries cover a restart (~2-5 s).
    registry = Registry(url, info.storage_options(), retries=6, backoff_s=0.5)
    facts = _kill_mid_upload(info, prefix, restart_after_s=1.0, root=fragile_store)

    published = registry.publish("medical", big_adapter, {"note": "survived a store crash"})
    facts["thread"].join(timeout=30)

    assert "error" not in facts and "killed_at" in facts and "restarted" in facts
    assert facts["restarted"].pid != info.pid  # really a new server process
    assert published.version == 1
    fresh = Registry(url, info.storage_options())
    assert fresh.versions("medical") == [1]
    manifest = fresh.verify("medical", 1)  # every byte re-hashed on the server
    weights = big_adapter / "adapter_model.safetensors"
    assert manifest.files["adapter_model.safetensors"].size == weights.stat().st_size
    assert fresh.resolve("medical") == 1
    # The killed attempt's multipart upload is still on the server (parts no listing shows); gc aborts it and
    # touches nothing of the complete version.
    removed = fresh.gc(grace_s=0)
    assert all(url.endswith("/medical/v1/adapter_model.safetensors") for url in removed), removed
    assert _uploads(_raw_fs(facts["restarted"]), info.bucket, prefix) == []
    assert fresh.versions("medical") == [1] and fresh.verify("medical", 1) == manifest


def test_store_killed_mid_publish_and_left_down_fails_clearly_and_leaves_nothing(fragile_store, big_adapter):
    info = store_up(fragile_store)
    prefix = f"killed-{time.monotonic_ns()}"
    url = f"s3://{info.bucket}/{prefix}"
    registry = Registry(url, info.storage_options(), retries=3, backoff_s=0.1)
    facts = _kill_mid_upload(info, prefix, restart_after_s=None, root=fragile_store)

    with pytest.raises(RegistryError, match=r"cannot reach the object store .* after 3 tries") as caught:
        registry.publish("medical", big_adapter, {})
    facts["thread"].join(timeout=30)
    assert "killed_at" in facts
    assert info.secret not in str(caught.value) and info.access_key not in str(caught.value)

    info = store_up(fragile_store)  # back, on the same data
    fs = _raw_fs(info)
    left = _objects(fs, f"{info.bucket}/{prefix}")
    assert "medical/claims/v1.json" in left and "medical/v1/manifest.json" not in left
    # The kill landed inside the weights' multipart upload: the server holds its unfinished parts.
    assert _uploads(fs, info.bucket, prefix) == [f"{prefix}/medical/v1/adapter_model.safetensors"]
    fresh = Registry(url, info.storage_options())
    assert fresh.versions("medical") == [] and fresh.domains() == []  # the half upload is invisible
    with pytest.raises(RegistryError, match="no complete version"):
        fresh.resolve("medical")

    assert fresh.gc(grace_s=0) == [fresh.location("medical", 1), f"{url}/medical/v1/adapter_model.safetensors"]
    assert _objects(fs, f"{info.bucket}/{prefix}") == []  # not one object of the incomplete version is left
    assert _uploads(fs, info.bucket, prefix) == []  # nor any of its parts
    assert fresh.publish("medical", big_adapter, {}).version == 1  # and the number is free again
    fresh.verify("medical", 1)


def test_store_killed_after_the_commit_point_publish_returns_the_version_and_settling_it_later_finishes(
        fragile_store, big_adapter):
    """The manifest is the commit point: with the store gone while publish re-verifies, the version exists, the
    publish says so (`unverified`) instead of failing, and settling it once the store is back verifies it and moves
    `latest`."""
    info = store_up(fragile_store)
    prefix = f"committed-{time.monotonic_ns()}"
    url = f"s3://{info.bucket}/{prefix}"
    registry = Registry(url, info.storage_options(), retries=3, backoff_s=0.1)
    facts = _kill_mid_upload(info, prefix, restart_after_s=None, root=fragile_store, after_commit=True)

    published = registry.publish("medical", big_adapter, {"note": "committed, then the store died"})
    facts["thread"].join(timeout=30)

    assert "error" not in facts and "killed_at" in facts
    assert published.version == 1 and published.unverified is not None
    assert published.unverified.startswith("cannot reach the object store")
    assert info.secret not in published.unverified and info.access_key not in published.unverified

    info = store_up(fragile_store)  # back, on the same data
    fresh = Registry(url, info.storage_options())
    assert fresh.versions("medical") == [1] and fresh.alias("medical", "latest") is None
    settled = fresh.settle(fresh.manifest("medical", 1))
    assert settled.version == 1 and settled.unverified is None
    assert fresh.alias("medical", "latest").version == 1 and fresh.versions("medical") == [1]


def test_a_publish_failing_after_its_commit_point_succeeds_and_its_retry_finishes_it_once(ray_cluster,
                                                                                         tiny_config_file, tmp_path):
    """`latest` cannot be moved (its document's path is taken by a folder: a store fault after the manifest is
    written, injected without a mock): the publish exits 0 naming the version and warning; the same publish again
    returns that version and moves `latest`; only --force-new-version publishes the run a second time."""
    registry = Registry(f"file://{tmp_path / 'registry'}")
    config = tiny_config_file(publish={"registry": registry.url, "audit_prompts": 0},
                              train={"max_steps": 2, "eval_every": 1, "checkpoint_every": 2})
    trained = runner.invoke(app, ["train", str(config)])
    assert trained.exit_code == 0, trained.output
    (run_dir,) = (tmp_path / "output" / "medical").iterdir()
    publish = ["publish", str(config), "--domain", "medical", "--from", str(run_dir)]
    blocked = tmp_path / "registry" / "medical" / "aliases" / "latest.json"
    blocked.mkdir(parents=True)

    first = runner.invoke(app, publish)
    assert first.exit_code == 0, first.output
    assert "published medical v1 →" in first.output
    assert "warning: published medical v1; could not re-verify: object store error at" in first.output
    assert "while reading alias latest of medical" in first.output and "Traceback" not in first.output
    assert registry.versions("medical") == [1] and registry.alias("medical", "production").version == 1

    blocked.rmdir()
    again = runner.invoke(app, publish)
    assert again.exit_code == 0, again.output
    assert "already published: medical v1 →" in again.output and "warning" not in again.output
    assert "gate (production): promoted — no current production; eval loss below base (decided when v1 was " \
           "published)" in again.output
    assert registry.versions("medical") == [1] and registry.alias("medical", "latest").version == 1
    assert len(registry.alias("medical", "production").history) == 1  # promoted once, by the first publish

    forced = runner.invoke(app, [*publish, "--force-new-version"])
    assert forced.exit_code == 0, forced.output
    assert "published medical v2 →" in forced.output and registry.versions("medical") == [1, 2]
    assert registry.alias("medical", "latest").version == 2
    v1, v2 = (registry.manifest("medical", version).files for version in (1, 2))
    assert all(v2[name] == v1[name] for name in ("adapter_config.json", "adapter_model.safetensors"))


# ------------------------------------------------------------------ resource limits


def _peak_bytes(function, *args):
    """(result or raised exception, peak bytes Python allocated while `function` ran)."""
    tracemalloc.start()
    try:
        try:
            outcome = function(*args)
        except Exception as exc:  # returned for the test to check, with the memory it took
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_data_files_are_streamed_in_flat_memory(tmp_path):
    file_mb = 30
    record = {"messages": [{"role": "user", "content": "How long should I rest? " * 40},
                           {"role": "assistant", "content": "Two days, then see a doctor. " * 40}]}
    line = (json.dumps(record) + "\n").encode()
    lines = file_mb * 2**20 // len(line)
    big = tmp_path / "big.jsonl"
    big.write_bytes(line * lines)

    count, peak = _peak_bytes(check_file, str(big), {})
    assert count == lines
    assert peak < 4 * 2**20, f"validating a {file_mb} MB file peaked at {peak / 2**20:.1f} MiB"

    # One 30 MB "line" with no newline: refused by its length without ever being held whole.
    one_line = tmp_path / "one-line.jsonl"
    one_line.write_bytes(b"[" * (file_mb * 2**20))
    error, peak = _peak_bytes(check_file, str(one_line), {})
    assert isinstance(error, DataError), error
    assert f"one-line.jsonl:1: line is {file_mb * 2**20:,} bytes (limit {MAX_LINE_BYTES:,})" in str(error)
    assert peak < 4 * 2**20, f"refusing a {file_mb} MB line peaked at {peak / 2**20:.1f} MiB"


def test_worker_larger_than_every_node_fails_fast_with_the_reason(ray_cluster, tiny_config_file):
    import ray

    config = tiny_config_file(domains=("medical",))
    node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    started = time.monotonic()
    result = runner.invoke(app, ["train", str(config), f"cluster.cpus_per_worker={node_cpus * 4:g}"])
    assert result.exit_code == 2, result.output
    assert "cpus_per_worker" in result.output and f"CPU: {node_cpus * 4:g}" in result.output
    assert "Traceback" not in result.output
    assert time.monotonic() - started < 30  # refused up front, not after waiting for a node
    assert not (config.parent / "output").exists() and not (config.parent / "runs").exists()


# ------------------------------------------------------------------ credentials


def _store_bytes(url: str, info: StoreInfo) -> dict[str, bytes]:
    fs = _raw_fs(info)
    root = url.removeprefix("s3://")
    return {f"s3://{path}": fs.cat_file(f"{root}/{path}") for path in _objects(fs, root)}


def _files_bytes(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


def test_no_credential_in_output_logs_errors_or_anything_stored(ray_cluster, tiny_config_file, s3_store,
                                                               registry_url, tmp_path):
    import socket

    import ray

    options = s3_store.storage_options()
    env = s3_store.env()  # the same key and secret as AWS_* variables, as a Ray job gets them
    credentials = [s3_store.access_key, s3_store.secret]
    train = {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2}
    publish = {"registry": registry_url, "storage_options": options, "audit_prompts": 1, "audit_max_new_tokens": 4}
    config = tiny_config_file(domains=("support",), train=train, publish=publish)
    seen: dict[str, bytes] = {}

    shown = runner.invoke(app, ["validate", str(config)], env=env)
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.output)["publish"]["storage_options"]["endpoint_url"] == options["endpoint_url"]
    seen["`loramill validate` output"] = shown.output.encode()
    result = runner.invoke(app, ["run", str(config)], env=env)
    assert result.exit_code == 0, result.output
    seen["`loramill run` output"] = result.output.encode()
    stored = _store_bytes(registry_url, s3_store)
    assert any(path.endswith("/support/v1/manifest.json") for path in stored)
    assert any(path.endswith("/support/v1/audit.json") for path in stored)
    assert any(path.endswith("/support/v1/README.md") for path in stored)  # the model card
    seen |= stored
    seen |= _files_bytes(config.parent / "runs", config.parent / "output")
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert logs.is_dir()
    seen |= _files_bytes(logs)

    # Errors: a missing bucket, a refused secret, a data URL that carries a password.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    wrong_secret = options | {"secret": "0" * len(s3_store.secret)}
    password_url = f"http://loramill:{s3_store.secret}@127.0.0.1:{closed_port}/train.jsonl"
    def variant(name: str, edit=lambda raw: None, **sections) -> Path:
        """A copy of the tiny config (the fixture always writes config.yaml) with `sections` merged, then `edit`."""
        raw = yaml.safe_load(tiny_config_file(domains=("support",), **sections).read_text())
        edit(raw)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    failures = [
        (["list", "-c", variant("no-bucket.yaml", publish=publish | {"registry": "s3://no-such-bucket-lm/x"})],
         "bucket 'no-such-bucket-lm' does not exist"),
        (["list", "-c", variant("wrong-secret.yaml", publish=publish | {"storage_options": wrong_secret})],
         "refused the credentials"),
        (["train", variant("password-url.yaml", lambda raw: raw["domains"][0].update(train=password_url))],
         f"http://127.0.0.1:{closed_port}/train.jsonl: "),  # named, without its user:password
    ]
    for argv, message in failures:
        outcome = runner.invoke(app, [str(a) for a in argv], env=env)
        assert outcome.exit_code == 2, outcome.output
        assert message in outcome.output and "Traceback" not in outcome.output
        seen[f"`loramill {argv[0]}` error: {message}"] = outcome.output.encode()

    leaks = sorted({where for where, data in seen.items() for secret in credentials if secret.encode() in data})
    assert leaks == [], f"a credential was found in: {leaks}"

"""The adapter registry against a real SeaweedFS, moto (strict AWS rules) and file://, on loopback only."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from infra.registry import (
    NAME_PATTERN,
    ConflictError,
    IntegrityError,
    Registry,
    RegistryError,
    Retention,
    validate_name,
)
from infra.store import StoreInfo
from lora import bottleneck
from lora.config import load_config
from pipelines.cli import app
from pipelines.registry_access import open_registry
from tests.s3_fixtures import MOTO_BUCKET, Target, moto_options

WEIGHTS = "adapter_model.safetensors"
METADATA = {
    "base_model": {"id": "tests/tiny-llama", "revision": "r0", "weights_sha256": "0" * 64},
    "config_sha256": "1" * 64,
    "data": {"train_sha256": "2" * 64},
    "metrics": {"eval_loss": 1.25},
    "loramill_version": "0.1.0",
    "git_commit": "abc123",
}


@dataclass(frozen=True)
class TinyAdapter:
    path: Path
    config: LlamaConfig
    base_state: dict[str, torch.Tensor]
    input_ids: torch.Tensor
    logits: torch.Tensor

    def load(self, folder: Path) -> torch.Tensor:
        """Logits of the base model with the adapter in `folder` applied."""
        base = LlamaForCausalLM(self.config)
        base.load_state_dict(self.base_state)
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            return model(input_ids=self.input_ids).logits


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> TinyAdapter:
    """A real PEFT LoRA (r=4) on a tiny random Llama, saved with save_pretrained."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).eval()
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    # init_lora_weights=False: B is random too, so the adapter changes the logits and the check below has teeth.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=input_ids).logits, logits)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return TinyAdapter(path, config, base_state, input_ids, logits)


def raw_path(target: Target, domain: str, rel: str) -> str:
    return f"{target.root}/{domain}/{rel}"


def stored(target: Target, folder: str) -> dict[str, bytes]:
    """Every object below `<root>/<folder>/`, by its path relative to it, read straight from the store."""
    base = f"{target.root}/{folder}"
    return {path[len(base) + 1:]: target.fs.cat_file(path) for path in target.fs.find(base)}


def view(target: Target, name: str) -> dict[str, bytes]:
    return stored(target, f"serve/{name}")


def version_files(target: Target, domain: str, version: int) -> dict[str, bytes]:
    return stored(target, f"{domain}/v{version}")


def adapter_of(target: Target, domain: str, version: int) -> dict[str, bytes]:
    """What the serving view of a version must hold: its two adapter files, as published."""
    files = version_files(target, domain, version)
    return {name: files[name] for name in ("adapter_config.json", WEIGHTS)}


def variant(adapter: TinyAdapter, folder: Path, dropout: float) -> Path:
    """The adapter with another lora_dropout in its config: other bytes, the same outputs in eval mode."""
    folder.mkdir(parents=True)
    for source in adapter.path.iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"lora_dropout": dropout}))
    return folder


# ------------------------------------------------------------------ publish, list, pull


def test_publish_list_pull_roundtrip(target: Target, adapter: TinyAdapter, tmp_path: Path) -> None:
    reg = target.registry
    published = reg.publish("medical", adapter.path, METADATA)

    assert (published.version, published.url) == (1, reg.location("medical", 1))
    assert reg.versions("medical") == [1] and reg.domains() == ["medical"]
    manifest = reg.manifest("medical", 1)
    assert manifest.model_dump(by_alias=True)["schema"] == 1
    assert (manifest.domain, manifest.version, manifest.parent_version) == ("medical", 1, None)
    assert manifest.metadata == METADATA
    assert sorted(manifest.files) == sorted(p.name for p in adapter.path.iterdir())
    for name, entry in manifest.files.items():
        assert entry.size == (adapter.path / name).stat().st_size
    assert reg.resolve("medical") == reg.resolve("medical", "latest") == reg.resolve("medical", "v1") == 1
    [row] = reg.describe()
    assert (row.domain, row.version, row.aliases, row.metrics) == ("medical", 1, ["latest"], {"eval_loss": 1.25})
    assert row.problem is None
    assert row.size_bytes == sum(p.stat().st_size for p in adapter.path.iterdir())

    dest = reg.pull("medical", None, tmp_path / "pulled")
    for source in adapter.path.iterdir():
        assert (dest / source.name).read_bytes() == source.read_bytes()
    torch.testing.assert_close(adapter.load(dest), adapter.logits)

    # The version folder holds exactly its manifest's files; the claim lives beside it; the serving view holds the
    # two adapter files of v1, under the version and under `latest`.
    assert sorted(version_files(target, "medical", 1)) == sorted([*manifest.files, "manifest.json"])
    assert sorted(stored(target, "medical/claims")) == ["v1.json"]
    assert view(target, "medical.v1") == view(target, "medical.latest") == adapter_of(target, "medical", 1)
    assert sorted(stored(target, "serve")) == sorted(f"{name}/{file}" for name in ("medical.latest", "medical.v1")
                                                      for file in ("adapter_config.json", WEIGHTS))
    assert reg.view_location() == f"{reg.url}/serve"
    assert reg.view_location("medical", "latest") == f"{reg.url}/serve/medical.latest"
    assert reg.view_location("medical", 1) == reg.view_location("medical", "v1") == f"{reg.url}/serve/medical.v1"
    assert reg.domains() == ["medical"]  # the view is no domain

    second = reg.publish("medical", variant(adapter, tmp_path / "second", 0.25), METADATA)
    assert (second.version, second.manifest.parent_version) == (2, 1)
    assert reg.resolve("medical") == 2 and reg.alias("medical", "latest").history[-1]["from"] == 1
    assert view(target, "medical.latest") == view(target, "medical.v2") == adapter_of(target, "medical", 2)
    assert view(target, "medical.v1") == adapter_of(target, "medical", 1) != adapter_of(target, "medical", 2)
    assert sorted(version_files(target, "medical", 2)) == sorted([*second.manifest.files, "manifest.json"])
    assert reg.settle(second.manifest).unverified is None  # settling again leaves the views as they are
    assert view(target, "medical.v2") == adapter_of(target, "medical", 2)


def test_concurrent_publishes_get_distinct_complete_versions(target: Target, adapter: TinyAdapter) -> None:
    reg = target.registry
    start = threading.Barrier(8)

    def publish(i: int) -> int:
        start.wait()
        return reg.publish("legal", adapter.path, {"worker": i}).version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(publish, range(8)))

    assert sorted(versions) == list(range(1, 9))
    assert reg.versions("legal") == list(range(1, 9))
    manifests = [reg.verify("legal", v) for v in versions]
    assert {manifest.metadata["worker"] for manifest in manifests} == set(range(8))
    assert reg.resolve("legal") == 8  # `latest` only ever moves forward
    for manifest in manifests:  # a parent is an earlier complete version (which one depends on who finished first)
        assert manifest.parent_version is None or manifest.parent_version < manifest.version
        assert manifest.skipped_parents == []
        # Only the manifest's files: every claim is in claims/, none inside a version folder.
        assert sorted(version_files(target, "legal", manifest.version)) == sorted([*manifest.files, "manifest.json"])
        assert view(target, f"legal.v{manifest.version}") == adapter_of(target, "legal", manifest.version)
    assert sorted(stored(target, "legal/claims")) == sorted(f"v{v}.json" for v in range(1, 9))


def test_concurrent_promotes_exactly_one_wins_and_history_keeps_every_move(
    target: Target, adapter: TinyAdapter, tmp_path: Path
) -> None:
    reg = target.registry
    for version in range(1, 4):
        reg.publish("support", variant(adapter, tmp_path / f"v{version}", version / 10), {})

    def race(expected: int | None | str, versions: list[int]) -> tuple[list[int], int]:
        start = threading.Barrier(len(versions))

        def promote(version: int) -> int | None:
            start.wait()
            try:
                reg.promote("support", version, "prod", expected=expected, record={"by": f"worker-{version}"})
            except ConflictError:
                return None
            return version

        with ThreadPoolExecutor(len(versions)) as pool:
            results = list(pool.map(promote, versions))
        winners = [v for v in results if v is not None]
        return winners, len(results) - len(winners)

    winners, conflicts = race(None, [1, 2, 3, 1, 2, 3])
    assert (len(winners), conflicts) == (1, 5)
    assert reg.alias("support", "prod").version == winners[0]
    assert view(target, "support.prod") == adapter_of(target, "support", winners[0])

    previous = winners[0]
    winners, conflicts = race(previous, [v for v in (1, 2, 3) if v != previous] * 3)
    assert (len(winners), conflicts) == (1, 5)

    # SeaweedFS answers contended conditional PUTs on one key in 1 s steps (a server-side lock that waiters
    # poll each second): four writers keep this round near 2 s.
    winners, conflicts = race("any", [1, 2, 3, 1])
    assert (len(winners), conflicts) == (4, 0)

    state = reg.alias("support", "prod")
    # However the four switches interleaved, the view ends on the version the alias points at last.
    assert view(target, "support.prod") == adapter_of(target, "support", state.version)
    assert len(state.history) == state.generation == 6
    assert state.history[0]["from"] is None
    for before, after in zip(state.history, state.history[1:], strict=False):
        assert after["from"] == before["to"]  # a chain: no move was lost or overwritten
    assert state.version == state.history[-1]["to"]
    with pytest.raises(ConflictError, match="points at"):
        reg.promote("support", 1, "prod", expected=state.version + 1 if state.version < 3 else 1)


# ------------------------------------------------------------------ tampering


def test_flipped_byte_in_weights_is_refused(target: Target, adapter: TinyAdapter, tmp_path: Path) -> None:
    target.registry.publish("medical", adapter.path, {})
    path = raw_path(target, "medical", f"v1/{WEIGHTS}")
    data = bytearray(target.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    target.fs.pipe_file(path, bytes(data))

    with pytest.raises(IntegrityError, match=WEIGHTS):
        target.registry.pull("medical", 1, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    with pytest.raises(IntegrityError, match=WEIGHTS):
        target.registry.verify("medical", 1)


def test_tampered_version_never_reaches_the_serving_view(target: Target, adapter: TinyAdapter,
                                                         tmp_path: Path) -> None:
    reg = target.registry
    reg.publish("medical", adapter.path, {})
    reg.promote("medical", 1, "prod")
    second = reg.publish("medical", variant(adapter, tmp_path / "second", 0.5), {})
    path = raw_path(target, "medical", f"v2/{WEIGHTS}")
    data = bytearray(target.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    target.fs.pipe_file(path, bytes(data))

    with pytest.raises(IntegrityError, match=WEIGHTS):
        reg.promote("medical", 2, "prod")
    assert reg.alias("medical", "prod").version == 1  # refused before the alias moved
    assert view(target, "medical.prod") == adapter_of(target, "medical", 1)
    # A version tampered with before its view was written (here: the view removed, then settled again) is not
    # copied either.
    target.fs.rm(f"{target.root}/serve/medical.v2", recursive=True)
    with pytest.raises(IntegrityError, match=WEIGHTS):
        reg.settle(second.manifest)
    assert view(target, "medical.v2") == {}
    # An audit file changed after publishing fails verification too: no alias moves to that version.
    third = reg.publish("medical", variant(adapter, tmp_path / "third", 0.75), {}).version
    target.fs.pipe_file(raw_path(target, "medical", f"v{third}/README.md"), b"rewritten")
    with pytest.raises(IntegrityError, match="README.md"):
        reg.promote("medical", third, "prod")
    assert view(target, "medical.prod") == adapter_of(target, "medical", 1)


def test_adapter_layers_get_no_serving_view_and_an_alias_moved_to_them_leaves_none(
        target: Target, adapter: TinyAdapter, tmp_path: Path) -> None:
    """vLLM and Ray Serve load PEFT adapters only: a version of adapter layers is published but not served, and an
    alias moved to it must not keep serving the LoRA version it pointed at before."""
    reg = target.registry
    reg.publish("medical", adapter.path, {})
    reg.promote("medical", 1, "prod")
    model = LlamaForCausalLM(adapter.config)
    bottleneck.add_adapter_layers(model, size=4)
    bottleneck.save(model, tmp_path / "layers", "tests/tiny-llama")
    second = reg.publish("medical", tmp_path / "layers", {})
    assert second.unverified is None and reg.alias("medical", "latest").version == 2
    assert view(target, "medical.v2") == {} and view(target, "medical.latest") == {}
    reg.promote("medical", 2, "prod")
    assert view(target, "medical.prod") == {}
    reg.promote("medical", 1, "prod")
    assert view(target, "medical.prod") == adapter_of(target, "medical", 1)


def test_versions_failing_verification_are_skipped_as_parent_and_described(target: Target,
                                                                          adapter: TinyAdapter) -> None:
    reg = target.registry
    for _ in range(3):
        reg.publish("medical", adapter.path, {})
    resized = raw_path(target, "medical", f"v2/{WEIGHTS}")
    target.fs.pipe_file(resized, target.fs.cat_file(resized) + b"\0")
    flipped = raw_path(target, "medical", f"v3/{WEIGHTS}")
    data = bytearray(target.fs.cat_file(flipped))
    data[len(data) // 2] ^= 0xFF
    target.fs.pipe_file(flipped, bytes(data))

    reservation = reg.reserve("medical")
    assert (reservation.version, reservation.parent_version) == (4, 1)
    assert [s.version for s in reservation.skipped_parents] == [3, 2]  # newest first
    assert "sha256" in reservation.skipped_parents[0].reason and "bytes" in reservation.skipped_parents[1].reason
    published = reg.publish_reserved(reservation, adapter.path, {})
    assert published.manifest == reg.verify("medical", 4)
    assert (published.manifest.parent_version, published.manifest.skipped_parents) == (1, reservation.skipped_parents)
    assert reg.publish("medical", adapter.path, {}).manifest.parent_version == 4

    listed = {row.version: row.problem for row in reg.describe("medical")}  # nothing downloaded
    assert listed[1] is None and listed[4] is None and listed[5] is None
    assert listed[2] is not None and "the file was changed after publishing" in listed[2]  # from the listing
    assert listed[3] == f"failed verification when v4 was published: {reservation.skipped_parents[0].reason}"
    verified = {row.version: row.problem for row in reg.describe("medical", verify=True)}
    assert verified[3] == reservation.skipped_parents[0].reason and verified[2] is not None
    assert [verified[v] for v in (1, 4, 5)] == [None, None, None]


def test_pickle_in_version_folder_is_refused(target: Target, adapter: TinyAdapter, tmp_path: Path) -> None:
    target.registry.publish("medical", adapter.path, {})
    target.fs.pipe_file(raw_path(target, "medical", "v1/pytorch_model.bin"), b"\x80\x04 not really a pickle")

    with pytest.raises(IntegrityError, match=r"pytorch_model\.bin.*pickle"):
        target.registry.pull("medical", 1, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_manifest_pointing_at_another_files_hash_is_refused(
    target: Target, adapter: TinyAdapter, tmp_path: Path
) -> None:
    target.registry.publish("medical", adapter.path, {})
    path = raw_path(target, "medical", "v1/manifest.json")
    manifest = json.loads(target.fs.cat_file(path))
    manifest["files"][WEIGHTS]["sha256"] = manifest["files"]["adapter_config.json"]["sha256"]
    target.fs.pipe_file(path, json.dumps(manifest).encode())

    with pytest.raises(IntegrityError, match=WEIGHTS):
        target.registry.pull("medical", 1, tmp_path / "pulled")


def test_version_without_manifest_is_invisible_and_collected(target: Target, adapter: TinyAdapter) -> None:
    reg = target.registry
    reg.publish("medical", adapter.path, {})
    # An upload that died before its manifest: a claim and one file.
    target.fs.pipe_file(raw_path(target, "medical", "claims/v2.json"), b'{"claimed_at": "2026-01-01T00:00:00+00:00"}')
    target.fs.pipe_file(raw_path(target, "medical", f"v2/{WEIGHTS}"), b"partial")

    assert reg.versions("medical") == [1] and reg.resolve("medical") == 1
    with pytest.raises(RegistryError, match="no complete version v2"):
        reg.resolve("medical", "v2")
    assert reg.gc(grace_s=3600) == []
    assert reg.gc("medical", grace_s=0) == [reg.location("medical", 2)]
    assert not [p for p in target.fs.find(f"{target.root}/medical") if "/v2/" in p or p.endswith("/v2.json")]
    assert reg.versions("medical") == [1]
    assert reg.publish("medical", adapter.path, {}).version == 2  # nothing of the abandoned v2 is left


def test_claim_left_in_a_version_by_an_older_loramill_is_tolerated_and_collected(
    target: Target, adapter: TinyAdapter, tmp_path: Path
) -> None:
    reg = target.registry
    reg.publish("medical", adapter.path, {})
    legacy = raw_path(target, "medical", "v1/.claim")
    target.fs.pipe_file(legacy, b'{"claimed_at": "2026-01-01T00:00:00+00:00"}')

    assert reg.verify("medical", 1) and [row.problem for row in reg.describe("medical")] == [None]
    reg.pull("medical", 1, tmp_path / "pulled")
    assert reg.gc(grace_s=3600) == [f"{target.registry.url}/medical/v1/.claim"]  # a finished claim: no grace
    manifest = reg.manifest("medical", 1)
    assert sorted(version_files(target, "medical", 1)) == sorted([*manifest.files, "manifest.json"])
    assert reg.publish("medical", adapter.path, {}).version == 2


def test_pull_into_existing_dest_is_refused(target: Target, adapter: TinyAdapter, tmp_path: Path) -> None:
    target.registry.publish("medical", adapter.path, {})
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")

    with pytest.raises(RegistryError, match="already exists"):
        target.registry.pull("medical", "latest", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"
    assert [p.name for p in dest.parent.iterdir()] == ["dest"]  # no staging folder left behind


def test_no_credential_reaches_the_store(target: Target, adapter: TinyAdapter) -> None:
    if not target.credentials:
        pytest.skip("file:// registries have no credentials")
    reg = target.registry
    reg.publish("medical", adapter.path, METADATA)
    reg.promote("medical", 1, "prod", record={"by": "ci", "forced": False, "gate": {"eval_loss": 1.25}})
    with reg.lock("medical", "schedule", ttl_s=60):
        stored = {path: target.fs.cat_file(path) for path in target.fs.find(target.root)}
    assert any(path.endswith("/locks/schedule.json") for path in stored)
    for credential in target.credentials:
        assert not [path for path, data in stored.items() if credential.encode() in data]

    with pytest.raises(RegistryError, match="credential") as caught:
        reg.publish("medical", adapter.path, {"note": f"secret={target.credentials[1]}"})
    assert target.credentials[1] not in str(caught.value)


def test_lock_excludes_until_released_or_expired(target: Target) -> None:
    reg = target.registry
    with reg.lock("medical", "schedule", ttl_s=60):
        with pytest.raises(ConflictError, match="held by"):
            with reg.lock("medical", "schedule", ttl_s=60):
                pass
    with reg.lock("medical", "schedule", ttl_s=60):  # released: free again
        pass

    with reg.lock("medical", "nightly", ttl_s=0.2):
        time.sleep(0.3)
        with reg.lock("medical", "nightly", ttl_s=60):  # expired: taken over
            pass


# ------------------------------------------------------------------ write-once versions (S3 Object Lock)


@dataclass(frozen=True)
class Locked:
    """A registry with retention on a fresh bucket created with Object Lock, and raw access to that bucket."""

    registry: Registry
    options: dict[str, str]
    client: Any
    bucket: str


@pytest.fixture(params=[("seaweedfs", "governance"), ("moto", "compliance")], ids=lambda p: "-".join(p))
def locked(request: pytest.FixtureRequest) -> Locked:
    server, mode = request.param
    if server == "seaweedfs":
        options = request.getfixturevalue("s3_store").storage_options()
    else:
        options = moto_options(request.getfixturevalue("moto_server"))
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                          aws_secret_access_key=options["secret"], region_name="us-east-1")
    bucket = f"worm-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    registry = Registry(f"s3://{bucket}/adapters", options, retention=Retention(mode=mode, days=1))
    return Locked(registry, options, client, bucket)


def test_every_object_of_a_version_is_written_once_under_object_lock(
    locked: Locked, adapter: TinyAdapter, tmp_path: Path
) -> None:
    reg, client, bucket = locked.registry, locked.client, locked.bucket
    reserved_at = datetime.now(UTC)
    reg.publish("medical", adapter.path, METADATA)

    [row] = reg.describe()
    assert row.lock is not None and row.lock.mode == reg.retention.mode.upper()
    assert abs(row.lock.until - (reserved_at + timedelta(days=1))).total_seconds() < 30
    keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket, Prefix="adapters/medical/v1/")["Contents"]]
    assert sorted(key.rsplit("/", 1)[1] for key in keys) == sorted(["manifest.json",
                                                                      *(p.name for p in adapter.path.iterdir())])
    # The version's serving view is kept as long as the version; the claim and the alias's view carry no lock, so
    # that gc can remove an abandoned claim and a switch leaves no locked old copy behind.
    view_keys = [f"adapters/serve/medical.v1/{name}" for name in ("adapter_config.json", WEIGHTS)]
    for key in keys + view_keys:
        head = client.head_object(Bucket=bucket, Key=key)
        assert (head["ObjectLockMode"], head["ObjectLockRetainUntilDate"]) == (row.lock.mode, row.lock.until), key
    for key in ["adapters/medical/claims/v1.json", *(f"adapters/serve/medical.latest/{name}"
                                                      for name in ("adapter_config.json", WEIGHTS))]:
        assert "ObjectLockMode" not in client.head_object(Bucket=bucket, Key=key), key
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "domains": [{"name": "medical", "train": "t.jsonl", "eval": "e.jsonl", "intended_use": "tests",
                     "limitations": "none"}],
        "publish": {"registry": reg.url, "storage_options": locked.options}}))
    listed = CliRunner().invoke(app, ["list", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert f"{reg.retention.mode} until {row.lock.until:%Y-%m-%d}" in listed.output

    # Another client with write access: an overwrite only adds a newer object version (which verification refuses),
    # and the published bytes cannot be deleted. (SeaweedFS also refuses to shorten their retention; moto does not.)
    key = f"adapters/medical/v1/{WEIGHTS}"
    published = client.head_object(Bucket=bucket, Key=key)["VersionId"]
    client.put_object(Bucket=bucket, Key=key, Body=b"tampered")
    with pytest.raises(IntegrityError, match=WEIGHTS):
        reg.verify("medical", 1)
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key=key, VersionId=published)
    stored = client.get_object(Bucket=bucket, Key=key, VersionId=published)["Body"].read()
    assert stored == (adapter.path / WEIGHTS).read_bytes()


def test_retention_without_object_lock_is_refused_before_anything_is_written(
    moto_server: str, adapter: TinyAdapter, tmp_path: Path
) -> None:
    url = f"s3://{MOTO_BUCKET}/test-{uuid.uuid4().hex[:12]}"  # a bucket made without Object Lock
    reg = Registry(url, moto_options(moto_server), retention=Retention(mode="governance", days=30))
    with pytest.raises(RegistryError, match=f"bucket '{MOTO_BUCKET}' at .* has no Object Lock: create the bucket"):
        reg.publish("medical", adapter.path, {})
    assert Registry(url, moto_options(moto_server)).gc(grace_s=0) == []  # not even a claim
    with pytest.raises(RegistryError, match="retention needs S3 Object Lock"):
        Registry(f"file://{tmp_path}", retention=Retention(mode="compliance", days=1))


def test_embedded_registry_keeps_versions_write_once_by_default(
    s3_store: StoreInfo, adapter: TinyAdapter, tmp_path: Path
) -> None:
    """`publish.registry: embedded` with no retention setting (the session's store, reopened from its folder):
    every object of a version is kept 30 days in governance mode, deleting one is refused, an overwrite is refused
    at pull, `loramill list` shows the retention, and gc still removes an abandoned upload."""
    domain = f"worm-{uuid.uuid4().hex[:12]}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "domains": [{"name": domain, "train": "t.jsonl", "eval": "e.jsonl", "intended_use": "tests",
                     "limitations": "none"}],
        "publish": {"store_dir": str(s3_store.data_dir.parent)}}))
    reg = open_registry(load_config(config))
    reserved_at = datetime.now(UTC)
    reg.publish(domain, adapter.path, METADATA)

    client = boto3.client("s3", endpoint_url=s3_store.endpoint_url, aws_access_key_id=s3_store.access_key,
                          aws_secret_access_key=s3_store.secret, region_name="us-east-1")
    prefix = f"adapters/{domain}/v1/"
    keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=s3_store.bucket, Prefix=prefix)["Contents"]]
    assert len(keys) == len(list(adapter.path.iterdir())) + 1  # the adapter's files and the manifest
    for key in keys:
        head = client.head_object(Bucket=s3_store.bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE", key
        assert abs(head["ObjectLockRetainUntilDate"] - (reserved_at + timedelta(days=30))).total_seconds() < 60, key
    listed = CliRunner().invoke(app, ["list", domain, "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert f"governance until {head['ObjectLockRetainUntilDate']:%Y-%m-%d}" in listed.output

    # Another client with write access: deleting the published object version is refused; an overwrite only adds
    # a newer object version, which the verified pull refuses, and the published bytes stay on the store.
    key = prefix + WEIGHTS
    published = client.head_object(Bucket=s3_store.bucket, Key=key)["VersionId"]
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=s3_store.bucket, Key=key, VersionId=published)
    client.put_object(Bucket=s3_store.bucket, Key=key, Body=b"tampered")
    with pytest.raises(IntegrityError, match=WEIGHTS):
        reg.pull(domain, 1, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    stored = client.get_object(Bucket=s3_store.bucket, Key=key, VersionId=published)["Body"].read()
    assert stored == (adapter.path / WEIGHTS).read_bytes()

    # gc on the locked bucket: the abandoned reservation's claim (never locked) goes, and its number is free again;
    # v1 is untouched.
    assert reg.reserve(domain).version == 2
    assert reg.gc(domain, grace_s=0) == [reg.location(domain, 2)]
    claims = client.list_objects_v2(Bucket=s3_store.bucket, Prefix=f"adapters/{domain}/claims/")["Contents"]
    assert [entry["Key"].rsplit("/", 1)[1] for entry in claims] == ["v1.json"]
    assert reg.versions(domain) == [1] and reg.reserve(domain).version == 2
    # Governance mode: the store's own admin key can still remove a version early, when it says so.
    client.delete_object(Bucket=s3_store.bucket, Key=key, VersionId=published, BypassGovernanceRetention=True)


def test_retention_on_a_folder_registry_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "domains": [{"name": "medical", "train": "t.jsonl", "eval": "e.jsonl", "intended_use": "tests",
                     "limitations": "none"}],
        "publish": {"registry": f"file://{tmp_path}/registry", "retention_days": 365}}))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    assert (f"publish.retention_days: retention needs S3 Object Lock, and file://{tmp_path}/registry is a folder "
            "whose owner can always change it: publish to registry=embedded or an s3:// bucket created with Object "
            "Lock, or remove retention_days") in result.output


# ------------------------------------------------------------------ names, URLs and errors


@pytest.mark.parametrize("bad", ["../x", "a/b", "Upper", "", "-lead", "x" * 65, "a.b"])
def test_bad_names_are_refused_with_the_fix(bad: str, tmp_path: Path, adapter: TinyAdapter) -> None:
    reg = Registry(f"file://{tmp_path}/registry")
    message = f"domain name {bad!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_'"
    with pytest.raises(RegistryError) as caught:
        reg.publish(bad, adapter.path, {})
    assert message in str(caught.value)
    with pytest.raises(RegistryError, match="alias name"):
        reg.promote("medical", 1, bad)
    assert not (tmp_path / "registry").exists()


def test_domain_named_like_the_serving_view_is_refused(tmp_path: Path, adapter: TinyAdapter) -> None:
    with pytest.raises(RegistryError, match="domain name 'serve' is reserved: <registry>/serve/ holds the serving view"):
        Registry(f"file://{tmp_path}/registry").publish("serve", adapter.path, {})
    assert not (tmp_path / "registry").exists()


def test_alias_that_looks_like_a_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="looks like a version number"):
        Registry(f"file://{tmp_path}").promote("medical", 1, "v3")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("s3://Bad_Bucket/x", "bucket name 'Bad_Bucket'"),
        ("s3://ab/x", "bucket name 'ab'"),
        ("s3://bucket/../x", "path part '..'"),
        ("file://relative/x", "must be absolute"),
        ("file:relative/x", "must be absolute"),
        ("http://127.0.0.1/x", "not supported"),
    ],
)
def test_bad_urls_are_refused(url: str, problem: str) -> None:
    with pytest.raises(RegistryError, match=problem.replace(".", r"\.")):
        Registry(url)


def test_refused_file_types_at_publish(tmp_path: Path, adapter: TinyAdapter) -> None:
    reg = Registry(f"file://{tmp_path}/registry")
    folder = tmp_path / "with-pickle"
    folder.mkdir()
    for source in adapter.path.iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match=r"pytorch_model\.bin .*pickle"):
        reg.publish("medical", folder, {})
    (folder / "pytorch_model.bin").unlink()
    (folder / WEIGHTS).unlink()
    with pytest.raises(RegistryError, match=WEIGHTS):
        reg.publish("medical", folder, {})
    with pytest.raises(RegistryError, match="reserved"):
        reg.publish("medical", adapter.path, {"version": 7})


def test_wrong_secret_is_a_credentials_error(s3_store: StoreInfo, registry_url: str) -> None:
    options = s3_store.storage_options() | {"secret": "wrong-" + s3_store.secret[6:]}
    with pytest.raises(RegistryError, match="refused the credentials") as caught:
        Registry(registry_url, options).versions("medical")
    assert s3_store.secret not in str(caught.value) and options["secret"] not in str(caught.value)
    assert s3_store.secret not in repr(Registry(registry_url, s3_store.storage_options()))


def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k" * 16, "secret": "s" * 32}
    reg = Registry("s3://loramill/x", options, retries=3, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(RegistryError, match=r"cannot reach the object store .* after 3 tries"):
        reg.versions("medical")
    assert time.monotonic() - started < 5


def test_missing_bucket_has_its_own_message(moto_server: str) -> None:
    with pytest.raises(RegistryError, match="bucket 'no-such-bucket' does not exist"):
        Registry("s3://no-such-bucket/x", moto_options(moto_server)).versions("medical")
    assert Registry(f"s3://{MOTO_BUCKET}/empty", moto_options(moto_server)).versions("medical") == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=70), st.from_regex(r"[a-zA-Z0-9._/-]{0,70}", fullmatch=True)))
def test_accepted_names_are_safe(name: str) -> None:
    try:
        validate_name(name)
    except RegistryError:
        return
    assert "/" not in name and ".." not in name and 1 <= len(name) <= 64
    assert re.fullmatch(NAME_PATTERN, name)


# Built once: constructing a Registry contacts nothing, and hypothesis calls the test hundreds of times.
_KEY_REGISTRIES = (Registry("s3://loramill/team/adapters"), Registry("file:///srv/registry"))


@settings(max_examples=200, deadline=None)
@given(
    domain=st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 64 and s != "serve"),
    version=st.integers(1, 10**6),
)
def test_computed_keys_stay_under_the_prefix(domain: str, version: int) -> None:
    for reg in _KEY_REGISTRIES:
        assert reg.location(domain).startswith(reg.url + "/")
        assert reg.location(domain, version).startswith(reg.url + "/")
        assert reg.view_location(domain, version).startswith(reg.url + "/serve/")

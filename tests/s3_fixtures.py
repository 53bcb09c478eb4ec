"""Object-storage fixtures (a pytest plugin: `pytest_plugins = ["tests.s3_fixtures"]`).

- `s3_store`: one real SeaweedFS for the session, started by `infra.store` on free loopback ports in a temp dir,
  so it runs next to a user's own store.
- `registry_url`: a fresh `s3://loramill/test-<uuid>` prefix on it for each test.
- `moto_server`: moto's S3 on 127.0.0.1 (starts in ~0.01 s, follows AWS naming and listing rules exactly, but
  accepts any credentials and keeps nothing on disk).
- `target`: a fresh empty registry plus raw access to its storage, parametrized over SeaweedFS, moto and file://.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import fsspec
import pytest

from infra.registry import Registry
from infra.store import StoreInfo, store_down, store_up

MOTO_BUCKET = "loramill"


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreInfo]:
    """A dedicated SeaweedFS on free 127.0.0.1 ports, with the `loramill` bucket; stopped after the session."""
    root = tmp_path_factory.mktemp("seaweedfs")
    info = store_up(root, s3_port=0)
    yield info
    # A short grace: SeaweedFS's clean stop waits ~15 s on its own gRPC streams; acknowledged data is safe.
    store_down(root, grace_s=1)


@pytest.fixture
def registry_url(s3_store: StoreInfo) -> str:
    """A prefix no other test uses, in the session store's bucket."""
    return f"s3://{s3_store.bucket}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL of an in-process moto S3 server on 127.0.0.1, with an empty `loramill` bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="moto", aws_secret_access_key="moto", region_name="us-east-1"
    ).create_bucket(Bucket=MOTO_BUCKET)
    yield endpoint
    server.stop()


def moto_options(endpoint: str) -> dict[str, str]:
    """storage_options for the moto server (it accepts any credentials)."""
    return {"endpoint_url": endpoint, "key": "moto-access-key", "secret": "moto-secret-key"}


@dataclass
class Target:
    """A registry under test, and the raw filesystem under it (to tamper the way a bug or an attacker would)."""

    registry: Registry
    fs: fsspec.AbstractFileSystem
    root: str
    """The registry's root as a path of `fs`."""
    credentials: list[str] = field(default_factory=list)


@pytest.fixture(params=["seaweedfs", "moto", "file"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty registry on each backend; the S3 servers start only when a test needs one."""
    if request.param == "file":
        root = str(tmp_path / "registry")
        return Target(Registry(f"file://{root}"), fsspec.filesystem("file", auto_mkdir=True), root)
    if request.param == "seaweedfs":
        info: StoreInfo = request.getfixturevalue("s3_store")
        url, options = request.getfixturevalue("registry_url"), info.storage_options()
    else:
        url = f"s3://{MOTO_BUCKET}/test-{uuid.uuid4().hex[:12]}"
        options = moto_options(request.getfixturevalue("moto_server"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **options)
    credentials = [options["key"], options["secret"]]
    return Target(Registry(url, options), fs, url.removeprefix("s3://"), credentials)

"""`loramill store up|down|status`: a real SeaweedFS in a temp dir, on free loopback ports."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import s3fs

from infra.store import StoreError, store_down, store_status, store_up


def test_up_status_down_up_keeps_data_and_credentials(tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert store_status(root) is None
    info = store_up(root, s3_port=0)
    try:
        assert store_status(root) == info
        assert store_up(root) == info  # already running: the same server
        assert info.secret not in repr(info) and info.secret not in str(info)
        assert stat.S_IMODE((root / "s3.json").stat().st_mode) == 0o600
        client = boto3.client("s3", endpoint_url=info.endpoint_url, aws_access_key_id=info.access_key,
                              aws_secret_access_key=info.secret, region_name="us-east-1")
        assert object_lock(client, info.bucket) == "Enabled"
        # A bucket made by an older loramill, without Object Lock: the next start enables it, data kept.
        client.delete_bucket(Bucket=info.bucket)
        client.create_bucket(Bucket=info.bucket)
        assert object_lock(client, info.bucket) is None
        fs = s3fs.S3FileSystem(**info.storage_options(), skip_instance_cache=True)
        fs.pipe_file(f"{info.bucket}/kept/object", b"persist me")

        assert store_down(root, grace_s=1) is True
        assert store_status(root) is None and store_down(root) is False

        again = store_up(root)
        assert again.pid != info.pid
        assert (again.endpoint_url, again.access_key, again.secret) == (info.endpoint_url, info.access_key, info.secret)
        # env() is what Ray jobs get: s3fs must find the store from the environment alone.
        read_back = subprocess.run(
            [sys.executable, "-c", f"import s3fs; print(s3fs.S3FileSystem().cat_file('{info.bucket}/kept/object'))"],
            env={**os.environ, **again.env()},
            capture_output=True,
            text=True,
            check=True,
        )
        assert read_back.stdout.strip() == "b'persist me'"
        assert object_lock(client, info.bucket) == "Enabled"
        assert client.get_bucket_versioning(Bucket=info.bucket)["Status"] == "Enabled"
        # The readiness probe leaves nothing behind, not even a noncurrent object version.
        assert [v["Key"] for v in client.list_object_versions(Bucket=info.bucket).get("Versions", [])] == ["kept/object"]
    finally:
        store_down(root, grace_s=1)


def object_lock(client: Any, bucket: str) -> str | None:
    """The bucket's ObjectLockEnabled, or None when it has no Object Lock configuration."""
    try:
        return client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]["ObjectLockEnabled"]
    except botocore.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] == "ObjectLockConfigurationNotFoundError"
        return None


def test_busy_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StoreError, match=f"s3={port}"):
            store_up(tmp_path / "store", s3_port=port)
    assert store_status(tmp_path / "store") is None

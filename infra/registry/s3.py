"""The S3 transport (through s3fs). The only registry module that imports s3fs, aiohttp or botocore; the facade
imports it when an s3:// registry is opened, so file:// registries and the light commands never load them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import aiohttp
import botocore.exceptions
import s3fs

from infra.registry.backend import ErrorKind, ObjectLock, StoredObject, classify_os_error, describe_error
from infra.registry.errors import RegistryError, no_bucket_message
from infra.registry.integrity import CHUNK


class S3Backend:
    scheme = "s3"
    errors: tuple[type[BaseException], ...] = (OSError, botocore.exceptions.BotoCoreError, aiohttp.ClientError)

    def __init__(self, bucket: str, options: dict[str, Any]) -> None:
        self.bucket = bucket
        self.endpoint = str(
            options.get("endpoint_url")
            or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS S3"
        )
        config = dict(options.pop("config_kwargs", None) or {})
        # The registry retries with its own bounded backoff; botocore's hidden retries would multiply it
        # (a refused connection took ~5 s per call with them).
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", 5)
        # Other processes change listings under us: never answer from s3fs's listing cache.
        options.setdefault("use_listings_cache", False)
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config, **options)

    def describe(self) -> str:
        return self.endpoint

    def classify(self, exc: BaseException) -> ErrorKind:
        error = _client_error(exc)
        if error is not None:
            code = error.response.get("Error", {}).get("Code", "")
            status = _status(error)
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
                return "transient"
            if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                return "denied"
            if code == "NoSuchBucket":
                return "no_bucket"
            return "other"
        transient = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, aiohttp.ClientError)
        return "transient" if isinstance(exc, transient) else classify_os_error(exc)

    def reason(self, exc: BaseException) -> str:
        error = _client_error(exc)
        if error is not None:
            code = error.response.get("Error", {}).get("Code", "") or str(_status(error))
            return f"{code} (HTTP {_status(error)})"
        return describe_error(exc)

    def check(self) -> None:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except OSError as exc:
            error = _client_error(exc)
            if isinstance(exc, FileNotFoundError) or (error is not None and _status(error) == 404):
                raise RegistryError(no_bucket_message(self.bucket, self.endpoint)) from None
            raise

    def read(self, path: str) -> tuple[bytes, str] | None:
        for _ in range(3):
            try:
                with self.fs.open(path, "rb") as handle:
                    return handle.read(), handle.details["ETag"]
            except FileNotFoundError:
                return None
            except OSError as exc:
                # s3fs reads with If-Match on the ETag it saw in HEAD: 412 means it changed in between.
                if not _precondition_failed(exc):
                    raise
        raise RegistryError(f"s3://{path} keeps changing while being read: retry later")

    def write_if(self, path: str, data: bytes, etag: str | None, lock: ObjectLock | None = None) -> bool:
        bucket, key = path.split("/", 1)
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition, **_lock_args(lock))
        except OSError as exc:
            # AWS and moto answer If-Match on a missing key with 404, SeaweedFS with 412.
            if _precondition_failed(exc) or (etag is not None and isinstance(exc, FileNotFoundError)):
                return False
            raise
        return True

    def delete_if(self, path: str, etag: str) -> bool:
        bucket, key = path.split("/", 1)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except OSError as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return False
            raise
        return True

    def upload_new(self, local: Path, path: str, lock: ObjectLock | None = None) -> bool:
        try:
            # mode="create" sends If-None-Match: * on the PUT, or on CompleteMultipartUpload for big files; the
            # lock goes on the PUT or on CreateMultipartUpload.
            self.fs.put_file(str(local), path, mode="create", **_lock_args(lock))
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def put(self, local: Path, path: str, lock: ObjectLock | None = None) -> None:
        # A PUT, or CompleteMultipartUpload for big files, replaces the object in one step.
        self.fs.put_file(str(local), path, **_lock_args(lock))

    def object_lock(self) -> bool:
        try:
            answer = self.fs.call_s3("get_object_lock_configuration", Bucket=self.bucket)
        except OSError as exc:
            error = _client_error(exc)
            # AWS and moto: ObjectLockConfigurationNotFoundError (404) when the bucket was made without it.
            if isinstance(exc, FileNotFoundError) or (error is not None and _status(error) == 404):
                return False
            raise
        return answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def lock_of(self, path: str) -> ObjectLock | None:
        bucket, key = path.split("/", 1)
        # Without s3:GetObjectRetention, AWS leaves the lock headers out rather than refusing the HEAD.
        head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        if head.get("ObjectLockMode") not in ("GOVERNANCE", "COMPLIANCE"):
            return None
        return ObjectLock(mode=head["ObjectLockMode"], until=head["ObjectLockRetainUntilDate"])

    def download(self, path: str, local: Path) -> None:
        self.fs.get_file(path, str(local))

    def open(self, path: str) -> IO[bytes]:
        # One ranged GET per 16 MiB read, no read-ahead copy: ~0.8 s for 160 MB on loopback.
        return self.fs.open(path, "rb", block_size=CHUNK, cache_type="none")

    def walk(self, path: str) -> dict[str, StoredObject]:
        found = self.fs.find(path, detail=True)
        return {
            name[len(path) + 1 :]: StoredObject(size=int(info["size"]), mtime=info["LastModified"].timestamp())
            for name, info in found.items()
            if info["type"] == "file" and name.startswith(path + "/")
        }

    def delete(self, paths: list[str]) -> None:
        self.fs.rm(paths)

    def abort_uploads(self, path: str, started_before: float) -> list[str]:
        bucket, _, prefix = path.partition("/")
        answer = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
        aborted = []
        for upload in answer.get("Uploads", []):
            if upload["Initiated"].timestamp() < started_before:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(f"{bucket}/{upload['Key']}")
        return aborted


def _lock_args(lock: ObjectLock | None) -> dict[str, Any]:
    return {} if lock is None else {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": lock.until}


def _client_error(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """The botocore ClientError behind `exc`: s3fs re-raises them as OSError subclasses with the cause set."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, botocore.exceptions.ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _precondition_failed(exc: BaseException) -> bool:
    """True for a failed If-Match/If-None-Match. s3fs turns 412 into FileExistsError only when the server
    names the failed condition (AWS, moto); SeaweedFS does not, so look at the status code underneath.
    409 is AWS's "a concurrent conditional write is in progress": also lost, so re-read and retry."""
    if isinstance(exc, FileExistsError):
        return True
    error = _client_error(exc)
    if error is None:
        return False
    code = error.response.get("Error", {}).get("Code", "")
    return _status(error) in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")

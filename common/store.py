"""Object store behind a small interface: S3 (boto3; MinIO/SeaweedFS) and in-memory."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Protocol
from urllib.parse import urlsplit

from common.errors import StoreError
from common.settings import Settings

log = logging.getLogger(__name__)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, "key/prefix")."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r} (expected 's3://bucket/prefix')")
    if len(parts.netloc) < 3:
        raise ValueError(f"bucket name {parts.netloc!r} in {uri!r} is shorter than 3 characters")
    return parts.netloc, parts.path.lstrip("/")


class ObjectStore(Protocol):
    def put(self, bucket: str, key: str, data: bytes) -> None: ...
    def put_file(self, bucket: str, key: str, path: str) -> None: ...
    def get(self, bucket: str, key: str) -> bytes: ...
    def get_to_file(self, bucket: str, key: str, path: str) -> int: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def list(self, bucket: str, prefix: str) -> list[str]: ...
    def ensure_bucket(self, bucket: str) -> None: ...
    def ping(self) -> None: ...


class MemoryStore:
    """In-process store with the same contract as S3Store (missing key -> StoreError)."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], bytes] = {}
        self._buckets: set[str] = set()
        self._lock = threading.Lock()
        self.bytes_put = 0

    def ensure_bucket(self, bucket: str) -> None:
        self._buckets.add(bucket)

    def _check(self, bucket: str) -> None:
        if bucket not in self._buckets:
            raise StoreError(f"bucket {bucket!r} does not exist")

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._check(bucket)
        with self._lock:
            self._objects[(bucket, key)] = bytes(data)
            self.bytes_put += len(data)

    def put_file(self, bucket: str, key: str, path: str) -> None:
        with open(path, "rb") as f:
            self.put(bucket, key, f.read())

    def get(self, bucket: str, key: str) -> bytes:
        try:
            return self._objects[(bucket, key)]
        except KeyError:
            raise StoreError(f"no object s3://{bucket}/{key}") from None

    def get_to_file(self, bucket: str, key: str, path: str) -> int:
        data = self.get(bucket, key)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def exists(self, bucket: str, key: str) -> bool:
        return (bucket, key) in self._objects

    def list(self, bucket: str, prefix: str) -> list[str]:
        return sorted(k for b, k in self._objects if b == bucket and k.startswith(prefix))

    def ping(self) -> None:
        return None


class S3Store:
    """boto3 client configured from settings; errors name bucket and key, never credentials."""

    def __init__(self, settings: Settings, *, max_pool: int = 32) -> None:
        import boto3
        from botocore.config import Config

        self._settings = settings
        endpoint = settings.s3_url
        self._client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key, aws_secret_access_key=settings.s3_secret_key,
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=max_pool,
                          retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=5, read_timeout=60))
        self.bytes_put = 0

    @property
    def client(self):
        return self._client

    def _fail(self, op: str, bucket: str, key: str, exc: Exception) -> StoreError:
        return StoreError(f"S3 {op} s3://{bucket}/{key} at {self._settings.s3_url} failed: "
                          f"{type(exc).__name__}: {exc}")

    def _call(self, op: str, bucket: str, key: str, fn):
        """``fn()``, riding out a store that does not answer for up to GANGWAY_STORE_OUTAGE_SECONDS (a
        restart of the S3 server takes seconds; boto's own retries give up within a few). Any other error,
        or an outage past the bound, is a StoreError naming the operation, bucket, key and endpoint."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        deadline = time.monotonic() + self._settings.store_outage_seconds
        delay = 0.25
        while True:
            try:
                return fn()
            except (BotoConnectionError, HTTPClientError) as exc:
                if time.monotonic() + delay > deadline:
                    raise self._fail(op, bucket, key, exc) from exc
                log.warning("S3 %s s3://%s/%s at %s: %s; retrying in %.2g s", op, bucket, key,
                            self._settings.s3_url, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)
            except StoreError:
                raise
            except Exception as exc:
                raise self._fail(op, bucket, key, exc) from exc

    def ensure_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        def ensure() -> None:
            try:
                self._client.head_bucket(Bucket=bucket)
            except ClientError:
                try:
                    self._client.create_bucket(Bucket=bucket)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise self._fail("create_bucket", bucket, "", exc) from exc
        self._call("head_bucket", bucket, "", ensure)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._call("put", bucket, key, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data))
        self.bytes_put += len(data)

    def put_file(self, bucket: str, key: str, path: str) -> None:
        self._call("put", bucket, key, lambda: self._client.upload_file(path, bucket, key))
        self.bytes_put += os.path.getsize(path)

    def get(self, bucket: str, key: str) -> bytes:
        return self._call("get", bucket, key,
                          lambda: self._client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def get_to_file(self, bucket: str, key: str, path: str) -> int:
        def download() -> int:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
            n = 0
            with open(path, "wb") as f:   # a retry starts the file over
                for block in body.iter_chunks(chunk_size=1 << 20):
                    f.write(block)
                    n += len(block)
            return n
        return self._call("get", bucket, key, download)

    def exists(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self._client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return self._call("head", bucket, key, head)

    def list(self, bucket: str, prefix: str) -> list[str]:
        def listing() -> list[str]:
            keys: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(o["Key"] for o in page.get("Contents", []))
            return sorted(keys)
        return self._call("list", bucket, prefix, listing)

    def ping(self) -> None:
        try:
            self._client.list_buckets()
        except Exception as exc:
            raise StoreError(f"S3 store at {self._settings.s3_url} does not answer: "
                             f"{type(exc).__name__}: {exc}") from exc

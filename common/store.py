"""Object store behind a small interface: S3 (the ``minio`` SDK; MinIO/SeaweedFS) and in-memory."""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from common.errors import ObjectChangedError, StoreError
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


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size and ETag (unquoted): which version of it a reference means."""

    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    def put(self, bucket: str, key: str, data: bytes, *, sha256: str | None = None) -> None: ...
    def put_file(self, bucket: str, key: str, path: str) -> None: ...
    def get(self, bucket: str, key: str) -> bytes: ...
    def get_range(self, bucket: str, key: str, offset: int, length: int, etag: str | None = None) -> bytes: ...
    def get_to_file(self, bucket: str, key: str, path: str) -> int: ...
    def stat(self, bucket: str, key: str) -> ObjectInfo: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def list(self, bucket: str, prefix: str) -> list[str]: ...
    def list_info(self, bucket: str, prefix: str) -> list[ObjectInfo]: ...
    def copy(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def delete_many(self, bucket: str, keys: list[str]) -> None: ...
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

    def put(self, bucket: str, key: str, data: bytes, *, sha256: str | None = None) -> None:
        """``sha256``: the body's hex SHA-256 if the caller has it (S3 signs with it); checked here."""
        self._check(bucket)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"put s3://{bucket}/{key}: the body's SHA-256 is not the {sha256!r} given")
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

    def get_range(self, bucket: str, key: str, offset: int, length: int, etag: str | None = None) -> bytes:
        if etag is not None and (bucket, key) not in self._objects:
            raise ObjectChangedError(f"s3://{bucket}/{key} is gone: it had ETag {_etag(etag)!r} when the dataset "
                                     "was made")
        data = self.get(bucket, key)
        now = _memory_etag(data)
        if etag is not None and now != _etag(etag):
            raise ObjectChangedError(f"s3://{bucket}/{key} changed: it had ETag {_etag(etag)!r} when the "
                                     f"dataset was made, now {now!r}")
        return data[offset:offset + length]

    def get_to_file(self, bucket: str, key: str, path: str) -> int:
        data = self.get(bucket, key)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        data = self.get(bucket, key)
        return ObjectInfo(key, len(data), _memory_etag(data))

    def exists(self, bucket: str, key: str) -> bool:
        return (bucket, key) in self._objects

    def list(self, bucket: str, prefix: str) -> list[str]:
        return sorted(k for b, k in self._objects if b == bucket and k.startswith(prefix))

    def list_info(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        return [self.stat(bucket, k) for k in self.list(bucket, prefix)]

    def copy(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None:
        data = self.get(bucket, key)
        self.put(dst_bucket, dst_key, data)

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:   # deleting what is not there is no error, as in S3
            self._objects.pop((bucket, key), None)

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        for key in keys:
            self.delete(bucket, key)

    def ping(self) -> None:
        return None


class S3Store:
    """A ``minio`` client configured from settings; errors name bucket and key, never credentials."""

    def __init__(self, settings: Settings, *, max_pool: int = 32) -> None:
        import urllib3
        from minio import Minio

        self._settings = settings
        url = urlsplit(settings.s3_url)
        # urllib3 retries a refused connection or a 5xx a few times within ~3 s; _call rides out longer outages
        http = urllib3.PoolManager(
            maxsize=max_pool, timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504],
                                  raise_on_status=False))
        self._client = _client_class()(url.netloc, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                             secure=url.scheme == "https", region=settings.s3_region, http_client=http)
        self.bytes_put = 0

    @property
    def client(self):
        return self._client

    def _fail(self, op: str, bucket: str, key: str, exc: Exception) -> StoreError:
        return StoreError(f"S3 {op} s3://{bucket}/{key} at {self._settings.s3_url} failed: {_describe(exc)}")

    def _call(self, op: str, bucket: str, key: str, fn):
        """``fn()``, riding out a store that does not answer for up to GANGWAY_STORE_OUTAGE_SECONDS (a
        restart of the S3 server takes seconds; urllib3's own retries give up within a few). Any other
        error, or an outage past the bound, is a StoreError naming the operation, bucket, key and endpoint."""
        deadline = time.monotonic() + self._settings.store_outage_seconds
        delay = 0.25
        while True:
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                if not _unanswered(exc) or time.monotonic() + delay > deadline:
                    raise self._fail(op, bucket, key, exc) from exc
                log.warning("S3 %s s3://%s/%s at %s: %s; retrying in %.2g s", op, bucket, key,
                            self._settings.s3_url, type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def ensure_bucket(self, bucket: str) -> None:
        from minio.error import S3Error

        def ensure() -> None:
            if self._client.bucket_exists(bucket):
                return
            try:
                self._client.make_bucket(bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._call("create_bucket", bucket, "", ensure)

    def put(self, bucket: str, key: str, data: bytes, *, sha256: str | None = None) -> None:
        """One object from bytes or any buffer (a ``bytearray``, a ``memoryview``). ``sha256``, the body's
        hex SHA-256 when the caller already has it (content addressing), signs the request instead of a
        second hash of the body; over HTTPS the body is not signed and it is unused."""
        view = memoryview(data).cast("B")
        if len(view) <= _MAX_PART and _fast_put():
            # one PUT of the buffer as it is: no bytes() copy, no second SHA-256 over plain HTTP
            self._call("put", bucket, key, lambda: self._put_buffer(bucket, key, view, sha256))
        else:
            body = data if isinstance(data, bytes) else bytes(data)   # minio's public reader wants bytes
            # one PUT, not 5 MiB multipart pieces: chunks are at most GANGWAY_CHUNK_BYTES
            part = min(max(len(body), _MIN_PART), _MAX_PART)
            self._call("put", bucket, key,
                       lambda: self._client.put_object(bucket, key, io.BytesIO(body), len(body), part_size=part))
        self.bytes_put += len(view)

    def _put_buffer(self, bucket: str, key: str, view: memoryview, sha256: str | None) -> None:
        from minio.helpers import check_bucket_name, check_object_name
        check_bucket_name(bucket)
        check_object_name(key)
        _known_sha256.value = sha256
        try:
            self._client._put_object(bucket, key, view, {"Content-Type": "application/octet-stream"})
        finally:
            _known_sha256.value = None

    def put_file(self, bucket: str, key: str, path: str) -> None:
        # streamed from disk (multipart past 16 MiB): the file is never held whole
        self._call("put", bucket, key, lambda: self._client.fput_object(bucket, key, path, part_size=16 << 20))
        self.bytes_put += os.path.getsize(path)

    def _read(self, bucket: str, key: str, **kw) -> tuple[bytes, str]:
        resp = self._client.get_object(bucket, key, **kw)
        try:
            return resp.read(), _etag(resp.headers.get("ETag", ""))
        finally:
            resp.close()
            resp.release_conn()

    def get(self, bucket: str, key: str) -> bytes:
        return self._call("get", bucket, key, lambda: self._read(bucket, key)[0])

    def get_range(self, bucket: str, key: str, offset: int, length: int, etag: str | None = None) -> bytes:
        """Bytes [offset, offset+length) of an object; with ``etag``, only of that version of it (a
        rewritten or deleted object is an ``ObjectChangedError`` saying so, never other bytes)."""
        try:
            data, now = self._call("get", bucket, key,
                                   lambda: self._read(bucket, key, offset=offset, length=length))
        except StoreError as exc:
            if etag is not None and getattr(exc.__cause__, "code", None) == "NoSuchKey":
                raise ObjectChangedError(f"s3://{bucket}/{key} at {self._settings.s3_url} is gone: it had ETag "
                                         f"{_etag(etag)!r} when the dataset was made") from exc
            raise
        if etag is not None and now != _etag(etag):
            raise ObjectChangedError(f"s3://{bucket}/{key} at {self._settings.s3_url} changed: it had ETag "
                                     f"{_etag(etag)!r} when the dataset was made, now {now!r}")
        return data

    def get_to_file(self, bucket: str, key: str, path: str) -> int:
        def download() -> int:
            resp = self._client.get_object(bucket, key)
            n = 0
            try:
                with open(path, "wb") as f:   # a retry starts the file over
                    for block in resp.stream(1 << 20):
                        f.write(block)
                        n += len(block)
            finally:
                resp.close()
                resp.release_conn()
            return n
        return self._call("get", bucket, key, download)

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        o = self._call("head", bucket, key, lambda: self._client.stat_object(bucket, key))
        return ObjectInfo(key, int(o.size), _etag(o.etag or ""))

    def exists(self, bucket: str, key: str) -> bool:
        from minio.error import S3Error

        def head() -> bool:
            try:
                self._client.stat_object(bucket, key)
                return True
            except S3Error as exc:
                if exc.response is not None and exc.response.status == 404:
                    return False
                raise
        return self._call("head", bucket, key, head)

    def list_info(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            found = self._client.list_objects(bucket, prefix=prefix, recursive=True)
            return sorted((ObjectInfo(o.object_name, int(o.size or 0), _etag(o.etag or "")) for o in found
                           if not o.is_dir), key=lambda o: o.key)
        return self._call("list", bucket, prefix, listing)

    def list(self, bucket: str, prefix: str) -> list[str]:
        return [o.key for o in self.list_info(bucket, prefix)]

    def copy(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None:
        """A server-side copy: the bytes never leave the store."""
        from minio.commonconfig import ComposeSource, CopySource

        def copy() -> None:
            try:
                self._client.copy_object(dst_bucket, dst_key, CopySource(bucket, key))
            except ValueError:   # over 5 GiB: one CopyObject cannot, a multipart compose can
                self._client.compose_object(dst_bucket, dst_key, [ComposeSource(bucket, key)])
        self._call("copy", bucket, key, copy)

    def delete(self, bucket: str, key: str) -> None:
        self._call("delete", bucket, key, lambda: self._client.remove_object(bucket, key))

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        """Up to 1,000 objects per request (S3 DeleteObjects); an object that is not there is no error."""
        from minio.deleteobjects import DeleteObject

        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]

            def remove() -> None:
                failed = [f"{e.name}: {e.code} {e.message}"
                          for e in self._client.remove_objects(bucket, [DeleteObject(k) for k in batch])]
                if failed:
                    raise StoreError(f"S3 delete of {len(failed)} of {len(batch)} objects in s3://{bucket}/ at "
                                     f"{self._settings.s3_url} failed: {failed[:5]}")
            self._call("delete", bucket, batch[0], remove)

    def ping(self) -> None:
        try:
            self._client.list_buckets()
        except Exception as exc:
            raise StoreError(f"S3 store at {self._settings.s3_url} does not answer: {_describe(exc)}") from exc


_MIN_PART, _MAX_PART = 5 << 20, 5 << 30

# The SHA-256 of the body being sent by this thread, when its caller computed it already (see S3Store.put).
_known_sha256 = threading.local()


@functools.cache
def _fast_put() -> bool:
    """minio 7.2's private single-PUT and header builder, which S3Store.put uses to send a buffer without
    copying it to bytes and to sign it with a SHA-256 already computed; any other minio: the public path."""
    import inspect

    from minio import Minio
    try:
        build = list(inspect.signature(Minio._build_headers).parameters)
        put = list(inspect.signature(Minio._put_object).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    return build[:5] == ["self", "host", "headers", "body", "creds"] and put[:5] == [
        "self", "bucket_name", "object_name", "data", "headers"]



def _client_class():
    """``Minio``, or where the fast put is available a subclass that signs a body with the SHA-256 its
    caller already computed (set in ``_known_sha256`` for the call) instead of hashing it again."""
    from minio import Minio
    if not _fast_put():
        return Minio

    class KnownHashMinio(Minio):
        def _build_headers(self, host, headers=None, body=None, creds=None):
            known = getattr(_known_sha256, "value", None)
            if known is None or not body or self._base_url.is_https or not creds:
                return super()._build_headers(host, headers, body, creds)
            headers, date = super()._build_headers(host, headers, None, creds)   # no body: nothing hashed
            headers["Content-Length"] = str(len(body))
            headers["x-amz-content-sha256"] = known
            return headers, date
    return KnownHashMinio


def _memory_etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()   # what S3 gives a single-part object


def _etag(value: str) -> str:
    """An ETag without the quotes S3 puts around it (HEAD, GET and LIST differ in that)."""
    return value.strip().strip('"')


def _root(exc: Exception) -> Exception:
    """The connection failure inside urllib3's ``MaxRetryError``."""
    return getattr(exc, "reason", None) or exc


def _unanswered(exc: Exception) -> bool:
    """True when the store did not answer (refused, reset, timed out, 502-504): worth waiting for."""
    import urllib3.exceptions as u3
    from minio.error import ServerError
    if isinstance(exc, ServerError):
        return exc.status_code in (502, 503, 504)
    if isinstance(_root(exc), u3.SSLError):   # a certificate problem does not go away by waiting
        return False
    return isinstance(exc, (u3.HTTPError, ConnectionError))


def _describe(exc: Exception) -> str:
    """One line: the error's type and message (the connection failure itself for a retry that gave up)."""
    import urllib3.exceptions as u3
    root = _root(exc)
    if isinstance(exc, (u3.HTTPError, ConnectionError)):
        text = f"cannot reach the store: {type(root).__name__}: {root}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())

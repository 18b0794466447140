"""Talking to S3: endpoint parsing, one-line errors, retries with backoff, and streaming multipart transfers
that never hold more than a few parts of a file in memory."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, S3Error, ServerError

from ruyi_core.errors import RuyiError

CONNECT_TIMEOUT_S = 3.0  # an unreachable endpoint must fail fast
READ_TIMEOUT_S = 20.0  # between bytes (not for a whole part): a silent endpoint fails in seconds
CHUNK = 1 << 20
SHA_META = "x-amz-meta-sha256"
AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken",
              "AuthorizationHeaderMalformed", "InvalidSecurity", "MissingSecurityHeader"}
TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "ServerBusy",
                   "XMinioServerNotInitialized"}
SERVE_HINT = "start it with `ruyi store serve` or set RUYI_S3_ENDPOINT"


class StoreError(RuyiError):
    """The object store or an artifact in it is not usable; the message names the problem and the fix."""


class IntegrityError(StoreError):
    """Stored bytes do not match their manifest."""


class Cancelled(Exception):
    """A call given up because another call of its batch failed first (`Transfer.run_all`); that failure is the one
    reported, so this never reaches a user."""


def parse_endpoint(value: str, secure: bool) -> tuple[str, bool]:
    """`host:port` keeps the spec's `secure`; a URL's scheme decides it."""
    v = value.strip()
    if "://" in v:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/") or u.query:
            raise StoreError(f"invalid object store endpoint {value!r}: use host:port or http(s)://host:port")
        return u.netloc, u.scheme == "https"
    if not v or "/" in v or " " in v:
        raise StoreError(f"invalid object store endpoint {value!r}: use host:port or http(s)://host:port")
    return v, secure


def make_client(endpoint: str, access_key: str, secret_key: str, *, secure: bool, region: str | None,
                pool_size: int, read_timeout_s: float = READ_TIMEOUT_S) -> Minio:
    # Our own pool: short connect timeout, and no urllib3-level retries (we retry whole operations with
    # backoff, and never on auth errors); enough connections for every part in flight.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout_s),
        maxsize=max(10, pool_size), cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=3))
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                 http_client=http)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        if exc.code in AUTH_CODES:
            return False
        return exc.code in TRANSIENT_CODES or getattr(exc.response, "status", 0) >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return "code: 5" in str(exc)  # the class keeps the HTTP status private; its message shows it
    if any(isinstance(e, urllib3.exceptions.SSLError) for e in _chain(exc)):  # TLS vs plain HTTP never heals
        return False
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
                            http.client.HTTPException))


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception in `exc`'s chain: causes, contexts and urllib3's `.reason` (a string on SSL errors)."""
    chain, stack = [], [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or any(e is c for c in chain):
            continue
        chain.append(e)
        stack += [getattr(e, "reason", None), e.__cause__, e.__context__]
    return chain


def _root_reason(exc: BaseException) -> str:
    """Short cause of a connection failure, found anywhere in the exception chain."""
    chain = _chain(exc)
    # most specific first: urllib3's NewConnectionError is itself a ConnectTimeoutError
    checks = [(lambda e: isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e),
               "connection refused"),
              (lambda e: isinstance(e, urllib3.exceptions.NameResolutionError), "host name not found"),
              (lambda e: isinstance(e, urllib3.exceptions.SSLError), "TLS handshake failed; check store.secure"),
              (lambda e: isinstance(e, ConnectionResetError), "connection reset"),
              (lambda e: isinstance(e, (urllib3.exceptions.TimeoutError, TimeoutError)), "timed out")]
    for test, reason in checks:
        if any(test(e) for e in chain):
            return reason
    return type(exc).__name__


def describe(exc: BaseException, endpoint: str, what: str, bucket: str) -> StoreError:
    """One line naming the problem and the fix, for any failure of a store operation."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, S3Error):
        if exc.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"):
            return StoreError(f"the object store rejected the credentials ({exc.code}): "
                              "check RUYI_S3_ACCESS_KEY / RUYI_S3_SECRET_KEY")
        if exc.code == "AccessDenied":
            return StoreError(f"the object store denied access while {what} (AccessDenied): check that "
                              f"RUYI_S3_ACCESS_KEY / RUYI_S3_SECRET_KEY may read and write bucket {bucket!r}")
        if exc.code == "NoSuchBucket":
            return StoreError(f"bucket {exc.bucket_name or bucket!r} does not exist at {endpoint}: "
                              "check the URI or store.bucket")
        msg = (exc.message or "").splitlines()[0] if exc.message else ""
        return StoreError(f"the object store failed while {what} ({exc.code}: {msg}): "
                          f"check the server at {endpoint}")
    if isinstance(exc, ServerError):
        return StoreError(f"the object store failed while {what} (HTTP {exc.status_code}): "
                          f"check the server at {endpoint}")
    if isinstance(exc, InvalidResponseError):
        return StoreError(f"the service at {endpoint} did not answer as S3 while {what}: check RUYI_S3_ENDPOINT")
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, http.client.HTTPException)):
        return StoreError(f"cannot reach the object store at {endpoint} ({_root_reason(exc)}): {SERVE_HINT}")
    return StoreError(f"object store error while {what} ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def hash_file(path: Path) -> tuple[str, int, int]:
    """(sha256, size, mtime_ns); mtime is read first, so a write during hashing shows up at upload."""
    mtime = os.stat(path).st_mtime_ns
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n, mtime


@dataclass
class TransferStats:
    """Counters for one store instance (tests and progress displays read them)."""

    files_uploaded: int = 0
    files_skipped: int = 0
    bytes_uploaded: int = 0
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class Transfer:
    """Streaming single-object transfers with retries; parts of `part_size` bytes, `parallel` in flight.

    Against a store that stops answering, one call gives up after `retries` + 1 attempts of at most the read
    timeout each, with the backoff between them. Many calls run as a batch (`batch`, `run_all`): the first failure
    stops the others at their next retry, so a transfer of any number of files or parts fails within one call's
    cycle plus one attempt (docs/architecture.md)."""

    def __init__(self, client: Minio, *, part_size: int, parallel: int, retries: int, stats: TransferStats,
                 backoff_s: float = 0.5, backoff_cap_s: float = 8.0, stops: tuple[threading.Event, ...] = ()):
        self.client, self.part_size, self.parallel, self.retries = client, part_size, parallel, retries
        self.stats, self.backoff_s, self.backoff_cap_s = stats, backoff_s, backoff_cap_s
        self._stops = (*stops, threading.Event())  # an enclosing batch's, then this one's own

    def batch(self) -> Transfer:
        """This transfer for one group of calls: a failure in it stops the group (and the groups inside it), never
        the enclosing one, which learns of it from the exception."""
        return Transfer(self.client, part_size=self.part_size, parallel=self.parallel, retries=self.retries,
                        stats=self.stats, backoff_s=self.backoff_s, backoff_cap_s=self.backoff_cap_s,
                        stops=self._stops)

    def stop(self) -> None:
        self._stops[-1].set()

    @property
    def stopped(self) -> bool:
        return any(e.is_set() for e in self._stops)

    def run_all(self, fn: Callable[[Any], None], items: list, name: str) -> None:
        """`fn(item)` for every item, `parallel` at once, on a batch (`batch`). The first failure is raised and stops
        the rest: queued items never start, running ones give up at their next retry."""
        def one(item: Any) -> None:
            try:
                fn(item)
            except BaseException:
                self.stop()  # before this thread takes the next item, which then never starts
                raise

        with ThreadPoolExecutor(self.parallel, thread_name_prefix=name) as pool:
            futures = [pool.submit(one, it) for it in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            if self.stopped:
                for f in futures:
                    f.cancel()
        # the pool has waited for every started call: nothing of this batch outlives it
        failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if failed:  # the cause, not the calls it cancelled (unless an enclosing batch stopped them all)
            raise next((e for e in failed if not isinstance(e, Cancelled)), failed[0])

    def retry(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        for attempt in range(self.retries + 1):
            if self.stopped:
                raise Cancelled("another call of this batch failed")
            try:
                return fn(*args, **kw)
            except Exception as e:
                if attempt >= self.retries or not is_transient(e):
                    raise
                # full jitter keeps parallel parts from retrying in lockstep
                pause = min(self.backoff_cap_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
                self._pause(pause)
        raise AssertionError("unreachable")

    def _pause(self, seconds: float) -> None:
        """Sleeps `seconds`, or less once the batch stops (the next attempt then raises Cancelled)."""
        deadline = time.monotonic() + seconds
        while not self.stopped and (left := deadline - time.monotonic()) > 0:
            self._stops[-1].wait(min(left, 0.1))  # an enclosing batch's stop is seen within 0.1 s

    def stat(self, bucket: str, key: str) -> tuple[int, str | None] | None:
        """(size, sha256 from user metadata) of an object, or None when it is absent."""
        try:
            st = self.retry(self.client.stat_object, bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        return st.size, (st.metadata or {}).get(SHA_META)

    def is_intact(self, bucket: str, key: str, sha256: str, size: int) -> bool:
        return self.stat(bucket, key) == (size, sha256)

    # ---- upload -------------------------------------------------------------------------------------
    def upload(self, bucket: str, key: str, path: Path, sha256: str, size: int, mtime_ns: int) -> None:
        """Upload `path`, hashed by the caller (`hash_file`), with its sha256 in the object's metadata. A file
        whose size or mtime moved since hashing is refused rather than stored mislabelled (a stat, not a
        second hash pass: downloads verify the bytes anyway)."""
        if size <= self.part_size:
            with open(path, "rb") as f:
                data = f.read(size + 1)  # at most one part in memory
            self._check_unchanged(path, size, mtime_ns, len(data))
            self.retry(lambda: self.client.put_object(bucket, key, BytesIO(data), len(data),
                                                      part_size=max(self.part_size, 5 << 20),
                                                      metadata={"sha256": sha256}))
            self.stats.add(bytes_uploaded=len(data))
            return
        headers = {SHA_META: sha256, "Content-Type": "application/octet-stream"}
        # private: minio's public put_object uploads its parts itself, one by one, with no retry per part; these
        # are its own multipart steps, which let parts go in parallel and be retried (test_private_apis)
        upload_id = self.retry(self.client._create_multipart_upload, bucket, key, headers)
        try:
            parts = self.batch()._upload_parts(bucket, key, upload_id, path, size, mtime_ns)
            self.retry(self.client._complete_multipart_upload, bucket, key, upload_id, parts)
        except BaseException as e:
            # Best effort, and only when the store answered: against one that does not, an abort would wait a read
            # timeout more, past the batch's bound (an unfinished upload stays invisible; MinIO expires it).
            if not (is_transient(e) or isinstance(e, Cancelled)):
                with contextlib.suppress(Exception):
                    self.client._abort_multipart_upload(bucket, key, upload_id)
            raise

    def _put_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes) -> Part:
        etag = self.retry(self.client._upload_part, bucket, key, data, None, upload_id, number)
        self.stats.add(bytes_uploaded=len(data))
        return Part(number, etag)

    def _upload_parts(self, bucket: str, key: str, upload_id: str, path: Path, size: int,
                      mtime_ns: int) -> list[Part]:
        done, pending, sent = [], set(), 0
        with open(path, "rb") as f, ThreadPoolExecutor(self.parallel, thread_name_prefix="ruyi-up") as pool:
            try:
                for number, off in enumerate(range(0, size, self.part_size), 1):
                    # this thread reads sequentially (kind to disks); workers only send
                    data = f.read(min(self.part_size, size - off))
                    sent += len(data)
                    pending.add(pool.submit(self._put_part, bucket, key, upload_id, number, data))
                    del data
                    while len(pending) >= self.parallel:  # bounds memory to ~parallel parts
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        done += [fut.result() for fut in finished]
                finished, _ = wait(pending)
                done += [fut.result() for fut in finished]
            except BaseException:
                self.stop()  # the parts still sending give up at their next retry
                for fut in pending:
                    fut.cancel()
                raise
        self._check_unchanged(path, size, mtime_ns, sent)
        return sorted(done, key=lambda p: p.part_number)

    @staticmethod
    def _check_unchanged(path: Path, size: int, mtime_ns: int, read: int) -> None:
        st = os.stat(path)
        if read != size or st.st_size != size or st.st_mtime_ns != mtime_ns:
            raise StoreError(f"{path} changed while uploading: retry when it is no longer being written")

    # ---- download -----------------------------------------------------------------------------------
    def download(self, bucket: str, key: str, dest: Path, size: int, sha256: str | None, label: str) -> str:
        """Stream an object to `dest`, verifying size and sha256 on the way (sha256=None: just report it);
        `dest` appears only once the bytes are verified (a temp file is renamed), and nothing is left behind
        on failure. Returns the sha256 of the bytes written."""
        found = self.stat(bucket, key)
        if found is None:
            raise IntegrityError(f"{label}: the object is missing from the store; re-upload the artifact")
        if found[0] != size:
            raise IntegrityError(f"{label}: stored size {found[0]} != manifest size {size}; "
                                 "the object was changed or truncated, re-upload the artifact")
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.ruyi-part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)  # preallocate so parts can land anywhere
                if size <= self.part_size:
                    got = self.retry(self._get_whole, bucket, key, fd, size)
                else:
                    got = self.batch()._get_parts(bucket, key, fd, size)
            finally:
                os.close(fd)
            if sha256 is not None and got != sha256:
                raise IntegrityError(f"{label}: sha256 mismatch (manifest {sha256[:12]}…, stored bytes "
                                     f"{got[:12]}…): the object is corrupt; re-upload the artifact")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.stats.add(files_downloaded=1)
        return got

    def _get_whole(self, bucket: str, key: str, fd: int, size: int) -> str:
        h, off = hashlib.sha256(), 0
        resp = self.client.get_object(bucket, key)
        try:
            for chunk in resp.stream(CHUNK):
                if off + len(chunk) > size:
                    raise IntegrityError(f"{bucket}/{key}: more bytes than the manifest's {size}")
                os.pwrite(fd, chunk, off)
                h.update(chunk)
                off += len(chunk)
        finally:
            resp.close()
            resp.release_conn()
        if off != size:  # a short body is a broken connection, worth a retry
            raise urllib3.exceptions.ProtocolError(f"short read: {off} of {size} bytes")
        self.stats.add(bytes_downloaded=size)
        return h.hexdigest()

    def _get_range(self, bucket: str, key: str, fd: int, off: int, length: int) -> bytes:
        def once() -> bytes:
            resp = self.client.get_object(bucket, key, offset=off, length=length)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
            if len(data) != length:
                raise urllib3.exceptions.ProtocolError(f"short read: {len(data)} of {length} bytes")
            return data

        data = self.retry(once)
        os.pwrite(fd, data, off)
        self.stats.add(bytes_downloaded=length)
        return data

    def _get_parts(self, bucket: str, key: str, fd: int, size: int) -> str:
        # Ranged GETs run in parallel; this thread hashes their bytes in file order. A window of twice
        # the workers keeps them busy while it waits for the oldest part, and bounds memory.
        h, window = hashlib.sha256(), deque()
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="ruyi-down") as pool:
            try:
                for off in range(0, size, self.part_size):
                    window.append(pool.submit(self._get_range, bucket, key, fd, off,
                                              min(self.part_size, size - off)))
                    if len(window) >= 2 * self.parallel:
                        h.update(window.popleft().result())
                while window:
                    h.update(window.popleft().result())
            except BaseException:
                self.stop()  # the parts still arriving give up at their next retry
                for fut in window:
                    fut.cancel()
                raise
        return h.hexdigest()

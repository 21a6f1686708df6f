"""Reading a packed dataset from object storage: range reads with retries, and a file object for pyarrow.

A :class:`Store` is the dataset's folder on a remote filesystem (``s3://``, ``gs://``, ``az://``, ``http(s)://``,
``memory://``, ... through :func:`mmprep.runtime.storage.open_location`). Every request goes through
:meth:`Store.call`: a dropped connection, a timeout or a 5xx/429 answer is retried with exponential backoff and
jitter, and when the tries are spent the error is one line naming the file and the store (its URI without
credentials, and the endpoint when one is set); a missing file, denied access or another 4xx is not retried.
The store's own client retries too (botocore, s3fs, gcsfs, ...), so these retries cover what outlasts them.

:class:`RangeFile` is what pyarrow reads a remote shard through: a seekable file whose every read is one range
request (pyarrow coalesces the column chunks of a row group into few large reads), served from the local
:class:`~mmprep.dataset.cache.ShardCache` when it holds the range. Nothing downloads a whole shard unless asked
(:meth:`Store.blocks`, for the whole-shard cache and ``verify``).

Filesystems are not fork-safe (fsspec refuses to use an instance in a forked child): after a fork, a store rebuilds
its filesystem from the pickled location, so DataLoader workers started by ``fork`` read with their own clients.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pickle
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mmprep.dataset.cache import ShardCache
from mmprep.errors import InputError, MmprepError, RunFailed, UsageError
from mmprep.runtime.storage import Location, redact

__all__ = ["IOStats", "RangeFile", "RetryPolicy", "Store", "is_transient"]

log = logging.getLogger("mmprep.dataset.remote")

T = TypeVar("T")

_BLOCK = 16 << 20
_KEEP_RANGES = 10_000
_VERIFY_HINT = "run `mmprep verify` on the dataset"
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
#: Exception classes (by name, anywhere in the class's MRO) that mean the connection or the server failed.
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "TimeoutError", "Timeout", "HTTPClientError", "IncompleteReadError", "IncompleteRead",
    "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError", "ProtocolError",
    "ChunkedEncodingError", "RemoteDisconnected", "ResponseStreamingError", "RetryError", "TransportError",
    "ServiceUnavailable", "InternalServerError", "TooManyRequests", "BadGateway", "GatewayTimeout",
})
_DENIED = ("ACCESS_DENIED", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken")
_STATUS = re.compile(r"HTTP status (?:code )?(\d{3})")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is tried again.

    Attributes:
        tries: attempts in all (1 = no retry).
        backoff: seconds before the first retry; each further retry waits twice as long (with jitter), at most
            ``max_backoff``.
    """

    tries: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0

    @classmethod
    def from_retries(cls, retries: int) -> RetryPolicy:
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
            raise UsageError(f"retries must be a whole number in 0..100, got {retries!r}")
        return cls(tries=retries + 1)


class IOStats:
    """What a reader fetched: requests, bytes, retries, cache hits (thread-safe counters, for tests and tuning).

    ``ranges`` records the byte ranges requested from the store as ``(file, start, end)`` (the file relative to
    the dataset folder; the last 10,000), so a test can tell which row groups a worker read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        self.cache_hits = 0
        self.cache_bytes = 0
        self.shard_downloads = 0
        self.ranges: deque[tuple[str, int, int]] = deque(maxlen=_KEEP_RANGES)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def record(self, rel: str, start: int, end: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += end - start
            self.ranges.append((rel, start, end))

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes, "retries": self.retries,
                    "cache_hits": self.cache_hits, "cache_bytes": self.cache_bytes,
                    "shard_downloads": self.shard_downloads}

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = self.retries = self.cache_hits = self.cache_bytes = 0
            self.shard_downloads = 0
            self.ranges = deque(maxlen=_KEEP_RANGES)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (clients wrap their errors: s3fs wraps botocore's)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not e for e in out) and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an answer carried: botocore's response, an HTTP client's ``status``/``status_code``, or
    ``HTTP status NNN`` in the text (pyarrow's S3 client)."""
    for cur in _chain(exc):
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
    for cur in _chain(exc):
        for attr in ("status", "status_code"):
            value = getattr(cur, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
        m = _STATUS.search(str(cur))
        if m:
            return int(m.group(1))
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another try: a dropped, cut or refused connection, a timeout, a 5xx or 429 answer.

    Not: a missing file, denied access, another 4xx, a bad option, or mmprep's own errors.
    """
    if not isinstance(exc, Exception) or isinstance(exc, (MmprepError, *_PERMANENT)):
        return False
    chain = _chain(exc)
    if any(k.__name__ in _TRANSIENT_NAMES for cur in chain for k in type(cur).__mro__):
        return True  # the connection failed (payload cut off, disconnected, timed out): no answer to judge
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if any(word in str(cur) for cur in chain for word in _DENIED):
        return False
    return isinstance(exc, (OSError, EOFError, http.client.HTTPException))


def _describe(exc: BaseException, scrub: Callable[[str], str]) -> str:
    text = " ".join(scrub(str(exc)).split())
    if len(text) > 240:
        text = text[:240] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fsspec_of(loc: Location) -> Any:
    """The fsspec filesystem behind a location's pyarrow wrapper (None for pyarrow's own clients)."""
    return getattr(getattr(loc.fs, "handler", None), "fs", None)


def store_name(loc: Location) -> str:
    """How messages name a store: ``s3://bucket``, plus the endpoint when one is configured (no credentials)."""
    parts = urlsplit(loc.uri)
    name = f"{parts.scheme}://{parts.netloc}" if parts.scheme else loc.uri
    fs = _fsspec_of(loc)
    endpoint = None
    if fs is not None:
        endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    elif parts.scheme in ("s3", "s3a"):  # pyarrow's own S3 client: the endpoint comes from the environment
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if isinstance(endpoint, str) and endpoint:
        name += f" at {redact(endpoint)}"
    return name


class _ShortRead(OSError):
    """The store returned fewer bytes than asked for (retried like a dropped connection)."""


class Store:
    """The dataset's folder on a remote filesystem: sizes, range reads and listings, each retried.

    Args:
        root: the dataset folder.
        policy: retries.
        stats: where requests are counted.
    """

    def __init__(self, root: Location, policy: RetryPolicy | None = None, stats: IOStats | None = None) -> None:
        self.root = root
        self.policy = policy or RetryPolicy()
        self.stats = stats or IOStats()
        self.name = store_name(root)
        self._pid = os.getpid()
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _loc(self) -> Location:
        if self._pid != os.getpid():  # forked: the parent's client (its event loop, its sockets) is not ours
            with self._lock:
                if self._pid != os.getpid():
                    self.root = pickle.loads(pickle.dumps(self.root))
                    self._handles = {}
                    self._pid = os.getpid()
        return self.root

    def child(self, rel: str) -> Location:
        """The location of ``rel`` (a checked relative POSIX path) under the dataset folder."""
        return self._loc().child(rel)

    def uri(self, rel: str) -> str:
        return self.root.uri.rstrip("/") + "/" + rel

    def scrub(self, text: str) -> str:
        return self.root.scrub(text)

    # -- the retry loop --------------------------------------------------------------------------------------------
    def call(self, rel: str, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with retries; errors become one line naming ``rel``'s URI, what was done and the store.

        Raises:
            FileNotFoundError: the file does not exist (the caller says what that means).
            InputError: access denied or another error that retrying cannot fix.
            RunFailed: the store kept failing (dropped connections, timeouts, 5xx) through every try.
        """
        delay = self.policy.backoff
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as exc:
                if isinstance(exc, MmprepError):
                    raise
                uri = self.uri(rel)
                if not is_transient(exc):
                    hint = ("check the credentials (environment, the store's config files or storage options) "
                            "and the bucket's permissions") if isinstance(exc, PermissionError) or any(
                        w in str(exc) for w in _DENIED) else "check the URI and the storage options"
                    raise InputError(f"{uri}: {what} failed on the store {self.name}: "
                                     f"{_describe(exc, self.scrub)}", hint=hint) from None
                self._forget(rel)
                if attempt >= self.policy.tries:
                    took = time.monotonic() - start
                    raise RunFailed(
                        f"{uri}: {what} failed {attempt} time{'s' if attempt > 1 else ''} in {took:.1f} s on the "
                        f"store {self.name} ({_describe(exc, self.scrub)})",
                        hint="the store dropped the connection or answered with a server error each time; check "
                             "the endpoint and the network, then run again") from None
                self.stats.add(retries=1)
                log.info("%s: %s failed (%s); try %d of %d in %.2f s", uri, what, _describe(exc, self.scrub),
                         attempt + 1, self.policy.tries, delay)
                time.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.policy.max_backoff)

    # -- operations --------------------------------------------------------------------------------------------------
    def size(self, rel: str) -> int | None:
        """The size of file ``rel``, None when there is no such file."""
        loc = self.child(rel)

        def stat() -> int | None:
            fs = _fsspec_of(loc)
            if fs is not None:
                try:
                    info = fs.info(loc.path)
                except FileNotFoundError:
                    return None
                return int(info["size"]) if info.get("type") == "file" and info.get("size") is not None else None
            import pyarrow.fs as pafs

            info = loc.fs.get_file_info(loc.path)
            return int(info.size) if info.type == pafs.FileType.File else None

        self.stats.add(requests=1)
        return self.call(rel, "looking it up", stat)

    def read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``rel`` (one range request, retried; a short answer is retried)."""
        loc = self.child(rel)

        def get() -> bytes:
            fs = _fsspec_of(loc)
            if fs is not None:
                data = fs.cat_file(loc.path, start=start, end=end)
            else:
                data = self._handle(rel, loc).read_at(end - start, start)
            if len(data) != end - start:
                raise _ShortRead(f"the store returned {len(data)} of {end - start} bytes")
            return bytes(data)

        self.stats.record(rel, start, end)
        return self.call(rel, f"reading bytes {start}-{end - 1}", get)

    def read_all(self, rel: str, size: int) -> bytes:
        """The whole file ``rel`` of ``size`` bytes (small files: the index, the rejects file)."""
        if size == 0:
            return b""
        return b"".join(self.blocks(rel, size))

    def blocks(self, rel: str, size: int, block: int = _BLOCK) -> Iterator[bytes]:
        """The bytes of file ``rel`` in order, one retried range request per block (a download survives drops)."""
        for start in range(0, size, block):
            yield self.read(rel, start, min(size, start + block))

    def list_names(self, rel: str = "") -> list[str]:
        """Names directly inside folder ``rel`` (empty when there is none)."""
        loc = self.child(rel) if rel else self._loc()
        self.stats.add(requests=1)
        return self.call(rel or ".", "listing the folder", loc.list_names)

    def _handle(self, rel: str, loc: Location) -> Any:
        with self._lock:
            f = self._handles.get(rel)
            if f is None:
                f = self._handles[rel] = loc.fs.open_input_file(loc.path)
            return f

    def _forget(self, rel: str) -> None:
        with self._lock:
            f = self._handles.pop(rel, None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()


class RangeFile:
    """One remote shard as a read-only, seekable binary file for pyarrow: each read is one range request.

    Reads are served from ``cache`` when it holds the range (and kept there when fetched). ``size`` is the
    shard's size (checked against the index by the caller); reads past it return what is left.
    """

    def __init__(self, store: Store, rel: str, size: int, sha256: str = "", cache: ShardCache | None = None) -> None:
        self.store = store
        self.rel = rel
        self._size = size
        self.sha256 = sha256
        self.cache = cache if cache is not None and cache.usable(sha256) else None
        self.pos = 0
        self.closed = False
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        with self._lock:
            start = self.pos
            end = self._size if n is None or n < 0 else min(self._size, start + n)
            if end <= start:
                return b""
            data = self.cache.get_range(self.sha256, start, end - start) if self.cache is not None else None
            if data is not None:
                self.store.stats.add(cache_hits=1, cache_bytes=len(data))
            else:
                data = self.store.read(self.rel, start, end)
                if self.cache is not None:
                    self.cache.put_range(self.sha256, start, data)
            self.pos = end
            return data

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

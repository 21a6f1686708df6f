"""A local cache of remote shard bytes for the reader: byte ranges and whole shards, a size limit, LRU eviction.

Entries are addressed by the shard's sha256 from ``index.json`` (content, not name), so datasets and processes
can share one cache folder and a shard rewritten under the same name is never served from an old entry::

    CACHE_DIR/mmprep-cache-v1/
      ranges/<sha256>/<start>-<length>     bytes [start, start + length) of the shard, as the reader asked for them
      shards/<sha256>.parquet              a whole shard (``cache_shards=True``): checked against the sha256 when it
                                           is stored, its size on every use
      locks/<sha256>.lock                  one process downloads a whole shard, the others wait for it

Every entry is written under a temporary name and renamed (never a half-written entry, never through a link).
An entry whose size is not the one its name (a range) or the index (a whole shard) gives is deleted and fetched
again. Each hit sets the entry's modification time, and when an insertion would take the cache over its limit the
least recently used entries are deleted first (the total is rescanned from disk at least every 32 insertions, so
processes sharing the folder see each other's entries). A failed write (disk full, permissions) is logged once and
the read goes on from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmprep.errors import MmprepError, UsageError
from mmprep.runtime.files import TEMP_MARK, atomic_write, ensure_dir

__all__ = ["ShardCache", "ShardMismatch", "parse_size"]

log = logging.getLogger("mmprep.dataset.cache")

_SHA = re.compile(r"^[0-9a-f]{64}$")
_RESCAN_EVERY = 32
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(value: int | str | None, what: str = "cache_limit") -> int | None:
    """A byte count from an int or a string like ``"50GB"`` / ``"512 MiB"`` (binary units); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"{what} must be a number of bytes such as 50GB or 512MiB, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise UsageError(f"{what} must be at least 1 byte, got {value!r}")
    return n


class ShardCache:
    """Shard bytes on local disk, keyed by the shard's sha256, at most ``limit`` bytes (None: no limit).

    Thread-safe; several processes may share the folder.
    """

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None) -> None:
        self.folder = Path(root) / "mmprep-cache-v1"
        self.limit = limit
        try:
            ensure_dir(self.folder, root=Path(root))
        except OSError as exc:
            raise UsageError(f"{root}: cannot create the cache folder: {exc.strerror or exc}",
                             hint="give a writable cache_dir") from None
        self._lock = threading.Lock()
        self._estimate: int | None = None  # bytes held: finished entries plus the room reserved for writes under way
        self._pending = 0  # room reserved for writes under way
        self._since_scan = 0
        self._warned = False

    def __repr__(self) -> str:
        return f"ShardCache({str(self.folder)!r}, limit={self.limit})"

    def __getstate__(self) -> dict[str, Any]:  # travels to DataLoader workers: no lock, a fresh count of the folder
        state = self.__dict__.copy()
        del state["_lock"]
        state.update(_estimate=None, _pending=0, _since_scan=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- keys ----------------------------------------------------------------------------------------------------
    @staticmethod
    def usable(sha256: str) -> bool:
        """Whether a shard can be cached: its index entry has a well-formed sha256 (the key of its entries)."""
        return bool(_SHA.match(sha256))

    def _range_path(self, sha256: str, start: int, length: int) -> Path:
        return self.folder / "ranges" / sha256 / f"{start}-{length}"

    def shard_path(self, sha256: str) -> Path:
        return self.folder / "shards" / f"{sha256}.parquet"

    # -- byte ranges ---------------------------------------------------------------------------------------------
    def get_range(self, sha256: str, start: int, length: int) -> bytes | None:
        """Bytes ``[start, start + length)`` of the shard, or None when not cached (or cached with a wrong size)."""
        p = self._range_path(sha256, start, length)
        try:
            with open(p, "rb") as f:
                data = f.read(length + 1)
        except OSError:
            return None
        if len(data) != length:
            self._drop(p)
            return None
        self._touch(p)
        return data

    def put_range(self, sha256: str, start: int, data: bytes) -> bool:
        """Keep ``data`` as bytes ``[start, start + len(data))`` of the shard; False when it was not kept."""
        if not self.usable(sha256) or not self._make_room(len(data)):
            return False
        p = self._range_path(sha256, start, len(data))
        return self._write(p, data, len(data))

    # -- whole shards --------------------------------------------------------------------------------------------
    def get_shard(self, sha256: str, size: int) -> Path | None:
        """The cached whole shard when present with the index's size (an entry of another size is deleted)."""
        p = self.shard_path(sha256)
        try:
            st = os.lstat(p)
        except OSError:
            return None
        if st.st_size != size:
            self._drop(p)
            return None
        self._touch(p)
        return p

    def put_shard(self, sha256: str, size: int, blocks: Callable[[], Iterator[bytes]]) -> Path | None:
        """Download a whole shard into the cache once (other processes wait for it) and return its path.

        ``blocks()`` yields the shard's bytes in order. The entry is kept only when they hash to ``sha256`` and add
        up to ``size``; otherwise :class:`ShardMismatch` is raised (the dataset is damaged), and an error of
        ``blocks`` (the store failed) propagates unchanged. Returns None when the shard cannot be kept (over the
        limit, disk full): the caller reads it by ranges instead.
        """
        if not self.usable(sha256):
            return None
        with self._shard_lock(sha256):
            hit = self.get_shard(sha256, size)
            if hit is not None:
                return hit
            if not self._make_room(size):
                return None
            p = self.shard_path(sha256)

            def write(f: BinaryIO) -> None:
                digest = hashlib.sha256()
                n = 0
                it = blocks()
                while True:
                    try:
                        block = next(it, None)
                    except BaseException as exc:  # the store, not the disk: not a cache failure
                        raise _FromStore(exc) from None
                    if block is None:
                        break
                    f.write(block)
                    digest.update(block)
                    n += len(block)
                if n != size:
                    raise ShardMismatch(f"{n} bytes, index.json says {size}")
                if digest.hexdigest() != sha256:
                    raise ShardMismatch(f"sha256 {digest.hexdigest()[:16]}… differs from index.json "
                                        f"({sha256[:16]}…)")

            try:
                return p if self._write(p, write, size) else None
            except _FromStore as wrapped:
                raise wrapped.exc from None

    # -- internals -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _shard_lock(self, sha256: str) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): concurrent downloads of one shard are only wasteful
            yield
            return
        try:
            folder = ensure_dir(self.folder / "locks", root=self.folder)
            fd = os.open(folder / f"{sha256}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except (OSError, MmprepError) as exc:
            self._warn(f"cannot lock {self.folder}: {exc}")
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, p: Path, data: bytes | Callable[[BinaryIO], None], size: int) -> bool:
        try:
            ensure_dir(p.parent, root=self.folder)
            atomic_write(p, data, what="cache entry", fsync=False)
        except (ShardMismatch, _FromStore):
            raise
        except MmprepError as exc:  # disk full, permissions, a link in the way: read on without caching
            self._warn(str(exc))
            self._release(size)
            return False
        except OSError as exc:
            self._warn(f"cannot write {p}: {exc.strerror or exc}")
            self._release(size)
            return False
        except BaseException:
            self._release(size)
            raise
        self._release(size, written=True)
        return True

    def _release(self, size: int, written: bool = False) -> None:
        """End the reservation of an entry: written (it now counts as held) or not (the room is given back)."""
        if self.limit is None:
            return
        with self._lock:
            self._pending -= size
            if not written and self._estimate is not None:
                self._estimate -= size

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("shard cache: %s; reading on without caching", message)

    @staticmethod
    def _touch(p: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(p)

    def _drop(self, p: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(p)

    def entries(self) -> list[tuple[float, int, Path]]:
        """Every finished entry as (last use, size, path)."""
        found: list[tuple[float, int, Path]] = []
        for sub in ("ranges", "shards"):
            stack = [self.folder / sub]
            while stack:
                try:
                    it = os.scandir(stack.pop())
                except OSError:
                    continue
                with it:
                    for e in it:
                        if e.name.startswith(".") and TEMP_MARK in e.name:
                            continue
                        try:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(Path(e.path))
                            elif e.is_file(follow_symlinks=False):
                                st = e.stat(follow_symlinks=False)
                                found.append((st.st_mtime, st.st_size, Path(e.path)))
                        except OSError:
                            continue
        return found

    def size(self) -> int:
        """Bytes held now (a scan of the folder)."""
        return sum(s for _, s, _ in self.entries())

    def _make_room(self, incoming: int) -> bool:
        """Evict least recently used entries so that ``incoming`` more bytes fit, and reserve the room (threads
        writing at once cannot overshoot the limit together); False when they never can fit."""
        if self.limit is None:
            return True
        if incoming > self.limit:
            return False
        with self._lock:
            self._since_scan += 1
            if (self._estimate is not None and self._since_scan < _RESCAN_EVERY
                    and self._estimate + incoming <= self.limit):
                self._estimate += incoming
                self._pending += incoming
                return True
            entries = sorted(self.entries(), key=lambda e: e[0])  # finished entries (not the writes under way)
            total = sum(s for _, s, _ in entries) + self._pending
            self._since_scan = 0
            for _, size, path in entries:
                if total + incoming <= self.limit:
                    break
                self._drop(path)
                total -= size
            fits = total + incoming <= self.limit
            if fits:
                total += incoming
                self._pending += incoming
            self._estimate = total
            return fits


class ShardMismatch(Exception):
    """A downloaded whole shard is not the one ``index.json`` describes (the caller names the shard)."""


class _FromStore(Exception):
    """An error of the download itself, carried through the cache's write unchanged."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc

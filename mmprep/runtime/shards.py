"""Writing shards and the dataset files around them, never leaving anything half-written under a final name.

An output directory holds ``shard-NNNNN.parquet`` files, ``rejected.jsonl``, ``index.json`` (written last) and
``run-stats.json`` (timings: the only file that differs between identical runs), plus a ``.mmprep/`` state folder
(lock, run identity, one record per finished shard) that ``--resume`` uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import RunFailed, UsageError

__all__ = [
    "INDEX_NAME",
    "REJECTS_NAME",
    "STATE_DIR",
    "OutputDir",
    "ShardInfo",
    "atomic_write_bytes",
    "file_sha256",
    "shard_name",
    "write_shard",
]

INDEX_NAME = "index.json"
REJECTS_NAME = "rejected.jsonl"
RUN_STATS_NAME = "run-stats.json"
STATE_DIR = ".mmprep"
# Temporary names used by write_shard / atomic_write_bytes (".<final name>.tmp-<pid>") in the output directory.
_TEMP_PREFIXES = (".shard-", f".{INDEX_NAME}.tmp-", f".{REJECTS_NAME}.tmp-", f".{RUN_STATS_NAME}.tmp-")
_OWNED_PREFIXES = ("shard-", *_TEMP_PREFIXES)
_OWNED_NAMES = (INDEX_NAME, REJECTS_NAME, RUN_STATS_NAME, STATE_DIR)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard as listed in the index."""

    path: str
    rows: int
    bytes: int
    sha256: str


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name, fsync, then rename it into place."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunFailed(f"cannot write {p}: {exc.strerror or exc}",
                        hint="check free disk space and permissions of the output directory") from None
    _fsync_dir(p.parent)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def write_shard(
    path: str | Path,
    schema: Any,
    batches: Iterable[Any],
    *,
    compression: str = "zstd",
    extra_metadata: Any = None,
) -> ShardInfo:
    """Write record batches as one Parquet file (one row group per batch), atomically.

    ``extra_metadata`` is called after the last batch and returns a ``{key: str}`` dict added to the file's
    key-value metadata (per-shard facts such as the image-count histogram).
    """
    import pyarrow.parquet as pq

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    rows = 0
    try:
        with open(tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            writer = pq.ParquetWriter(
                sink,
                schema,
                compression=None if compression == "none" else compression,
                write_statistics=["id", "line", "image_count"],
                use_dictionary=_dictionary_columns(schema),
                store_schema=True,
            )
            try:
                for batch in batches:
                    if batch is None or batch.num_rows == 0:
                        continue
                    writer.write_batch(batch, row_group_size=batch.num_rows)
                    rows += batch.num_rows
                if extra_metadata is not None:
                    writer.add_key_value_metadata(extra_metadata())
            finally:
                writer.close()
            raw.flush()
            os.fsync(raw.fileno())
        digest, size = sink.sha.hexdigest(), sink.size
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunFailed(f"cannot write shard {p}: {exc.strerror or exc}",
                        hint="check free disk space and permissions of the output directory") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(p.parent)
    return ShardInfo(path=p.name, rows=rows, bytes=size, sha256=digest)


class _HashingWriter:
    """A write-only file object that hashes what passes through it (the shard is never read back to hash it)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the caller closes the real file
        self.closed = True


# Columns never worth a dictionary: one large, distinct value per row (hashing them only costs time).
_NO_DICTIONARY = frozenset({"pixel_values", "images"})


def _dictionary_columns(schema: Any) -> list[str]:
    """Parquet leaf paths of every column but the large binary ones, for ``use_dictionary``."""
    import pyarrow as pa

    def leaves(prefix: str, typ: Any) -> list[str]:
        if pa.types.is_struct(typ):
            return [leaf for i in range(typ.num_fields)
                    for leaf in leaves(f"{prefix}.{typ.field(i).name}", typ.field(i).type)]
        if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
            return leaves(f"{prefix}.list.element", typ.value_type)
        return [prefix]

    return [leaf for f in schema if f.name not in _NO_DICTIONARY for leaf in leaves(f.name, f.type)]


class OutputDir:
    """The output directory of a pack run: lock, run identity, per-shard records, final files.

    Args:
        path: the directory.
        resume: keep finished shards of an earlier run with the same identity.
        overwrite: delete mmprep's own files from an earlier run first.
    """

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.state = self.path / STATE_DIR
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def open(self, identity: dict[str, Any]) -> None:
        """Create/lock the directory and check (or record) the run identity."""
        try:
            self._open(identity)
        except OSError as exc:  # e.g. a disk that is full before the run starts
            self.close()
            raise RunFailed(f"{self.path}: cannot prepare the output directory: {exc.strerror or exc}",
                            hint="check free disk space and permissions of the output directory") from None

    def _open(self, identity: dict[str, Any]) -> None:
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UsageError(f"{self.path}: exists and is not a directory") from None
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot create output directory: {exc.strerror or exc}") from None
        existing = [p.name for p in self.path.iterdir()]
        if not os.access(self.path, os.W_OK):
            raise UsageError(f"{self.path}: output directory is not writable")
        self.state.mkdir(exist_ok=True)
        self._lock()
        run_file = self.state / "run.json"
        ours = [n for n in existing if n.startswith(_OWNED_PREFIXES) or n in _OWNED_NAMES]
        foreign = [n for n in existing if n not in ours]
        if self.resume:
            if not run_file.exists():
                if any(n.startswith("shard-") for n in ours):
                    raise UsageError(f"{self.path}: has shards but no run record to resume from",
                                     hint="rerun with --overwrite to start again")
            else:
                old = json.loads(run_file.read_text())
                if old != identity:
                    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                    raise UsageError(
                        f"{self.path}: cannot resume: the earlier run used different "
                        + ", ".join(diff),
                        hint="use the same manifest and flags, or --overwrite to start again",
                    )
        elif foreign or [n for n in ours if n != STATE_DIR]:
            if not self.overwrite:
                raise UsageError(
                    f"{self.path}: output directory is not empty",
                    hint="pass --resume to continue an interrupted run or --overwrite to replace it",
                )
            for n in ours:
                if n == STATE_DIR:
                    continue
                target = self.path / n
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            shutil.rmtree(self.state / "chunks", ignore_errors=True)
        self._remove_temps()  # left by a killed run
        (self.state / "chunks").mkdir(exist_ok=True)
        write_json(run_file, identity)

    def _lock(self) -> None:
        import fcntl

        lock_path = self.state / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{self.path}: another mmprep run (pid {other}) is writing to this directory",
                hint="wait for it to finish or choose another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _remove_temps(self) -> None:
        """Delete temporary files of mmprep's own (never a final name); only while holding the lock."""
        for folder in (self.path, self.state, self.state / "chunks"):
            for p in folder.glob(".*.tmp-*"):
                if folder != self.path or p.name.startswith(_TEMP_PREFIXES):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A failed or interrupted run (the engine has stopped its workers by now) leaves no temporary files.
        if exc_type is not None and self._lock_fd is not None:
            self._remove_temps()
        self.close()

    # -- per-chunk records ---------------------------------------------------------------------------------
    def chunk_record_path(self, index: int) -> Path:
        return self.state / "chunks" / f"{index:05d}.json"

    def finished_chunk(self, index: int) -> dict[str, Any] | None:
        """The record of a chunk finished by an earlier run, if its shard is intact."""
        rec_path = self.chunk_record_path(index)
        if not rec_path.exists():
            return None
        try:
            rec = json.loads(rec_path.read_text())
            shard = self.path / rec["shard"]["path"]
            if shard.stat().st_size != rec["shard"]["bytes"] or file_sha256(shard) != rec["shard"]["sha256"]:
                return None
        except (OSError, ValueError, KeyError):
            return None
        return rec

    def save_chunk(self, index: int, record: dict[str, Any]) -> None:
        write_json(self.chunk_record_path(index), record)

    def iter_chunk_records(self, count: int) -> Iterator[dict[str, Any]]:
        for i in range(count):
            yield json.loads(self.chunk_record_path(i).read_text())

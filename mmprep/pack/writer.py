"""Writing one shard: record batches in, one Parquet file out (one row group per batch), hashed while written.

The file appears under its final name only when complete (:func:`mmprep.runtime.files.atomic_write`), and its
sha256 is computed from the bytes as they are written, so the shard is never read back to hash it. The hashing runs
in a thread (``hashlib`` releases the GIL on large buffers), so the worker goes on encoding the next row group
while the last one is hashed; the file is fsynced once, when complete.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from mmprep.dataset.format import ShardInfo
from mmprep.runtime.files import atomic_write

__all__ = ["write_shard"]

# Columns never worth a dictionary: one large, distinct value per row (hashing them only costs time).
_NO_DICTIONARY = frozenset({"pixel_values", "images"})


class _Written:
    """Size and sha256 of a file written through :func:`write_shard`."""

    def __init__(self) -> None:
        self.size = 0
        self.sha256 = ""
        self.rows = 0


def write_shard(
    path: str | Path,
    schema: Any,
    batches: Iterable[Any],
    *,
    compression: str = "zstd",
    extra_metadata: Callable[[], dict[str, str]] | None = None,
    name: str | None = None,
) -> ShardInfo:
    """Write record batches as one Parquet file, atomically; returns its path (``name``), rows, bytes and sha256.

    ``extra_metadata`` is called after the last batch and returns a ``{key: str}`` dict added to the file's
    key-value metadata (per-shard facts such as the image-count histogram).

    Raises:
        RunFailed: the file cannot be written (one line naming it).
    """
    import pyarrow.parquet as pq

    p = Path(path)
    done = _Written()

    def write(raw: BinaryIO) -> None:
        sink = _HashingWriter(raw)
        try:
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
                    done.rows += batch.num_rows
                if extra_metadata is not None:
                    writer.add_key_value_metadata(extra_metadata())
            finally:
                writer.close()
        finally:
            sha256 = sink.finish()  # also after an error: the hashing thread ends with the shard
        done.size, done.sha256 = sink.size, sha256

    # One fsync per shard (its bytes); the folder is fsynced once, when the index is published: a shard whose
    # rename a crash loses is missing on --resume, which redoes its chunk.
    atomic_write(p, write, what="shard", fsync_folder=False)
    return ShardInfo(path=name or p.name, rows=done.rows, bytes=done.size, sha256=done.sha256)


class _HashingWriter:
    """A write-only file object that hashes what passes through it (the shard is never read back to hash it).

    Each block is written at once and hashed by a thread, in order. pyarrow hands its file object ``bytes`` (a
    row group's column chunks arrive as one large block), which nothing can change afterwards, so the thread
    reads them without a copy; anything else is copied first.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.size = 0
        self.closed = False
        self._sha = hashlib.sha256()
        self._blocks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._hash, name="mmprep-shard-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._sha.update(block)

    def write(self, data: Any) -> int:
        block = data if isinstance(data, bytes) else bytes(memoryview(data))
        self._blocks.put(block)
        self.size += len(block)
        return int(self.raw.write(block))

    def finish(self) -> str:
        """Wait for the hashing thread; the sha256 of everything written."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()
        return self._sha.hexdigest()

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the caller closes the real file
        self.closed = True


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

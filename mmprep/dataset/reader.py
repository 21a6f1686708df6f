"""Reading packed datasets back: rows and numpy batches, random access, epoch plans.

:class:`PackedDataset` opens the output directory of ``mmprep pack`` through its ``index.json`` and serves:

- **batches** (``iter_batches``): a ``dict`` of column name → numpy array with a leading batch dimension.
  ``pixel_values`` is the whole column buffer viewed as ``[B, *shape]`` in the stored dtype with
  ``np.frombuffer`` (no copy; each batch has its own buffer, so changing it in place touches nothing else);
  fixed-size lists (``image_mask``, ``content_boxes``,
  ``input_ids``, ...) become ``[B, ...]`` arrays; strings and variable-length lists (``id``, ``text``,
  ``tag_ids``, ``image_paths``, encoded ``images``) become Python lists (:mod:`mmprep.dataset.columns`).
- **rows** (iteration, ``ds[i]``): the same fields for one sample, without the batch dimension.
- **random access** (``ds[i]``, ``ds.take(indices)``): reads only the Parquet row groups holding the rows (with a
  small cache of decoded row groups), so nearby indices cost one read.
- **normalisation on load** for ``uint8`` shards: ``(pixel / 255 - mean) / std`` with the mean/std from the
  metadata (or given), to ``float32``/``float16``; padding slots become zeros, exactly as a normalised pack
  stores them (:func:`mmprep.dataset.arrays.normalize_pixels`).
- **epoch plans** (``epoch_plan``/``iter_plan``): which rows a (rank, worker) reads in an epoch, each row exactly
  once across all of them, shuffled deterministically by seed and epoch (:mod:`mmprep.dataset.plans`). The
  PyTorch datasets in :mod:`mmprep.dataset.torch_data` are thin wrappers around these.
- **object storage**: the path may be any fsspec/pyarrow URI (``s3://bucket/ds``, ``gs://``, ``az://``,
  ``http(s)://``, ``memory://``). Shards are then read by row group with range requests (pyarrow coalesces a row
  group's column chunks into few reads), retried on dropped connections and server errors
  (:mod:`mmprep.dataset.remote`); the next row groups of a sequential read, an epoch plan or a ``take`` are
  fetched by a small thread pool in the background (``prefetch`` row groups ahead, so memory stays bounded); and
  with ``cache_dir`` the bytes read are kept on local disk under a size limit, least recently used first out
  (:mod:`mmprep.dataset.cache`; ``cache_shards=True`` downloads whole shards instead, checked against the index
  sha256). Each shard's size is checked against the index before it is read. Local paths keep the direct path
  (no thread pool, no copies) unless ``prefetch`` is given.

Masks and targets over batches (:func:`~mmprep.dataset.arrays.image_mask`,
:func:`~mmprep.dataset.arrays.patch_mask`, :func:`~mmprep.dataset.arrays.multi_hot`) are in
:mod:`mmprep.dataset.arrays`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.dataset.arrays import NORMALIZE_DTYPES, Batch, PixelSpec, normalize_pixels, patch_mask
from mmprep.dataset.cache import ShardCache, ShardMismatch, parse_size
from mmprep.dataset.columns import (
    column_to_numpy,
    decode_images,
    empty_batch,
    rebatch,
    rows_of,
    to_record_batch,
)
from mmprep.dataset.format import INDEX_NAME, Index
from mmprep.dataset.index_file import load_index
from mmprep.dataset.plans import PlanRange, epoch_plan
from mmprep.dataset.remote import IOStats, RangeFile, RetryPolicy, Store
from mmprep.dataset.vocab_lookup import VocabLookup, find_vocab
from mmprep.errors import InputError, MmprepError, UsageError
from mmprep.runtime.storage import Location

__all__ = ["PackedDataset", "ShardEntry"]


_VERIFY = "run `mmprep verify` on the directory"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as listed in the index, with its place in the dataset's row order.

    Attributes:
        name: its path relative to the dataset folder, as the index lists it.
        path: a Path for a local dataset, its URI (without credentials) otherwise.
    """

    name: str
    path: Path | str
    rows: int
    start: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class _RowGroups:
    """Every row group of the dataset, numbered across shards: where it starts, its shard, its number there."""

    starts: np.ndarray  # global first row of each row group, plus len(dataset) at the end
    shard: np.ndarray
    local: np.ndarray


class PackedDataset:
    """A packed directory (the ``--out`` of ``mmprep pack``), readable as rows or numpy batches.

    Args:
        path: the directory (or its ``index.json``): a local path or a URI (``s3://bucket/ds``, ``gs://``, ...).
        split: which split to read (default: the only one, else ``train``).
        columns: columns to read (default: all). Unknown names are a UsageError listing the available ones.
        normalize: ``float32`` or ``float16`` to return pixels normalised with the metadata's mean/std
            (uint8 shards), or cast (already normalised shards); None returns them as stored.
        mean: override the mean used by ``normalize`` (three values in [0, 1]).
        std: override the std used by ``normalize``.
        decode_images: for ``--pad none`` shards: False keeps ``images`` as lists of ``{bytes, path}``; True
            decodes each to a uint8 ``(H, W, 3)`` array (EXIF orientation applied); an
            :class:`mmprep.images.decode.ImageConfig` also resizes.
        cache_row_groups: decoded row groups kept for random access.
        storage_options: fsspec options for a URI (``endpoint_url``, credentials, ...; never shown). Credentials
            are best left to the store's own environment and config files.
        cache_dir: keep the shard bytes read from a remote dataset in this local folder (shared safely by
            processes and datasets: entries are keyed by the shard's sha256). Ignored for local datasets.
        cache_limit: at most this many bytes in ``cache_dir`` (an int or ``"50GB"``); the least recently used
            entries are deleted first. None: no limit.
        cache_shards: cache whole shards (downloaded once, checked against the index sha256) instead of the byte
            ranges read.
        prefetch: row groups read ahead in background threads (default: 4 for a remote dataset, 0 for a local one).
        retries: how often a failed request to the store is tried again (dropped connections, timeouts, 5xx),
            with exponential backoff, before the read fails with one line naming the shard and the store.

    Attributes:
        path: the dataset folder (a Path, or the URI without credentials for a remote dataset).
        split: the split read.
        location: the dataset folder on its filesystem.
        remote: whether the dataset is read from a remote filesystem.
        index: the split's part of ``index.json`` (:class:`mmprep.dataset.format.Index`).
        shards: the shards in row order, each with its first global row.
        metadata: the dataset's ``mmprep`` metadata (layout, pixels, text, vocab); empty without shards.
        pixels: the padded pixel layout, None for the encoded layout.

    Raises:
        InputError: the directory is not a finished mmprep pack, or its index is damaged (naming the field).
        UsageError: bad options.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        split: str | None = None,
        columns: Sequence[str] | None = None,
        normalize: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        decode_images: Any = False,
        cache_row_groups: int = 4,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = None,
        cache_shards: bool = False,
        prefetch: int | None = None,
        retries: int = 3,
    ) -> None:
        policy = RetryPolicy.from_retries(retries)
        limit = parse_size(cache_limit)
        loaded = load_index(path, storage_options, split=split)
        self.path: Path | str = loaded.root
        self.location: Location = loaded.location
        self.remote: bool = not loaded.location.local
        self.index: Index = loaded.index
        self.split: str = loaded.index.split
        self.shards: list[ShardEntry] = []
        start = 0
        for s in self.index.shards:
            where: Path | str = self.path / s.path if isinstance(self.path, Path) else f"{self.path}/{s.path}"
            self.shards.append(ShardEntry(name=s.path, path=where, rows=s.rows, start=start, bytes=s.bytes,
                                          sha256=s.sha256))
            start += s.rows
        self._len = start
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                                     or not 0 <= prefetch <= 64):
            raise UsageError(f"prefetch must be a whole number of row groups in 0..64, got {prefetch!r}")
        self.prefetch: int = (4 if self.remote else 0) if prefetch is None else prefetch
        self.stats = IOStats()
        self._store: Store | None = Store(self.location, policy, self.stats) if self.remote else None
        self._disk_cache: ShardCache | None = (ShardCache(cache_dir, limit) if self.remote and cache_dir is not None
                                               else None)
        self.cache_shards = bool(cache_shards)
        self._meta: dict[int, Any] = {}
        self._checked: set[int] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self.metadata: dict[str, Any] = self.index.metadata or {}
        self.layout: str = self.metadata.get("layout", "padded")
        self.pixels: PixelSpec | None = None
        if self.layout == "padded" and "pixels" in self.metadata:
            try:
                self.pixels = PixelSpec.from_metadata(self.metadata)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{self.index_file}: bad pixel metadata ({exc})",
                                 hint="run `mmprep verify` on the directory") from None
        if normalize is not None:
            if normalize not in NORMALIZE_DTYPES:
                raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_DTYPES)}, got '{normalize}'")
            if self.pixels is None:
                raise UsageError(f"{self.path}: normalize needs padded pixel tensors; this dataset stores "
                                 f"{self.layout} images", hint="use decode_images=True for the encoded layout")
        self.normalize = normalize
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.decode_images = decode_images
        self.cache_row_groups = max(0, int(cache_row_groups))
        self._schema: Any = None
        self._rg_rows: list[list[int]] | None = None
        self._rg: _RowGroups | None = None
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()
        self.columns: list[str] = self._check_columns(columns)

    # -- pickling (DataLoader workers): no open files, cached tables or threads travel --------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_files"] = OrderedDict()
        state["_pool"] = None
        state["stats"] = IOStats()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self._store is not None:
            self._store.stats = self.stats

    def __repr__(self) -> str:
        return (f"PackedDataset({str(self.path)!r}, split={self.split!r}, rows={self._len}, shards={len(self.shards)}, "
                f"layout={self.layout})")

    def close(self) -> None:
        """Stop the prefetch threads and close open shard files (the dataset can still be read afterwards)."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)
        while self._files:
            _, f = self._files.popitem()
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self) -> PackedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def index_file(self) -> Path | str:
        """The ``index.json`` file (a Path, or its URI)."""
        return self.path / INDEX_NAME if isinstance(self.path, Path) else f"{self.path}/{INDEX_NAME}"

    # -- facts ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def schema(self) -> Any:
        """The Arrow schema of the shards (read from the first shard)."""
        if self._schema is None and self.shards:
            with self._reading(0):
                self._schema = self._file(0).schema_arrow
        return self._schema

    @property
    def column_names(self) -> list[str]:
        """All columns stored in the shards."""
        return list(self.schema.names) if self.schema is not None else []

    @property
    def limit_images(self) -> int:
        """Image slots per row (padded) or the pack's --limit-images."""
        return int(self.metadata.get("limit_images", 0))

    @property
    def max_length(self) -> int | None:
        """Token ids per row, when the pack had a tokenizer."""
        text = self.metadata.get("text")
        return int(text["max_length"]) if text else None

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        names = self.column_names
        if columns is None:
            return names
        if isinstance(columns, str):
            columns = [columns]
        unknown = [c for c in columns if c not in names]
        if unknown and names:
            raise UsageError(f"{self.path}: no column {', '.join(repr(c) for c in unknown)}",
                             hint="columns: " + ", ".join(names))
        return list(dict.fromkeys(columns))

    def _read_columns(self, cols: list[str]) -> list[str]:
        """Columns to read for ``cols``: plus image_count when normalising (padding slots become zeros)."""
        read = list(cols)
        if (self.normalize and self.pixels is not None and self.pixels.column in cols
                and "image_count" not in read and "image_count" in self.column_names):
            read.append("image_count")
        return read

    # -- conversion ----------------------------------------------------------------------------------------
    def to_numpy(self, batch: Any, columns: Sequence[str] | None = None) -> Batch:
        """Convert an Arrow record batch or table of this dataset's rows to a batch dict.

        ``columns`` (default: all in ``batch``) are returned; normalisation needs ``image_count`` in ``batch``
        to zero the padding slots.
        """
        rb = to_record_batch(batch)
        cols = list(columns) if columns is not None else list(rb.schema.names)
        return self._finish(self._convert(rb, list(rb.schema.names)), cols)

    def _convert(self, rb: Any, names: list[str]) -> Batch:
        """Arrow → numpy/lists as stored (no normalisation or decoding)."""
        return {name: column_to_numpy(name, rb.column(name), self.pixels, str(self.path)) for name in names}

    def _finish(self, raw: Batch, cols: list[str]) -> Batch:
        """Apply normalisation and image decoding; keep only ``cols``."""
        out = {name: raw[name] for name in cols}
        if self.pixels is not None and self.pixels.column in out and self.normalize:
            out[self.pixels.column] = normalize_pixels(out[self.pixels.column], self.pixels, self.normalize,
                                                       mean=self.mean, std=self.std,
                                                       image_count=raw.get("image_count"))
        if "images" in out and self.decode_images:
            out["images"] = decode_images(out["images"], out.get("id"), self.decode_images)
        return out

    # -- sequential reading --------------------------------------------------------------------------------
    def iter_batches(
        self,
        batch_size: int = 256,
        *,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows in stored order (the last one smaller unless ``drop_last``).

        Args:
            batch_size: rows per batch; batches run across shard boundaries.
            columns: columns to return (default: the dataset's selection).
            drop_last: skip a final partial batch.
            start: first row (global index).
            stop: end row (exclusive; default: all).
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)
        stop = self._len if stop is None else min(stop, self._len)
        for rb in rebatch(self._iter_record_batches(start, stop, read, batch_size), batch_size, drop_last):
            yield self.to_numpy(rb, cols)

    def __iter__(self) -> Iterator[Batch]:
        """Rows in stored order: each a dict of the selected columns without the batch dimension."""
        for batch in self.iter_batches(256):
            yield from rows_of(batch)

    def _iter_record_batches(self, start: int, stop: int, read: list[str], batch_size: int) -> Iterator[Any]:
        if self.prefetch or self._store is not None:  # remote: row group by row group, never a whole shard at once
            yield from self._iter_row_group_slices(start, stop, read)
            return
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, shard.start), min(stop, shard.start + shard.rows)
            if lo >= hi:
                continue
            f = self._file(k)
            if lo == shard.start and hi == shard.start + shard.rows:
                with self._reading(k):
                    yield from f.iter_batches(batch_size=batch_size, columns=read, use_threads=True)
                self._close_file(k)  # an open pyarrow file keeps the whole shard's pre-buffered bytes
                continue
            rg_rows = self._row_groups()[k]
            first = shard.start
            for g, n in enumerate(rg_rows):
                a, b = max(lo, first), min(hi, first + n)
                if a < b:
                    with self._reading(k):
                        table = f.read_row_group(g, columns=read, use_threads=True)
                    yield to_record_batch(table.slice(a - first, b - a))
                first += n

    def _iter_row_group_slices(self, start: int, stop: int, read: list[str]) -> Iterator[Any]:
        """Rows ``[start, stop)`` row group by row group, the next ones fetched in the background."""
        rg = self._rg_table()
        first = int(np.searchsorted(rg.starts, start, side="right")) - 1
        jobs: list[tuple[int, int, int]] = []
        for g in range(max(0, first), len(rg.starts) - 1):
            lo, hi = int(rg.starts[g]), int(rg.starts[g + 1])
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                jobs.append((g, a - lo, b - a))
        tables = self._row_group_tables([g for g, _, _ in jobs], read)
        for (_, offset, n), table in zip(jobs, tables, strict=True):
            yield to_record_batch(table.slice(offset, n))

    @contextlib.contextmanager
    def _reading(self, k: int) -> Iterator[None]:
        """Turn pyarrow's errors while reading shard ``k`` into one line naming the shard, with a hint."""
        import pyarrow as pa

        shard = self.shards[k]
        try:
            yield
        except MmprepError:
            raise
        except FileNotFoundError:
            raise InputError(f"{shard.path}: listed in {INDEX_NAME} but missing", hint=_VERIFY) from None
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, a damaged page, a truncated file
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 200 else detail[:200] + "…"
            raise InputError(f"{shard.path}: not a readable Parquet file ({detail})",
                             hint=f"the shard is damaged or truncated; {_VERIFY}") from None

    def _source(self, k: int) -> Any:
        """What pyarrow opens shard ``k`` from: its local path, a cached copy, or a :class:`RangeFile`.

        The shard's size is checked against the index first (a short or replaced shard is one clear line).
        """
        shard = self.shards[k]
        if self._store is None:
            if shard.bytes:
                try:
                    size = os.stat(shard.path).st_size
                except FileNotFoundError:
                    raise InputError(f"{shard.path}: listed in {INDEX_NAME} but missing", hint=_VERIFY) from None
                except OSError:
                    size = shard.bytes  # let the open name the problem
                if size != shard.bytes:
                    raise InputError(f"{shard.path}: {size:,} bytes, {INDEX_NAME} says {shard.bytes:,} (a truncated "
                                     "or replaced shard)", hint=_VERIFY)
            return str(shard.path)
        store = self._store
        if k not in self._checked:
            found = store.size(shard.name)
            if found is None:
                raise InputError(f"{shard.path}: listed in {INDEX_NAME} but missing from the store {store.name}",
                                 hint=_VERIFY)
            if found != shard.bytes:
                raise InputError(f"{shard.path}: {found:,} bytes on the store, {INDEX_NAME} says {shard.bytes:,} "
                                 "(a truncated or replaced shard)", hint=_VERIFY)
            with self._lock:
                self._checked.add(k)
        if self._disk_cache is not None and self.cache_shards:
            local = self._disk_cache.get_shard(shard.sha256, shard.bytes)
            if local is None:
                try:
                    local = self._disk_cache.put_shard(shard.sha256, shard.bytes,
                                                       lambda: store.blocks(shard.name, shard.bytes))
                except ShardMismatch as exc:
                    raise InputError(f"{shard.path}: {exc} (the shard on the store is not the one the index "
                                     "lists)", hint=_VERIFY) from None
                if local is not None:
                    self.stats.add(shard_downloads=1)
            if local is not None:
                return str(local)
        return RangeFile(store, shard.name, shard.bytes, shard.sha256, self._disk_cache)

    def _metadata(self, k: int) -> Any:
        """The Parquet footer of shard ``k`` (read once; its row count checked against the index)."""
        md = self._meta.get(k)
        if md is None:
            import pyarrow.parquet as pq

            shard = self.shards[k]
            with self._reading(k):
                if self._store is None:
                    md = self._file(k).metadata
                else:
                    with pq.ParquetFile(self._source(k)) as f:
                        md = f.metadata
            if md.num_rows != shard.rows:
                raise InputError(f"{shard.path}: holds {md.num_rows} rows, {INDEX_NAME} says {shard.rows}",
                                 hint=_VERIFY)
            with self._lock:
                self._meta[k] = md
        return md

    def _file(self, k: int) -> Any:
        """Shard ``k`` opened for reading (kept open: up to 8 shards)."""
        import pyarrow.parquet as pq

        f = self._files.get(k)
        if f is None:
            with self._reading(k):
                if self._store is None:
                    f = pq.ParquetFile(self._source(k))
                    if k not in self._meta:
                        if f.metadata.num_rows != self.shards[k].rows:
                            raise InputError(f"{self.shards[k].path}: holds {f.metadata.num_rows} rows, "
                                             f"{INDEX_NAME} says {self.shards[k].rows}", hint=_VERIFY)
                        self._meta[k] = f.metadata
                else:
                    f = pq.ParquetFile(self._source(k), metadata=self._metadata(k), pre_buffer=True)
            self._files[k] = f
            while len(self._files) > 8:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(k)
        return f

    def _close_file(self, k: int) -> None:
        f = self._files.pop(k, None)
        if f is not None:
            f.close()

    def _task_file(self, k: int) -> Any:
        """A private handle on shard ``k`` for one background read (pyarrow file readers are not shared between
        threads); opening it reads nothing, the footer is already known."""
        import pyarrow.parquet as pq

        md = self._metadata(k)
        with self._reading(k):
            return pq.ParquetFile(self._source(k), metadata=md, pre_buffer=True)

    # -- background reads ------------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # none yet, or the parent's (threads do not fork)
            workers = max(4, self.prefetch) if self._store is not None else max(1, self.prefetch)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmprep-prefetch")
            self._pool_pid = os.getpid()
        return self._pool

    def _read_row_group(self, k: int, g: int, read: list[str]) -> Any:
        """Row group ``g`` of shard ``k`` read on a private handle (safe in a background thread)."""
        f = self._task_file(k)
        try:
            with self._reading(k):
                return f.read_row_group(g, columns=read, use_threads=True)
        finally:
            f.close()

    def _row_group_tables(self, groups: Sequence[int], read: list[str]) -> Iterator[Any]:
        """Row groups (global numbers) as Arrow tables, in order; with ``prefetch``, up to that many of the next
        ones are read by background threads while the current one is used (memory: ``prefetch + 1`` row groups)."""
        rg = self._rg_table()
        jobs = [(int(rg.shard[g]), int(rg.local[g])) for g in groups]
        if not self.prefetch:
            for k, g in jobs:
                with self._reading(k):
                    yield self._file(k).read_row_group(g, columns=read, use_threads=True)
            return
        pool = self._executor()
        pending: deque[Future[Any]] = deque()
        todo = iter(jobs)
        try:
            for k, g in itertools.islice(todo, self.prefetch):
                pending.append(pool.submit(self._read_row_group, k, g, read))
            while pending:
                table = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._read_row_group, nxt[0], nxt[1], read))
                yield table
        finally:
            for fut in pending:
                fut.cancel()

    # -- row groups and random access ----------------------------------------------------------------------
    def _row_groups(self) -> list[list[int]]:
        if self._rg_rows is None:
            if self._store is not None and len(self.shards) > 1:  # footers of a remote dataset: fetched in parallel
                pool = self._executor()
                futures = [pool.submit(self._metadata, k) for k in range(len(self.shards))]
                wait(futures)  # all of them, also when one fails: nothing keeps running behind an error
                mds = [f.result() for f in futures]
            else:
                mds = [self._metadata(k) for k in range(len(self.shards))]
            self._rg_rows = [[md.row_group(g).num_rows for g in range(md.num_row_groups)] for md in mds]
        return self._rg_rows

    def _rg_table(self) -> _RowGroups:
        if self._rg is None:
            sizes, shard_of, local = [], [], []
            for k, groups in enumerate(self._row_groups()):
                for g, n in enumerate(groups):
                    sizes.append(n)
                    shard_of.append(k)
                    local.append(g)
            self._rg = _RowGroups(starts=np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
                                  shard=np.asarray(shard_of, dtype=np.int64),
                                  local=np.asarray(local, dtype=np.int64))
        return self._rg

    def row_group_bounds(self) -> np.ndarray:
        """Global row index where each row group starts, plus ``len(self)`` at the end (for block shuffles)."""
        return self._rg_table().starts.copy()

    def _read_rg(self, g: int, read: list[str]) -> Any:
        """Row group ``g`` (global numbering) as an Arrow table."""
        rg = self._rg_table()
        k = int(rg.shard[g])
        with self._reading(k):
            return self._file(k).read_row_group(int(rg.local[g]), columns=read, use_threads=True)

    def _rg_arrays(self, g: int, read: list[str], table: Any = None) -> Batch:
        """Row group ``g`` converted to numpy as stored (cached: ``cache_row_groups`` of them); ``table`` is the
        row group when it was already read."""
        key = (g, tuple(read))
        arrays = self._cache.get(key)
        if arrays is not None:
            self._cache.move_to_end(key)
            return arrays
        arrays = self._convert(to_record_batch(self._read_rg(g, read) if table is None else table), read)
        if self.cache_row_groups:
            self._cache[key] = arrays
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return arrays

    def take(self, indices: Iterable[int] | np.ndarray, *, columns: Sequence[str] | None = None) -> Batch:
        """A batch of the rows at ``indices`` (global, any order, repeats allowed; negative counts from the end).

        Each row group holding requested rows is read and converted once (and kept in a small cache); the rows
        are gathered from it with numpy indexing, so the batch is a fresh copy.

        Raises:
            IndexError: an index outside ``[-len, len)``.
        """
        import pyarrow as pa

        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
        if idx.size == 0:
            schema = pa.schema([self.schema.field(c) for c in read] if self.schema is not None else [])
            return self.to_numpy(empty_batch(schema), cols)
        bad = (idx < -self._len) | (idx >= self._len)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} is out of range for {self._len} rows")
        idx = np.where(idx < 0, idx + self._len, idx)
        starts = self._rg_table().starts
        group = np.searchsorted(starts, idx, side="right") - 1
        local = idx - starts[group]
        uniq, inverse = np.unique(group, return_inverse=True)
        fetched: dict[int, Any] = {}
        missing = [int(g) for g in uniq if (int(g), tuple(read)) not in self._cache]
        if self.prefetch and len(missing) > 1:  # the batch's row groups fetched side by side
            fetched = dict(zip(missing, self._row_group_tables(missing, read), strict=True))
        parts = [self._rg_arrays(int(g), read, fetched.get(int(g))) for g in uniq]
        picks = [np.flatnonzero(inverse == j) for j in range(len(parts))]
        raw: Batch = {}
        for name in read:
            first = parts[0][name]
            if isinstance(first, np.ndarray):
                if len(parts) == 1:
                    raw[name] = first[local]
                else:
                    out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
                    for part, pick in zip(parts, picks, strict=True):
                        out[pick] = part[name][local[pick]]
                    raw[name] = out
            else:
                values: list[Any] = [None] * len(idx)
                for part, pick in zip(parts, picks, strict=True):
                    col = part[name]
                    for pos in pick.tolist():
                        v = col[local[pos]]
                        values[pos] = v.copy() if isinstance(v, np.ndarray) else v
                raw[name] = values
        return self._finish(raw, cols)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> Batch:
        """``ds[i]`` → one row; ``ds[a:b]`` or ``ds[[i, j, ...]]`` → a batch."""
        if isinstance(key, slice):
            return self.take(np.arange(self._len)[key])
        if isinstance(key, (int, np.integer)):
            return next(rows_of(self.take([int(key)])))
        return self.take(key)

    def column(self, name: str) -> np.ndarray | list[Any]:
        """One column over the whole dataset, read on its own (cheap for scalar columns like ``n_tokens``)."""
        self._check_columns([name])
        if self.prefetch or self._store is not None:
            tables = list(self._row_group_tables(range(len(self._rg_table().starts) - 1), [name]))
            parts = [self.to_numpy(t, [name])[name] for t in tables]
        else:
            parts = []
            for k in range(len(self.shards)):
                with self._reading(k):
                    table = self._file(k).read(columns=[name], use_threads=True)
                parts.append(self.to_numpy(table, [name])[name])
        if not parts:
            return np.zeros(0)
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        return [v for p in parts for v in p]

    # -- epochs for distributed / multi-worker training ------------------------------------------------------
    def epoch_plan(
        self,
        *,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        even: bool = False,
    ) -> list[PlanRange]:
        """The row ranges one (rank, worker) reads in an epoch (:func:`mmprep.dataset.plans.epoch_plan` over
        this dataset's row groups): every row exactly once across all ranks and workers; with ``even`` every rank
        gets ``len // world_size`` rows."""
        return epoch_plan(np.diff(self._rg_table().starts), epoch=epoch, seed=seed, shuffle=shuffle, rank=rank,
                          world_size=world_size, worker=worker, num_workers=num_workers, even=even)

    def iter_plan(
        self,
        plan: Sequence[tuple[int, int, int]],
        batch_size: int,
        *,
        shuffle_rng: np.random.Generator | None = None,
        window: int = 4,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of the rows of an :meth:`epoch_plan`, shuffled within windows of ``window`` row-group ranges.

        With ``shuffle_rng`` the rows of each window (a few row groups read together, at most ``window`` × ~32
        MB of pixels in memory) are permuted before batching; without it they come in plan order.
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        cols = self._check_columns(columns) if columns is not None else self.columns
        read = self._read_columns(cols)

        def windows() -> Iterator[Any]:
            import pyarrow as pa

            step = max(1, window) if shuffle_rng is not None else 1
            tables = self._row_group_tables([g for g, _, _ in plan], read)
            for w in range(0, len(plan), step):
                parts = [next(tables).slice(a, b - a) for _, a, b in plan[w:w + step]]
                table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
                if shuffle_rng is not None:
                    table = table.take(pa.array(shuffle_rng.permutation(table.num_rows)))
                yield from table.combine_chunks().to_batches(max_chunksize=batch_size)

        for rb in rebatch(windows(), batch_size, drop_last):
            yield self.to_numpy(rb, cols)

    # -- masks and vocabulary ------------------------------------------------------------------------------------
    def patch_mask(self, batch: Batch, patch_size: int | tuple[int, int], *, rule: str = "any") -> np.ndarray:
        """:func:`mmprep.dataset.arrays.patch_mask` of a batch's ``content_boxes`` for this dataset's image size."""
        if self.pixels is None:
            raise UsageError(f"{self.path}: patch masks need padded pixel tensors; this dataset stores "
                             f"{self.layout} images")
        if "content_boxes" not in batch:
            raise UsageError("the batch has no content_boxes column", hint="read it along with the pixels")
        return patch_mask(batch["content_boxes"], self.pixels.image_size, patch_size, rule=rule)

    def tag_names(self, vocab: str | os.PathLike[str] | None = None) -> list[str] | None:
        """Tag names by id, from ``vocab`` or the vocabulary file recorded at pack time when reachable (see
        :meth:`find_vocab`); None when no file with the recorded sha256 is found."""
        return self.find_vocab(vocab).names

    def find_vocab(self, vocab: str | os.PathLike[str] | None = None) -> VocabLookup:
        """Find the vocabulary the tag ids refer to, and say where it was found (or where it was looked for).

        See :func:`mmprep.dataset.vocab_lookup.find_vocab`: ``vocab``, then the path recorded at pack time
        (relative to the working directory, the dataset's folder and the folders above it), then the recorded
        file name inside the dataset's folder; the first whose sha256 matches the metadata wins.
        """
        root = self.path if isinstance(self.path, Path) else None
        return find_vocab(root, self.metadata, self.index.config.get("vocab"), vocab)

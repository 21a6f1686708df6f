"""``pack``: manifest → padded (or encoded) Parquet shards + ``index.json`` + ``rejected.jsonl``.

The work is split into *chunks* of consecutive input rows (after the optional shuffle); chunk ``k`` becomes
``shard-k``. Chunk boundaries depend only on the input and the flags, never on the number of workers, so output
is byte-identical across runs and worker counts, and ``--resume`` can skip chunks whose shard is intact.
Workers write their own shards (pixels never travel through a pipe); the parent merges the per-chunk records
into the index, written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmprep.errors import RunFailed, UsageError
from mmprep.inputs.manifest import iter_samples
from mmprep.pack.processor import ROW_GROUP_BYTES, PackConfig, SampleProcessor, default_row_group_rows, with_defaults
from mmprep.records import Rejected, Sample
from mmprep.runtime.shards import (
    INDEX_NAME,
    REJECTS_NAME,
    RUN_STATS_NAME,
    OutputDir,
    shard_name,
    write_shard,
)
from mmprep.runtime.storage import PackLocations, read_parquet_schema, staged_file, write_file, write_json_file

if TYPE_CHECKING:
    from mmprep.runtime.engines.local import WorkerPool
    from mmprep.runtime.storage import Location, RemoteOutputDir

__all__ = ["DEFAULT_SHARD_SIZE", "PackReport", "estimate_row_bytes", "iter_items", "pack", "pack_chunk"]

DEFAULT_SHARD_SIZE = 512 * 1024 * 1024
# With the default shard size, inputs smaller than MIN_SHARDS full shards are cut into MIN_SHARDS shards (of at
# least MIN_SHARD_ROWS rows), so that they keep several workers busy.
MIN_SHARDS = 16
MIN_SHARD_ROWS = 16
ProgressFn = Callable[[int, int], None]  # (rows_done_delta, images_done_delta)


@dataclass
class PackReport:
    """The outcome of a pack run (the ``--json`` report)."""

    out: str
    shards: list[dict[str, Any]]
    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    images_written: int
    images_dropped: int
    tags_dropped: int
    text_truncated: int
    image_count_histogram: dict[str, int]
    rows_per_shard: int
    bytes_written: int
    seconds: float = 0.0
    samples_per_s: float = 0.0
    images_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    resumed_shards: int = 0
    workers: int = 1
    engine: str = "local"
    reject_rate: float = 0.0
    failed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def iter_items(cfg: PackConfig, source: str | Location | None = None) -> Iterator[Sample | Rejected]:
    """Manifest items in input order; later duplicates of an id are rejected (``duplicate_id``).

    ``source`` is where to read the manifest when it is not ``cfg.manifest`` itself (an opened remote location).
    """
    seen: dict[str, int] = {}
    for item in iter_samples(source if source is not None else cfg.manifest, cfg.columns, fmt=cfg.format,
                             require_images=True):
        if isinstance(item, Sample):
            first = seen.setdefault(item.id, item.line)
            if first != item.line:
                yield Rejected(item.line, item.id, "manifest", "duplicate_id",
                               f"{item.source}:{item.line}: id '{item.id}' already used on line {first}")
                continue
        yield item


def _rows_for(cfg: PackConfig, row_bytes: int) -> int:
    """Rows per shard from ``--rows-per-shard``, or ``--shard-size`` divided by the bytes of a row (for padded rows
    exact before compression; for ``--pad none`` an estimate, so the limit is a target)."""
    return cfg.rows_per_shard or max(1, (cfg.shard_size or DEFAULT_SHARD_SIZE) // row_bytes)


def estimate_row_bytes(
    cfg: PackConfig, head: list[Sample | Rejected], image_bytes: Callable[[str], int] | None = None
) -> int:
    """Bytes of one packed row: exact for padded rows, the mean over ``head`` of the image files for ``--pad none``."""
    text_bytes = (cfg.text.max_length * 5 if cfg.tokenizer else 0) + 512
    if cfg.pad == "max":
        return cfg.pixel_bytes() + text_bytes
    sizes = []
    root = cfg.root
    for item in head:
        if isinstance(item, Sample):
            total = 0
            for ref in item.images[: cfg.limit_images]:
                if image_bytes is not None:
                    total += image_bytes(ref)
                    continue
                with contextlib.suppress(OSError):
                    total += (root / ref).stat().st_size
            sizes.append(total)
    return max(1, (sum(sizes) // len(sizes) if sizes else 256 * 1024) + text_bytes)


def _rereadable(manifest: str) -> bool:
    """A regular file or a remote object (not stdin, a FIFO or ``<(process substitution)``): readable twice."""
    from mmprep.runtime.storage import is_local, local_path

    if manifest == "-":
        return False
    if not is_local(manifest):
        return True
    try:
        return stat.S_ISREG(os.stat(local_path(manifest)).st_mode)
    except OSError:
        return False


_POLICIES = ("on_error", "max_reject_rate")


def _identity(cfg: PackConfig, rows_per_shard: int, source: str | Location | None = None) -> dict[str, Any]:
    manifest_hash = None
    if source is not None and not isinstance(source, str):
        from mmprep.runtime.storage import file_digest

        manifest_hash = file_digest(source)
    elif _rereadable(cfg.manifest):  # hashing a pipe would consume the rows the run has not read yet
        from mmprep.runtime.storage import local_path

        h = hashlib.sha256()
        with open(local_path(cfg.manifest), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        manifest_hash = h.hexdigest()
    config = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
    for policy in _POLICIES:  # they decide whether the run fails, not what the shards hold
        config.pop(policy, None)
    return {
        "config": config,
        "manifest_sha256": manifest_hash,
        "rows_per_shard": rows_per_shard,
    }


def pack_chunk(
    processor: SampleProcessor,
    out_dir: Path | Location,
    index: int,
    items: list[Sample | Rejected],
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Process one chunk and write its shard; returns the chunk record (also the resume record).

    ``out_dir`` is a local folder, or a remote location (the shard is staged locally, then uploaded).
    """
    cfg = processor.cfg
    state: dict[str, Any] = {}
    done = [0, 0]

    def batches() -> Iterator[Any]:
        for batch, res in processor.process_chunk(index, items, batch_rows=default_row_group_rows(cfg)):
            state["res"] = res
            if progress is not None:
                rows = res.rows + len(res.rejected)
                progress(rows - done[0], res.images_written - done[1])
                done[0], done[1] = rows, res.images_written
            yield batch

    def shard_meta() -> dict[str, str]:
        res = state["res"]
        hist = {str(k): v for k, v in sorted(res.image_count_histogram.items())}
        return {"mmprep.shard": json.dumps({"index": index, "rows": res.rows, "image_count_histogram": hist,
                                            "first_line": res.first_line, "last_line": res.last_line},
                                           sort_keys=True)}

    with staged_file(out_dir, shard_name(index)) as target:
        info = write_shard(target, processor.schema, batches(),
                           compression=cfg.compression, extra_metadata=shard_meta)
    res = state["res"]
    if progress is not None:
        progress(len(items) - done[0], res.images_written - done[1])
    return {
        "index": index,
        "items": len(items),
        "shard": asdict(info),
        "rows": res.rows,
        "rejected": [r.to_dict() for r in res.rejected],
        "image_count_histogram": {str(k): v for k, v in sorted(res.image_count_histogram.items())},
        "images_written": res.images_written,
        "images_dropped": res.images_dropped,
        "tags_dropped": res.tags_dropped,
        "text_truncated": res.text_truncated,
        "first_line": res.first_line,
        "last_line": res.last_line,
    }


def _chunks(items: Iterable[Sample | Rejected], size: int) -> Iterator[tuple[int, list[Sample | Rejected]]]:
    chunk: list[Sample | Rejected] = []
    index = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield index, chunk
            index += 1
            chunk = []
    if chunk or index == 0:
        yield index, chunk


def pack(
    cfg: PackConfig,
    *,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    progress: ProgressFn | None = None,
    on_total: Callable[[int | None], None] | None = None,
    ray_address: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> PackReport:
    """Run a pack job and return its report.

    Args:
        cfg: the configuration (validated here).
        workers: worker processes (default: all cores); 1 runs in this process.
        resume: keep intact shards of an interrupted run with the same input and flags.
        overwrite: replace mmprep's files from an earlier run in ``cfg.out``.
        engine: ``local`` (process pool) or ``ray``.
        progress: called with (rows, images) increments as work completes.
        on_total: called once with the number of input rows when known (after a shuffle), else None.
        ray_address: the Ray cluster for ``engine="ray"`` (default: start a local Ray with ``workers`` CPUs).
        storage_options: fsspec keyword arguments for remote URIs (credentials, endpoint); never recorded.

    Raises:
        UsageError: bad configuration or output directory (exit 2).
        RunFailed: a failed run: ``--on-error fail`` met a bad row, a worker died, too many rejects (exit 1).
        MissingDependencyError: ``engine="ray"`` without Ray installed (exit 2).
    """
    cfg.validate()
    cfg = with_defaults(cfg)
    if resume and not _rereadable(cfg.manifest):
        raise UsageError("--resume needs a manifest file, not stdin or a pipe")
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, got '{engine}'")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}", hint="leave it out to use every core")
    requested_workers = workers
    workers = workers or os.cpu_count() or 1
    if engine == "ray":
        from mmprep.runtime.engines.ray import check_address, require_ray

        require_ray()  # before anything is read or written: fail at once with the install hint
        check_address(ray_address)  # and a cluster that does not answer: before the output directory is made
    start = time.perf_counter()
    where = PackLocations.open(cfg, storage_options, workers=workers, engine=engine)
    with contextlib.ExitStack() as stack:
        pool = None
        if engine == "local" and workers > 1:
            from mmprep.runtime.engines.local import WorkerPool

            # Started now, so the workers import while this process reads the manifest and loads the tokenizer.
            pool = stack.enter_context(WorkerPool(workers, with_progress=progress is not None))
        report, resumed, workers, extra = _pack_run(cfg, where, pool, workers, requested_workers, resume=resume,
                                                    overwrite=overwrite, engine=engine, progress=progress,
                                                    on_total=on_total, ray_address=ray_address)
    report.seconds = time.perf_counter() - start
    report.samples_per_s = report.written / report.seconds if report.seconds else 0.0
    report.images_per_s = report.images_written / report.seconds if report.seconds else 0.0
    report.peak_rss_mb = _peak_rss_mb()
    report.resumed_shards = resumed
    report.workers = workers
    report.engine = engine
    report.extra.update(extra)
    write_json_file(where.out, RUN_STATS_NAME, {
        "seconds": round(report.seconds, 3), "samples_per_s": round(report.samples_per_s, 2),
        "images_per_s": round(report.images_per_s, 2), "peak_rss_mb": round(report.peak_rss_mb, 1),
        "workers": workers, "resumed_shards": resumed, "engine": engine, **extra,
    })
    return report


def _pack_run(
    cfg: PackConfig,
    where: PackLocations,
    pool: WorkerPool | None,
    workers: int,
    requested_workers: int | None,
    *,
    resume: bool,
    overwrite: bool,
    engine: str,
    progress: ProgressFn | None,
    on_total: Callable[[int | None], None] | None,
    ray_address: str | None,
) -> tuple[PackReport, int, int, dict[str, Any]]:
    """Read, process and write; returns (report without timings, resumed shards, workers used, engine stats)."""
    cfg = where.cfg
    source = None if isinstance(where.manifest, str) else where.manifest
    items_iter = iter_items(cfg, source)
    if cfg.shuffle:
        import numpy as np

        all_items = list(items_iter)
        order = np.random.default_rng(cfg.seed).permutation(len(all_items))
        items_iter = iter([all_items[i] for i in order])
        if on_total:
            on_total(len(all_items))
    head: list[Sample | Rejected] = []
    for item in items_iter:
        head.append(item)
        if len(head) >= 64:
            break
    row_bytes = estimate_row_bytes(cfg, head, where.images.size if where.images is not None else None)
    rows_per_shard = _rows_for(cfg, row_bytes)
    if cfg.row_group_rows is None:  # --pad none: row groups of ~32 MB of encoded images, like padded ones
        cfg = replace(cfg, row_group_rows=max(1, min(1024, ROW_GROUP_BYTES // row_bytes)))
    if cfg.rows_per_shard is None and cfg.shard_size is None:
        # The default size: a small input is still cut into MIN_SHARDS shards, so every worker gets work. Whether
        # the input is small is found by reading ahead (the rows read are kept), so the plan depends on the
        # input alone, never on the number of workers.
        for item in items_iter:
            head.append(item)
            if len(head) >= MIN_SHARDS * rows_per_shard:
                break
        else:
            rows_per_shard = min(rows_per_shard, max(MIN_SHARD_ROWS, math.ceil(len(head) / MIN_SHARDS)))

    def all_items_iter() -> Iterator[Sample | Rejected]:
        yield from head
        yield from items_iter

    # Built once, before the output is touched: a bad tokenizer or vocabulary fails fast (exit 2), and workers
    # receive this processor pickled (the tokenizer travels as its JSON, so workers do not import transformers).
    processor = SampleProcessor(cfg)
    processor.store = where.images  # images on remote storage are read through it (None: local files)
    extra: dict[str, Any] = {}

    with where.output_dir(resume=resume, overwrite=overwrite) as out_dir:
        out_dir.open(_identity(cfg, rows_per_shard, source))
        chunks = _chunks(all_items_iter(), rows_per_shard)
        if engine == "ray":
            from mmprep.runtime.engines.ray import run_chunks_ray

            records, resumed = run_chunks_ray(processor, out_dir, chunks, workers=requested_workers,
                                              progress=progress, address=ray_address, stats=extra)
            workers = extra.get("ray_workers", workers)
        elif workers == 1:
            records, resumed = _run_inline(processor, out_dir, chunks, progress)
        else:
            from mmprep.runtime.engines.local import run_chunks_pool

            records, resumed = run_chunks_pool(processor, out_dir, chunks, workers=workers, progress=progress,
                                               pool=pool)
        report = _finish(cfg, out_dir.path, records, rows_per_shard)
    return report, resumed, workers, extra


def _run_inline(
    processor: SampleProcessor,
    out_dir: OutputDir | RemoteOutputDir,
    chunks: Iterable[tuple[int, list[Sample | Rejected]]],
    progress: ProgressFn | None,
) -> tuple[list[dict[str, Any]], int]:
    records: list[dict[str, Any]] = []
    resumed = 0
    for index, items in chunks:
        rec = out_dir.finished_chunk(index)
        if rec is not None and rec.get("items") == len(items):
            resumed += 1
            if progress:
                progress(len(items), rec["images_written"])
        else:
            rec = pack_chunk(processor, out_dir.path, index, items, progress)
            out_dir.save_chunk(index, rec)
        check_fail_fast(processor.cfg, rec)
        records.append(rec)
    return records, resumed


def finished_record(
    out_dir: OutputDir | RemoteOutputDir, index: int, items: list[Sample | Rejected], progress: ProgressFn | None
) -> dict[str, Any] | None:
    """With ``--resume``: the record of chunk ``index`` when an earlier run finished it intact (its rows and images
    are reported to ``progress``), else None."""
    rec = out_dir.finished_chunk(index)
    if rec is None or rec.get("items") != len(items):
        return None
    if progress is not None:
        progress(len(items), rec["images_written"])
    return rec


def check_fail_fast(cfg: PackConfig, record: dict[str, Any]) -> None:
    """With ``--on-error fail``, stop at the first rejected row (no index is written)."""
    if cfg.on_error == "fail" and record["rejected"]:
        first = min(record["rejected"], key=lambda r: r["line"])
        raise RunFailed(
            f"--on-error fail: {first['detail'] or first['reason']} (stage {first['stage']}, reason {first['reason']})",
            hint="fix that row, or use --on-error skip to write bad rows to rejected.jsonl and go on",
        )


def _finish(cfg: PackConfig, out: Path | Location, records: list[dict[str, Any]], rows_per_shard: int) -> PackReport:
    records = sorted(records, key=lambda r: r["index"])
    rejected = sorted((r for rec in records for r in rec["rejected"]), key=lambda r: r["line"])
    by_reason = Counter(r["reason"] for r in rejected)
    hist: Counter[str] = Counter()
    for rec in records:
        hist.update(rec["image_count_histogram"])
    read = sum(rec["items"] for rec in records)
    written = sum(rec["rows"] for rec in records)
    if read != written + len(rejected):
        raise RunFailed(f"row accounting failed: read {read}, written {written}, rejected {len(rejected)}")
    shards = [
        {**rec["shard"], "image_count_histogram": rec["image_count_histogram"],
         "first_line": rec["first_line"], "last_line": rec["last_line"]}
        for rec in records
    ]
    sorted_hist = {k: hist[k] for k in sorted(hist, key=int)}
    totals = {
        "read": read,
        "written": written,
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "images_written": sum(rec["images_written"] for rec in records),
        "images_dropped_by_limit": sum(rec["images_dropped"] for rec in records),
        "tags_dropped_unknown": sum(rec["tags_dropped"] for rec in records),
        "text_truncated": sum(rec["text_truncated"] for rec in records),
        "image_count_histogram": sorted_hist,
        "bytes": sum(s["bytes"] for s in shards),
    }
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejected)
    write_file(out, REJECTS_NAME, lines.encode())
    schema_meta = None
    if shards:
        from mmprep.pack.schema import read_metadata

        schema_meta = read_metadata(read_parquet_schema(out, shards[0]["path"]))
    index = {
        "format": "mmprep-index",
        "format_version": 1,
        "config": cfg.to_dict(),
        "rows_per_shard": rows_per_shard,
        "metadata": schema_meta,
        "shards": shards,
        "rejects": REJECTS_NAME,
        "totals": totals,
    }
    failed = _failure(cfg, read, written, len(rejected), by_reason)
    if failed is None:
        write_json_file(out, INDEX_NAME, index)  # last: its presence means the dataset is complete
    report = PackReport(
        out=str(out),
        shards=shards,
        read=read,
        written=written,
        rejected=len(rejected),
        rejected_by_reason=totals["rejected_by_reason"],
        images_written=totals["images_written"],
        images_dropped=totals["images_dropped_by_limit"],
        tags_dropped=totals["tags_dropped_unknown"],
        text_truncated=totals["text_truncated"],
        image_count_histogram=sorted_hist,
        rows_per_shard=rows_per_shard,
        bytes_written=totals["bytes"],
        reject_rate=(len(rejected) / read) if read else 0.0,
    )
    report.failed = failed
    return report


def _failure(cfg: PackConfig, read: int, written: int, rejected: int, by_reason: Counter[str]) -> str | None:
    """Why a finished run failed (then no index is written), or None."""
    if read and not written:
        top = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common(3))
        return f"no row was written: all {read} rows were rejected ({top})"
    rate = rejected / read if read else 0.0
    if rate > cfg.max_reject_rate:
        return (f"{rejected} of {read} rows rejected ({rate:.1%}), above --max-reject-rate {cfg.max_reject_rate:.1%}; "
                "no index.json was written")
    return None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and its (finished) children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


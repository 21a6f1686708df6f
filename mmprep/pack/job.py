"""``pack``: manifest -> padded (or encoded) Parquet shards + ``index.json`` + ``rejected.jsonl``.

The work is split into *chunks* of consecutive input rows (after the optional shuffle); chunk ``k`` becomes
``shard-k``. Chunk boundaries depend only on the input and the flags (:mod:`mmprep.pack.plan`), never on the
number of workers, so output is byte-identical across runs, worker counts and engines, and ``--resume`` can keep
chunks whose shard is intact. Workers write their own shards (pixels never travel through a pipe); the job runtime
(:func:`mmprep.runtime.job.run_job`) merges the chunk records, and this module turns them into the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmprep.dataset.format import (
    INDEX_NAME,
    REJECTS_NAME,
    RUN_STATS_NAME,
    SHARD_METADATA_KEY,
    ChunkRecord,
    Index,
    RejectRecord,
    ShardInfo,
    Totals,
    shard_name,
)
from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.sources import ImageSource
from mmprep.pack.config import PackConfig
from mmprep.pack.plan import PackPlan, plan_pack, rereadable
from mmprep.pack.processor import SampleProcessor
from mmprep.pack.writer import write_shard
from mmprep.records import Rejected, Sample
from mmprep.runtime.engines.base import Engine, InlineEngine, ProgressFn
from mmprep.runtime.job import Chunk, JobRun, Policy, Publication, run_job
from mmprep.runtime.outdir import ChunkEntry, OutputDir
from mmprep.runtime.storage import Location
from mmprep.text.render import inline_images

__all__ = ["PackJob", "PackReport", "PackTask", "pack"]

Item = Sample | Rejected
#: Modules a local worker imports while the parent plans.
_PRELOAD = ("pyarrow.parquet", "mmprep.pack.job", "mmprep.images.fast", "simplejpeg", "tokenizers")


@dataclass
class PackReport:
    """The outcome of a pack run (the ``--json`` report)."""

    out: str
    shards: list[ShardInfo]
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


def input_signature(items: list[Item], images: ImageSource) -> str:
    """A digest of the size and modification time of every image the chunk's rows refer to: ``--resume`` redoes a
    chunk whose images changed since its shard was written."""
    h = hashlib.sha256()
    for item in items:
        if not isinstance(item, Sample):
            continue
        for ref in list(item.images) or inline_images(item.text):
            h.update(f"{ref}\0{images.signature(ref)}\n".encode(errors="surrogatepass"))
    return h.hexdigest()


@dataclass(frozen=True)
class PackTask:
    """The work of one chunk, run in a worker: process the rows and write the chunk's shard."""

    processor: SampleProcessor
    out: Location

    def __call__(self, chunk: Chunk[list[Item]], progress: ProgressFn | None) -> ChunkRecord:
        processor = self.processor
        index, items = chunk.index, chunk.items
        signature = input_signature(items, processor.images)
        state: dict[str, Any] = {}
        done = [0, 0]

        def batches() -> Iterator[Any]:
            for batch, res in processor.process_chunk(index, items):
                state["res"] = res
                if progress is not None:
                    rows = res.rows + len(res.rejected)
                    progress(rows - done[0], res.images_written - done[1])
                    done[0], done[1] = rows, res.images_written
                yield batch

        def shard_meta() -> dict[str, str]:
            res = state["res"]
            hist = {str(k): v for k, v in sorted(res.image_count_histogram.items())}
            return {SHARD_METADATA_KEY: json.dumps({"index": index, "rows": res.rows, "image_count_histogram": hist,
                                                    "first_line": res.first_line, "last_line": res.last_line},
                                                   sort_keys=True)}

        name = shard_name(index)
        with self.out.child(name).staged() as target:
            info = write_shard(target, processor.schema, batches(), compression=processor.cfg.compression,
                               extra_metadata=shard_meta, name=name)
        res = state["res"]
        if progress is not None:
            progress(len(items) - done[0], res.images_written - done[1])
        hist = {str(k): v for k, v in sorted(res.image_count_histogram.items())}
        shard = ShardInfo(path=info.path, rows=info.rows, bytes=info.bytes, sha256=info.sha256,
                          image_count_histogram=hist, first_line=res.first_line, last_line=res.last_line)
        return ChunkRecord(
            index=index, items=len(items), shard=shard, rows=res.rows,
            rejected=tuple(RejectRecord(r.line, r.id, r.stage, r.reason, r.detail) for r in res.rejected),
            images_written=res.images_written, images_dropped=res.images_dropped, tags_dropped=res.tags_dropped,
            text_truncated=res.text_truncated, signature=signature,
        )


class PackJob:
    """The pack job as the runtime runs it: chunks of manifest rows -> shards -> one index."""

    ordered = False

    def __init__(self, plan: PackPlan, processor: SampleProcessor) -> None:
        self.plan = plan
        self.processor = processor
        tokenizer_key = None
        if plan.cfg.tokenizer:
            from mmprep.text.cache import tokenizer_cache_key

            tokenizer_key = tokenizer_cache_key(plan.cfg.tokenizer)
        self._identity = plan.identity(tokenizer_key=tokenizer_key,
                                       vocab_sha256=processor.vocab.sha256 if processor.vocab else None)

    def identity(self) -> dict[str, Any]:
        return self._identity

    def chunks(self) -> Iterator[Chunk[list[Item]]]:
        size = self.plan.rows_per_shard
        chunk: list[Item] = []
        index = 0
        for item in self.plan.items():
            chunk.append(item)
            if len(chunk) == size:
                yield Chunk(index, chunk, len(chunk))
                index += 1
                chunk = []
        if chunk:
            yield Chunk(index, chunk, len(chunk))

    def task(self) -> PackTask:
        return PackTask(self.processor, self.plan.out)

    def restore(self, entry: ChunkEntry, chunk: Chunk[list[Item]], out: OutputDir) -> ChunkRecord | None:
        try:
            rec = ChunkRecord.from_json(entry.record)
        except (KeyError, TypeError, ValueError, AttributeError, InputError):
            return None  # a damaged record: the chunk is redone
        if rec.index != chunk.index or rec.items != chunk.size:
            return None
        if not out.intact(rec.shard.path, rec.shard.bytes, rec.shard.sha256):
            return None
        if rec.signature != input_signature(chunk.items, self.processor.images):
            return None  # an image changed since the shard was written: redo the chunk
        return rec

    def accept(self, record: ChunkRecord, out: OutputDir) -> None:
        if not out.visible(record.shard.path, record.shard.bytes):
            raise RunFailed(
                f"shard {record.shard.path} written by a worker is not visible in {out}",
                hint="on a multi-node cluster --out must be storage every node shares (a shared mount or an object "
                     "store such as s3://)",
            )

    def finish(self, records: list[ChunkRecord], run: JobRun[ChunkRecord], out: OutputDir) -> Publication:
        if out.local:  # shards are renamed into place without a folder fsync each: one per folder, before the index
            from mmprep.runtime.files import fsync_dir

            for folder in sorted({os.path.dirname(out.child(rec.shard.path).os_path) for rec in records}):
                fsync_dir(folder)
        rejected = sorted((r for rec in records for r in rec.rejected), key=lambda r: r.line)
        hist: Counter[str] = Counter()
        for rec in records:
            hist.update(rec.image_count_histogram)
        shards = tuple(rec.shard for rec in records)
        totals = Totals(
            read=run.read, written=run.written, rejected=run.rejected, rejected_by_reason=run.rejected_by_reason,
            images_written=sum(rec.images_written for rec in records),
            images_dropped_by_limit=sum(rec.images_dropped for rec in records),
            tags_dropped_unknown=sum(rec.tags_dropped for rec in records),
            text_truncated=sum(rec.text_truncated for rec in records),
            image_count_histogram={k: hist[k] for k in sorted(hist, key=int)},
            bytes=sum(s.bytes for s in shards),
        )
        self.totals = totals
        from mmprep.pack.schema import read_metadata

        index = Index(config=self.plan.recorded_config(), rows_per_shard=self.plan.rows_per_shard,
                      metadata=read_metadata(self.processor.schema) if shards else None, shards=shards,
                      totals=totals)
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in rejected)
        return Publication(files=((REJECTS_NAME, lines.encode()),), index=(INDEX_NAME, index.dumps()),
                           stats_name=RUN_STATS_NAME)


def _is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".parquet") and name[6:-8].isdigit()


def make_engine(engine: str, workers: int | None, *, ray_address: str | None, progress: bool) -> Engine:
    """The engine for ``--engine``/``--workers`` (a local pool starts its workers now, to warm up while planning).

    Raises:
        UsageError: an unknown engine, a bad worker count, Ray missing or its address unreachable.
    """
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, got '{engine}'")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}", hint="leave it out to use every core")
    if engine == "ray":
        from mmprep.runtime.engines.ray import RayEngine

        return RayEngine(workers, ray_address, size_of=lambda chunk: chunk.size)
    n = workers or os.cpu_count() or 1
    if n == 1:
        return InlineEngine()
    from mmprep.runtime.engines.local import LocalEngine

    return LocalEngine(n, with_progress=progress, preload=_PRELOAD, setup=_worker_setup)


def _worker_setup() -> None:
    """In each pool worker: one thread for OpenCV and the tokenizer (their own thread pools would spin on the cores
    the other workers use; the processes are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import cv2

    cv2.setNumThreads(1)


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
        overwrite: replace the files an earlier run wrote in ``cfg.out``.
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
    start = time.perf_counter()
    cfg.validate()
    if resume and not rereadable(cfg.manifest):
        raise UsageError("--resume needs a manifest file, not stdin or a pipe")
    with make_engine(engine, workers, ray_address=ray_address, progress=progress is not None) as eng:
        plan = plan_pack(cfg, storage_options, workers=eng.workers, engine=engine)
        if on_total is not None and plan.total is not None:
            on_total(plan.total)
        # Built once, before the output is touched: a bad tokenizer or vocabulary fails fast (exit 2), and workers
        # receive this processor pickled (the tokenizer travels as its JSON, so workers do not import transformers).
        processor = SampleProcessor(cfg, plan.images, plan.row_group_rows)
        job = PackJob(plan, processor)
        out = OutputDir(plan.out, resume=resume, overwrite=overwrite,
                        fixed_names=(INDEX_NAME, REJECTS_NAME, RUN_STATS_NAME), temp_owner=_is_shard_name,
                        kind="packed dataset")
        run = run_job(job, eng, out, policy=Policy(on_error=cfg.on_error, max_reject_rate=cfg.max_reject_rate),
                      progress=progress, started=start)
    totals = job.totals
    failed = run.failed
    if failed is not None and run.written:
        failed += f"; no {INDEX_NAME} was written"
    return PackReport(
        out=str(plan.out), shards=[r.shard for r in run.records], read=run.read, written=run.written,
        rejected=run.rejected, rejected_by_reason=run.rejected_by_reason, images_written=totals.images_written,
        images_dropped=totals.images_dropped_by_limit, tags_dropped=totals.tags_dropped_unknown,
        text_truncated=totals.text_truncated, image_count_histogram=totals.image_count_histogram,
        rows_per_shard=plan.rows_per_shard, bytes_written=totals.bytes, seconds=run.seconds,
        samples_per_s=run.written / run.seconds if run.seconds else 0.0,
        images_per_s=totals.images_written / run.seconds if run.seconds else 0.0, peak_rss_mb=run.peak_rss_mb,
        resumed_shards=run.resumed, workers=run.workers, engine=run.engine,
        reject_rate=run.rejected / run.read if run.read else 0.0, failed=failed, extra=dict(run.stats),
    )

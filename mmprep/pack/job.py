"""``pack``: manifest -> padded (or encoded) Parquet shards of one split + ``index.json`` + the split's rejects.

The output folder has the Hugging Face Hub layout (:mod:`mmprep.dataset.format`): the shards alone in ``data/``,
named ``data/{split}-{k:05d}-of-{n:05d}.parquet``, a dataset card ``README.md`` and ``index.json`` listing every
split, the split's rejects and run statistics beside ``data/``. Packing another split into the same folder adds
it: the other splits' files are never touched; the index and the card are rewritten with this split's entry
(withdrawn from both when the run starts, put back when it finishes).

The work is split into *chunks* of consecutive input rows (after the optional shuffle); chunk ``k`` becomes
shard ``k``. Chunk boundaries depend only on the input and the flags (:mod:`mmprep.pack.plan`), never on the
number of workers, so output is byte-identical across runs, worker counts and engines, and ``--resume`` can keep
chunks whose shard is intact. Workers write their own shards (pixels never travel through a pipe); the job runtime
(:func:`mmprep.runtime.job.run_job`) merges the chunk records, and this module turns them into the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmprep.dataset.format import (
    CARD_NAME,
    DATA_DIR,
    INDEX_NAME,
    SHARD_METADATA_KEY,
    ChunkRecord,
    Index,
    IndexFile,
    RejectRecord,
    ShardInfo,
    Totals,
    rejects_name,
    run_stats_name,
    shard_name,
)
from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.sources import ImageSource
from mmprep.pack.card import dataset_card
from mmprep.pack.config import PackConfig
from mmprep.pack.plan import PackPlan, plan_pack, rereadable
from mmprep.pack.preflight import check_first_images
from mmprep.pack.processor import SampleProcessor
from mmprep.pack.writer import write_shard
from mmprep.records import Rejected, Sample, image_ref_key
from mmprep.runtime.engines import make_engine
from mmprep.runtime.engines.base import ProgressFn
from mmprep.runtime.job import Chunk, JobRun, Policy, Publication, run_job
from mmprep.runtime.outdir import ChunkEntry, OutputDir
from mmprep.runtime.storage import Location
from mmprep.text.render import inline_images

__all__ = ["PackJob", "PackReport", "PackTask", "pack"]

Item = Sample | Rejected
#: Modules a local worker imports while the parent plans.
_PRELOAD = ("pyarrow.parquet", "mmprep.pack.job", "mmprep.images.fast", "simplejpeg", "tokenizers")
#: How often a worker reports the rows and images it finished (seconds).
PROGRESS_EVERY_S = 0.2


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
    device: str = "cpu"
    split: str = "train"
    rejects: str = ""
    columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def input_signature(items: list[Item], images: ImageSource) -> str:
    """A digest of the size and modification time of every image the chunk's rows refer to: ``--resume`` redoes a
    chunk whose images changed since its shard was written."""
    h = hashlib.sha256()
    for item in items:
        if not isinstance(item, Sample):
            continue
        for ref in list(item.images) or inline_images(item.text):
            h.update(f"{image_ref_key(ref)}\0{images.signature(ref)}\n".encode(errors="surrogatepass"))
    return h.hexdigest()


@dataclass(frozen=True)
class PackTask:
    """The work of one chunk, run in a worker: process the rows and write the chunk's shard."""

    processor: SampleProcessor
    out: Location
    split: str = "train"
    shards: int = 1

    def __call__(self, chunk: Chunk[list[Item]], progress: ProgressFn | None) -> ChunkRecord:
        processor = self.processor
        index, items = chunk.index, chunk.items
        signature = input_signature(items, processor.images)
        state: dict[str, Any] = {}
        ticker = _Ticker(progress) if progress is not None else None

        def batches() -> Iterator[Any]:
            for batch, res in processor.process_chunk(index, items, ticker.row if ticker is not None else None,
                                                      reuse_buffer=True):  # each batch is written before the next
                state["res"] = res
                yield batch

        def shard_meta() -> dict[str, str]:
            res = state["res"]
            hist = {str(k): v for k, v in sorted(res.image_count_histogram.items())}
            return {SHARD_METADATA_KEY: json.dumps({"index": index, "rows": res.rows, "image_count_histogram": hist,
                                                    "first_line": res.first_line, "last_line": res.last_line},
                                                   sort_keys=True)}

        name = shard_name(index, self.split, self.shards)
        with self.out.child(name).staged() as target:
            info = write_shard(target, processor.schema, batches(), compression=processor.cfg.compression,
                               extra_metadata=shard_meta, name=name)
        res = state["res"]
        if ticker is not None:  # the chunk's exact totals, whatever was sent so far
            ticker.finish(len(items), res.images_written)
        hist = {str(k): v for k, v in sorted(res.image_count_histogram.items())}
        shard = ShardInfo(path=info.path, rows=info.rows, bytes=info.bytes, sha256=info.sha256,
                          image_count_histogram=hist, first_line=res.first_line, last_line=res.last_line)
        return ChunkRecord(
            index=index, items=len(items), shard=shard, rows=res.rows,
            rejected=tuple(RejectRecord(r.line, r.id, r.stage, r.reason, r.detail) for r in res.rejected),
            images_written=res.images_written, images_dropped=res.images_dropped, tags_dropped=res.tags_dropped,
            text_truncated=res.text_truncated, signature=signature,
        )


class _Ticker:
    """Progress from inside a chunk: rows and images counted as each row is done, sent at most every
    :data:`PROGRESS_EVERY_S` seconds (a local worker sends them through a queue)."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.rows = self.images = 0  # counted
        self.sent_rows = self.sent_images = 0
        self.last = time.monotonic()

    def row(self, images: int) -> None:
        self.rows += 1
        self.images += images
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self._send(self.rows, self.images)

    def finish(self, rows: int, images: int) -> None:
        self._send(rows, images)

    def _send(self, rows: int, images: int) -> None:
        if rows != self.sent_rows or images != self.sent_images:
            self.progress(rows - self.sent_rows, images - self.sent_images)
            self.sent_rows, self.sent_images = rows, images


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

    @property
    def split(self) -> str:
        return self.plan.cfg.split

    def begin(self, out: OutputDir) -> None:
        """Withdraw this split from the index and the card while it is (re)written: the index lists only splits
        whose every shard is in place."""
        index = self._read_index(out)
        if index is None or self.split not in index.splits:
            return
        rest = IndexFile({k: v for k, v in index.splits.items() if k != self.split})
        if rest.splits:
            out.write(CARD_NAME, dataset_card(rest))
            out.write(INDEX_NAME, rest.dumps())
        else:
            out.delete_shared(INDEX_NAME)
            out.delete_shared(CARD_NAME)

    def _read_index(self, out: OutputDir) -> IndexFile | None:
        """The index other runs wrote into the folder (None when there is none)."""
        raw = out.read(INDEX_NAME)
        if raw is None:
            return None
        try:
            return IndexFile.from_json(json.loads(raw), f"{out}/{INDEX_NAME}")
        except (ValueError, InputError) as exc:
            raise UsageError(f"{out}/{INDEX_NAME}: cannot add split '{self.split}': {exc}",
                             hint="run `mmprep verify` on the folder, or pack into another --out") from None

    def chunks(self) -> Iterator[Chunk[list[Item]]]:
        size = self.plan.rows_per_shard
        chunk: list[Item] = []
        index = 0
        for item in self.plan.items():
            chunk.append(item)
            if len(chunk) == size:
                self._check_count(index + 1, done=False)
                yield Chunk(index, chunk, len(chunk))
                index += 1
                chunk = []
        if chunk:
            self._check_count(index + 1, done=False)
            yield Chunk(index, chunk, len(chunk))
            index += 1
        self._check_count(index, done=True)

    def _check_count(self, chunks: int, *, done: bool) -> None:
        """The shard names (``-of-NNNNN``) were fixed by counting the input: a different count means the input
        changed while it was read."""
        if chunks > self.plan.shards or (done and chunks != self.plan.shards):
            raise RunFailed(f"{self.plan.manifest_shown}: the input changed while it was read: it had "
                            f"{self.plan.total} rows ({self.plan.shards} shards) when counted",
                            hint="pack a copy that does not change, then rerun with --overwrite")

    def task(self) -> PackTask:
        return PackTask(self.processor, self.plan.out, self.split, self.plan.shards)

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

    def accept(self, record: ChunkRecord, out: OutputDir | None) -> ChunkRecord:
        if out is not None and not out.visible(record.shard.path, record.shard.bytes):
            raise RunFailed(
                f"shard {record.shard.path} written by a worker is not visible in {out}",
                hint="on a multi-node cluster --out must be storage every node shares (a shared mount or an object "
                     "store such as s3://)",
            )
        return record

    def finish(self, records: list[ChunkRecord], run: JobRun[ChunkRecord], out: OutputDir | None) -> Publication:
        if out is not None and out.local:  # shards are renamed in without a folder fsync each: one per folder here
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

        split = self.split
        entry = Index(config=self.plan.recorded_config(), rows_per_shard=self.plan.rows_per_shard,
                      metadata=read_metadata(self.processor.schema) if shards else None, shards=shards,
                      totals=totals, rejects=rejects_name(split), split=split, run_stats=run_stats_name(split))
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in rejected)
        files: tuple[tuple[str, bytes], ...] = ((rejects_name(split), lines.encode()),)
        index = None
        if run.failed is None:
            assert out is not None  # pack always runs in an output folder
            earlier = self._read_index(out)
            merged = IndexFile({**(earlier.splits if earlier is not None else {}), split: entry})
            files += ((CARD_NAME, dataset_card(merged)),)
            index = (INDEX_NAME, merged.dumps())
        return Publication(files=files, index=index, stats_name=run_stats_name(split))


_SPECIAL_FLAGS = {
    "image.size": "--image-size", "image.draft": "--no-draft", "norm.preset": "--norm", "norm.applied": "--dtype",
    "encode_quality": "--quality", "text.caption": "--caption", "text.separator": "--caption-separator",
    "text.add_special_tokens": "--no-special-tokens", "text.check_placeholders": "--no-placeholder-check",
    "format": "--format",
}
_DERIVED = frozenset({"norm.applied", "row_group_rows"})
_CONTENT = {"manifest_sha256": "the manifest's content", "tokenizer_sha256": "the tokenizer's files (content)",
            "vocab_sha256": "the vocabulary file's content", "rows_per_shard": "the shard plan (rows per shard)"}


def describe_identity_change(key: str, old: Any, new: Any) -> str:
    """A differing run-identity key as the user knows it: the flag (``--image-size 224x224 -> 64x64``), or what
    changed under the same path (``the tokenizer's files (content)``)."""
    if key in _CONTENT:
        return f"{_CONTENT[key]} ({key})"
    if key == "decoder" or key.startswith("decoder."):
        return "the image decoder: --resampler, or the versions of Pillow, simplejpeg or OpenCV (decoder)"
    if key == "columns" or key.startswith("columns."):
        return "the input columns carried, or their types (--keep-columns, --drop-columns, the manifest)"
    name = key.removeprefix("config.")
    if name in _DERIVED:
        return ""  # follows from a flag that is named on its own
    if name in _SPECIAL_FLAGS:
        flag = _SPECIAL_FLAGS[name]
    elif name.startswith("columns."):
        flag = f"--{name.split('.', 1)[1]}-column"
    else:
        flag = "--" + name.rsplit(".", 1)[-1].replace("_", "-")

    def show(v: Any) -> str:
        if name == "image.size" and isinstance(v, list) and len(v) == 2:
            return f"{v[0]}x{v[1]}"
        return "unset" if v is None else json.dumps(v)

    return f"{flag} {show(old)} -> {show(new)}"


_ANY_SHARD = re.compile(r"(?P<split>.+)-\d{5}-of-\d{5}\.parquet")


def _split_of(name: str) -> str | None:
    """The split a file name in ``data/`` is a shard of (None: not a shard name)."""
    m = _ANY_SHARD.fullmatch(name)
    return m.group("split") if m else None


def shard_file_pattern(split: str) -> re.Pattern[str]:
    """The file names (in ``data/``) of a split's shards."""
    return re.compile(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.parquet")


def _ray_elsewhere(address: str | None) -> bool:
    from mmprep.runtime.engines.ray import check_address

    return check_address(address) != "local"


def _root_from(cfg: PackConfig) -> str:
    """How the image root was chosen, for messages."""
    if cfg.image_root:
        return "--image-root"
    return "the working folder, as the manifest is stdin" if cfg.manifest == "-" else "the manifest's folder"


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
    check_images: bool = True,
    on_phase: Callable[[str], None] | None = None,
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
        check_images: before any work, look up the first rows' images and stop when most cannot be found
            (:mod:`mmprep.pack.preflight`).
        on_phase: called with what the run is doing while no row is counted yet (``reading the manifest``,
            ``loading the tokenizer``, ``starting 2 workers``).

    Raises:
        UsageError: bad configuration or output directory (exit 2).
        RunFailed: a failed run: ``--on-error fail`` met a bad row, a worker died, too many rejects, most of the
            first rows' images missing (exit 1).
        MissingDependencyError: ``engine="ray"`` without Ray installed (exit 2).

    ``cfg.device``: ``cuda`` decodes JPEGs on the GPU (:mod:`mmprep.images.gpu`; a UsageError when the ``gpu``
    extra or a CUDA device is missing), ``auto`` uses it when it can; the report says which ran.
    """
    start = time.perf_counter()
    if cfg.device != "cpu":  # auto -> cpu or cuda; cuda without a usable GPU path is a usage error (exit 2)
        import dataclasses

        from mmprep.images.gpu import resolve_device

        if engine == "ray" and cfg.device == "cuda":
            raise UsageError("--device cuda runs with the local engine: Ray's workers are given no GPU",
                             hint="use --engine local, or --device cpu with --engine ray")
        device = "cpu" if engine == "ray" else resolve_device(cfg.device, padded=cfg.pad == "max")
        cfg = dataclasses.replace(cfg, device=device)
        if device == "cuda":  # the device resizes with Pillow's filters: images that fall back to the CPU do too
            cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, resampler="pillow"))
    cfg.validate()
    if resume and not rereadable(cfg.manifest):
        raise UsageError("--resume needs a manifest file, not stdin or a pipe")
    phase = on_phase if on_phase is not None else (lambda text: None)
    with make_engine(engine, workers, ray_address=ray_address, progress=progress is not None, preload=_PRELOAD,
                     setup=_worker_setup if cfg.image.resampler == "fast" else None,
                     size_of=lambda chunk: chunk.size) as eng:
        phase("reading the manifest")
        plan = plan_pack(cfg, storage_options, workers=eng.workers, engine=engine)
        eng.limit(plan.shards)  # --workers 24 for a one-shard input starts no more workers
        try:
            if plan.spooled and engine == "ray" and _ray_elsewhere(ray_address):
                raise UsageError("the input's embedded images are spooled on this machine; Ray workers elsewhere "
                                 "cannot read them", hint="use --engine local, or a Ray on this machine only")
            if check_images:
                check_first_images(plan.head, plan.images, root_from=_root_from(cfg))
            if on_total is not None and plan.total is not None:
                on_total(plan.total)
            if cfg.tokenizer or cfg.vocab:
                phase("loading the tokenizer" if cfg.tokenizer else "loading the vocabulary")
            # Built once, before the output is touched: a bad tokenizer or vocabulary fails fast (exit 2), and
            # workers receive this processor pickled (the tokenizer travels as its JSON, so workers do not import
            # transformers).
            processor = SampleProcessor(cfg, plan.images, plan.row_group_rows, plan.columns)
            if engine == "ray":
                phase("starting Ray")
            elif eng.workers > 1:
                phase(f"starting {eng.workers} workers")
            else:
                phase("packing the first rows")
            job = PackJob(plan, processor)
            split = cfg.split
            pattern = shard_file_pattern(split)
            out = OutputDir(plan.out, resume=resume, overwrite=overwrite,
                            fixed_names=(INDEX_NAME, CARD_NAME, rejects_name(split), run_stats_name(split)),
                            temp_owner=lambda name: bool(pattern.fullmatch(name)), kind="split", scope=split,
                            shared_names=(INDEX_NAME, CARD_NAME), guarded=(DATA_DIR,), scope_of=_split_of,
                            describe=describe_identity_change)
            run = run_job(job, eng, out, policy=Policy(on_error=cfg.on_error, max_reject_rate=cfg.max_reject_rate),
                          progress=progress, started=start)
        finally:
            plan.close()
    totals = job.totals
    failed = run.failed
    if failed is not None and run.written:
        failed += f"; no {INDEX_NAME} entry was written for split '{cfg.split}'"
    # a run that wrote no row kept none of its (empty) shards: see run_job
    shards = [r.shard for r in run.records] if run.written else []
    return PackReport(
        out=str(plan.out), shards=shards, read=run.read, written=run.written,
        rejected=run.rejected, rejected_by_reason=run.rejected_by_reason, images_written=totals.images_written,
        images_dropped=totals.images_dropped_by_limit, tags_dropped=totals.tags_dropped_unknown,
        text_truncated=totals.text_truncated, image_count_histogram=totals.image_count_histogram,
        rows_per_shard=plan.rows_per_shard, bytes_written=sum(sh.bytes for sh in shards), seconds=run.seconds,
        samples_per_s=run.written / run.seconds if run.seconds else 0.0,
        images_per_s=totals.images_written / run.seconds if run.seconds else 0.0, peak_rss_mb=run.peak_rss_mb,
        resumed_shards=run.resumed, workers=run.workers, engine=run.engine,
        reject_rate=run.rejected / run.read if run.read else 0.0, failed=failed, extra=dict(run.stats),
        device=cfg.device,
        split=cfg.split, rejects=rejects_name(cfg.split), columns=plan.columns.names(), notes=list(plan.notes),
    )

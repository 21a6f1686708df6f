"""The one job runtime: plan -> chunks -> engine -> typed chunk records -> finish, with resume and policies.

Every dataset job (``pack``, and any job shaped alike) is a :class:`Job`: it plans its input into numbered
:class:`Chunk` s and names a picklable task that turns one chunk into a record (writing the chunk's files itself,
in the worker). :func:`run_job` owns everything around that, once for all jobs:

- the output folder (:class:`~mmprep.runtime.outdir.OutputDir`): lock, run identity, ``--resume`` records,
  ``--overwrite`` of exactly the earlier run's files;
- resume: a chunk whose stored record the job still accepts (its files intact, its inputs unchanged) is not
  redone;
- the engine (inline, local process pool, Ray), progress, and the records coming back (in chunk order when the
  job asks for it);
- the policies: ``--on-error fail`` stops at the first rejected row; a run that writes no row, or rejects more
  than ``--max-reject-rate``, fails (one that writes no row keeps none of its chunks' files: they hold no row);
- publishing: the job's files first, then the run statistics, then the index, last, and only for a run that did
  not fail, so the index's presence means the output is complete.
"""

from __future__ import annotations

import contextlib
import heapq
import resource
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mmprep.dataset.format import dumps_json
from mmprep.errors import RunFailed
from mmprep.runtime.engines.base import Engine, ProgressFn, Task
from mmprep.runtime.outdir import ChunkEntry, OutputDir

__all__ = ["Chunk", "Job", "JobRecord", "JobRun", "Policy", "Publication", "StreamedRecord", "StreamingJob", "run_job"]

T = TypeVar("T")
R = TypeVar("R", bound="JobRecord")


@dataclass(frozen=True)
class Chunk(Generic[T]):
    """One unit of work: its number (which decides its output name), its items, and how many input rows it holds."""

    index: int
    items: T
    size: int


class Reject(Protocol):
    """A rejected input row (or item), as the runtime reads it."""

    @property
    def reason(self) -> str: ...

    @property
    def detail(self) -> str: ...


class JobRecord(Protocol):
    """What a task returns for a chunk (and what ``--resume`` stores)."""

    @property
    def index(self) -> int: ...

    @property
    def items(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def images(self) -> int: ...

    @property
    def rejected(self) -> Sequence[Reject]: ...

    @property
    def files(self) -> tuple[str, ...]: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Policy:
    """When a run fails although every row was handled.

    Attributes:
        on_error: ``skip`` (rejected rows are written to the rejects file) or ``fail`` (the first one stops the run).
        max_reject_rate: the largest share of rejected rows a successful run may have.
        require_rows: a run that writes no row fails.
    """

    on_error: str = "skip"
    max_reject_rate: float = 1.0
    require_rows: bool = True


@dataclass(frozen=True)
class Publication:
    """The files a finished job publishes: ``files`` first, then the run statistics, then ``index`` last."""

    files: tuple[tuple[str, bytes], ...] = ()
    index: tuple[str, bytes] | None = None
    stats_name: str | None = None


@dataclass
class JobRun(Generic[R]):
    """The outcome of :func:`run_job`.

    Attributes:
        records: every chunk's record, in chunk order.
        resumed: chunks kept from an earlier run.
        read, written, rejected: the row accounting (read == written + rejected).
        rejected_by_reason: rejected rows counted by reason.
        failed: why the run failed (then no index was published), or None.
        seconds: wall time of the whole run.
        engine: ``local`` or ``ray``; workers: how many ran.
        stats: engine facts (``ray_init_s``...) and anything the job adds.
    """

    records: list[R]
    resumed: int
    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    images: int
    failed: str | None
    seconds: float
    engine: str
    workers: int
    peak_rss_mb: float
    stats: dict[str, Any] = field(default_factory=dict)


class Job(Protocol[T, R]):
    """A dataset job, as :func:`run_job` sees it."""

    #: keep records in chunk order when they reach :meth:`accept` (a job writing one file in order needs it)
    ordered: bool

    def identity(self) -> dict[str, Any]:
        """What decides the output (inputs' content hashes, settings); ``--resume`` requires it unchanged."""
        ...

    def begin(self, out: OutputDir) -> None:
        """Called once the folder is open and locked, before any chunk (e.g. to withdraw this run's part from a
        shared index while it is rewritten)."""
        ...

    def chunks(self) -> Iterable[Chunk[T]]:
        """The planned chunks, in order (streamed: memory must not grow with the input)."""
        ...

    def task(self) -> Task[Chunk[T], R]:
        """The picklable work of one chunk."""
        ...

    def restore(self, entry: ChunkEntry, chunk: Chunk[T], out: OutputDir) -> R | None:
        """The record of a chunk an earlier run finished, if it still holds (files intact, inputs unchanged)."""
        ...

    def accept(self, record: R, out: OutputDir | None) -> R:
        """Take one record in the parent (checks, bookkeeping, writing it where it goes); raise to stop the run.

        Returns what the runtime keeps of it until :meth:`finish` (drop bulky parts already written)."""
        ...

    def finish(self, records: list[R], run: JobRun[R], out: OutputDir | None) -> Publication:
        """The files to publish once every chunk is done (``run.failed`` says whether the run failed)."""
        ...


class StreamedRecord:
    """Base for the records of a job that writes its output itself as records arrive: no files of the chunk's own,
    nothing for ``--resume`` to keep (subclasses are dataclasses with ``index`` and ``items``)."""

    index: int
    items: int

    @property
    def files(self) -> tuple[str, ...]:
        return ()

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "items": self.items}


class StreamingJob:
    """Defaults for a job that writes its output in :meth:`Job.accept` (tokenize's one file, normalize-images'
    record): no run identity, nothing to resume, nothing for the runtime to publish."""

    def identity(self) -> dict[str, Any]:
        return {}

    def begin(self, out: OutputDir) -> None:
        return None

    def restore(self, entry: ChunkEntry, chunk: Chunk[Any], out: OutputDir) -> None:
        return None

    def finish(self, records: list[Any], run: JobRun[Any], out: OutputDir | None) -> Publication:
        return Publication()


def _failure(policy: Policy, read: int, written: int, rejected: int, by_reason: Counter[str]) -> str | None:
    if policy.require_rows and not read:
        return "the input has no rows: nothing was written"
    if policy.require_rows and not written:
        top = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common(3))
        return f"no row was written: all {read} rows were rejected ({top})"
    rate = rejected / read if read else 0.0
    if rate > policy.max_reject_rate:
        return (f"{rejected} of {read} rows rejected ({rate:.1%}), above --max-reject-rate "
                f"{policy.max_reject_rate:.1%}")
    return None


def _check_fail_fast(policy: Policy, record: JobRecord) -> None:
    if policy.on_error == "fail" and record.rejected:
        first = record.rejected[0]  # records list their rejects in input order
        stage = getattr(first, "stage", "")
        raise RunFailed(
            f"--on-error fail: {first.detail or first.reason} ({f'stage {stage}, ' if stage else ''}reason "
            f"{first.reason})",
            hint="fix that row, or use --on-error skip to write bad rows to the rejects file and go on",
        )


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its (finished) children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def run_job(
    job: Job[T, R],
    engine: Engine,
    out: OutputDir | None,
    *,
    policy: Policy = Policy(),
    progress: ProgressFn | None = None,
    started: float | None = None,
) -> JobRun[R]:
    """Run ``job`` on ``engine`` into ``out``; see the module docstring.

    Args:
        job: the job.
        engine: where the tasks run (already started, so its workers warm up while the job plans).
        out: the output folder (not yet opened; this opens, locks and closes it), or None for a job that writes
            its output itself as records arrive (no resume, nothing published here).
        policy: when the run fails.
        progress: called with ``(rows, images)`` increments.
        started: when the run began (``time.perf_counter()``), for the statistics.

    Raises:
        UsageError: the output folder cannot be used (not empty, locked, a different run on ``--resume``).
        RunFailed: ``--on-error fail`` met a rejected row, a worker died, or a file could not be written.
    """
    t0 = started if started is not None else time.perf_counter()
    records: list[R] = []
    resumed = 0
    order: list[tuple[int, int, R]] = []  # records waiting for an earlier chunk (ordered jobs)
    next_index = [0]
    report = progress if progress is not None and engine.streams_progress else None

    def take(record: R) -> None:
        _check_fail_fast(policy, record)
        if not job.ordered:
            records.append(job.accept(record, out))
            return
        heapq.heappush(order, (record.index, id(record), record))
        while order and order[0][0] == next_index[0]:
            rec = heapq.heappop(order)[2]
            records.append(job.accept(rec, out))
            next_index[0] += 1

    with out if out is not None else contextlib.nullcontext():
        if out is not None:
            out.open(job.identity())
        if out is not None:
            job.begin(out)

        def pending() -> Iterator[Chunk[T]]:
            nonlocal resumed
            for chunk in job.chunks():
                entry = out.finished(chunk.index) if out is not None else None
                kept = job.restore(entry, chunk, out) if entry is not None and out is not None else None
                if kept is None:
                    yield chunk
                    continue
                resumed += 1
                if progress is not None:
                    progress(kept.items, kept.images)
                take(kept)

        for record in engine.map(job.task(), pending(), report):
            if out is not None:
                out.save(record.index, record.to_json(), record.files)
            if progress is not None and report is None:
                progress(record.items, record.images)
            take(record)
        if order:
            raise RunFailed(f"internal error: chunks {sorted(o[0] for o in order)[:5]} finished but an earlier one "
                            "never did")
        records.sort(key=lambda r: r.index)
        read = sum(r.items for r in records)
        written = sum(r.rows for r in records)
        by_reason: Counter[str] = Counter(rej.reason for r in records for rej in r.rejected)
        rejected = sum(by_reason.values())
        if read != written + rejected:
            raise RunFailed(f"row accounting failed: read {read}, written {written}, rejected {rejected}")
        run: JobRun[R] = JobRun(
            records=records, resumed=resumed, read=read, written=written, rejected=rejected,
            rejected_by_reason=dict(sorted(by_reason.items())), images=sum(r.images for r in records),
            failed=_failure(policy, read, written, rejected, by_reason), seconds=0.0, engine=engine.name,
            workers=engine.workers, peak_rss_mb=0.0, stats=dict(engine.stats),
        )
        publication = job.finish(records, run, out)
        run.seconds = time.perf_counter() - t0
        run.peak_rss_mb = peak_rss_mb()
        if out is not None:
            for name, data in publication.files:
                out.write(name, data)
            if publication.stats_name is not None:
                out.write(publication.stats_name, dumps_json(run_stats(run)))
            if publication.index is not None and run.failed is None:
                out.write(*publication.index)  # last: its presence means the output is complete
            if policy.require_rows and records and not written:
                # Every row was rejected: the rejects file holds them all, and the chunks' files (empty shards)
                # would only be mistaken for output. A later --resume redoes the chunks.
                for rec in records:
                    out.discard(rec.index, rec.files)
    return run


def run_stats(run: JobRun[Any]) -> dict[str, Any]:
    """The run statistics file: timings and where the run went (the only output that differs between runs)."""
    return {
        "seconds": round(run.seconds, 3),
        "samples_per_s": round(run.written / run.seconds, 2) if run.seconds else 0.0,
        "images_per_s": round(run.images / run.seconds, 2) if run.seconds else 0.0,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "workers": run.workers,
        "resumed_shards": run.resumed,
        "engine": run.engine,
        **run.stats,
    }

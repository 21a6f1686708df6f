"""The local engine: a process pool where each worker loads one SampleProcessor and writes its own shards.

The pool is started before the processor exists (:class:`WorkerPool`), so the workers import numpy, Pillow and
pyarrow while the parent loads the tokenizer; the processor then reaches every worker once, through a file.
Chunks are submitted in order with a bounded number in flight (memory does not grow with the dataset); finished
chunk records are saved by the parent as they arrive, so a killed run can be resumed. A worker that dies fails
the run with a clear message instead of hanging, and workers whose parent dies (kill -9) exit on their own.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from mmprep.errors import RunFailed
from mmprep.pack.processor import SampleProcessor
from mmprep.records import Rejected, Sample
from mmprep.runtime.shards import OutputDir
from mmprep.runtime.storage import Location, RemoteOutputDir

__all__ = ["WorkerPool", "run_chunks_pool"]

_processor: SampleProcessor | None = None
_processor_file: str | None = None
_progress_q: Any = None
_PARENT_POLL_S = 0.5


def _init(progress_q: Any, parent_pid: int) -> None:
    global _progress_q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    if hasattr(signal, "pthread_sigmask"):  # blocked since the parent started this process (_sigint_blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _progress_q = progress_q
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="mmprep-parent-watch", daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the parent is gone (killed with -9: nobody would ever stop the pool otherwise)."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _warm_up() -> int:
    """The first task of each worker: import what packing needs while the parent is still preparing."""
    import pyarrow.parquet  # noqa: F401

    import mmprep.pack.job  # noqa: F401

    return os.getpid()


def _load_processor(path: str) -> SampleProcessor:
    global _processor, _processor_file
    if _processor is None or _processor_file != path:
        with open(path, "rb") as f:
            _processor = pickle.load(f)
        _processor_file = path
    return _processor


def _work(processor_file: str, out_dir: Path | Location, index: int, items: list[Sample | Rejected]) -> dict[str, Any]:
    from mmprep.pack.job import pack_chunk

    processor = _load_processor(processor_file)
    q = _progress_q

    def progress(rows: int, images: int) -> None:
        if q is not None and (rows or images):
            q.put((rows, images))

    return pack_chunk(processor, out_dir, index, items, progress)


class WorkerPool:
    """``workers`` spawned processes, started at once; :meth:`set_processor` hands them the processor.

    Args:
        workers: number of worker processes.
        with_progress: create the queue workers report (rows, images) progress through.
    """

    def __init__(self, workers: int, *, with_progress: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.workers = workers
        self.progress_q = ctx.Queue() if with_progress else None
        self._dir = tempfile.mkdtemp(prefix="mmprep-pool-")
        self.processor_file: str | None = None
        self._closed = False
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init,
                                            initargs=(self.progress_q, os.getpid()))
        with _sigint_blocked():  # each submit starts a worker while none is idle
            self._warm = [self.executor.submit(_warm_up) for _ in range(workers)]

    def set_processor(self, processor: SampleProcessor) -> None:
        path = os.path.join(self._dir, "processor.pickle")
        with open(path, "wb") as f:
            pickle.dump(processor, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.processor_file = path

    def close(self, *, ok: bool) -> None:
        """Wait for the workers (``ok``), or stop them at once (failure, Ctrl-C); remove the processor file."""
        if self._closed:
            return
        self._closed = True
        try:
            if ok:
                self.executor.shutdown(wait=True)
            else:
                _terminate(self.executor)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)


def run_chunks_pool(
    processor: SampleProcessor,
    out_dir: OutputDir | RemoteOutputDir,
    chunks: Iterable[tuple[int, list[Sample | Rejected]]],
    *,
    workers: int,
    progress: Any = None,
    pool: WorkerPool | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Process chunks on ``workers`` processes; returns (chunk records, number of resumed shards).

    ``pool`` is a pool started earlier (its workers already warm); without one, a pool is started here. Either way
    it is closed before returning.
    """
    from mmprep.pack.job import check_fail_fast

    cfg = processor.cfg
    if pool is None:
        pool = WorkerPool(workers, with_progress=progress is not None)
    pool.set_processor(processor)
    assert pool.processor_file is not None
    progress_q = pool.progress_q if progress is not None else None
    stop = threading.Event()
    drainer = None
    if progress_q is not None:

        def drain() -> None:
            while not stop.is_set():
                try:
                    rows, images = progress_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                progress(rows, images)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()

    records: list[dict[str, Any]] = []
    resumed = 0
    inflight: dict[Future[dict[str, Any]], int] = {}
    executor = pool.executor

    def collect(done: Iterable[Future[dict[str, Any]]]) -> None:
        for fut in done:
            inflight.pop(fut)
            rec = fut.result()
            out_dir.save_chunk(rec["index"], rec)
            records.append(rec)
            check_fail_fast(cfg, rec)

    ok = False
    try:
        for index, items in chunks:
            rec = out_dir.finished_chunk(index)
            if rec is not None and rec.get("items") == len(items):
                resumed += 1
                records.append(rec)
                if progress is not None:
                    progress(len(items), rec["images_written"])
                continue
            while len(inflight) >= 2 * workers:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                collect(done)
            with _sigint_blocked():  # submit may start a worker process
                inflight[executor.submit(_work, pool.processor_file, out_dir.path, index, items)] = index
        while inflight:
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            collect(done)
        ok = True
    except BrokenProcessPool:  # from a result, or from submit() once the pool knows
        raise RunFailed(
            "a worker process died (killed, or out of memory) while packing",
            hint="rerun the same command with --resume to continue from the finished shards",
        ) from None
    finally:
        pool.close(ok=ok)
        stop.set()
        if drainer is not None:
            drainer.join(timeout=1)
            while progress_q is not None:  # progress sent just before the end
                try:
                    rows, images = progress_q.get_nowait()
                except (queue.Empty, OSError, ValueError):
                    break
                progress(rows, images)
    return records, resumed


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold back Ctrl-C while worker processes may be started.

    A child inherits the signal mask, so it cannot get a SIGINT meant for the whole process group while it is
    still importing (which would print a traceback from every worker); the parent gets the signal (and stops
    the pool) as soon as the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _terminate(executor: ProcessPoolExecutor) -> None:
    """Stop a pool at once (Ctrl-C or failure): cancel queued work and end the workers."""
    processes = list(getattr(executor, "_processes", {}).values())  # no public API before Python 3.14
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)

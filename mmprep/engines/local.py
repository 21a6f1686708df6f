"""The local engine: a process pool where each worker builds one SampleProcessor and writes its own shards.

Chunks are submitted in order with a bounded number in flight (memory does not grow with the dataset); finished
chunk records are saved by the parent as they arrive, so a killed run can be resumed. A worker that dies fails
the run with a clear message instead of hanging.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from mmprep.errors import RunFailed
from mmprep.process import SampleProcessor
from mmprep.records import Rejected, Sample
from mmprep.shards import OutputDir
from mmprep.storage import Location, RemoteOutputDir

__all__ = ["run_chunks_pool"]

_processor: SampleProcessor | None = None
_progress_q: Any = None


def _init(processor: SampleProcessor, progress_q: Any) -> None:
    global _processor, _progress_q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    if hasattr(signal, "pthread_sigmask"):  # blocked since the parent started this process (_sigint_blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _processor = processor
    _progress_q = progress_q


def _work(out_dir: Path | Location, index: int, items: list[Sample | Rejected]) -> dict[str, Any]:
    from mmprep.pack import pack_chunk

    assert _processor is not None
    q = _progress_q

    def progress(rows: int, images: int) -> None:
        if q is not None and (rows or images):
            q.put((rows, images))

    return pack_chunk(_processor, out_dir, index, items, progress)


def run_chunks_pool(
    processor: SampleProcessor,
    out_dir: OutputDir | RemoteOutputDir,
    chunks: Iterable[tuple[int, list[Sample | Rejected]]],
    *,
    workers: int,
    progress: Any = None,
) -> tuple[list[dict[str, Any]], int]:
    """Process chunks on ``workers`` processes; returns (chunk records, number of resumed shards)."""
    from mmprep.pack import check_fail_fast

    cfg = processor.cfg
    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue() if progress is not None else None
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
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init,
                                   initargs=(processor, progress_q))

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
                inflight[executor.submit(_work, out_dir.path, index, items)] = index
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
        if ok:
            executor.shutdown(wait=True)
        else:
            _terminate(executor)
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

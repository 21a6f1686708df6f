"""The local engine: a pool of spawned worker processes, each loading the task once.

The pool starts when the engine is created, before the task exists, so the workers import what they need
(``preload``: module names) while the parent still reads the manifest and loads the tokenizer; the task then
reaches every worker once, through a file. Chunks are submitted in order with at most ``2 x workers`` in flight
(memory does not grow with the input); results come back in completion order. A worker that dies fails the run
with a clear message instead of hanging, and workers whose parent dies (kill -9) exit on their own.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from mmprep.errors import RunFailed
from mmprep.runtime.engines.base import ProgressFn, Task, default_workers, sigint_blocked

__all__ = ["LocalEngine"]

C = TypeVar("C")
R = TypeVar("R")

_task: Any = None
_task_file: str | None = None
_progress_q: Any = None
_PARENT_POLL_S = 0.5


def _init(progress_q: Any, parent_pid: int, setup: Callable[[], None] | None = None) -> None:
    global _progress_q
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    if hasattr(signal, "pthread_sigmask"):  # blocked since the parent started this process (sigint_blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _progress_q = progress_q
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="mmprep-parent-watch", daemon=True).start()
    if setup is not None:
        setup()


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the parent is gone (killed with -9: nobody would ever stop the pool otherwise)."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _warm_up(modules: Sequence[str]) -> int:
    """The first call in each worker: import what the task needs while the parent is still preparing."""
    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def _run(task_file: str, chunk: Any) -> Any:
    global _task, _task_file
    if _task is None or _task_file != task_file:
        with open(task_file, "rb") as f:
            _task = pickle.load(f)
        _task_file = task_file
    q = _progress_q

    def progress(rows: int, images: int) -> None:
        if q is not None and (rows or images):
            q.put((rows, images))

    return _task(chunk, progress if q is not None else None)


class LocalEngine:
    """``workers`` spawned processes, started at once.

    Args:
        workers: number of worker processes (>= 2; use :class:`InlineEngine` for one).
        with_progress: create the queue workers report ``(rows, images)`` increments through.
        preload: modules each worker imports as soon as it starts.
        setup: a module-level function each worker runs once when it starts (for instance to keep a library's own
            thread pool to one thread: the processes are the parallelism).
    """

    name = "local"
    streams_progress = True

    def __init__(self, workers: int, *, with_progress: bool = False, preload: Sequence[str] = (),
                 setup: Callable[[], None] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.workers = workers
        self.stats: dict[str, Any] = {}
        self.progress_q = ctx.Queue() if with_progress else None
        self._dir = tempfile.mkdtemp(prefix="mmprep-pool-")
        self._closed = False
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init,
                                            initargs=(self.progress_q, os.getpid(), setup))
        # Workers start on demand (one per submit while none is idle): only as many as there are cores warm up
        # now, so that more workers than cores, or than the input has chunks, cost nothing until there is work.
        with sigint_blocked():
            self._warm = [self.executor.submit(_warm_up, tuple(preload))
                          for _ in range(min(workers, default_workers()))]

    def limit(self, useful: int) -> None:
        """No more worker processes than ``useful`` from now on (those warming up already are kept)."""
        self.workers = max(1, min(self.workers, useful))
        # ProcessPoolExecutor starts a process per submit while none is idle, up to its maximum: lowering the
        # maximum (never below the processes already started) is what keeps a one-chunk input at one worker.
        self.executor._max_workers = max(self.workers, len(self._warm))  # type: ignore[attr-defined]

    def _ship(self, task: Any) -> str:
        path = os.path.join(self._dir, "task.pickle")
        with open(path, "wb") as f:
            pickle.dump(task, f, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def map(self, task: Task[C, R], chunks: Iterable[C], progress: ProgressFn | None = None) -> Iterator[R]:
        task_file = self._ship(task)
        progress_q = self.progress_q if progress is not None else None
        stop = threading.Event()
        drainer = None
        if progress_q is not None and progress is not None:
            report = progress

            def drain() -> None:
                while not stop.is_set():
                    try:
                        rows, images = progress_q.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    report(rows, images)

            drainer = threading.Thread(target=drain, name="mmprep-progress", daemon=True)
            drainer.start()
        inflight: set[Future[R]] = set()
        try:
            for chunk in chunks:
                while len(inflight) >= 2 * self.workers:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
                with sigint_blocked():  # submit may start a worker process
                    inflight.add(self.executor.submit(_run, task_file, chunk))
            while inflight:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        except BrokenProcessPool:  # from a result, or from submit() once the pool knows
            raise RunFailed(
                "a worker process died (killed, or out of memory)",
                hint="rerun the same command with --resume to continue from the finished work",
            ) from None
        finally:
            stop.set()
            if drainer is not None:
                drainer.join(timeout=1)
                while progress_q is not None and progress is not None:  # progress sent just before the end
                    try:
                        rows, images = progress_q.get_nowait()
                    except (queue.Empty, OSError, ValueError):
                        break
                    progress(rows, images)

    def close(self, *, ok: bool) -> None:
        """Wait for the workers (``ok``), or stop them at once (failure, Ctrl-C); remove the task file."""
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

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)


def _terminate(executor: ProcessPoolExecutor) -> None:
    """Stop a pool at once (Ctrl-C or failure): cancel queued work and end the workers."""
    processes = list(getattr(executor, "_processes", {}).values())  # no public API before Python 3.14
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)

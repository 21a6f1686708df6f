"""The process pool the image jobs fan their files out over (each worker decodes and handles its own files; only
small results travel back to the parent)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from mmprep.errors import RunFailed

__all__ = ["default_workers", "parallel_map"]

_Item = TypeVar("_Item")
_Ctx = TypeVar("_Ctx")
_Result = TypeVar("_Result")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: let the parent alone decide how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunk(fn: Callable[[_Item, _Ctx], _Result], ctx: _Ctx, chunk: list[_Item]) -> list[_Result]:
    return [fn(item, ctx) for item in chunk]


def _mp_context(job_module: str) -> Any:
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["mmprep.images.decode", job_module])
    return ctx


def parallel_map(
    fn: Callable[[_Item, _Ctx], _Result],
    items: Sequence[_Item],
    ctx: _Ctx,
    *,
    workers: int,
    chunksize: int = 16,
) -> Iterator[_Result]:
    """Apply ``fn(item, ctx)`` to every item, yielding results as they finish (not in order).

    ``fn`` must be a module-level function and ``ctx`` picklable. With ``workers <= 1`` (or one or two items)
    everything runs in this process. A worker that dies (e.g. a decoder crash) raises RunFailed.
    """
    if workers <= 1 or len(items) <= 2:
        for item in items:
            yield fn(item, ctx)
        return
    # small sets still spread over every worker; large ones go in chunks of `chunksize`
    chunksize = max(1, min(chunksize, math.ceil(len(items) / (workers * 4))))
    chunks = [list(items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
    executor = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_mp_context(fn.__module__),
                                   initializer=_worker_init)
    pending: set[Future[list[_Result]]] = set()
    next_chunk = 0
    try:
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) < workers * 4:
                pending.add(executor.submit(_run_chunk, fn, ctx, chunks[next_chunk]))
                next_chunk += 1
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield from fut.result()
    except BrokenProcessPool:
        raise RunFailed("an image worker process died (killed, out of memory or a decoder crash)",
                        hint="rerun with --workers 1 to find the file; finished outputs are kept") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

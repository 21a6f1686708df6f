"""What every engine offers: map one picklable task over chunks, yielding the task's results as they finish.

An engine knows nothing of the jobs it runs. A *task* is a picklable callable ``task(chunk, progress) -> result``
(for ``pack``: a chunk of manifest rows in, the chunk record out, the shard written by the worker itself). The
engine ships the task to each worker once, sends chunks with a bounded number in flight (memory stays flat however
long the input), and yields results in completion order; the job runtime puts them back in order where a job needs
that. ``progress(rows, images)`` increments reach the caller's callback from any worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["Engine", "InlineEngine", "ProgressFn", "Task", "default_workers", "sigint_blocked"]

C = TypeVar("C")
R = TypeVar("R")
C_contra = TypeVar("C_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

#: ``progress(rows, images)``: increments of finished input rows and images.
ProgressFn = Callable[[int, int], None]


class Task(Protocol[C_contra, R_co]):
    """The work of one chunk; picklable, built once in the parent, run in the workers."""

    def __call__(self, chunk: C_contra, progress: ProgressFn | None) -> R_co: ...


class Engine(Protocol):
    """A way to run a task over chunks. Use as a context manager; :meth:`map` may be called once."""

    name: str
    workers: int
    #: whether progress increments arrive while a chunk runs (else only when it finishes)
    streams_progress: bool
    #: facts about the run for the run statistics (``ray_init_s``, ...)
    stats: dict[str, Any]

    def map(self, task: Task[C, R], chunks: Iterable[C], progress: ProgressFn | None = None) -> Iterator[R]:
        """Run ``task`` on every chunk; yields results as they finish (not in order)."""
        ...

    def limit(self, useful: int) -> None:
        """Start no more workers than ``useful`` (the number of chunks, once the plan knows it); call before
        :meth:`map`."""
        ...

    def close(self, *, ok: bool) -> None:
        """Wait for the workers (``ok``) or stop them at once (failure, Ctrl-C)."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, exc_type: object, *exc: object) -> None: ...


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class InlineEngine:
    """Runs every chunk in this process, in order (``--workers 1``)."""

    name = "local"
    streams_progress = True

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.workers = 1
        self.stats: dict[str, Any] = {}

    def map(self, task: Task[C, R], chunks: Iterable[C], progress: ProgressFn | None = None) -> Iterator[R]:
        for chunk in chunks:
            yield task(chunk, progress)

    def limit(self, useful: int) -> None:
        pass

    def close(self, *, ok: bool) -> None:
        pass

    def __enter__(self) -> InlineEngine:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Hold back Ctrl-C while worker processes may be started.

    A child inherits the signal mask, so it cannot get a SIGINT meant for the whole process group while it is
    still importing (which would print a traceback from every worker); the parent gets the signal (and stops
    the workers) as soon as the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Apply:
    """A task that applies ``fn(item, ctx)`` to every item of a chunk (a list): for jobs over many small items."""

    def __init__(self, fn: Callable[[Any, Any], Any], ctx: Any) -> None:
        self.fn = fn
        self.ctx = ctx

    def __call__(self, chunk: list[Any], progress: ProgressFn | None) -> list[Any]:
        return [self.fn(item, self.ctx) for item in chunk]


def map_items(
    engine: Engine,
    fn: Callable[[Any, R], Any],
    items: Sequence[Any],
    ctx: R,
    *,
    chunksize: int = 16,
) -> Iterator[Any]:
    """Apply ``fn(item, ctx)`` to every item on ``engine``, yielding results as they finish (not in order).

    ``fn`` must be a module-level function and ``ctx`` picklable. Items travel in groups of at most ``chunksize``,
    smaller when there are few, so every worker gets some.
    """
    size = max(1, min(chunksize, -(-len(items) // (max(1, engine.workers) * 4))))
    groups = (list(items[i:i + size]) for i in range(0, len(items), size))
    for results in engine.map(_Apply(fn, ctx), groups):
        yield from results

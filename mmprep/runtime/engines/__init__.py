"""Engines: where a job's tasks run. :func:`make_engine` picks one from ``--engine`` and ``--workers``.

- :class:`~mmprep.runtime.engines.base.InlineEngine`: this process, in order (``--workers 1``).
- :class:`~mmprep.runtime.engines.local.LocalEngine`: a pool of spawned processes on this machine.
- :class:`~mmprep.runtime.engines.ray.RayEngine`: Ray Data actors on a local Ray or a cluster.

All three map a picklable task over chunks and know nothing of the job (see :mod:`.base`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mmprep.errors import UsageError
from mmprep.runtime.engines.base import Engine, InlineEngine, default_workers

__all__ = ["ENGINES", "MAX_WORKERS", "make_engine"]

ENGINES = ("local", "ray")
#: More worker processes than this is a mistake, not a configuration (each costs ~50 MB and a second to start).
MAX_WORKERS = 1024


def make_engine(
    engine: str,
    workers: int | None,
    *,
    ray_address: str | None = None,
    progress: bool = False,
    preload: Sequence[str] = (),
    setup: Callable[[], None] | None = None,
    max_useful: int | None = None,
    size_of: Callable[[Any], int] | None = None,
) -> Engine:
    """The engine for ``--engine`` / ``--workers``; a local pool starts its workers now, to warm up meanwhile.

    Args:
        engine: ``local`` or ``ray``.
        workers: worker processes or Ray actors (default: every core / the cluster's CPUs).
        ray_address: the Ray cluster (``engine="ray"``).
        progress: workers report progress while a chunk runs (local pool).
        preload: modules each local worker imports as soon as it starts.
        setup: a module-level function each local worker runs once when it starts.
        max_useful: no more local workers than this (the number of chunks, when known).
        size_of: input rows of a chunk (Ray windows hold about ``WINDOW_ITEMS`` of them).

    Raises:
        UsageError: an unknown engine, a worker count out of range, Ray missing or its address unreachable.
    """
    if engine not in ENGINES:
        raise UsageError(f"--engine must be local or ray, got '{engine}'")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}",
                         hint="leave it out to use every core")
    if engine == "ray":
        from mmprep.runtime.engines.ray import RayEngine

        return RayEngine(workers, ray_address, size_of=size_of)
    n = workers or default_workers()
    if max_useful is not None:
        n = max(1, min(n, max_useful))
    if n == 1:
        return InlineEngine()
    from mmprep.runtime.engines.local import LocalEngine

    return LocalEngine(n, with_progress=progress, preload=preload, setup=setup)

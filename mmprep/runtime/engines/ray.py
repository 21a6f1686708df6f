"""The Ray engine: the local engine's chunks and per-chunk work, run by Ray Data on a local Ray or a cluster.

``pack`` hands the same ``(index, items)`` chunks as the local engine to a Ray Data pipeline:
``from_items`` (one block per chunk) ``.map_batches(_ChunkPacker, compute=ActorPoolStrategy(size=workers))``.
Each actor unpickles the parent's :class:`~mmprep.pack.processor.SampleProcessor` once (tokenizer and vocabulary travel
inside it, so workers need no access to those files) and runs :func:`mmprep.pack.job.pack_chunk` per chunk: the
same shard bytes as the local engine. Actors write their own shards (pixels never travel back); only the small
chunk records come back, and the parent saves each as it arrives (``--resume`` works the same), checks that it
can see the shard (output on storage every node shares), and merges them into one index and one rejects file.

Chunks are sent in windows of about :data:`WINDOW_ITEMS` manifest rows, so the parent never holds the whole
manifest; each window starts a fresh actor pool (a few seconds), which is why windows are large.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmprep.errors import MissingDependencyError, MmprepError, RunFailed, UsageError

if TYPE_CHECKING:
    from mmprep.pack.processor import SampleProcessor
    from mmprep.records import Rejected, Sample
    from mmprep.runtime.storage import Location

__all__ = [
    "CONNECT_TIMEOUT_S",
    "WINDOW_ITEMS",
    "check_address",
    "ray_map",
    "ray_session",
    "require_ray",
    "run_chunks_ray",
]

#: Manifest rows per Ray Data pipeline (the parent holds at most this many pending rows).
WINDOW_ITEMS = 1_000_000
_QUIET_LOGGERS = ("ray", "ray.data", "ray.util", "ray._private")


def require_ray() -> None:
    """Fail at once with the install hint when Ray (with Ray Data) is not installed.

    Raises:
        MissingDependencyError: exit 2, hint ``pip install 'mmprep[ray]'``.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ray", "ray", purpose="--engine ray") from None


@contextlib.contextmanager
def ray_session(workers: int | None, address: str | None = None) -> Iterator[tuple[Any, int, float]]:
    """Use the running Ray, or connect to ``address``, or start a local Ray with ``workers`` CPUs.

    Yields ``(ray module, worker count, seconds spent starting/connecting)``. A Ray this function started is shut
    down on exit, also on Ctrl-C; one that was already running is left alone. Ray's own logging and Ray Data's
    progress bars are silenced (library code never prints): the engine reports progress through the caller's
    callback.

    Ctrl-C: the processes of a Ray started here (GCS, raylet, agents, and the workers the raylet starts) inherit
    SIGINT blocked, so a Ctrl-C sent to the terminal's whole process group reaches only this process, which then
    shuts them all down itself. A Ctrl-C while Ray starts is held until ``ray.init`` has returned (interrupted
    half-way, it left Ray's agents running for good), and a second one does not cut the shutdown short.

    Args:
        workers: actors/tasks to run at once (default: the CPUs of the cluster or of this machine).
        address: ``ray://host:10001`` or ``host:6379`` of a running cluster; default ``$RAY_ADDRESS``, else a new
            local instance. An address that does not accept a TCP connection within :data:`CONNECT_TIMEOUT_S` is a
            UsageError (Ray itself would retry for minutes).
    """
    require_ray()
    import ray

    from mmprep.runtime.engines.local import _sigint_blocked

    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    saved = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:  # failures reach the user as one RunFailed line, not as Ray's stack traces
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = False
    t0 = time.perf_counter()
    try:
        if not ray.is_initialized():
            target = check_address(address)
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.ERROR}
            if target == "local":
                kwargs["num_cpus"] = workers or _local_cpus()
            with _sigint_blocked():
                try:
                    ray.init(address=target, **kwargs)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UsageError(f"cannot start or reach Ray at '{target}': {str(exc).splitlines()[0]}",
                                     hint=_ADDRESS_HINT) from None
                started = True
        init_s = time.perf_counter() - t0
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        with contextlib.suppress(AttributeError):
            ctx.enable_operator_progress_bars = False
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield ray, n, init_s
    finally:
        if started:
            with _sigint_blocked():  # a second Ctrl-C must not cut the shutdown short (orphaned processes)
                ray.shutdown()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


#: Seconds to wait for a TCP connection to ``--ray-address`` before giving up.
CONNECT_TIMEOUT_S = 10.0
_ADDRESS_HINT = "start the cluster (`ray start --head`) or leave out --ray-address"


def check_address(address: str | None, timeout: float | None = None) -> str:
    """The Ray address to use (``address``, else ``$RAY_ADDRESS``, else ``local``), checked for reachability.

    ``local`` and ``auto`` (found by Ray itself) are not probed; ``host:port`` and ``ray://host:port`` must accept
    a TCP connection within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`). Cheap: call it before anything
    is written, as :func:`ray_session` does before starting Ray.

    Raises:
        UsageError: nothing listens there, or the host does not answer in time (one line, exit 2).
    """
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target in ("local", "auto"):
        return target
    rest = target.split("://", 1)[1] if "://" in target else target
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return target  # not host:port: Ray's own parser names the problem
    limit = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=limit):
            pass
    except TimeoutError:
        raise UsageError(f"cannot reach Ray at '{target}': no answer within {limit:g}s", hint=_ADDRESS_HINT) from None
    except OSError as exc:
        raise UsageError(f"cannot reach Ray at '{target}': {exc.strerror or exc}", hint=_ADDRESS_HINT) from None
    return target


def _local_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _ChunkPacker:
    """The Ray Data callable class: built once per actor, packs one chunk per row of its batch."""

    def __init__(self, holder: list[Any], dest: Path | Location) -> None:
        import ray

        # the processor travels as an object reference wrapped in a list, fetched once per actor
        self.processor: SampleProcessor = ray.get(holder[0])
        self.dest = dest

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from mmprep.pack.job import pack_chunk

        records = []
        for index, payload in zip(batch["index"], batch["payload"], strict=True):
            items = pickle.loads(payload)
            records.append(json.dumps(pack_chunk(self.processor, self.dest, int(index), items)))
        return {"record": records}


def _restart_args(ray: Any) -> dict[str, Any]:
    """On one node a dead actor (out of memory, a crash) would die again: no restarts, the run fails with the
    ``--resume`` hint as on the local engine. On a cluster Ray restarts actors lost with a node and retries."""
    try:
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception:
        alive = 1
    return {"max_restarts": 0} if alive <= 1 else {}


def _cause(exc: BaseException) -> MmprepError | None:
    """The mmprep error a worker raised, through Ray's wrappers."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MmprepError):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def _failure(exc: BaseException, what: str, hint: str) -> MmprepError:
    """The error to raise for an exception out of Ray: the mmprep error a worker raised, else RunFailed."""
    cause = _cause(exc)
    return cause if cause is not None else RunFailed(f"{what}: {_first_line(exc)}", hint=hint)


def _first_line(exc: BaseException) -> str:
    """A short reason: a lost worker process in plain words, else the last line of Ray's text (at most 300 chars)."""
    chain: list[BaseException | None] = [exc, exc.__cause__, getattr(exc, "cause", None)]
    if any(e is not None and type(e).__name__ in ("ActorDiedError", "WorkerCrashedError", "NodeDiedError",
                                                   "ActorUnavailableError") for e in chain):
        return "a worker process died (killed, out of memory, or crashed)"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def run_chunks_ray(
    processor: SampleProcessor,
    out_dir: Any,
    chunks: Iterable[tuple[int, list[Sample | Rejected]]],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    address: str | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Pack chunks on Ray; returns (chunk records, number of resumed shards), like ``run_chunks_pool``.

    Args:
        processor: built by the parent; sent once to every actor.
        out_dir: ``shards.OutputDir`` or ``storage.RemoteOutputDir`` (finished/saved chunk records).
        chunks: ``(index, items)`` in order, from ``pack._chunks``.
        workers: actors at once (default: the cluster's CPUs).
        progress: called with (rows, images) per finished chunk.
        address: the Ray cluster (see :func:`ray_session`).
        stats: filled with ``ray_workers`` and ``ray_init_s``.

    Raises:
        RunFailed: a worker failed (the hint says ``--resume``), ``--on-error fail`` met a bad row, or a shard
            written by a worker is not visible to the parent (output not on shared storage).
    """
    from mmprep.pack.job import check_fail_fast, finished_record
    from mmprep.runtime.storage import shard_visible

    cfg = processor.cfg
    dest = out_dir.path
    records: list[dict[str, Any]] = []
    resumed = 0
    with ray_session(workers, address) as (ray, n, init_s):
        if stats is not None:
            stats.update(ray_workers=n, ray_init_s=round(init_s, 3))
        try:
            holder = [ray.put(processor)]
        except TypeError as exc:  # e.g. a filesystem object that cannot be pickled
            raise RunFailed(f"cannot send the pack job to Ray workers: {_first_line(exc)}") from None
        remote_args = _restart_args(ray)

        def run(window: list[tuple[int, list[Sample | Rejected]]]) -> None:
            ds = ray.data.from_items(
                [{"index": i, "payload": pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)} for i, items in window],
                override_num_blocks=len(window),
            )
            kwargs = dict(fn_constructor_args=(holder, dest), batch_size=1, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=min(n, len(window))), num_cpus=1)
            with warnings.catch_warnings():
                # max_restarts has no named parameter yet; Ray >= 2.64 may refuse it: then Ray's defaults apply
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
                try:
                    ds = ds.map_batches(_ChunkPacker, **kwargs, **remote_args)
                except TypeError:
                    ds = ds.map_batches(_ChunkPacker, **kwargs)
            before = set(threading.enumerate())
            rows = iter(ds.iter_rows())  # a generator: closing it stops Ray Data's iteration and its threads
            try:
                for row in rows:
                    rec = json.loads(row["record"])
                    if not shard_visible(dest, rec["shard"]):
                        raise RunFailed(
                            f"shard {rec['shard']['path']} written by a Ray worker is not visible in {dest}",
                            hint="on a multi-node cluster --out must be storage every node shares (a shared "
                                 "mount or an object store such as s3://)",
                        )
                    out_dir.save_chunk(rec["index"], rec)
                    records.append(rec)
                    if progress is not None:
                        progress(rec["items"], rec["images_written"])
                    check_fail_fast(cfg, rec)
            except MmprepError:
                raise
            except Exception as exc:
                raise _failure(exc, "a Ray worker failed while packing",
                               "rerun the same command with --resume to continue from the finished shards") from None
            finally:
                _close_iteration(rows, before)

        window: list[tuple[int, list[Sample | Rejected]]] = []
        pending = 0
        for index, items in chunks:
            rec = finished_record(out_dir, index, items, progress)
            if rec is not None:
                resumed += 1
                records.append(rec)
                check_fail_fast(cfg, rec)
                continue
            window.append((index, items))
            pending += len(items)
            if pending >= WINDOW_ITEMS:
                run(window)
                window, pending = [], 0
        if window:
            run(window)
    return records, resumed


#: Ray Data's per-iteration threads that fetch blocks (and the executor loop). Its "Prefetcher" thread is left out:
#: an iteration closed early leaves it parked on a condition for good (Ray Data 2.60 stops it only at the end of
#: an iteration), where it makes no Ray calls.
_ITERATION_THREADS = ("iter_threaded", "StreamingExecutor")


def _close_iteration(rows: Iterator[Any], before: set[threading.Thread], timeout: float = 10.0) -> None:
    """Stop a Ray Data iteration and wait (at most ``timeout`` s) for the threads it started.

    One of them still fetching blocks when Ray shuts down (after Ctrl-C or a failure) makes Ray's core worker end
    the whole process: exit 1 with a line of Ray's C++ log instead of mmprep's message.
    """
    with contextlib.suppress(Exception):
        rows.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t not in before and t is not threading.current_thread() and t.name.startswith(_ITERATION_THREADS):
            t.join(max(0.0, deadline - time.monotonic()))


def _apply_batch(batch: dict[str, Any], fn: Callable[[Any, Any], Any], ctx: Any) -> dict[str, Any]:
    out = []
    for payload in batch["payload"]:
        out.append(pickle.dumps([fn(item, ctx) for item in pickle.loads(payload)]))
    return {"result": out}


def ray_map(
    fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    ctx: Any,
    *,
    workers: int | None = None,
    address: str | None = None,
    chunksize: int = 16,
) -> Iterator[Any]:
    """Apply ``fn(item, ctx)`` to every item on Ray, yielding results as they finish (not in order).

    The Ray counterpart of ``image_jobs.parallel_map`` (same contract: ``fn`` a module-level function, ``ctx``
    picklable); items travel in groups of ``chunksize``.
    """
    with ray_session(workers, address) as (ray, n, _):
        if not items:
            return
        size = max(1, min(chunksize, -(-len(items) // (n * 4))))
        groups = [pickle.dumps(list(items[i:i + size])) for i in range(0, len(items), size)]
        ds = ray.data.from_items([{"payload": g} for g in groups], override_num_blocks=len(groups)).map_batches(
            _apply_batch, fn_kwargs={"fn": fn, "ctx": ctx}, batch_size=1, batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=n), num_cpus=1,
        )
        before = set(threading.enumerate())
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                yield from pickle.loads(row["result"])
        except MmprepError:
            raise
        except Exception as exc:
            raise _failure(exc, "a Ray worker failed", "rerun the same command: finished outputs are kept") from None
        finally:
            _close_iteration(rows, before)

"""The Ray engine: the same tasks and chunks as the local engine, run by Ray Data on a local Ray or a cluster.

Chunks go to a Ray Data pipeline, one block each: ``from_items(...).map_batches(_TaskActor,
compute=ActorPoolStrategy(size=workers))``. Each actor fetches the task (sent once with ``ray.put``) when it
starts and runs it per chunk; only the (small) results come back. A job whose task writes files (pack's shards)
gets the same bytes as on the local engine; on a cluster the output must be storage every node shares.

Chunks are sent in windows of about :data:`WINDOW_ITEMS` input rows, so the parent never holds the whole input;
each window starts a fresh actor pool (a few seconds), which is why windows are large.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from mmprep.errors import MissingDependencyError, MmprepError, RunFailed, UsageError
from mmprep.runtime.engines.base import ProgressFn, Task, default_workers, sigint_blocked

__all__ = ["CONNECT_TIMEOUT_S", "WINDOW_ITEMS", "RayEngine", "check_address", "ray_session", "require_ray"]

C = TypeVar("C")
R = TypeVar("R")

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
                kwargs["num_cpus"] = workers or default_workers()
            with sigint_blocked():
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
            with sigint_blocked():  # a second Ctrl-C must not cut the shutdown short (orphaned processes)
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


class _TaskActor:
    """The Ray Data callable class: fetches the task once per actor, runs it on one chunk per row of its batch."""

    def __init__(self, holder: list[Any]) -> None:
        import ray

        self.task = ray.get(holder[0])  # an object reference wrapped in a list, fetched once per actor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = []
        for payload in batch["payload"]:
            results.append(pickle.dumps(self.task(pickle.loads(payload), None), protocol=pickle.HIGHEST_PROTOCOL))
        return {"result": results}


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


class RayEngine:
    """Runs tasks on Ray: the running Ray, the cluster at ``address``, or a local Ray it starts (and stops).

    Creating one checks that Ray is installed and that ``address`` answers (cheap: call it before anything is
    written); Ray itself starts with the first :meth:`map`. Progress is reported per finished chunk by the job.

    Args:
        workers: actors at once (default: the cluster's CPUs).
        address: see :func:`ray_session`.
        size_of: the input rows of a chunk (windows hold about :data:`WINDOW_ITEMS` of them).
    """

    name = "ray"
    streams_progress = False

    def __init__(self, workers: int | None = None, address: str | None = None,
                 size_of: Callable[[Any], int] | None = None) -> None:
        require_ray()
        check_address(address)
        if workers is not None and workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        self.requested = workers
        self.address = address
        self.workers = workers or 0
        self.stats: dict[str, Any] = {}
        self._size_of = size_of or (lambda chunk: 1)

    def limit(self, useful: int) -> None:
        """Ray windows are sized by :meth:`map` from the cluster's CPUs and the chunks it is given."""

    def map(self, task: Task[C, R], chunks: Iterable[C], progress: ProgressFn | None = None) -> Iterator[R]:
        with ray_session(self.requested, self.address) as (ray, n, init_s):
            self.workers = n
            self.stats.update(ray_workers=n, ray_init_s=round(init_s, 3))
            try:
                holder = [ray.put(task)]
            except TypeError as exc:  # e.g. a filesystem object that cannot be pickled
                raise RunFailed(f"cannot send the job to Ray workers: {_first_line(exc)}") from None
            remote_args = _restart_args(ray)
            window: list[C] = []
            pending = 0
            for chunk in chunks:
                window.append(chunk)
                pending += self._size_of(chunk)
                if pending >= WINDOW_ITEMS:
                    yield from self._run_window(ray, n, holder, remote_args, window)
                    window, pending = [], 0
            if window:
                yield from self._run_window(ray, n, holder, remote_args, window)

    def _run_window(self, ray: Any, n: int, holder: list[Any], remote_args: dict[str, Any],
                    window: list[Any]) -> Iterator[Any]:
        ds = ray.data.from_items([{"payload": pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL)} for c in window],
                                 override_num_blocks=len(window))
        kwargs = dict(fn_constructor_args=(holder,), batch_size=1, batch_format="numpy",
                      compute=ray.data.ActorPoolStrategy(size=min(n, len(window))), num_cpus=1)
        with warnings.catch_warnings():
            # max_restarts has no named parameter yet; Ray >= 2.64 may refuse it: then Ray's defaults apply
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
            try:
                ds = ds.map_batches(_TaskActor, **kwargs, **remote_args)
            except TypeError:
                ds = ds.map_batches(_TaskActor, **kwargs)
        before = set(threading.enumerate())
        rows = iter(ds.iter_rows())  # a generator: closing it stops Ray Data's iteration and its threads
        try:
            for row in rows:
                yield pickle.loads(row["result"])
        except MmprepError:
            raise
        except Exception as exc:
            raise _failure(exc, "a Ray worker failed",
                           "rerun the same command with --resume to continue from the finished work") from None
        finally:
            _close_iteration(rows, before)

    def close(self, *, ok: bool) -> None:
        """Nothing to do: the Ray session ends with :meth:`map`."""

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)


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

"""Shared pieces of the benchmarks: measured subprocesses, the Pillow decode ceiling, tables.

Every method of a benchmark that compares whole pipelines runs in a fresh process (:func:`run_measured`), so
imports, caches and memory of one method never help or hurt another, and its peak memory is the peak of the
*sum* of the resident sets of its whole process tree (worker pools included), sampled every 20 ms.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Measured", "ceiling_decode", "ceiling_resize", "centre_box", "fmt_ratio", "markdown_table", "median",
           "run_measured", "timed_rounds"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    """One measured subprocess: exit status, wall seconds, peak RSS of its process tree, captured output."""

    rc: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def _tree_rss(proc: object) -> int:
    import psutil

    assert isinstance(proc, psutil.Process)
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_measured(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 3600
) -> Measured:
    """Run ``cmd`` to completion; return its wall time and the peak summed RSS of it and its descendants."""
    import psutil

    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd)
    ps = psutil.Process(proc.pid)
    peak = 0
    out_chunks: list[str] = []
    err_chunks: list[str] = []

    def pump(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks), daemon=True)]
    for t in threads:
        t.start()
    deadline = start + timeout
    while proc.poll() is None:
        peak = max(peak, _tree_rss(ps))
        if time.perf_counter() > deadline:
            proc.kill()
            break
        time.sleep(0.02)
    rc = proc.wait()
    wall = time.perf_counter() - start
    for t in threads:
        t.join(timeout=5)
    return Measured(rc, wall, peak / 2**20, "".join(out_chunks), "".join(err_chunks))


def timed_rounds(methods: dict[str, Callable[[], Any]], repeats: int,
                 check: Callable[[str, Any], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each method per round: one warm-up call each (its result passed to ``check``), then ``repeats``
    rounds, each method once per round in an order rotated by one every round (drift on a shared machine hits
    every method alike)."""
    names = list(methods)
    for name in names:
        got = methods[name]()
        if check is not None:
            check(name, got)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def centre_box(w: float, h: float, size: int) -> tuple[float, float, float, float]:
    """The centred square region of a ``w`` x ``h`` image that a ``size`` x ``size`` center crop keeps."""
    scale = max(size / w, size / h)
    cw, ch = size / scale, size / scale
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    return x0, y0, x0 + cw, y0 + ch


def ceiling_resize(im: Any, size: int) -> Any:
    """The ceiling's work on one opened Pillow image: ``draft`` to the smallest JPEG scale that still covers a
    ``size`` center crop, then one bicubic resize of the (scaled) centre box; returns the ``size`` x ``size`` image."""
    from PIL import Image

    w, h = im.size
    scale = max(size / w, size / h)
    drafted = im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    f = drafted[1][2] / w if drafted else 1.0
    x0, y0, x1, y1 = centre_box(w, h, size)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=(x0 * f, y0 * f, x1 * f, y1 * f))


def ceiling_decode(paths: Sequence[str], size: int) -> int:
    """The bare minimum with Pillow for a ``size`` center crop: open + ``draft`` + one bicubic resize.

    No EXIF orientation, no mode handling, no error handling, no array conversion: the decode ceiling that a
    full pipeline can approach but not pass with the same decoder.
    """
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            ceiling_resize(im, size)
    return len(paths)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def python() -> str:
    """The interpreter running the benchmark (methods run with the same one)."""
    return sys.executable

"""What audit-labels writes besides its report: tag lists (``--write-used``, ``--write-never-used``) and the tag
frequency plot (``--plot``, matplotlib imported only here). Every file is written under a temporary name and
renamed into place (:func:`mmprep.runtime.files.atomic_write`)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mmprep.errors import MissingDependencyError, UsageError
from mmprep.labels.audit.report import AuditReport, TagCount
from mmprep.runtime.files import atomic_write

__all__ = ["frequency_figure", "plot_format", "plot_frequency", "write_tag_list"]


def write_tag_list(path: str | Path, tags: Iterable[TagCount], *, counts: bool = False) -> int:
    """Write ``id<TAB>name`` lines (``id<TAB>name<TAB>count`` with ``counts``) under a temporary name, then rename
    it into place; returns the number written. Raises RunFailed if the file cannot be written."""
    written = 0

    def write(fh: BinaryIO) -> None:
        nonlocal written
        line = "{0.id}\t{0.name}\t{0.count}\n".format if counts else "{0.id}\t{0.name}\n".format
        it = iter(tags)
        while block := list(islice(it, 65536)):  # in blocks: a list of millions of tags is never one string
            fh.write("".join(map(line, block)).encode("utf-8"))
            written += len(block)

    atomic_write(path, write)
    return written


def plot_format(path: str | Path) -> str:
    """The image format ``plot_frequency`` will write for ``path`` (its extension), checked before any work.

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``plot`` extra).
        UsageError: the extension is missing or not a format matplotlib writes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None
    supported = sorted(FigureCanvasAgg.get_supported_filetypes())
    fmt = Path(str(path)).suffix.lower().removeprefix(".")
    if fmt not in supported:
        what = f"format '{fmt}' is not supported" if fmt else "has no extension naming the image format"
        raise UsageError(f"--plot {path}: {what}", hint="end the file name in one of ." + ", .".join(supported))
    return fmt


def frequency_figure(report: AuditReport) -> Any:
    """The long tail as a matplotlib Figure (see :func:`plot_frequency`).

    Samples with the tag on a log axis; tag ranks on a log axis too when never-used tags outnumber the used ones
    (a few used tags among thousands of never-used ones still show their curve), else linear (a short never-used
    tail keeps a visible width). Ticks are labelled with plain numbers (1, 2, 5, 10, ..., 1,000); the legend sits
    above the plot, outside it.

    Raises:
        UsageError: the report has no counts (no annotation files were read).
        MissingDependencyError: matplotlib is not installed (the ``plot`` extra).
    """
    if report.counts is None:
        raise UsageError("--plot needs annotation files to count tags in")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None

    counts = np.sort(report.counts[report.counts > 0])[::-1]
    never = len(report.never_used or ())
    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(1, counts.size + 1)
    if counts.size:
        ax.plot(x, counts, color="#1f77b4", lw=1.5, drawstyle="steps-mid", label=f"{counts.size:,} used tags")
    if never:
        start = counts.size + 1
        ax.axvspan(start - 0.5, start + never - 0.5, color="#d62728", alpha=0.25,
                   label=f"{never:,} never-used tags (ticks at the bottom)")
        ax.plot(np.arange(start, start + never), np.full(never, 0.8), "|", color="#d62728", ms=6)
    # Ranks on a log axis when never-used tags outnumber the used ones (on a linear axis the used ones would be a
    # sliver at the left); else linear, where a short never-used tail keeps a visible width.
    log_x = never > counts.size
    total = counts.size + never
    top = float(counts[0]) if counts.size else 1.0
    ax.set_yscale("log")
    low = 0.6 if never or not counts.size else float(counts[-1]) * 0.7  # never-used ticks sit at 0.8
    ax.set_ylim(low, max(top * 1.5, low * 3, 2.0))
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(0.8, total * 1.25 + 1)

    def plain(value: float, _pos: object) -> str:
        return f"{value:,.0f}" if value >= 1 or value <= 0 else f"{value:g}"

    axes = [(ax.yaxis, top)] + ([(ax.xaxis, float(total))] if log_x else [])
    for axis, span in axes:
        # 1, 2, 5, 10, 20, 50 ... over few decades; 1, 10, 100 ... over many
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 1000 else (1.0,)))
        axis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.set_xlabel("tags, most to least used (rank)")
    ax.set_ylabel("samples with the tag")
    fig.suptitle(f"Tag frequency long tail: {Path(report.vocab.path).name} ({report.vocab.entries:,} tags)")
    if counts.size or never:
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, frameon=False, borderaxespad=0.0)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def plot_frequency(report: AuditReport, path: str | Path) -> None:
    """Draw the long tail: tag counts sorted from most to least used, never-used tags marked (see
    :func:`frequency_figure`).

    The format follows the extension (see :func:`plot_format`); the file is written under a temporary name and
    renamed into place. Needs matplotlib (the ``plot`` extra); raises MissingDependencyError without it.
    """
    fmt = plot_format(path)
    fig = frequency_figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write(path, buf.getvalue())

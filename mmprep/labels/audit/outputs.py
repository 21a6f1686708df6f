"""What audit-labels writes besides its report: tag lists (``--write-used``, ``--write-never-used``) and the tag
frequency plot (``--plot``, matplotlib imported only here). Every file is written under a temporary name and
renamed into place (:func:`mmprep.runtime.files.atomic_write`)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mmprep.errors import MissingDependencyError, UsageError
from mmprep.labels.audit.report import AuditReport, TagCount
from mmprep.runtime.files import atomic_write

__all__ = ["plot_format", "plot_frequency", "write_tag_list"]


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


def plot_frequency(report: AuditReport, path: str | Path) -> None:
    """Draw the long tail: tag counts sorted from most to least used on a log scale, never-used tags marked.

    The format follows the extension (see :func:`plot_format`); the file is written under a temporary name and
    renamed into place. Needs matplotlib (the ``plot`` extra); raises MissingDependencyError without it.
    """
    if report.counts is None:
        raise UsageError("--plot needs annotation files to count tags in")
    fmt = plot_format(path)
    import matplotlib.pyplot as plt

    counts = np.sort(report.counts[report.counts > 0])[::-1]
    never = len(report.never_used or ())
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    x = np.arange(1, counts.size + 1)
    if counts.size:
        ax.plot(x, counts, color="#1f77b4", lw=1.5, label=f"{counts.size} used tags")
        ax.set_yscale("log")
    if never:
        start = counts.size + 1
        ax.axvspan(start - 0.5, start + never - 0.5, color="#d62728", alpha=0.25,
                   label=f"{never} never-used tags")
        ax.plot(np.arange(start, start + never), np.full(never, 0.8 if counts.size else 1.0), "|",
                color="#d62728", ms=6)
    ax.set_xlabel("tags, most to least used")
    ax.set_ylabel("samples with the tag (log)")
    ax.set_title(f"Tag frequency long tail: {Path(report.vocab.path).name} ({report.vocab.entries} tags)")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())

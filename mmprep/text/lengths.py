"""Token-count lengths: an exact histogram (:class:`LengthHistogram`) and its plot (:func:`plot_lengths`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import MissingDependencyError, UsageError
from mmprep.runtime.files import atomic_write

__all__ = ["LengthHistogram", "check_plot_path", "length_figure", "plot_lengths"]


class LengthHistogram:
    """Exact token-count histogram (memory grows with the longest row, not with the number of rows)."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, n_tokens: np.ndarray) -> None:
        """Add a batch of token counts."""
        if len(n_tokens) == 0:
            return
        binc = np.bincount(np.asarray(n_tokens, dtype=np.int64))
        if len(binc) > len(self.counts):
            binc[: len(self.counts)] += self.counts
            self.counts = binc
        else:
            self.counts[: len(binc)] += binc

    def quantile(self, q: float) -> int | None:
        """Nearest-rank quantile: the smallest count ``v`` with at least a fraction ``q`` of rows ``<= v``."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, int(np.ceil(q * total - 1e-9)))
        return int(np.searchsorted(np.cumsum(self.counts), rank))

    def over(self, max_length: int) -> int:
        """Rows with more than ``max_length`` tokens."""
        return int(self.counts[max_length + 1 :].sum())

    def summary(self, max_length: int) -> dict[str, Any]:
        """p50/p90/p99/max, mean, truncated rows and percent at ``max_length``, the max length covering 99%."""
        total = self.total
        mean = float((self.counts * np.arange(len(self.counts))).sum() / total) if total else None
        truncated = self.over(max_length)
        return {
            "rows": total,
            "p50": self.quantile(0.50),
            "p90": self.quantile(0.90),
            "p99": self.quantile(0.99),
            "max": int(np.flatnonzero(self.counts)[-1]) if total else None,
            "mean": mean,
            "max_length": max_length,
            "truncated": truncated,
            "truncated_pct": 100.0 * truncated / total if total else 0.0,
            "covers_99_pct": self.quantile(0.99),
        }


def check_plot_path(plot: str | os.PathLike[str], created: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`UsageError` when a ``--plot`` file cannot be written there (checked before any work).

    ``created``: a folder the command creates before the plot is drawn (the folder of ``--out``); a plot that goes
    there is fine although the folder does not exist yet.
    """
    path = Path(plot)
    if path.is_dir():
        raise UsageError(f"--plot {path}: is a directory", hint="pass a file name such as lengths.png")
    parent = path.parent
    if created is not None and not parent.exists() and parent.absolute() == Path(created).absolute():
        return
    if not parent.is_dir():
        raise UsageError(f"--plot {path}: the directory {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--plot {path}: the directory {parent} is not writable", hint="choose another directory")


_TITLE_CHARS = 70


def _short_title(title: str) -> str:
    """A title that fits the figure: long ones keep their start and end around an ellipsis."""
    if len(title) <= _TITLE_CHARS:
        return title
    keep = _TITLE_CHARS - 1
    return title[: keep // 2] + "…" + title[len(title) - (keep - keep // 2) :]


def _length_bins(counts: np.ndarray, max_length: int, max_bins: int = 120) -> tuple[np.ndarray, np.ndarray, int]:
    """Histogram bins over token counts: ``(starts, rows, width)``, bin ``k`` holding counts ``starts[k] ..
    starts[k] + width - 1``. Bins are aligned so that ``max_length + 1`` starts a bin: no bin mixes kept rows with
    truncated ones."""
    top = len(counts)
    width = max(1, int(np.ceil(top / max_bins)))
    first = (max_length + 1) % width
    first = first - width if first else 0  # the first bin start, <= 0 (count 0 falls in the first bin)
    binned = np.bincount((np.arange(top) - first) // width, weights=counts).astype(np.int64)
    return first + width * np.arange(len(binned)), binned, width


def length_figure(hist: LengthHistogram, max_length: int, *, title: str = "") -> Any:
    """The token-count histogram as a matplotlib Figure (see :func:`plot_lengths`).

    The legend sits above the plot, outside it, so it never hides a bar; the title above the legend.

    Raises:
        MissingDependencyError: matplotlib is not installed (extra ``plot``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if hist.total:
        starts, rows, width = _length_bins(hist.counts, max_length)
        # Count n is drawn over [n - 0.5, n + 0.5): the max-length line at L + 0.5 is a bin edge and splits kept
        # rows from truncated ones.
        ax.bar(starts - 0.5, rows, width=width, align="edge", color="#4C72B0", linewidth=0)
        ax.margins(y=0.08)
        summary = hist.summary(max_length)
        ax.axvline(
            max_length + 0.5, color="#C44E52", linestyle="--",
            label=f"max length {max_length} ({summary['truncated_pct']:.1f}% truncated)",
        )
        ax.axvline(summary["covers_99_pct"] + 0.5, color="#555555", linestyle=":",
                   label=f"99% of rows fit in {summary['covers_99_pct']}")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=3, frameon=False, fontsize="small",
                  borderaxespad=0.0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tokens per row (before truncation)")
    ax.set_ylabel("rows")
    fig.suptitle(_short_title(title or "token counts"), fontsize="medium")
    return fig


def plot_lengths(hist: LengthHistogram, max_length: int, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Draw the token-count histogram with the max length (and the 99% length) marked, as a PNG.

    The PNG is written under a temporary name and renamed. Long titles are shortened around an ellipsis.

    Raises:
        MissingDependencyError: matplotlib is not installed (extra ``plot``).
        RunFailed: the file could not be written.
    """
    fig = length_figure(hist, max_length, title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())

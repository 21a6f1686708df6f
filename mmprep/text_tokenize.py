"""``mmprep tokenize`` as a library call: manifest in, fixed-length token ids in Parquet out, plus a length report.

Output columns (one row per accepted sample, in input order):

==========================  ================  ===========================================================
column                      type              meaning
==========================  ================  ===========================================================
``id``                      string            the sample id
``line``                    int64             the sample's 1-based line/record number in the manifest
``input_ids``               list<int32>       exactly ``max_length`` ids (padded with the pad token id)
``attention_mask``          list<uint8>       1 on real tokens, 0 on padding
``n_tokens``                int32             the true token count before truncation (with special tokens)
``num_truncated_tokens``    int32             tokens cut off (``max(0, n_tokens - max_length)``)
``truncated``               bool              ``n_tokens > max_length``
==========================  ================  ===========================================================

Every input row ends up in exactly one place: the Parquet file or ``<out>.rejected.jsonl`` (one JSON object per
line: ``line``, ``id``, ``stage``, ``reason``, ``detail``). Both are written under temporary names and renamed
when complete. The Parquet schema metadata key ``mmprep`` records the tokenizer and settings.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import MissingDependencyError, RunFailed, UsageError
from mmprep.manifest import ColumnMap, iter_samples
from mmprep.records import Rejected, Sample
from mmprep.text import LengthHistogram, TextConfig, TextEncoder, TextError, TokenBatch, sample_image_count

__all__ = ["TokenizeReport", "plot_lengths", "rejects_path_for", "token_table", "tokenize_manifest"]

_FLUSH_ROWS = 16384  # rows buffered per Parquet row group


@dataclass
class TokenizeReport:
    """What a tokenize run did.

    Attributes:
        rows_in: manifest rows read; equals ``rows_written + rows_rejected``.
        rejected_by_reason: reject counts by reason code.
        lengths: the length report (see :meth:`LengthHistogram.summary`), over written rows.
        tokens: real (unpadded) tokens written; ``tokens_per_s`` over the whole run, file reading included.
    """

    manifest: str
    out: str
    rejects: str
    tokenizer: str
    config: dict[str, Any]
    rows_in: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rejects_path_for(out: str | os.PathLike[str]) -> Path:
    """Where the rejects of an output file go: ``<out>.rejected.jsonl``."""
    p = Path(out)
    return p.with_name(p.name + ".rejected.jsonl")


def token_table(batch: TokenBatch, ids: list[str], lines: list[int]) -> Any:
    """A pyarrow Table with the output columns for one encoded batch."""
    import pyarrow as pa

    n, length = batch.input_ids.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "line": pa.array(lines, pa.int64()),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(batch.input_ids.reshape(-1))),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(batch.attention_mask.reshape(-1))),
            "n_tokens": pa.array(batch.n_tokens),
            "num_truncated_tokens": pa.array(np.maximum(batch.n_tokens - length, 0).astype(np.int32)),
            "truncated": pa.array(batch.truncated),
        }
    )


def _schema(metadata: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("line", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("attention_mask", pa.list_(pa.uint8())),
            ("n_tokens", pa.int32()),
            ("num_truncated_tokens", pa.int32()),
            ("truncated", pa.bool_()),
        ],
        metadata={"mmprep": json.dumps(metadata, sort_keys=True)},
    )


def _check_paths(manifest: str, out: Path) -> None:
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a directory", hint="pass a file name such as tokens.parquet")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist", hint="create it first")
    if manifest != "-" and Path(manifest).exists() and Path(manifest).resolve() == out.resolve():
        raise UsageError(f"--out {out} is the input manifest", hint="write the tokens to another file")


def tokenize_manifest(
    manifest: str,
    tokenizer_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: TextConfig,
    *,
    columns: ColumnMap | None = None,
    fmt: str | None = None,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
    encoder: TextEncoder | None = None,
) -> tuple[TokenizeReport, LengthHistogram]:
    """Tokenise the text of every manifest row into ``out`` (Parquet) and ``<out>.rejected.jsonl``.

    Reads the manifest as a stream and encodes ``batch_size`` rows at a time, so memory stays bounded.

    Args:
        manifest: a manifest path (JSONL, JSON list, CSV, Parquet) or ``-`` for stdin.
        tokenizer_dir: a local tokenizer directory.
        out: the Parquet file to write.
        cfg: text settings.
        columns: which columns hold the id, images and text (unset: the usual names).
        fmt: the manifest format (unset: from the name or content).
        batch_size: rows per call to the tokenizer.
        progress: called with the number of rows handled after each batch.
        encoder: an already constructed encoder for ``tokenizer_dir``/``cfg`` (else one is built).

    Returns:
        The report and the token-count histogram of the written rows.

    Raises:
        InputError, UsageError: unreadable manifest or tokenizer, bad settings (nothing is written).
        RunFailed: the output could not be written.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    cfg.validate()
    out_path = Path(out)
    _check_paths(manifest, out_path)
    started = time.perf_counter()
    enc = encoder if encoder is not None else TextEncoder(tokenizer_dir, cfg)
    rej_path = rejects_path_for(out_path)
    report = TokenizeReport(
        manifest=manifest,
        out=str(out_path),
        rejects=str(rej_path),
        tokenizer=enc.name_or_path,
        config=asdict(cfg) | {"pad_token_id": enc.pad_token_id},
        warnings=list(enc.warnings),
    )
    hist = LengthHistogram()
    reasons: Counter[str] = Counter()
    tmp_out = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp_rej = rej_path.with_name(f".{rej_path.name}.tmp-{os.getpid()}")

    import pyarrow as pa
    import pyarrow.parquet as pq

    metadata = {
        "tokenizer": enc.name_or_path,
        "tokenizer_dir": str(tokenizer_dir),
        "vocab_size": enc.vocab_size,
        "pad_token": enc.pad_token,
        "pad_token_id": enc.pad_token_id,
        **asdict(cfg),
    }
    writer = None
    try:
        try:
            writer = pq.ParquetWriter(str(tmp_out), _schema(metadata))
            rej_fh = tmp_rej.open("w", encoding="utf-8")
        except OSError as exc:
            raise RunFailed(f"{out_path}: cannot write: {exc.strerror or exc}") from None
        with rej_fh:
            texts: list[str] = []
            ids: list[str] = []
            lines: list[int] = []
            pending: list[Any] = []
            pending_rows = 0

            def reject(item: Rejected) -> None:
                reasons[item.reason] += 1
                rej_fh.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")

            def flush_batch() -> None:
                nonlocal pending_rows
                batch = enc.encode_batch(texts)
                hist.add(batch.n_tokens)
                report.tokens += int(batch.attention_mask.sum(dtype=np.int64))
                pending.append(token_table(batch, ids, lines))
                pending_rows += len(texts)
                report.rows_written += len(texts)
                if progress is not None:
                    progress(len(texts))
                texts.clear()
                ids.clear()
                lines.clear()
                if pending_rows >= _FLUSH_ROWS:
                    flush_rows()

            def flush_rows() -> None:
                nonlocal pending_rows
                if pending:
                    writer.write_table(pa.concat_tables(pending))
                    pending.clear()
                    pending_rows = 0

            for item in iter_samples(manifest, columns, fmt=fmt):
                report.rows_in += 1
                if isinstance(item, Rejected):
                    reject(item)
                    continue
                assert isinstance(item, Sample)
                try:
                    rendered = enc.render(item.text, sample_id=item.id, image_count=sample_image_count(item))
                except TextError as exc:
                    reject(Rejected(item.line, item.id, "text", exc.reason, f"{item.source}:{item.line}: {exc.detail}"))
                    continue
                texts.append(rendered)
                ids.append(item.id)
                lines.append(item.line)
                if len(texts) >= batch_size:
                    flush_batch()
            if texts:
                flush_batch()
            flush_rows()
            writer.close()
            writer = None
        os.replace(tmp_rej, rej_path)
        os.replace(tmp_out, out_path)
    except OSError as exc:
        raise RunFailed(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
        for tmp in (tmp_out, tmp_rej):
            tmp.unlink(missing_ok=True)
    report.rows_rejected = sum(reasons.values())
    report.rejected_by_reason = dict(reasons.most_common())
    report.lengths = hist.summary(cfg.max_length)
    report.seconds = time.perf_counter() - started
    report.tokens_per_s = report.tokens / report.seconds if report.seconds > 0 else 0.0
    return report, hist


def plot_lengths(hist: LengthHistogram, max_length: int, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Draw the token-count histogram with the max length (and the 99% length) marked, as a PNG.

    Raises:
        MissingDependencyError: matplotlib is not installed (extra ``plot``).
        RunFailed: the file could not be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None
    counts = hist.counts
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if hist.total:
        top = len(counts)
        width = max(1, int(np.ceil(top / 120)))
        edges = np.arange(0, top + width, width)
        binned = np.add.reduceat(counts, edges[:-1]) if top else counts
        # Bars span [n - 0.5, n + width - 0.5): the max-length line at L + 0.5 splits kept from truncated rows.
        ax.bar(edges[:-1] - 0.5, binned, width=width, align="edge", color="#4C72B0", linewidth=0)
        summary = hist.summary(max_length)
        ax.axvline(
            max_length + 0.5, color="#C44E52", linestyle="--",
            label=f"max length {max_length} ({summary['truncated_pct']:.1f}% truncated)",
        )
        ax.axvline(summary["covers_99_pct"] + 0.5, color="#555555", linestyle=":",
                   label=f"99% of rows fit in {summary['covers_99_pct']}")
        ax.legend(loc="upper right")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tokens per row (before truncation)")
    ax.set_ylabel("rows")
    ax.set_title(title or "token counts")
    try:
        fig.savefig(str(path), format="png")
    except OSError as exc:
        raise RunFailed(f"{path}: cannot write the plot: {exc.strerror or exc}") from None

"""``mmprep tokenize`` as a library call: manifest in, fixed-length token ids in Parquet out, plus a length report.

Output columns (one row per accepted sample, in input order):

==========================  =============================  ==============================================
column                      type                           meaning
==========================  =============================  ==============================================
``id``                      string                         the sample id
``line``                    int64                          the sample's 1-based line/record number
``input_ids``               fixed_size_list<int32>[N]      exactly ``max_length`` ids (padded with the pad id)
``attention_mask``          fixed_size_list<int8>[N]       1 on real tokens, 0 on padding
``n_tokens``                int32                          the true token count before truncation
``num_truncated_tokens``    int32                          tokens cut off (``max(0, n_tokens - max_length)``)
``truncated``               bool                           ``n_tokens > max_length``
==========================  =============================  ==============================================

The token columns have the types of ``mmprep pack`` shards. ``n_tokens`` (with special tokens) is not
transformers' ``length``, which is the padded length (always ``max_length`` here); ``num_truncated_tokens`` is
transformers' name (``return_overflowing_tokens``).

Every input row ends up in exactly one place: the Parquet file or ``<out>.rejected.jsonl`` (one JSON object per
line: ``line``, ``id``, ``stage``, ``reason``, ``detail``). Both files are written under temporary names and
renamed when complete. Rows that reuse an id are kept (real manifests repeat an image id for each question about
it; ``line`` tells them apart) and counted in ``duplicate_ids`` with a warning, since ``mmprep pack`` rejects them
as ``duplicate_id``.
The Parquet schema metadata key ``mmprep`` records the tokenizer and settings.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mmprep.errors import RunFailed, UsageError
from mmprep.inputs.manifest import ColumnMap, iter_samples
from mmprep.records import Rejected, Sample
from mmprep.runtime.engines.base import InlineEngine, ProgressFn
from mmprep.runtime.files import atomic_write, ensure_dir
from mmprep.runtime.job import Chunk, Policy, StreamedRecord, StreamingJob, run_job
from mmprep.text.config import TextConfig, TextError, TokenBatch
from mmprep.text.encoder import TextEncoder
from mmprep.text.lengths import LengthHistogram
from mmprep.text.render import sample_image_count

__all__ = [
    "TokenizeReport",
    "rejects_path_for",
    "token_table",
    "tokenize_manifest",
    "tokenize_samples",
]

_FLUSH_ROWS = 16384  # rows buffered per Parquet row group
#: Bytes of padded ids and masks held at once (per tokenizer call and per row group): bounds memory at a large
#: ``max_length`` by using fewer rows per batch.
_BUFFER_BYTES = 256 << 20
_BYTES_PER_POSITION = 5  # int32 id + int8 mask


@dataclass
class TokenizeReport:
    """What a tokenize run did.

    Attributes:
        rows_in: manifest rows read; equals ``rows_written + rows_rejected``.
        rejected_by_reason: reject counts by reason code.
        lengths: the length report (see :meth:`LengthHistogram.summary`), over written rows.
        tokens: real (unpadded) tokens written; ``tokens_per_s`` over the whole run, file reading included.
        duplicate_ids: written rows whose id an earlier row already used (see the module docs).
        histogram: the token-count histogram of the written rows (for :func:`mmprep.text.lengths.plot_lengths`);
            not part of :meth:`to_dict`, which holds its summary as ``lengths``.
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
    duplicate_ids: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plot: str | None = None
    histogram: LengthHistogram = field(default_factory=LengthHistogram, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "histogram"}


def rejects_path_for(out: str | os.PathLike[str]) -> Path:
    """Where the rejects of an output file go: ``<out>.rejected.jsonl``."""
    p = Path(out)
    return p.with_name(p.name + ".rejected.jsonl")


def _schema(max_length: int, metadata: dict[str, Any] | None = None) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("line", pa.int64()),
            ("input_ids", pa.list_(pa.int32(), max_length)),
            ("attention_mask", pa.list_(pa.int8(), max_length)),
            ("n_tokens", pa.int32()),
            ("num_truncated_tokens", pa.int32()),
            ("truncated", pa.bool_()),
        ],
        metadata=None if metadata is None else {"mmprep": json.dumps(metadata, sort_keys=True)},
    )


def token_table(batch: TokenBatch, ids: list[str], lines: list[int]) -> Any:
    """A pyarrow Table with the output columns for one encoded batch."""
    import pyarrow as pa

    length = batch.input_ids.shape[1]
    mask = batch.attention_mask.view(np.int8)  # 0/1: the same bytes as int8
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(lines, pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(batch.input_ids.reshape(-1)), length),
            pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), length),
            pa.array(batch.n_tokens),
            pa.array(np.maximum(batch.n_tokens - length, 0).astype(np.int32)),
            pa.array(batch.truncated),
        ],
        schema=_schema(length),
    )


def _check_paths(manifest: str, out: Path) -> None:
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a directory", hint="pass a file name such as tokens.parquet")
    # Missing folders are created when the file is written (as pack creates its output folder); a file in the way
    # is an error now, before any work.
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is not a directory", hint="choose another output path")
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
) -> TokenizeReport:
    """Tokenise the text of every manifest row into ``out`` (Parquet) and ``<out>.rejected.jsonl``.

    Reads the manifest as a stream and encodes ``batch_size`` rows at a time (fewer when ``max_length`` is very
    large), so memory stays bounded.

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
        The report; ``report.histogram`` is the token-count histogram of the written rows.

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
    return _write_tokens(
        iter_samples(manifest, columns, fmt=fmt), out_path, enc, cfg, manifest=manifest,
        tokenizer_dir=str(tokenizer_dir), batch_size=batch_size, progress=progress, started=started,
    )


def tokenize_samples(
    items: Iterable[Sample | Rejected],
    out: str | os.PathLike[str],
    encoder: TextEncoder,
    *,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
    source: str = "<samples>",
) -> TokenizeReport:
    """:func:`tokenize_manifest` for samples already read (e.g. by :func:`mmprep.inputs.manifest.iter_samples`).

    ``items`` may hold :class:`Rejected` rows from reading; they go to the rejects file and count as rows read.
    The settings are ``encoder.cfg``; ``source`` names the input in the report.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    out_path = Path(out)
    _check_paths(source, out_path)
    return _write_tokens(
        items, out_path, encoder, encoder.cfg, manifest=source, tokenizer_dir=encoder.tokenizer_dir,
        batch_size=batch_size, progress=progress, started=time.perf_counter(),
    )


@dataclass
class TokenChunk(StreamedRecord):
    """One chunk of rows, tokenised (a runtime record): the table of its written rows and its rejects."""

    index: int
    items: int
    rejected: list[Rejected]
    ids: list[str]
    lines: list[int]
    table: Any  # pyarrow Table of the written rows (None once written)
    n_tokens: Any  # numpy int array: tokens per written row, before truncation
    tokens: int
    written: int
    source: str = ""

    @property
    def rows(self) -> int:
        return self.written

    @property
    def images(self) -> int:
        return 0


@dataclass(frozen=True)
class TokenizeTask:
    """Render and tokenise one chunk of manifest items (rows that cannot be rendered become rejects)."""

    encoder: TextEncoder

    def __call__(self, chunk: Chunk[list[Sample | Rejected]], progress: ProgressFn | None) -> TokenChunk:
        enc = self.encoder
        rejected: list[Rejected] = []
        texts: list[str] = []
        ids: list[str] = []
        lines: list[int] = []
        for item in chunk.items:
            if isinstance(item, Rejected):
                rejected.append(item)
                continue
            try:
                texts.append(enc.render(item.text, sample_id=item.id, image_count=sample_image_count(item)))
            except TextError as exc:
                rejected.append(Rejected(item.line, item.id, "text", exc.reason,
                                         f"{item.source}:{item.line}: {exc.detail}"))
                continue
            ids.append(item.id)
            lines.append(item.line)
        table, n_tokens, tokens = None, np.zeros(0, dtype=np.int32), 0
        if texts:
            batch = enc.encode_batch(texts)
            table, n_tokens = token_table(batch, ids, lines), batch.n_tokens
            tokens = int(batch.attention_mask.sum(dtype=np.int64))
        if progress is not None:
            progress(chunk.size, 0)
        source = next((it.source for it in chunk.items if isinstance(it, Sample)), "")
        return TokenChunk(chunk.index, chunk.size, rejected, ids, lines, table, n_tokens, tokens, len(ids), source)


class TokenizeJob(StreamingJob):
    """``tokenize`` on the job runtime: chunks of ``batch_size`` rows, tokenised in order and streamed into one
    Parquet file (row groups of ``group_rows``) and the rejects file."""

    ordered = True

    def __init__(self, items: Iterable[Sample | Rejected], encoder: TextEncoder, report: TokenizeReport, *,
                 batch_size: int, group_rows: int, writer: Any, rejects: BinaryIO) -> None:
        self.items = items
        self.encoder = encoder
        self.report = report
        self.batch_size = batch_size
        self.group_rows = group_rows
        self.writer = writer
        self.rejects = rejects
        self.pending: list[Any] = []
        self.pending_rows = 0
        self.seen: dict[str, int] = {}
        self.reasons: Counter[str] = Counter()
        self.first_dup = ""

    def chunks(self) -> Iterator[Chunk[list[Sample | Rejected]]]:
        chunk: list[Sample | Rejected] = []
        accepted = 0
        index = 0
        for item in self.items:
            chunk.append(item)
            accepted += isinstance(item, Sample)
            if accepted >= self.batch_size:  # a tokenizer call per batch_size rows
                yield Chunk(index, chunk, len(chunk))
                index, chunk, accepted = index + 1, [], 0
        if chunk:
            yield Chunk(index, chunk, len(chunk))

    def task(self) -> TokenizeTask:
        return TokenizeTask(self.encoder)

    def accept(self, record: TokenChunk, out: Any) -> TokenChunk:
        report = self.report
        for rej in record.rejected:
            self.reasons[rej.reason] += 1
            self.rejects.write((json.dumps(rej.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
        for sid, line in zip(record.ids, record.lines, strict=True):
            first = self.seen.setdefault(sid, line)
            if first != line:
                if not report.duplicate_ids:
                    self.first_dup = f"{record.source}:{line}: id '{sid}' already used on line {first}"
                report.duplicate_ids += 1
        report.rows_in += record.items
        report.rows_written += record.rows
        report.tokens += record.tokens
        report.histogram.add(record.n_tokens)
        if record.table is not None:
            self.pending.append(record.table)
            self.pending_rows += record.rows
            while self.pending_rows >= self.group_rows:
                self._write_group(self.group_rows)
        return TokenChunk(record.index, record.items, record.rejected, [], [], None, None, record.tokens,
                          record.written, record.source)

    def _write_group(self, rows: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, rows))
        rest = table.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self._write_group(self.pending_rows)
        self.writer.close()


def _write_tokens(
    items: Iterable[Sample | Rejected],
    out_path: Path,
    enc: TextEncoder,
    cfg: TextConfig,
    *,
    manifest: str,
    tokenizer_dir: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
    started: float,
) -> TokenizeReport:
    # Rows per tokenizer call and per row group, bounded so padded arrays stay within _BUFFER_BYTES.
    max_rows = max(1, _BUFFER_BYTES // (_BYTES_PER_POSITION * cfg.max_length))
    batch_size = min(batch_size, max_rows)
    flush_at = min(_FLUSH_ROWS, max_rows)
    group_rows = -(-flush_at // batch_size) * batch_size  # whole tokenizer batches per row group
    rej_path = rejects_path_for(out_path)
    report = TokenizeReport(
        manifest=manifest,
        out=str(out_path),
        rejects=str(rej_path),
        tokenizer=enc.name_or_path,
        config=asdict(cfg) | {"pad_token_id": enc.pad_token_id},
        warnings=list(enc.warnings),
    )
    import pyarrow.parquet as pq

    metadata = {
        "tokenizer": enc.name_or_path,
        "tokenizer_dir": tokenizer_dir,
        "vocab_size": enc.vocab_size,
        "pad_token": enc.pad_token,
        "pad_token_id": enc.pad_token_id,
        **asdict(cfg),
    }
    jobs: list[TokenizeJob] = []

    def fill(out_fh: BinaryIO, rej_fh: BinaryIO) -> None:
        """Stream every row into the Parquet file or the rejects file (both open under temporary names)."""
        try:
            writer = pq.ParquetWriter(out_fh, _schema(cfg.max_length, metadata))
        except OSError as exc:
            raise RunFailed(f"{out_path}: cannot write: {exc.strerror or exc}") from None
        job = TokenizeJob(items, enc, report, batch_size=batch_size, group_rows=group_rows, writer=writer,
                          rejects=rej_fh)
        jobs.append(job)
        try:
            run_job(job, InlineEngine(), None, policy=Policy(require_rows=False),
                    progress=(lambda rows, _images: progress(rows)) if progress is not None else None)
            job.close()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the writer must not outlive the file it writes into
                writer.close()
            if isinstance(exc, OSError):  # the Parquet writer (ArrowIOError is an OSError) or the rejects file
                raise RunFailed(f"{out_path}: cannot write: {exc.strerror or exc}") from None
            raise

    # Both files are written under temporary names; the rejects file is renamed first, then the Parquet file.
    ensure_dir(out_path.parent)
    atomic_write(out_path, lambda out_fh: atomic_write(rej_path, lambda rej_fh: fill(out_fh, rej_fh), fsync=False),
                 fsync=False)
    job = jobs[0]
    reasons, first_dup = job.reasons, job.first_dup
    hist = report.histogram
    if report.duplicate_ids:
        report.warnings.append(
            f"{report.duplicate_ids:,} written row(s) reuse an id of an earlier row ({first_dup}); they are kept "
            "and the line column tells them apart, but mmprep pack rejects them as duplicate_id"
        )
    report.rows_rejected = sum(reasons.values())
    report.rejected_by_reason = dict(reasons.most_common())
    report.lengths = hist.summary(cfg.max_length)
    report.seconds = time.perf_counter() - started
    report.tokens_per_s = report.tokens / report.seconds if report.seconds > 0 else 0.0
    return report

"""Read manifests (JSONL, JSON list, CSV, Parquet; ``-`` for stdin) as a stream of records with positions.

A manifest may also be a folder: one written by ``datasets.Dataset.save_to_disk`` (``state.json`` and Arrow
files), or a folder of Parquet files (a Hub dataset's ``data/``, or the ``data/`` of ``mmprep pack``), read in
file-name order as one input whose rows are numbered across the files. A single ``.arrow`` file (Arrow IPC stream
or file) is read too.

Row-level problems (a line that is not JSON, not UTF-8, not an object) come back as records with ``error`` set,
so callers turn them into rejects with the line number; file-level problems (missing file, unknown format, a CSV
without a header, a JSON document that is not a list) raise :class:`~mmprep.errors.InputError` (exit 2).

JSON lists are parsed incrementally (one element at a time), so memory stays bounded on huge files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast, runtime_checkable

from mmprep.errors import InputError, UsageError
from mmprep.records import EmbeddedImage, ImageRef, Rejected, Sample

__all__ = [
    "FORMATS",
    "MAX_RECORD_BYTES",
    "ColumnMap",
    "InputLocation",
    "ManifestSource",
    "RawRecord",
    "TableInput",
    "check_columns",
    "detect_format",
    "iter_json_array",
    "iter_records",
    "iter_samples",
    "open_binary",
    "table_input",
    "to_sample",
]

Format = Literal["jsonl", "json", "csv", "parquet", "arrow"]
FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet", "arrow")

_CHUNK = 1 << 20
#: The longest record accepted: a JSONL line, a JSON list element or a CSV row/cell. A longer one is rejected with its
#: line (JSONL, CSV) or stops the file (JSON list, where the rest cannot be trusted); memory stays bounded by it.
MAX_RECORD_BYTES = 64 << 20
#: About this many bytes of a Parquet/Arrow input are turned into Python records at a time (rows holding image
#: bytes are large: a fixed number of rows would hold gigabytes).
_TABLE_BATCH_BYTES = 4 << 20


@runtime_checkable
class InputLocation(Protocol):
    """A readable location that opens itself, e.g. a remote :class:`mmprep.runtime.storage.Location`."""

    def open_input(self) -> IO[bytes]:
        """A binary file open for reading (raises InputError naming the location)."""
        ...


#: What the readers take: a local path, ``-`` for standard input, or an :class:`InputLocation`.
ManifestSource = str | os.PathLike[str] | InputLocation


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record of a manifest: its data, or the row-level error that prevented reading it.

    ``line`` is 1-based: the line for JSONL/CSV, the line where the element starts for a JSON list, the row
    number for Parquet.
    """

    source: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None
    fmt: str = ""  # the format it was read as; CSV cells may hold a list as JSON or as ``a|b``


def open_binary(path: ManifestSource) -> IO[bytes]:
    """Open a file for binary reading; ``-`` is standard input. Raises InputError naming the file.

    ``path`` may also be an opened remote location (anything with ``open_input()``, e.g. ``storage.Location``).
    """
    if str(path) == "-":
        return sys.stdin.buffer
    if isinstance(path, InputLocation):
        return path.open_input()
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError(f"{p}: is a directory, expected a file")
        fh = p.open("rb")
        kind = os.fstat(fh.fileno()).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):  # /dev/zero, /dev/urandom: endless, never a manifest
            fh.close()
            raise InputError(f"{p}: not a regular file or a pipe", hint="give a manifest file")
        return fh
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except PermissionError:
        raise InputError(f"{p}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot open: {exc.strerror or exc}") from None


def detect_format(path: ManifestSource, head: bytes = b"") -> Format:
    """Choose a manifest format from the extension, or from the first bytes (``head``) for stdin/unknown."""
    suffixes = [s.lower() for s in Path(str(path)).suffixes]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext == ".arrow":
        return "arrow"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PAR1"):
        return "parquet"
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if (str(path) == "-" or not ext) and stripped:
        return "csv"
    raise InputError(
        f"{path}: cannot tell the manifest format from the name or content",
        hint="pass --format " + "|".join(FORMATS),
    )


def iter_records(path: ManifestSource, fmt: str | None = None, *, name: str | None = None) -> Iterator[RawRecord]:
    """Yield every record of a manifest, in file order (``name``: how records name their source, default the
    path)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'", hint="choose one of " + ", ".join(FORMATS))
    name = name or ("<stdin>" if str(path) == "-" else str(path))
    if not isinstance(path, InputLocation) and str(path) != "-" and Path(path).is_dir():
        yield from _iter_table_files(_table_of_folder(Path(path), fmt), name)
        return
    fh = open_binary(path)
    try:
        # BufferedReader only needs read/readinto of the raw file, which every binary file has
        stream = fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, fh), _CHUNK)
        head = stream.peek(64)[:64]
        chosen = fmt or detect_format(path, head)
        if fmt is None and chosen == "jsonl" and str(path).lower().endswith(".json"):
            _check_json_lines(stream, name)
        if chosen == "jsonl":
            yield from _iter_jsonl(stream, name)
        elif chosen == "json":
            for line, value, error in iter_json_array(stream, name):
                if error is not None:
                    yield RawRecord(name, line, None, error)
                elif not isinstance(value, dict):
                    yield RawRecord(name, line, None, f"expected a JSON object, got {_typename(value)}")
                else:
                    yield RawRecord(name, line, value)
        elif chosen == "csv":
            yield from _iter_csv(stream, name)
        elif chosen == "arrow":
            yield from _iter_arrow_stream(stream, name)
        else:
            yield from _iter_parquet(stream, name)
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def _check_json_lines(stream: Any, name: str) -> None:
    """A ``.json`` file that starts with ``{`` is read as JSON Lines only if its first line is a whole object.

    Otherwise it is one JSON document (a dict such as a COCO file), not a list of records: a file-level error
    rather than every line rejected as invalid JSON.
    """
    head = stream.peek(_CHUNK)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n").split(b"\n", 1)[0]
    if b"\n" not in head and len(head) >= _CHUNK:
        return  # a first line longer than the peek: cannot tell, read it as JSON Lines
    try:
        json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(
            f"{name}: one JSON object spanning several lines, expected a list of records",
            hint="write a JSON list [{...}, ...] of records, or one object per line (.jsonl / --format jsonl)",
        ) from None


# JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): valid JSON, but not text that UTF-8 (Parquet, tokenizers,
# file systems) can hold. The escape is searched in the raw text first, so ordinary rows pay one regex scan.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ERROR = "not valid UTF-8: a \\uXXXX escape encodes a lone surrogate"


def _valid_unicode(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _bounded_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` with every line at most :data:`MAX_RECORD_BYTES`; a longer line comes as
    ``(line number, None)`` and is skipped to its end without being held in memory."""
    lineno = 0
    while True:
        raw = stream.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) <= MAX_RECORD_BYTES or raw.endswith(b"\n"):
            yield lineno, raw
            continue
        while raw and not raw.endswith(b"\n"):  # the rest of the long line, a block at a time
            raw = stream.readline(_CHUNK)
        yield lineno, None


def _too_long(name: str, lineno: int) -> RawRecord:
    return RawRecord(name, lineno, None, f"line longer than {MAX_RECORD_BYTES >> 20} MB (the limit of one record)")


def _iter_jsonl(stream: IO[bytes], name: str) -> Iterator[RawRecord]:
    loads = json.loads
    for lineno, raw in _bounded_lines(stream):
        if raw is None:
            yield _too_long(name, lineno)
            continue
        if not raw.strip():
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRecord(name, lineno, None, f"not valid UTF-8 (byte {exc.start})")
            continue
        try:
            value = loads(text)
        except json.JSONDecodeError as exc:
            yield RawRecord(name, lineno, None, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield RawRecord(name, lineno, None, "invalid JSON: nested too deeply to read")
            continue
        if _SURROGATE_ESCAPE.search(text) and not _valid_unicode(value):
            yield RawRecord(name, lineno, None, _SURROGATE_ERROR)
            continue
        if not isinstance(value, dict):
            yield RawRecord(name, lineno, None, f"expected a JSON object, got {_typename(value)}")
            continue
        yield RawRecord(name, lineno, value)


def iter_json_array(stream: IO[bytes], name: str) -> Iterator[tuple[int, Any, str | None]]:
    """Parse a JSON array one element at a time: yields ``(line, value, error)``.

    Memory holds one chunk plus one element. A malformed element is a file-level error (the rest of the
    document cannot be trusted), raised as InputError with the line. A well-formed element that is not valid
    Unicode (a lone surrogate escape) comes back with ``error`` set and ``value`` None.
    """
    decoder = json.JSONDecoder()
    raw_decode = decoder.raw_decode
    buf = ""
    pos = 0
    line = 1  # line number at buf[pos]
    eof = False
    decode = _incremental_utf8(stream, name)

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = next(decode, None)
        if chunk is None:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            n = len(buf)
            while pos < n and buf[pos] in " \t\r\n\ufeff":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < n or not fill():
                return

    skip_ws()
    if pos >= len(buf):
        raise InputError(f"{name}: empty file, expected a JSON list")
    if buf[pos] != "[":
        raise InputError(f"{name}:{line}: expected a JSON list of records (a file starting with '[')",
                         hint="for one JSON object per line use a .jsonl file or --format jsonl")
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise InputError(f"{name}:{line}: unexpected end of file inside the JSON list")
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):  # a second list (cat a.json b.json), or anything else after the end
                raise InputError(f"{name}:{line}: data after the end of the JSON list",
                                 hint="a JSON manifest holds exactly one list [...]; concatenate lists into one, or "
                                      "use JSON Lines")
            return
        if not first:
            if buf[pos] != ",":
                raise InputError(f"{name}:{line}: expected ',' or ']' between list elements")
            pos += 1
            skip_ws()
        first = False
        start_line = line
        while True:
            try:
                value, end = raw_decode(buf, pos)
            except RecursionError:
                raise InputError(f"{name}:{start_line}: invalid JSON: an element nested too deeply to read") from None
            except json.JSONDecodeError as exc:
                # Maybe the element continues in the next chunks. Read at least as much again as is buffered
                # before parsing it anew: each retry parses twice the text of the last, so a huge element costs
                # linear time, not one full re-parse per chunk.
                have = len(buf) - pos
                if have > MAX_RECORD_BYTES:
                    raise InputError(f"{name}:{start_line}: a list element longer than {MAX_RECORD_BYTES >> 20} MB "
                                     "(the limit of one record)") from None
                grown = False
                while fill():
                    grown = True
                    if len(buf) - pos >= 2 * have:
                        break
                if grown:
                    continue
                raise InputError(
                    f"{name}:{start_line + buf.count(chr(10), pos, exc.pos)}: invalid JSON: {exc.msg}"
                ) from None
            # A number at the very end of the buffer might continue in the next chunk.
            if end >= len(buf) and not eof and not isinstance(value, (dict, list, str)) and fill():
                continue
            break
        bad = _SURROGATE_ESCAPE.search(buf, pos, end) is not None and not _valid_unicode(value)
        line += buf.count("\n", pos, end)
        pos = end
        yield (start_line, None, _SURROGATE_ERROR) if bad else (start_line, value, None)
        if pos > _CHUNK:
            buf = buf[pos:]
            pos = 0


def _incremental_utf8(stream: IO[bytes], name: str) -> Iterator[str]:
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        chunk = stream.read(_CHUNK)
        try:
            text = dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}: not valid UTF-8 at byte {offset + exc.start}") from None
        offset += len(chunk)
        if text:
            yield text
        if not chunk:
            return


def _iter_csv(stream: IO[bytes], name: str) -> Iterator[RawRecord]:
    # Undecodable bytes become lone surrogates, so one bad row is rejected with its line instead of failing the file.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        yield from _csv_rows(text, name)
    finally:
        text.detach()  # the caller owns (and closes) the underlying stream


_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def _csv_rows(text: IO[str], name: str) -> Iterator[RawRecord]:
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    reader = csv.reader(_bounded_text_lines(text), delimiter=delimiter, strict=True)
    try:
        header = _next_row(reader)
    except StopIteration:
        raise InputError(f"{name}: empty CSV file, expected a header row") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}:1: not valid UTF-8 (byte {exc.start})") from None
    if _BAD_UTF8.search("".join(header)):
        raise InputError(f"{name}:1: the header row is not valid UTF-8")
    header = [h.strip() for h in header]
    if not any(header) or len(set(header)) != len(header):
        raise InputError(f"{name}:1: the header row must name every column once, got {header}")
    while True:
        start = reader.line_num + 1
        try:
            row = _next_row(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}:{start}: not valid UTF-8 (byte {exc.start})") from None
        except csv.Error as exc:
            yield RawRecord(name, start, None, f"malformed CSV{_spanning(start, reader.line_num)}: {exc}")
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if row == [_LONG_LINE]:
            yield _too_long(name, start)
            continue
        if _BAD_UTF8.search("".join(row)):
            yield RawRecord(name, start, None, "not valid UTF-8")
            continue
        if len(row) != len(header):
            # A stray quote makes the csv module read on to the next quote: the lines it swallowed are named, so
            # no row disappears unseen.
            yield RawRecord(name, start, None,
                            f"expected {len(header)} fields, got {len(row)}{_spanning(start, reader.line_num)}")
            continue
        yield RawRecord(name, start, dict(zip(header, row, strict=True)), fmt="csv")


def _next_row(reader: Any) -> list[str]:
    """The next CSV row, read with a field limit of :data:`MAX_RECORD_BYTES` (the csv module's default of 128 KB
    rejects long captions). The limit is process-wide, so it is set for this read only and then restored."""
    old = csv.field_size_limit(MAX_RECORD_BYTES)
    try:
        return cast(list[str], next(reader))
    finally:
        csv.field_size_limit(old)


#: Stands for a line over the size limit in the CSV reader's input (it cannot occur in text: a private-use mark).
_LONG_LINE = "\ue000mmprep: line too long\ue000"


def _bounded_text_lines(text: IO[str]) -> Iterator[str]:
    """The lines of ``text``, each at most :data:`MAX_RECORD_BYTES` characters; a longer one is skipped to its end
    and replaced by :data:`_LONG_LINE` (so the CSV reader never holds more than one record's worth)."""
    while True:
        line = text.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_RECORD_BYTES or line.endswith("\n"):
            yield line
            continue
        while line and not line.endswith("\n"):
            line = text.readline(_CHUNK)
        yield _LONG_LINE + "\n"


def _spanning(start: int, end: int) -> str:
    if end <= start:
        return ""
    return (f" (this record runs from line {start} to line {end}: an unclosed quote on line {start} swallowed "
            f"{end - start} line(s))")


def _iter_parquet(stream: IO[bytes], name: str, first_row: int = 0) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source: Any = stream
    if not (hasattr(stream, "seekable") and stream.seekable()):
        source = io.BytesIO(stream.read())  # Parquet needs random access (footer first)
    try:
        # A buffered stream: unbuffered, pyarrow holds whole column chunks (and more) of a file of large values
        # (image bytes) while it iterates, and the reader's memory grows with the input.
        pf = pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{name}: not a readable Parquet file: {exc}") from None
    md = pf.metadata
    row_bytes = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups)) / max(1, md.num_rows)
    row = first_row
    try:
        for batch in pf.iter_batches(batch_size=_batch_rows(row_bytes), use_threads=False):
            for rec in batch.to_pylist():
                row += 1
                yield RawRecord(name, row, rec, fmt="parquet")
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{name}: the Parquet data is damaged after row {row}: {str(exc).splitlines()[0]}") from None


def _batch_rows(row_bytes: float) -> int:
    """Rows per batch turned into records: about :data:`_TABLE_BATCH_BYTES`, 1 to 1024."""
    return max(1, min(1024, int(_TABLE_BATCH_BYTES // max(1.0, row_bytes))))


def _iter_arrow_stream(stream: IO[bytes], name: str, first_row: int = 0) -> Iterator[RawRecord]:
    for batch in _arrow_batches(stream, name):
        yield from _records_of(batch, name, first_row, "arrow")
        first_row += batch.num_rows


def _arrow_batches(source: Any, name: str) -> Iterator[Any]:
    """The record batches of an Arrow IPC stream (as ``datasets`` writes them) or file."""
    import pyarrow as pa

    try:
        reader: Any = pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, OSError):
        try:
            if hasattr(source, "seek"):
                source.seek(0)
            file_reader = pa.ipc.open_file(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{name}: not a readable Arrow file: {exc}") from None
        reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    try:
        yield from reader
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{name}: the Arrow data is damaged: {str(exc).splitlines()[0]}") from None


def _records_of(batch: Any, name: str, first_row: int, fmt: str) -> Iterator[RawRecord]:
    """The rows of a record batch as records, turned into Python values a few megabytes at a time."""
    n = batch.num_rows
    step = _batch_rows(batch.nbytes / max(1, n))
    row = first_row
    for start in range(0, n, step):
        for rec in batch.slice(start, step).to_pylist():
            row += 1
            yield RawRecord(name, row, rec, fmt=fmt)


@dataclass(frozen=True)
class TableInput:
    """A manifest whose columns have types: Parquet or Arrow, one file or a folder of them.

    Attributes:
        fmt: ``parquet`` or ``arrow``.
        files: the files of a folder manifest, in reading order (empty for a single file or stream).
        schema: the Arrow schema of the rows (the files' schemas unified), with the first file's metadata.
        rows: the number of rows.
    """

    fmt: str
    files: tuple[str, ...]
    schema: Any
    rows: int


def table_input(path: ManifestSource, fmt: str | None = None) -> TableInput | None:
    """The schema and row count of a Parquet or Arrow manifest (file or folder), read from the footers and batch
    headers alone; None for the text formats and for standard input.

    Raises:
        InputError: a folder that is neither a ``save_to_disk`` folder nor a folder of Parquet files, a damaged
            file, or files whose schemas do not agree.
    """
    if str(path) == "-":
        return None
    chosen: str | None
    if isinstance(path, InputLocation):
        chosen = fmt or detect_format(str(path))
        if chosen not in ("parquet", "arrow"):
            return None
        with path.open_input() as fh:
            return _table_of_file(fh, str(path), chosen, local=False)
    p = Path(path)
    if p.is_dir():
        return _table_of_folder(p, fmt)
    chosen = fmt
    if chosen is None:
        try:
            with p.open("rb") as fh:
                chosen = detect_format(p, fh.read(64))
        except OSError:
            return None  # iter_records names the problem
    if chosen not in ("parquet", "arrow"):
        return None
    try:
        with p.open("rb") as fh:
            return _table_of_file(fh, str(p), chosen)
    except OSError:
        return None


def _table_of_file(fh: Any, name: str, fmt: str, *, local: bool = True) -> TableInput:
    """Schema and rows of one Parquet or Arrow file (``fh`` open on it; a local Arrow file is memory-mapped, so
    counting its rows reads only batch headers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{name}: not a readable Parquet file: {exc}") from None
        return TableInput("parquet", (), pf.schema_arrow, pf.metadata.num_rows)
    rows = 0
    schema = None
    for batch in _arrow_batches(pa.memory_map(name) if local else fh, name):
        schema = batch.schema if schema is None else schema
        rows += batch.num_rows
    if schema is None:  # no batch at all: the stream's schema message
        try:
            schema = pa.ipc.open_stream(pa.memory_map(name) if local else fh).schema
        except (pa.ArrowInvalid, OSError):
            schema = pa.schema([])
    return TableInput("arrow", (), schema, rows)


def _table_of_folder(p: Path, fmt: str | None) -> TableInput:
    import pyarrow as pa

    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "state.json").is_file())
        raise InputError(f"{p}: a datasets DatasetDict folder (splits: {', '.join(splits) or 'none'})",
                         hint=f"give one split's folder, e.g. {p / (splits[0] if splits else 'train')}")
    if (p / "state.json").is_file():
        try:
            state = json.loads((p / "state.json").read_text(encoding="utf-8"))
            names = [f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{p / 'state.json'}: not a datasets save_to_disk state file ({exc})") from None
        files = [p / n for n in names]
        chosen = "arrow"
    else:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".parquet", ".pq") and not f.name.startswith("."))
        chosen = "parquet"
        if not files:
            raise InputError(f"{p}: is a directory without Parquet files or a datasets save_to_disk folder",
                             hint="give a manifest file, a folder of .parquet files, or a save_to_disk folder")
    if fmt is not None and fmt != chosen:
        raise UsageError(f"--format {fmt}: {p} is a folder of {chosen} files")
    schemas, rows = [], 0
    for f in files:
        try:
            with f.open("rb") as fh:
                info = _table_of_file(fh, str(f), chosen)
        except FileNotFoundError:
            raise InputError(f"{f}: no such file (listed in {p / 'state.json'})") from None
        schemas.append(info.schema)
        rows += info.rows
    try:
        schema = pa.unify_schemas(schemas).with_metadata(schemas[0].metadata)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"{p}: its files have different columns or types: {str(exc).splitlines()[0]}") from None
    return TableInput(chosen, tuple(str(f) for f in files), schema, rows)


def _iter_table_files(table: TableInput, name: str) -> Iterator[RawRecord]:
    """The rows of a folder manifest, file after file, numbered across the files."""
    import pyarrow as pa

    row = 0
    for f in table.files:
        if table.fmt == "parquet":
            with open(f, "rb") as fh:
                for rec in _iter_parquet(fh, name, row):
                    row = rec.line
                    yield rec
        else:  # read, not memory-mapped: the pages of a mapped file would count as this process's memory
            with pa.OSFile(f) as fh:
                for batch in _arrow_batches(fh, f):
                    yield from _records_of(batch, name, row, "arrow")
                    row += batch.num_rows


# -- mapping records onto Sample ---------------------------------------------------------------------------

_ID_CANDIDATES = ("id", "sample_id", "uid", "key")
_IMAGE_CANDIDATES = ("images", "image", "image_path", "image_paths", "file_name", "filename", "path")
_TEXT_CANDIDATES = ("text", "caption", "captions", "conversations", "messages", "prompt")
_TAG_CANDIDATES = ("tags", "labels", "union_label_id", "tag_ids")


@dataclass(frozen=True, slots=True)
class ColumnMap:
    """Which manifest fields hold the id, images, text and tags.

    A field left as None is looked up in each record under the usual names (``images``, ``image``, ...; see
    the ``_*_CANDIDATES`` tuples), so manifests whose rows differ in naming still map.
    """

    id: str | None = None
    images: str | None = None
    text: str | None = None
    tags: str | None = None

    def resolve(self, keys: Sequence[str]) -> ColumnMap:
        """Fill unset fields from a record's keys using the usual names."""

        def pick(current: str | None, candidates: Sequence[str]) -> str | None:
            if current is not None:
                return current
            return next((c for c in candidates if c in keys), None)

        return ColumnMap(
            id=pick(self.id, _ID_CANDIDATES),
            images=pick(self.images, _IMAGE_CANDIDATES),
            text=pick(self.text, _TEXT_CANDIDATES),
            tags=pick(self.tags, _TAG_CANDIDATES),
        )


def _as_list(value: Any, *, csv_cell: bool) -> list[Any] | None:
    """A list field: a JSON list, or (CSV cells only) a JSON list in a string or a ``|``-separated string."""
    if isinstance(value, list):
        return value
    if csv_cell and isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply to read
                return None
            return parsed if isinstance(parsed, list) else None
        return [p.strip() for p in s.split("|") if p.strip()]
    return None


def _is_list_cell(cell: str) -> bool:
    """A CSV cell that holds several values: a JSON list, or values separated by ``|``."""
    return cell.strip()[:1] == "[" or "|" in cell


def _image_ref(value: Any, embedded: bool = False) -> ImageRef | None:
    """A path, or (``embedded``) the bytes of a Hugging Face Image value ``{bytes, path}`` or of a binary cell;
    a Hugging Face Image value without bytes stands for its path."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):  # Hugging Face Image storage {"bytes":..., "path":...}
        data, path = value.get("bytes"), value.get("path")
        path = path if isinstance(path, str) and path else None
        if embedded and isinstance(data, bytes | bytearray) and data:
            return EmbeddedImage(size=len(data), path=path, data=bytes(data))
        return path
    if embedded and isinstance(value, bytes | bytearray) and value:
        return EmbeddedImage(size=len(value), data=bytes(value))
    return None


def _shape(value: Any) -> str:
    """What a value is, for a message: never its bytes (an image's bytes would fill the terminal)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"binary data ({len(value):,} bytes)"
    if isinstance(value, dict):
        if not value:
            return "an empty object"
        parts = []
        for k, v in list(value.items())[:4]:
            parts.append(f"{k}: {_shape(v) if isinstance(v, bytes | bytearray | dict | list) else _typename(v)}")
        return "an object {" + ", ".join(parts) + (", ..." if len(value) > 4 else "") + "}"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value!r:.60}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return _typename(value)


def to_sample(
    rec: RawRecord,
    cmap: ColumnMap,
    *,
    csv_cells: bool = False,
    embedded: bool = False,
    keep_extra: bool = False,
) -> Sample | Rejected:
    """Map one record onto a :class:`Sample`, or a manifest-stage :class:`Rejected` with the reason.

    Args:
        rec: the record.
        cmap: which fields hold the id, images, text and tags.
        csv_cells: the record is a CSV row (lists may be written as ``a|b`` or as JSON in a cell).
        embedded: image bytes in the record (Hugging Face Image values, binary cells) become
            :class:`~mmprep.records.EmbeddedImage` references; otherwise only paths are references.
        keep_extra: fill :attr:`Sample.extra` with the record's other fields (all but id, images and tags).
    """
    if rec.data is None:
        reason = "not_utf8" if rec.error and "UTF-8" in rec.error else "bad_record"
        if rec.error and rec.error.startswith("invalid JSON"):
            reason = "invalid_json"
        return Rejected(rec.line, None, "manifest", reason, f"{rec.source}:{rec.line}: {rec.error}")
    data = rec.data
    loc = f"{rec.source}:{rec.line}"
    cmap = cmap.resolve(list(data))

    raw_id = data.get(cmap.id) if cmap.id else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        sid = f"L{rec.line}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        sid = str(raw_id)
    else:
        return Rejected(rec.line, None, "manifest", "bad_type", f"{loc}: id must be a string or integer")

    what = "an image path or embedded image" if embedded else "an image path"
    images: tuple[ImageRef, ...] = ()
    if cmap.images is not None:
        if cmap.images not in data:
            return Rejected(rec.line, sid, "manifest", "missing_column", f"{loc}: no '{cmap.images}' field")
        raw = data[cmap.images]
        if raw is None:
            images = ()
        elif isinstance(raw, dict | bytes | bytearray) or (isinstance(raw, str)
                                                          and not (csv_cells and _is_list_cell(raw))):
            ref = _image_ref(raw, embedded)
            if ref is None:
                return Rejected(rec.line, sid, "manifest", "bad_type",
                                f"{loc}: '{cmap.images}' is not {what}: {_shape(raw)}")
            images = (ref,)
        else:
            items = _as_list(raw, csv_cell=csv_cells)
            if items is None:
                return Rejected(
                    rec.line, sid, "manifest", "bad_type",
                    f"{loc}: '{cmap.images}' must be a path or a list of paths, got {_typename(raw)}",
                )
            refs = [_image_ref(v, embedded) for v in items]
            bad = next((k for k, r in enumerate(refs) if r is None), None)
            if bad is not None:
                return Rejected(
                    rec.line, sid, "manifest", "bad_type",
                    f"{loc}: '{cmap.images}' item {bad + 1} is not {what}: {_shape(items[bad])}",
                )
            images = tuple(r for r in refs if r is not None)

    text: Any = None
    if cmap.text is not None:
        text = data.get(cmap.text)
        if csv_cells and isinstance(text, str) and text.strip().startswith("[") and cmap.text != "text":
            parsed = _as_list(text, csv_cell=True)
            text = parsed if parsed is not None else text

    tags: tuple[str | int, ...] = ()
    if cmap.tags is not None and data.get(cmap.tags) is not None:
        raw_tags = data[cmap.tags]
        items = _as_list(raw_tags, csv_cell=csv_cells)
        if items is None:
            return Rejected(
                rec.line, sid, "manifest", "bad_type",
                f"{loc}: '{cmap.tags}' must be a list of tag names or ids, got {_typename(raw_tags)}",
            )
        clean: list[str | int] = []
        for t in items:
            if isinstance(t, bool) or not isinstance(t, (str, int)):
                return Rejected(
                    rec.line, sid, "manifest", "bad_type", f"{loc}: tag {t!r:.40} is not a name or an id"
                )
            if csv_cells and isinstance(t, str) and t.strip().isdigit():
                t = int(t)
            clean.append(t)
        tags = tuple(clean)

    extra: dict[str, Any] = {}
    if keep_extra:
        used = (cmap.id, cmap.images, cmap.tags)
        extra = {k: v for k, v in data.items() if k not in used}
    return Sample(id=sid, images=images, text=text, tags=tags, line=rec.line, source=rec.source, extra=extra)


def iter_samples(
    path: ManifestSource,
    cmap: ColumnMap | None = None,
    *,
    fmt: str | None = None,
    require_images: bool = False,
    embedded: bool = False,
    keep_extra: bool = False,
    name: str | None = None,
) -> Iterator[Sample | Rejected]:
    """Read a manifest and map each record to a Sample or a manifest-stage Rejected.

    The column map is resolved against the first readable record; an explicitly named column that the first
    record lacks is a file-level error (exit 2), since every row would be rejected. With ``require_images``, a
    CSV, Parquet or Arrow manifest without an image column is one too. ``embedded`` and ``keep_extra`` are passed
    to :func:`to_sample`; ``name`` is how records name their source (default: the path).
    """
    cmap = cmap or ColumnMap()
    checked = False
    name = name or ("<stdin>" if str(path) == "-" else str(path))
    for rec in iter_records(path, fmt, name=name):
        if rec.data is not None and not checked:
            checked = True
            check_columns(list(rec.data), cmap, name=name, line=rec.line, fmt=rec.fmt,
                          require_images=require_images)
        yield to_sample(rec, cmap, csv_cells=rec.fmt == "csv", embedded=embedded, keep_extra=keep_extra)


def check_columns(keys: Sequence[str], cmap: ColumnMap, *, name: str, line: int, fmt: str,
                  require_images: bool = False) -> None:
    """The file-level checks of a column map against the first readable record's keys (``line``): an explicitly
    named column it lacks; with ``require_images``, a CSV, Parquet or Arrow input without an image column (the
    header or schema is the same for every row: all of them would be rejected).

    Raises:
        InputError: naming the column and the flag, with the columns present.
    """
    for field_name, flag in _COLUMN_FLAGS.items():
        explicit = getattr(cmap, field_name)
        if explicit is not None and explicit not in keys:
            raise InputError(
                f"{name}:{line}: column '{explicit}' ({flag}) not found",
                hint="columns present: " + ", ".join(sorted(keys)),
            )
    if require_images and fmt in ("csv", "parquet", "arrow") and cmap.resolve(list(keys)).images is None:
        raise InputError(
            f"{name}: no image column (looked for {', '.join(_IMAGE_CANDIDATES)})",
            hint="name it with --image-column; columns present: " + ", ".join(sorted(keys)),
        )


_COLUMN_FLAGS = {"id": "--id-column", "images": "--image-column", "text": "--text-column", "tags": "--tags-column"}


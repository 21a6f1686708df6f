"""Annotation files: which format a file is in, and counting each format's records into the tally.

Formats (see :data:`ANNOTATION_FORMATS`): ``ram-json`` (streamed by :mod:`mmprep.labels.audit.ramjson`),
``json``/``jsonl``/``csv``/``parquet`` manifests with a tags column of names or ids (read by
:mod:`mmprep.inputs.manifest`), and RAM benchmark text (``ram-text``: ``image,tag,tag``, ``image,id id id``,
``image,id,id`` or ``image id id id``). :func:`scan_file` opens one file (``-`` = standard input), detects its
format unless one is given, counts it and returns its :class:`~mmprep.labels.audit.report.AnnotationFileReport`.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import IO, cast

from mmprep.errors import InputError
from mmprep.inputs.manifest import ColumnMap, RawRecord, iter_records, open_binary, to_sample
from mmprep.labels.audit.ramjson import scan_ram_json
from mmprep.labels.audit.report import AnnotationFileReport
from mmprep.labels.audit.tally import Tally, fixed_loc
from mmprep.records import Rejected

__all__ = ["ANNOTATION_FORMATS", "RAM_FORMATS", "detect_annotation_format", "scan_file"]

ANNOTATION_FORMATS: tuple[str, ...] = (
    "ram-json", "json", "jsonl", "csv", "parquet", "ram-text", "ram-text-ids", "ram-text-names",
)
#: The formats that have no tags column (``--tags-column`` does not apply).
RAM_FORMATS: tuple[str, ...] = ("ram-json", "ram-text", "ram-text-ids", "ram-text-names")

_TAG_COLUMNS = ("tags", "labels", "union_label_id", "tag_ids")
_DIGITS = re.compile(r"-?\d+")


def detect_annotation_format(path: str | Path, head: bytes, tags_column: str | None = None) -> str:
    """Choose an annotation format from the file name and its first bytes (see :data:`ANNOTATION_FORMATS`)."""
    ext = Path(str(path)).suffix.lower()
    if head.startswith(b"PAR1") or ext in (".parquet", ".pq"):
        return "parquet"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        if tags_column is None and (b'"union_label_id"' in head or b'"parse_label_id"' in head):
            return "ram-json"
        return "json"
    if stripped.startswith(b"{") or ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext in (".csv", ".tsv"):
        return "csv"
    first = stripped.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    header = {h.strip().lower() for h in next(csv.reader([first]), [])}
    wanted = {tags_column.lower()} if tags_column else set(_TAG_COLUMNS)
    if header & wanted and len(header) > 1:
        return "csv"
    return "ram-text"


def _scan_manifest(path: str, name: str, fmt: str, tags_column: str | None, tally: Tally) -> None:
    column = tags_column
    checked = False
    if fmt == "csv":  # check the header before reading rows (a CSV row reader closed early warns)
        header = _csv_header(path)
        if header is not None:
            column = _tags_column(name, RawRecord(name, 1, dict.fromkeys(header)), column)
            checked = True
    with closing(cast(Generator[RawRecord, None, None], iter_records(path, fmt))) as records:
        for n, rec in enumerate(records, 1):
            loc = fixed_loc(name, rec.line, n)
            if rec.data is None:
                tally.problem("bad_record", rec.error or "unreadable record", loc)
                continue
            if not checked:
                checked = True
                column = _tags_column(name, rec, column)
            sample = to_sample(replace(rec, source=name), ColumnMap(tags=column), csv_cells=fmt == "csv")
            if isinstance(sample, Rejected):
                tally.problem(sample.reason, sample.detail, loc)
            else:
                tally.add_tags(sample.tags, loc)


def _csv_header(path: str) -> list[str] | None:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            row = next(csv.reader(fh, delimiter="\t" if path.lower().endswith(".tsv") else ","), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # the row reader reports it
    return [h.strip() for h in row] if row else None


def _tags_column(name: str, rec: RawRecord, column: str | None) -> str:
    """The tags column, checked against the first readable record."""
    data = rec.data or {}
    if column is None:
        found = ColumnMap().resolve(list(data)).tags
        if found is None:
            raise InputError(
                f"{name}:{rec.line}: no tags column (looked for {', '.join(_TAG_COLUMNS)})",
                hint="name it with --tags-column (columns present: " + ", ".join(sorted(data))
                + "), or use --format ram-text for RAM benchmark lines (image,tag,tag)",
            )
        return found
    if column not in data:
        raise InputError(f"{name}:{rec.line}: column '{column}' (--tags-column) not found",
                         hint="columns present: " + ", ".join(sorted(data)))
    return column


@dataclass(frozen=True, slots=True)
class _TextLine:
    """A non-empty line of a RAM benchmark file: its number, its length in bytes, and its text (None when it is not
    UTF-8; ``error`` says where)."""

    number: int
    nbytes: int
    text: str | None
    error: str = ""


def _text_lines(stream: IO[bytes], name: str) -> Iterator[_TextLine]:
    """Each non-empty line.

    Raises InputError for a NUL byte: the file is binary (an image, an archive) or UTF-16, not annotation text.
    """
    for lineno, raw in enumerate(stream, 1):
        nbytes = len(raw)
        if b"\0" in raw:
            raise InputError(f"{name}:{lineno}: holds a NUL byte: a binary file (or UTF-16 text), not annotation text",
                             hint="pass RAM benchmark annotations as UTF-8 text, or choose the format with --format")
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            yield _TextLine(lineno, nbytes, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield _TextLine(lineno, nbytes, None, f"not valid UTF-8 (byte {exc.start})")


@dataclass(frozen=True, slots=True)
class _Tokens:
    """The tag tokens of a RAM benchmark line (after the image name), and whether the line uses commas."""

    tokens: list[str]
    commas: bool

    def pieces(self) -> list[str]:
        """The tokens split at whitespace too (``image,1 2 3`` holds ids ``1``, ``2``, ``3``)."""
        return [p for t in self.tokens for p in t.split()] if self.commas else self.tokens


def _text_tokens(line: str) -> _Tokens:
    if "," in line:
        return _Tokens(line.split(",", 1)[1].split(","), True)
    return _Tokens(line.split()[1:], False)


def _looks_like_ids(line: str) -> bool | None:
    """True if the line's tags are integer ids, False if they are names, None if it has no tags."""
    tok = _text_tokens(line)
    pieces = tok.pieces()
    if not pieces:
        return None
    if not tok.commas:
        return True if all(_DIGITS.fullmatch(p) for p in pieces) else None
    return all(_DIGITS.fullmatch(p) for p in pieces)


def _scan_ram_text(
    stream: IO[bytes], name: str, fmt: str, tally: Tally, progress: Callable[[int], None] | None
) -> None:
    lines = _text_lines(stream, name)
    head: list[_TextLine] = []
    mode = {"ram-text-ids": "ids", "ram-text-names": "names"}.get(fmt)
    if mode is None:  # decide from the first 1000 lines: names if any line has a tag that is not a number
        votes: set[bool] = set()
        for item in lines:
            head.append(item)
            if item.text is not None and (v := _looks_like_ids(item.text)) is not None:
                votes.add(v)
            if len(head) >= 1000:
                break
        mode = "names" if False in votes else "ids"
    records = 0
    for item in chain(head, lines):
        records += 1
        if progress is not None:
            progress(item.nbytes)
        loc = fixed_loc(name, item.number, records)
        if item.text is None:
            tally.problem("not_utf8", item.error, loc)
            continue
        tok = _text_tokens(item.text)
        if mode == "ids":
            ids = []
            for p in tok.pieces():
                if _DIGITS.fullmatch(p):
                    ids.append(int(p))
                else:
                    tally.problem("bad_id", f"'{p[:40]}' is not an integer id", loc)
            tally.add_ids(ids, loc)
        else:
            names = []
            for t in tok.tokens if tok.commas else ():
                if t.strip():
                    names.append(t.strip())
                else:
                    tally.problem("empty_tag", "an empty tag between commas", loc)
            tally.add_tags(names, loc)


def scan_file(
    path: str, fmt: str | None, tags_column: str | None, tally: Tally, progress: Callable[[int], None] | None
) -> AnnotationFileReport:
    """Count one annotation file (``-`` = standard input) into ``tally``; ``fmt`` None = detect it."""
    name = "<stdin>" if path == "-" else path
    before = (tally.samples, tally.refs, tally.problem_total)
    fh = open_binary(path)
    try:
        stream = fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, fh))
        chosen = fmt or detect_annotation_format(path, stream.peek(65536)[:65536], tags_column)
        if chosen == "ram-json":
            scan_ram_json(stream, name, tally, progress)
        elif chosen.startswith("ram-text"):
            _scan_ram_text(stream, name, chosen, tally, progress)
        elif path == "-":  # the manifest readers take a path: spool standard input to a temporary file
            with tempfile.NamedTemporaryFile(prefix="mmprep-stdin-", suffix=f".{chosen}") as tmp:
                shutil.copyfileobj(stream, tmp, 1 << 20)
                tmp.flush()
                _scan_manifest(tmp.name, name, chosen, tags_column, tally)
        else:
            _scan_manifest(path, name, chosen, tags_column, tally)
    finally:
        if path != "-":
            fh.close()
    tally.flush()
    return AnnotationFileReport(
        path=name,
        format=chosen,
        samples=tally.samples - before[0],
        tag_refs=tally.refs - before[1],
        problems=tally.problem_total - before[2],
    )

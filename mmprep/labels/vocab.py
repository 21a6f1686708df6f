"""Tag vocabularies: load (txt, JSON, CSV), normalise names, map names and ids, hash.

A vocabulary is an ordered list of tag names; the position is the tag id (0-based) unless a CSV gives explicit
ids. Loading keeps the raw entries (so the audit can report whitespace, empties and duplicates) and the file's
facts (BOM, CRLF, final newline).

Every file is read with bounds (:data:`MAX_VOCAB_BYTES` in all, :data:`MAX_LINE_BYTES` per line of a text or CSV
file, no NUL byte), so ``/dev/zero``, an endless pipe or a binary file is a one-line error, found early, instead of
memory running out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import operator
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

from mmprep.errors import InputError

__all__ = ["MAX_LINE_BYTES", "MAX_VOCAB_BYTES", "Vocabulary", "load_vocab", "normalize_tag", "read_bounded"]

#: The largest vocabulary (or aligned) file read: a 10-million-tag list is about 200 MB.
MAX_VOCAB_BYTES = 2 << 30
#: The longest line of a text or CSV vocabulary (a tag name, or a CSV row): longer is binary data, not a tag.
MAX_LINE_BYTES = 64 << 10
_CHUNK = 1 << 20


def normalize_tag(name: str) -> str:
    """The normalised form used to match tags: case-folded, ``_`` → space, whitespace collapsed and stripped.

    (Whitespace is what ``str.isspace`` says, the same set as the regular expression ``\\s``.)
    """
    return " ".join(name.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered tag vocabulary.

    Attributes:
        names: tag names by id, surrounding whitespace stripped.
        raw: the entries exactly as written (line endings removed), same order as ``names``.
        path: where it was loaded from.
        ids: explicit ids when the file gives them (CSV ``id,name``), else ``range(len(names))``.
        has_bom, has_crlf, final_newline: facts about a text file (None for JSON).
    """

    names: tuple[str, ...]
    raw: tuple[str, ...] = ()
    path: str = ""
    ids: tuple[int, ...] = ()
    has_bom: bool = False
    has_crlf: bool = False
    final_newline: bool | None = None
    format: str = "txt"
    first_line: int = 1  # file line of entry 0 (2 for CSV with a header)
    _extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    _implicit_ids: bool = field(default=False, init=False, compare=False, repr=False)  # ids = positions

    def __post_init__(self) -> None:
        if not self.raw:
            object.__setattr__(self, "raw", self.names)
        if not self.ids:
            object.__setattr__(self, "ids", tuple(range(len(self.names))))
            object.__setattr__(self, "_implicit_ids", True)

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def sequential(self) -> bool:
        """Whether the ids are ``0..len-1`` in order (always for text and JSON-list files)."""
        return self._implicit_ids or all(map(operator.eq, self.ids, range(len(self.ids))))

    @cached_property
    def size(self) -> int:
        """Declared size: one more than the largest id (equals ``len`` for line-numbered files)."""
        if self.sequential:
            return len(self.ids)
        return (max(self.ids) + 1) if self.ids else 0

    @cached_property
    def name_to_id(self) -> dict[str, int]:
        """Exact (stripped) name → id; the first occurrence wins for duplicates."""
        out: dict[str, int] = {}
        for i, n in zip(self.ids, self.names, strict=True):
            out.setdefault(n, i)
        return out

    @cached_property
    def normalized_to_id(self) -> dict[str, int]:
        """Normalised name → id (first occurrence wins)."""
        out: dict[str, int] = {}
        for i, n in zip(self.ids, self.names, strict=True):
            out.setdefault(normalize_tag(n), i)
        return out

    def lookup(self, name: str) -> int | None:
        """Id of a tag name: exact match first, then after normalisation; None if unknown."""
        i = self.name_to_id.get(name.strip())
        if i is None:
            i = self.normalized_to_id.get(normalize_tag(name))
        return i

    @cached_property
    def id_to_name(self) -> dict[int, str]:
        return dict(zip(self.ids, self.names, strict=True))

    @property
    def names_by_id(self) -> Mapping[int, str]:
        """Id → name, as :attr:`id_to_name`, but without building a dict when the ids are ``0..len-1``."""
        return _SequentialNames(self.names) if self.sequential else self.id_to_name

    @cached_property
    def sha256(self) -> str:
        """Hash of the id→name content (``id\\tname\\n`` lines), independent of BOM/CRLF/final newline."""
        h = hashlib.sha256()
        line = "{}\t{}\n".format
        ids, names = iter(self.ids), iter(self.names)
        while block := "".join(map(line, islice(ids, 65536), islice(names, 65536))):
            h.update(block.encode())
        return h.hexdigest()


class _SequentialNames(Mapping[int, str]):
    """Id → name for names whose ids are their positions: a view of the names, no dict built."""

    __slots__ = ("_names",)

    def __init__(self, names: Sequence[str]) -> None:
        self._names = names

    def __getitem__(self, tag_id: int) -> str:
        if type(tag_id) is not int or not 0 <= tag_id < len(self._names):
            raise KeyError(tag_id)
        return self._names[tag_id]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._names)))

    def __len__(self) -> int:
        return len(self._names)


def load_vocab(path: str | Path, *, role: str = "vocabulary") -> Vocabulary:
    """Load a vocabulary: ``.json`` (a list of names, or an object name -> id), ``.csv`` (``id,name`` or
    ``name`` header), else text.

    Text files: one tag per line; line ``k`` (0-based) is tag id ``k``; a missing final newline does not drop
    the last entry; a UTF-8 BOM and CRLF line ends are accepted and recorded; an empty file has no entries.
    ``role`` names the file in error messages (``"vocabulary"``, or ``"aligned"`` for a list that must
    match a vocabulary).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    data = read_bounded(p, role, line_limit=suffix != ".json")
    has_bom = data.startswith(b"\xef\xbb\xbf")
    if has_bom:
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{p}:{line}: {role} file is not valid UTF-8 (byte {exc.start})") from None
    if suffix == ".json":
        return _load_json(p, text, has_bom, role)
    if suffix == ".csv":
        return _load_csv(p, text, has_bom, role)
    has_crlf = "\r\n" in text
    final_newline = text.endswith("\n") if text else None
    lines = text.split("\n") if text else []
    if text.endswith("\n"):
        lines.pop()
    raw = tuple(line[:-1] if line.endswith("\r") else line for line in lines) if has_crlf else tuple(lines)
    del lines
    return Vocabulary(
        names=tuple(map(str.strip, raw)),
        raw=raw,
        path=str(p),
        has_bom=has_bom,
        has_crlf=has_crlf,
        final_newline=final_newline,
        format="txt",
    )


def read_bounded(p: Path, role: str, *, line_limit: bool = True) -> bytes:
    """The bytes of a vocabulary or aligned file, read in chunks with its bounds checked as they arrive.

    Raises InputError (one line, naming the file and line) for a missing or unreadable file, a directory, a file
    over :data:`MAX_VOCAB_BYTES`, a NUL byte (binary data, or UTF-16 text), and, with ``line_limit``, a line over
    :data:`MAX_LINE_BYTES` (the line is found before the rest of the file is read).
    """
    try:
        fh = open(p, "rb")  # noqa: SIM115 - closed below; open() raises the errors named here
    except FileNotFoundError:
        raise InputError(f"{p}: {role} file not found") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory; expected the {role} file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read the {role} file: {exc.strerror or exc}") from None
    chunks: list[bytes] = []
    total = 0
    lines = 0  # newlines before the current chunk
    run = 0  # bytes since the last newline
    with fh:
        try:
            if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) and os.fstat(fh.fileno()).st_size > MAX_VOCAB_BYTES:
                raise _too_big(p, role)
            while chunk := fh.read(_CHUNK):
                total += len(chunk)
                if total > MAX_VOCAB_BYTES:
                    raise _too_big(p, role)
                nul = chunk.find(b"\0")
                if nul >= 0:
                    line = lines + chunk.count(b"\n", 0, nul) + 1
                    raise InputError(
                        f"{p}:{line}: holds a NUL byte: binary data (or UTF-16 text), not a {role} file",
                        hint="a vocabulary is UTF-8 text: one tag per line, a JSON list, or a CSV with a name column",
                    )
                if line_limit:
                    run = _check_lines(p, role, chunk, run, lines)
                lines += chunk.count(b"\n")
                chunks.append(chunk)
        except OSError as exc:
            raise InputError(f"{p}: cannot read the {role} file: {exc.strerror or exc}") from None
    return b"".join(chunks)


def _check_lines(p: Path, role: str, chunk: bytes, run: int, lines: int) -> int:
    """Raise for a line over :data:`MAX_LINE_BYTES` that ends in ``chunk`` or is still running at its end (``run``:
    bytes of the current line before the chunk; ``lines``: newlines before it); returns the bytes of the line still
    open at the end of the chunk."""
    import numpy as np

    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    if not ends.size:
        run += len(chunk)
        if run > MAX_LINE_BYTES:
            raise _long_line(p, role, lines + 1)
        return run
    lengths = np.diff(ends, prepend=-1) - 1  # bytes of each line ending in this chunk (without its newline)
    lengths[0] += run
    over = np.flatnonzero(lengths > MAX_LINE_BYTES)
    if over.size:
        raise _long_line(p, role, lines + int(over[0]) + 1)
    run = len(chunk) - int(ends[-1]) - 1
    if run > MAX_LINE_BYTES:
        raise _long_line(p, role, lines + int(ends.size) + 1)
    return run


def _too_big(p: Path, role: str) -> InputError:
    return InputError(f"{p}: the {role} file is larger than {MAX_VOCAB_BYTES >> 30} GiB: not a tag list",
                      hint="a vocabulary holds one tag per line (10 million tags take about 200 MB)")


def _long_line(p: Path, role: str, line: int) -> InputError:
    return InputError(
        f"{p}:{line}: a line longer than {MAX_LINE_BYTES:,} bytes: not a {role} file (binary data, or one huge line)",
        hint="a vocabulary holds one tag per line (or a JSON list / a CSV with a 'name' column)",
    )


def _load_json(p: Path, text: str, has_bom: bool, role: str) -> Vocabulary:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{p}: the JSON is nested too deeply to be a {role} file",
                         hint="a JSON vocabulary is a list of tag names (or an object name -> id)") from None
    if isinstance(value, dict):  # {"name": id}
        seen: dict[int, str] = {}
        for name, tag_id in value.items():
            if type(tag_id) is not int:
                raise InputError(f"{p}: tag {name!r} has id {json.dumps(tag_id)[:40]}, expected an integer",
                                 hint="a JSON object vocabulary maps each tag name to its integer id")
            if tag_id < 0:
                raise InputError(f"{p}: tag {name!r} has id {tag_id}, which is negative")
            if tag_id in seen:
                raise InputError(f"{p}: id {tag_id} is given to both {seen[tag_id]!r} and {name!r}")
            seen[tag_id] = name
        pairs = sorted(seen.items())
        return Vocabulary(
            names=tuple(k.strip() for _, k in pairs), raw=tuple(k for _, k in pairs),
            ids=tuple(v for v, _ in pairs), path=str(p), has_bom=has_bom, format="json",
        )
    if not isinstance(value, list):
        raise InputError(f"{p}: a JSON {role} file must be a list of tag names (or an object name -> id)")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InputError(f"{p}: entry {i} is {type(v).__name__}, expected a tag name string")
    return Vocabulary(
        names=tuple(v.strip() for v in value), raw=tuple(value), path=str(p), has_bom=has_bom, format="json"
    )


def _load_csv(p: Path, text: str, has_bom: bool, role: str) -> Vocabulary:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:  # a quoted field running on past the field size limit, a NUL inside a field, ...
        raise InputError(f"{p}:{reader.line_num}: not a readable CSV {role} file: {exc}") from None
    if not rows:
        return Vocabulary(names=(), path=str(p), has_bom=has_bom, format="csv")
    header = [h.strip().lower() for h in rows[0]]
    if "name" not in header:
        raise InputError(f"{p}:1: a CSV {role} file needs a header with a 'name' column (and optionally 'id')")
    ni = header.index("name")
    ii = header.index("id") if "id" in header else None
    names: list[str] = []
    raw: list[str] = []
    ids: list[int] = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(f"{p}:{lineno}: expected {len(header)} fields, got {len(row)}")
        raw.append(row[ni])
        names.append(row[ni].strip())
        if ii is not None:
            try:
                tag_id = int(row[ii])
            except ValueError:
                raise InputError(f"{p}:{lineno}: id '{row[ii]}' is not an integer") from None
            if tag_id < 0:
                raise InputError(f"{p}:{lineno}: id {tag_id} is negative")
            ids.append(tag_id)
        else:
            ids.append(len(ids))
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise InputError(f"{p}: id {dup} appears more than once")
    return Vocabulary(
        names=tuple(names), raw=tuple(raw), ids=tuple(ids), path=str(p), has_bom=has_bom,
        has_crlf="\r\n" in text, final_newline=text.endswith("\n"), format="csv", first_line=2,
    )

"""Tag vocabularies: load (txt, JSON, CSV), normalise names, map names and ids, hash.

A vocabulary is an ordered list of tag names; the position is the tag id (0-based) unless a CSV gives explicit
ids. Loading keeps the raw entries (so the audit can report whitespace, empties and duplicates) and the file's
facts (BOM, CRLF, final newline).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mmprep.errors import InputError

__all__ = ["Vocabulary", "load_vocab", "normalize_tag"]

_WS = re.compile(r"\s+")


def normalize_tag(name: str) -> str:
    """The normalised form used to match tags: case-folded, ``_`` → space, whitespace collapsed and stripped."""
    return _WS.sub(" ", name.replace("_", " ")).strip().casefold()


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

    def __post_init__(self) -> None:
        if not self.raw:
            object.__setattr__(self, "raw", self.names)
        if not self.ids:
            object.__setattr__(self, "ids", tuple(range(len(self.names))))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        """Declared size: one more than the largest id (equals ``len`` for line-numbered files)."""
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

    @cached_property
    def sha256(self) -> str:
        """Hash of the id→name content (``id\\tname\\n`` lines), independent of BOM/CRLF/final newline."""
        h = hashlib.sha256()
        for i, n in zip(self.ids, self.names, strict=True):
            h.update(f"{i}\t{n}\n".encode())
        return h.hexdigest()


def load_vocab(path: str | Path, *, role: str = "vocabulary") -> Vocabulary:
    """Load a vocabulary: ``.json`` (a list of names, or an object name -> id), ``.csv`` (``id,name`` or
    ``name`` header), else text.

    Text files: one tag per line; line ``k`` (0-based) is tag id ``k``; a missing final newline does not drop
    the last entry; a UTF-8 BOM and CRLF line ends are accepted and recorded; an empty file has no entries.
    ``role`` names the file in error messages (``"vocabulary"``, or ``"aligned"`` for a list that must
    match a vocabulary).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: {role} file not found") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory; expected the {role} file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read the {role} file: {exc.strerror or exc}") from None
    has_bom = data.startswith(b"\xef\xbb\xbf")
    if has_bom:
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{p}:{line}: {role} file is not valid UTF-8 (byte {exc.start})") from None
    suffix = p.suffix.lower()
    if suffix == ".json":
        return _load_json(p, text, has_bom, role)
    if suffix == ".csv":
        return _load_csv(p, text, has_bom, role)
    has_crlf = "\r\n" in text
    final_newline = text.endswith("\n") if text else None
    lines = text.split("\n") if text else []
    if text.endswith("\n"):
        lines.pop()
    raw = tuple(line[:-1] if line.endswith("\r") else line for line in lines)
    return Vocabulary(
        names=tuple(r.strip() for r in raw),
        raw=raw,
        path=str(p),
        has_bom=has_bom,
        has_crlf=has_crlf,
        final_newline=final_newline,
        format="txt",
    )


def _load_json(p: Path, text: str, has_bom: bool, role: str) -> Vocabulary:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
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
    rows = list(reader)
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

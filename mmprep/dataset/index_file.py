"""Finding and reading ``index.json`` of a packed directory.

Two ways in: :func:`load_index` parses the whole index into the typed :class:`~mmprep.dataset.format.Index` and
raises on the first damaged field (the reader and ``inspect``); :func:`read_index` checks only the header (an
mmprep index of a version this mmprep reads, with a list of shards) and hands the JSON over, so that ``verify`` can
report every damaged field and go on checking. All file access is in :func:`_read_index_text`.

Both read one split (``split=``; default: the only split, else ``train``); a format 1 index holds one, ``train``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.dataset.format import DATA_DIR, INDEX_NAME, SHARD_GLOB, Index, select_split
from mmprep.errors import InputError

__all__ = ["IndexJson", "LoadedIndex", "load_index", "read_index"]

_GIVE_OUT = "give the --out directory of `mmprep pack`"


@dataclass(frozen=True)
class LoadedIndex:
    """A parsed ``index.json`` and the dataset folder it was found in."""

    root: Path
    index: Index

    @property
    def file(self) -> Path:
        """The ``index.json`` file."""
        return self.root / INDEX_NAME


@dataclass(frozen=True)
class IndexJson:
    """``index.json`` as JSON, its header checked but not its fields (for checks that report, not raise).

    Attributes:
        root: the dataset folder.
        data: one split's part of the index, shaped as a format 1 index (header, then the split's fields, and
            ``split``); ``data["shards"]`` is a list, its entries are unchecked.
    """

    root: Path
    data: dict[str, Any]

    @property
    def file(self) -> Path:
        """The ``index.json`` file."""
        return self.root / INDEX_NAME

    @property
    def entries(self) -> list[Any]:
        """The shard entries as stored (each should be an object with path, rows, bytes, sha256, ...)."""
        entries: list[Any] = self.data["shards"]
        return entries


def read_index(path: str | os.PathLike[str], *, split: str | None = None) -> IndexJson:
    """Find and read ``index.json`` of a packed directory (the directory or the index file itself), and pick one
    split (:func:`~mmprep.dataset.format.select_split`).

    Raises:
        InputError: the path is missing, not a directory, has no index (an unfinished run), or an index that is
            not valid JSON, not mmprep's, of a newer version, or without a list of shards; no such split.
    """
    root, text = _read_index_text(Path(path))
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{root / INDEX_NAME}: not valid JSON: {exc}",
                         hint="the index is damaged; rerun `mmprep pack`") from None
    where = str(root / INDEX_NAME)
    return IndexJson(root=root, data=select_split(Index.check_header(data, where), split, where))


def load_index(path: str | os.PathLike[str], *, split: str | None = None) -> LoadedIndex:
    """:func:`read_index`, then every field of the split parsed and checked into an
    :class:`~mmprep.dataset.format.Index`.

    Raises:
        InputError: as :func:`read_index`, or a damaged field (named, with its value).
    """
    raw = read_index(path, split=split)
    return LoadedIndex(root=raw.root, index=Index.from_json(raw.data, str(raw.file)))


def _read_index_text(p: Path) -> tuple[Path, str]:
    """The dataset folder and the text of its index (the only place that touches the filesystem)."""
    if p.is_file() and p.name == INDEX_NAME:
        p = p.parent
    if not p.exists():
        raise InputError(f"{p}: no such directory", hint=_GIVE_OUT)
    if not p.is_dir():
        raise InputError(f"{p}: not a directory", hint=_GIVE_OUT)
    idx = p / INDEX_NAME
    if not idx.is_file():
        if any(p.glob(SHARD_GLOB)) or any((p / DATA_DIR).glob("*.parquet")):
            raise InputError(f"{p}: has shards but no {INDEX_NAME}: the pack run did not finish",
                             hint="rerun the same `mmprep pack` command with --resume (index.json is written last)")
        raise InputError(f"{p}: not an mmprep packed directory (no {INDEX_NAME})", hint=_GIVE_OUT)
    try:
        return p, idx.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{idx}: cannot read: {exc}") from None

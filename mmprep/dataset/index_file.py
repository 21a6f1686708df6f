"""Finding and reading ``index.json`` of a packed directory.

Two ways in: :func:`load_index` parses the whole index into the typed :class:`~mmprep.dataset.format.Index` and
raises on the first damaged field (the reader and ``inspect``); :func:`read_index` checks only the header (an
mmprep index of a version this mmprep reads, with a list of shards) and hands the JSON over, so that ``verify`` can
report every damaged field and go on checking. All file access is in :func:`_read_index_text`.

The dataset may be a local folder (a path or ``file://``) or a folder on any filesystem fsspec or pyarrow reaches
(``s3://bucket/ds``, ``gs://``, ``az://``, ``http(s)://``, ``memory://``); ``storage_options`` are the fsspec
options for it (endpoint, credentials), never shown. A remote index is read with the retries of
:class:`mmprep.dataset.remote.Store`.

Both read one split (``split=``; default: the only split, else ``train``); a format 1 index holds one, ``train``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.dataset.format import DATA_DIR, INDEX_NAME, SHARD_GLOB, Index, select_split
from mmprep.errors import InputError
from mmprep.runtime.storage import Location, is_local, local_path, open_location

__all__ = ["MAX_INDEX_BYTES", "IndexJson", "LoadedIndex", "load_index", "read_index"]

_GIVE_OUT = "give the --out directory of `mmprep pack`"
#: The largest index.json read (a million shards take about 300 MB; anything larger is not an mmprep index).
MAX_INDEX_BYTES = 1 << 30


def _index_file(root: Path | str) -> Path | str:
    return root / INDEX_NAME if isinstance(root, Path) else f"{root.rstrip('/')}/{INDEX_NAME}"


@dataclass(frozen=True)
class LoadedIndex:
    """A parsed ``index.json`` and the dataset folder it was found in.

    Attributes:
        root: the folder: a Path for a local dataset, its URI (without credentials) otherwise.
        index: the parsed index.
        location: the folder on its filesystem (for reading the shards).
    """

    root: Path | str
    index: Index
    location: Location

    @property
    def file(self) -> Path | str:
        """The ``index.json`` file."""
        return _index_file(self.root)


@dataclass(frozen=True)
class IndexJson:
    """``index.json`` as JSON, its header checked but not its fields (for checks that report, not raise).

    Attributes:
        root: the dataset folder: a Path for a local dataset, its URI (without credentials) otherwise.
        data: one split's part of the index, shaped as a format 1 index (header, then the split's fields, and
            ``split``); ``data["shards"]`` is a list, its entries are unchecked.
        location: the folder on its filesystem.
    """

    root: Path | str
    data: dict[str, Any]
    location: Location

    @property
    def file(self) -> Path | str:
        """The ``index.json`` file."""
        return _index_file(self.root)

    @property
    def entries(self) -> list[Any]:
        """The shard entries as stored (each should be an object with path, rows, bytes, sha256, ...)."""
        entries: list[Any] = self.data["shards"]
        return entries


def read_index(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
               split: str | None = None) -> IndexJson:
    """Find and read ``index.json`` of a packed directory (the directory or the index file itself; a local path
    or a URI), and pick one split (:func:`~mmprep.dataset.format.select_split`).

    Raises:
        InputError: the path is missing, not a directory, has no index (an unfinished run), or an index that is
            not valid JSON (or nested too deeply to parse), not mmprep's, of a newer version, or without a list of
            shards; no such split.
        UsageError: no filesystem for the URI's scheme, or bad storage options.
        RunFailed: the store kept failing (dropped connections, server errors) through every retry.
    """
    root, location, text = _read_index_text(path, storage_options)
    where = str(_index_file(root))
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be an mmprep index",
                         hint="the index is damaged; rerun `mmprep pack`") from None
    except ValueError as exc:
        raise InputError(f"{where}: not valid JSON: {exc}",
                         hint="the index is damaged; rerun `mmprep pack`") from None
    return IndexJson(root=root, data=select_split(Index.check_header(data, where), split, where), location=location)


def load_index(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
               split: str | None = None) -> LoadedIndex:
    """:func:`read_index`, then every field of the split parsed and checked into an
    :class:`~mmprep.dataset.format.Index`.

    Raises:
        InputError: as :func:`read_index`, or a damaged field (named, with its value).
    """
    raw = read_index(path, storage_options, split=split)
    return LoadedIndex(root=raw.root, index=Index.from_json(raw.data, str(raw.file)), location=raw.location)


def _read_index_text(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Path | str, Location, str]:
    """The dataset folder (as shown, and on its filesystem) and the text of its index (the only place that touches
    the filesystem)."""
    s = os.fspath(path)
    if not is_local(s):
        return _read_remote_index_text(s, storage_options)
    p = Path(local_path(s))
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
        size = idx.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise InputError(f"{idx}: {size:,} bytes, too large for an mmprep index (at most {MAX_INDEX_BYTES:,})",
                             hint="the index is damaged; rerun `mmprep pack`")
        return p, open_location(p), idx.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{idx}: cannot read: {exc}") from None


def _read_remote_index_text(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[str, Location, str]:
    from mmprep.dataset.remote import Store

    loc = open_location(uri, storage_options)
    if loc.name == INDEX_NAME:
        loc = loc.parent()
    store = Store(loc)
    size = store.size(INDEX_NAME)
    if size is None:
        names = store.list_names()
        if not names:
            raise InputError(f"{loc}: nothing there (no such folder)", hint=_GIVE_OUT)
        if DATA_DIR in names or any(fnmatch.fnmatchcase(n, SHARD_GLOB) for n in names):
            raise InputError(f"{loc}: has shards but no {INDEX_NAME}: the pack run did not finish",
                             hint="rerun the same `mmprep pack` command with --resume (index.json is written last)")
        raise InputError(f"{loc}: not an mmprep packed directory (no {INDEX_NAME})", hint=_GIVE_OUT)
    if size > MAX_INDEX_BYTES:
        raise InputError(f"{store.uri(INDEX_NAME)}: {size:,} bytes, too large for an mmprep index (at most "
                         f"{MAX_INDEX_BYTES:,})", hint="the index is damaged; rerun `mmprep pack`")
    try:
        return loc.uri.rstrip("/"), loc, store.read_all(INDEX_NAME, size).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{store.uri(INDEX_NAME)}: cannot read: {exc}") from None

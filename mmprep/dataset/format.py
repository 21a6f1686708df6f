"""The packed dataset's on-disk contract, in one place: file names, format versions, and the typed index.

The writer (:mod:`mmprep.pack`) builds these types and serialises them with ``to_json``; the readers
(:mod:`mmprep.dataset.reader`, ``verify``, ``inspect``) parse them with ``from_json``. Nothing here imports other
mmprep modules except the error types, so every layer may depend on it.

A packed directory (format version 2, the Hugging Face Hub layout; one or more splits)::

    OUT/
      README.md                 the dataset card: YAML ``configs``/``data_files`` so ``datasets.load_dataset(OUT)``
                                finds every split (regenerated from the index by every run)
      data/
        train-00000-of-00004.parquet ...   the rows of split ``train`` (Parquet; schema metadata under METADATA_KEY,
                                per-shard facts under SHARD_METADATA_KEY); nothing else ever lives in data/
        test-00000-of-00001.parquet ...
      rejected-train.jsonl      one JSON object per rejected input row of the split (line, id, stage, reason, detail)
      run-stats-train.json      timings of the split's run (the only file that differs between identical runs)
      index.json                written last by each run: one entry per split (its shards with rows/bytes/sha256,
                                and its row accounting)
      .mmprep/                  run state for --resume (lock, and per split: run identity, finished chunks)

Format version 1 (still read) had one unnamed split: ``shard-NNNNN.parquet``, ``rejected.jsonl``,
``run-stats.json`` and ``index.json`` (the fields of one split entry, at the top) side by side in OUT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmprep.errors import InputError

__all__ = [
    "CARD_NAME",
    "DATA_DIR",
    "DEFAULT_SPLIT",
    "FORMAT_VERSION",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "METADATA_KEY",
    "READABLE_VERSIONS",
    "REJECTS_NAME",
    "RUN_STATS_NAME",
    "SHARD_GLOB",
    "SHARD_METADATA_KEY",
    "STATE_DIR",
    "ChunkRecord",
    "Index",
    "IndexFile",
    "ShardInfo",
    "Totals",
    "count_field",
    "count_problem",
    "dumps_json",
    "histogram_problem",
    "rejects_name",
    "run_stats_name",
    "select_split",
    "shard_entry_problems",
    "shard_name",
    "shard_path_problem",
    "split_problem",
]

INDEX_NAME = "index.json"
#: The dataset card (Hub layout): its YAML tells ``datasets.load_dataset(OUT)`` the splits and their files.
CARD_NAME = "README.md"
#: The folder that holds the shards and nothing else (trainers read every file in it).
DATA_DIR = "data"
DEFAULT_SPLIT = "train"
#: The rejects and run statistics of a format 1 directory (format 2: :func:`rejects_name`, :func:`run_stats_name`).
REJECTS_NAME = "rejected.jsonl"
RUN_STATS_NAME = "run-stats.json"
STATE_DIR = ".mmprep"
INDEX_FORMAT = "mmprep-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Parquet schema metadata key holding the dataset-wide facts (layout, pixels, text, vocab).
METADATA_KEY = "mmprep"
#: Parquet file metadata key holding one shard's facts (index, rows, image-count histogram, line range).
SHARD_METADATA_KEY = "mmprep.shard"

_DAMAGED = "the index is damaged; rerun `mmprep pack`, or run `mmprep verify` on the directory"
#: The largest count an index may hold (an int64: row numbers and byte offsets are int64 everywhere).
MAX_COUNT = 2**63 - 1
_ABSOLUTE = re.compile(r"^(?:[/\\]|[A-Za-z]:|[A-Za-z][A-Za-z0-9+.\-]*://)")


_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MAX_SPLIT = 64


def split_problem(split: object) -> str | None:
    """What is wrong with a split name (None when fine): word characters and dots, as ``datasets`` requires, and no
    ``-`` (it separates the split from the shard number in file names)."""
    if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split) or len(split) > _MAX_SPLIT:
        return (f"split name {split!r} must be letters, digits and _ (dots between them), at most {_MAX_SPLIT} "
                "characters")
    return None


def shard_name(index: int, split: str = DEFAULT_SPLIT, count: int = 1) -> str:
    """The path of shard ``index`` of ``count`` of a split, relative to the dataset folder (the Hub's naming:
    ``data/train-00000-of-00004.parquet``)."""
    return f"{DATA_DIR}/{split}-{index:05d}-of-{count:05d}.parquet"


def rejects_name(split: str) -> str:
    """The rejects file of a split (beside ``data/``, never in it)."""
    return f"rejected-{split}.jsonl"


def run_stats_name(split: str) -> str:
    """The run statistics file of a split."""
    return f"run-stats-{split}.json"


#: A glob matching every shard file name of a format 1 directory.
SHARD_GLOB = "shard-*.parquet"


def dumps_json(obj: Any) -> bytes:
    """How mmprep writes its JSON files: indented, sorted keys, UTF-8, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def count_field(value: Any) -> int | None:
    """``value`` when it is a whole number in ``0..MAX_COUNT`` as JSON stores one (an int, not a bool or a
    string), else None.

    Counts read from ``index.json`` are checked with this rather than coerced with ``int()``, so that a damaged
    index is reported by field instead of failing with a ValueError (or an OverflowError further on).
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
    return value if ok else None


def count_problem(d: Mapping[str, Any], key: str, name: str | None = None) -> str | None:
    """What is wrong with the count ``d[key]`` (``"rows is 'abc', not a whole number"``), None when it is fine.

    A missing key is fine here (the caller decides whether the field is required). ``name`` is how the message
    names the field (default: ``key``).
    """
    if key not in d or count_field(d[key]) is not None:
        return None
    value = d[key]
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
        shown = f"{str(value)[:20]}… ({len(str(value))} digits)" if len(str(value)) > 24 else str(value)
        return f"{name or key} is {shown}, out of range (at most 2**63 - 1)"
    return f"{name or key} is {value!r}, not a whole number"


def shard_path_problem(path: Any, name: str = "path") -> str | None:
    """What is wrong with a file path from the index (a shard's ``path``, ``rejects``), None when it is fine.

    Paths in ``index.json`` are relative POSIX paths inside the dataset folder (``shard-00000.parquet``,
    ``data/train-00000-of-00004.parquet``): an absolute path, a drive, a URI, a ``..`` part, a backslash or an empty
    part would make a reader open a file outside the dataset (a tampered index), so they are refused.
    """
    if not isinstance(path, str) or not path:
        return f"{name} is {path!r}, not a file path"
    shown = path if len(path) <= 200 else path[:200] + "…"
    if "\0" in path:
        return f"{name} {shown!r} contains a NUL character"
    if _ABSOLUTE.match(path):
        return f"{name} {shown!r} is absolute; paths in {INDEX_NAME} are relative to the dataset folder"
    if "\\" in path:
        return f"{name} {shown!r} contains a backslash; paths in {INDEX_NAME} use '/'"
    parts = path.split("/")
    if ".." in parts:
        return f"{name} {shown!r} leaves the dataset folder ('..')"
    if any(p in ("", ".") for p in parts):
        return f"{name} {shown!r} has an empty or '.' part"
    return None


def histogram_problem(value: Any, name: str = "image_count_histogram") -> str | None:
    """What is wrong with an image-count histogram ``{"<images per row>": rows}``, None when it is fine.

    The lenient half of the parse: ``verify`` reports the problem and goes on checking; ``from_json`` raises it.
    """
    if not isinstance(value, dict):
        return f"{name} is {value!r}, not a {{images: rows}} object"
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()):
            return f"{name} has the key {k!r}, not a number of images"
        if count_field(v) is None:
            return f"{name}[{k!r}] is {v!r}, not a whole number"
    return None


def shard_entry_problems(d: Mapping[str, Any]) -> list[str]:
    """Every damaged field of a shard entry that has a path and rows (``rows``, ``bytes``, the histogram).

    ``verify`` lists them all in one finding; :meth:`ShardInfo.from_json` raises the first.
    """
    found = [shard_path_problem(d.get("path")), count_problem(d, "rows"), count_problem(d, "bytes")]
    if d.get("image_count_histogram") is not None:
        found.append(histogram_problem(d["image_count_histogram"]))
    return [p for p in found if p is not None]


def _count(d: Mapping[str, Any], key: str, where: str, name: str | None = None) -> int:
    """The required count ``d[key]`` (InputError naming the field when missing or damaged)."""
    value = count_field(d.get(key))
    if value is None:
        problem = count_problem(d, key, name) or f"{name or key} is {d.get(key)!r}, not a whole number"
        raise InputError(f"{where}: {problem}", hint=_DAMAGED)
    return value


def _optional_count(d: Mapping[str, Any], key: str, where: str, name: str | None = None) -> int:
    """The count ``d[key]``, 0 when the key is missing (InputError naming the field when damaged)."""
    return _count(d, key, where, name) if key in d else 0


def _histogram(value: Any, where: str, name: str = "image_count_histogram") -> dict[str, int]:
    if value is None:
        return {}
    problem = histogram_problem(value, name)
    if problem is not None:
        raise InputError(f"{where}: {problem}", hint=_DAMAGED)
    return {str(k): int(v) for k, v in value.items()}


def _line(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard as listed in the index.

    Attributes:
        path: the file name, relative to the dataset folder.
        rows: rows it holds.
        bytes: its size.
        sha256: hex digest of its bytes.
        image_count_histogram: ``{str(images per row): rows}``.
        first_line: the input line of its first row (None when empty).
        last_line: the input line of its last row.
    """

    path: str
    rows: int
    bytes: int
    sha256: str
    image_count_histogram: dict[str, int] = field(default_factory=dict)
    first_line: int | None = None
    last_line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "image_count_histogram": dict(self.image_count_histogram), "first_line": self.first_line,
                "last_line": self.last_line}

    @classmethod
    def from_json(cls, d: Any, where: str = INDEX_NAME) -> ShardInfo:
        """Parse one shard entry (InputError naming the field when damaged)."""
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or "rows" not in d:
            raise InputError(f"{where} lacks path or rows", hint=_DAMAGED)
        problems = shard_entry_problems(d)
        if problems:
            shown = d["path"] if len(d["path"]) <= 200 else d["path"][:200] + "…"
            raise InputError(f"{where} ({shown}): {problems[0]}", hint=_DAMAGED)
        return cls(path=d["path"], rows=d["rows"], bytes=d.get("bytes", 0), sha256=str(d.get("sha256", "")),
                   image_count_histogram=dict(d.get("image_count_histogram") or {}),
                   first_line=_line(d.get("first_line")), last_line=_line(d.get("last_line")))


@dataclass(frozen=True)
class Totals:
    """The row accounting of a dataset: ``read == written + rejected``."""

    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    images_written: int
    images_dropped_by_limit: int
    tags_dropped_unknown: int
    text_truncated: int
    image_count_histogram: dict[str, int]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "rejected": self.rejected,
                "rejected_by_reason": dict(self.rejected_by_reason), "images_written": self.images_written,
                "images_dropped_by_limit": self.images_dropped_by_limit,
                "tags_dropped_unknown": self.tags_dropped_unknown, "text_truncated": self.text_truncated,
                "image_count_histogram": dict(self.image_count_histogram), "bytes": self.bytes}

    @classmethod
    def from_json(cls, d: Any, where: str = INDEX_NAME) -> Totals:
        if not isinstance(d, dict):
            raise InputError(f"{where}: no 'totals' object", hint=_DAMAGED)
        reasons = d.get("rejected_by_reason") or {}
        if not isinstance(reasons, dict) or not all(count_field(v) is not None for v in reasons.values()):
            raise InputError(f"{where}: totals.rejected_by_reason is {reasons!r}, not a {{reason: count}} object",
                             hint=_DAMAGED)

        def count(key: str) -> int:
            return _count(d, key, where, f"totals.{key}")

        def optional(key: str) -> int:
            return _optional_count(d, key, where, f"totals.{key}")

        return cls(read=count("read"), written=count("written"), rejected=count("rejected"),
                   rejected_by_reason=dict(reasons), images_written=optional("images_written"),
                   images_dropped_by_limit=optional("images_dropped_by_limit"),
                   tags_dropped_unknown=optional("tags_dropped_unknown"), text_truncated=optional("text_truncated"),
                   image_count_histogram=_histogram(d.get("image_count_histogram"), where,
                                                    "totals.image_count_histogram"),
                   bytes=optional("bytes"))


@dataclass(frozen=True)
class Index:
    """``index.json``: every shard, the dataset metadata, the settings that made it, and the accounting.

    Attributes:
        config: the pack settings that decide the content (as recorded).
        rows_per_shard: the shard plan.
        metadata: the shards' ``mmprep`` schema metadata (None when no shard was written).
        shards: the shards in row order.
        rejects: the rejects file name.
        totals: the row accounting.
        format_version: the on-disk format version.
        split: the split's name (``train`` for a format 1 directory).
        run_stats: the run statistics file name (None when not recorded).
    """

    config: dict[str, Any]
    rows_per_shard: int
    metadata: dict[str, Any] | None
    shards: tuple[ShardInfo, ...]
    totals: Totals
    rejects: str = REJECTS_NAME
    format_version: int = FORMAT_VERSION
    split: str = DEFAULT_SPLIT
    run_stats: str | None = None

    def entry_json(self) -> dict[str, Any]:
        """The split's entry of a format 2 index (what a format 1 index held at its top)."""
        out = {"config": self.config, "rows_per_shard": self.rows_per_shard, "metadata": self.metadata,
               "shards": [s.to_json() for s in self.shards], "rejects": self.rejects,
               "totals": self.totals.to_json()}
        if self.run_stats is not None:
            out["run_stats"] = self.run_stats
        return out

    def to_json(self) -> dict[str, Any]:
        """This split alone as a whole index of its format version (format 1: the entry at the top)."""
        if self.format_version < 2:
            return {"format": INDEX_FORMAT, "format_version": self.format_version, **self.entry_json()}
        return IndexFile({self.split: self}).to_json()

    def dumps(self) -> bytes:
        return dumps_json(self.to_json())

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @staticmethod
    def check_header(d: Any, where: str = INDEX_NAME) -> dict[str, Any]:
        """Check that ``d`` is an mmprep index of a version this mmprep reads; returns it.

        Raises:
            InputError: not an index, a damaged version, or a newer version.
        """
        if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise InputError(f"{where}: not an mmprep index (format {got!r})",
                             hint="give the --out directory of `mmprep pack`")
        version = d.get("format_version", 0)
        if count_field(version) is None:
            raise InputError(f"{where}: format_version is {version!r}, not a whole number", hint=_DAMAGED)
        if version > max(READABLE_VERSIONS):
            raise InputError(f"{where}: format version {version} is newer than this mmprep reads "
                             f"({max(READABLE_VERSIONS)})", hint="upgrade mmprep")
        if version >= 2 and "split" not in d:  # a whole index (a split's view, from select_split, has "split")
            if not isinstance(d.get("splits"), dict):
                raise InputError(f"{where}: no 'splits' object", hint=_DAMAGED)
            for name, entry in d["splits"].items():
                if split_problem(name) is not None:
                    raise InputError(f"{where}: {split_problem(name)}", hint=_DAMAGED)
                if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
                    raise InputError(f"{where}: split '{name}' has no 'shards' list", hint=_DAMAGED)
        elif not isinstance(d.get("shards"), list):
            raise InputError(f"{where}: no 'shards' list", hint=_DAMAGED)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = INDEX_NAME, split: str | None = None) -> Index:
        """Parse and check one split of an index (InputError naming the first damaged field); ``split`` as in
        :func:`select_split`."""
        d = select_split(cls.check_header(d, where), split, where)
        shards = tuple(ShardInfo.from_json(s, f"{where}: shard entry {k}") for k, s in enumerate(d["shards"]))
        metadata = d.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise InputError(f"{where}: metadata is not an object", hint=_DAMAGED)
        config = d.get("config") if isinstance(d.get("config"), dict) else {}
        stats = d.get("run_stats")
        rejects = d.get("rejects") or REJECTS_NAME
        for name, value in (("rejects", rejects), ("run_stats", stats)):
            problem = shard_path_problem(value, name) if value is not None else None
            if problem is not None:
                raise InputError(f"{where}: {problem}", hint=_DAMAGED)
        return cls(config=config, rows_per_shard=count_field(d.get("rows_per_shard")) or 0, metadata=metadata,
                   shards=shards, totals=Totals.from_json(d.get("totals"), where),
                   rejects=str(rejects), format_version=d.get("format_version", 0),
                   split=str(d.get("split") or DEFAULT_SPLIT), run_stats=stats if isinstance(stats, str) else None)


def select_split(d: dict[str, Any], split: str | None = None, where: str = INDEX_NAME) -> dict[str, Any]:
    """One split of a header-checked index, shaped as a format 1 index (header fields, then the entry's fields, and
    ``split``): what verify and the parsers read.

    ``split`` None picks the only split, else ``train``; a format 1 index holds one split, ``train``.

    Raises:
        InputError: no such split (naming the ones there), or several splits and none named ``train``.
    """
    if "split" in d and "splits" not in d:  # already one split's view
        if split not in (None, d["split"]):
            raise InputError(f"{where}: holds split '{d['split']}', not '{split}'")
        return d
    if d.get("format_version", 0) < 2:
        if split not in (None, DEFAULT_SPLIT):
            raise InputError(f"{where}: no split '{split}' (a format 1 dataset holds one split, {DEFAULT_SPLIT})",
                             hint=f"leave out the split, or use --split {DEFAULT_SPLIT}")
        return {**d, "split": DEFAULT_SPLIT}
    splits: dict[str, Any] = d["splits"]
    if split is None:
        if len(splits) == 1:
            split = next(iter(splits))
        elif DEFAULT_SPLIT in splits:
            split = DEFAULT_SPLIT
        else:
            raise InputError(f"{where}: holds the splits {', '.join(sorted(splits))}; say which one",
                             hint="pass --split NAME (split= in Python)")
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise InputError(f"{where}: no split '{split}' (splits: {have})", hint="pass one of those as --split")
    header = {k: v for k, v in d.items() if k != "splits"}
    return {**header, **splits[split], "split": split, "splits_present": sorted(splits)}


@dataclass(frozen=True)
class IndexFile:
    """A whole format 2 ``index.json``: every split's :class:`Index`, by name (sorted when written)."""

    splits: dict[str, Index]

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION,
                "splits": {name: self.splits[name].entry_json() for name in sorted(self.splits)}}

    def dumps(self) -> bytes:
        return dumps_json(self.to_json())

    @classmethod
    def from_json(cls, d: Any, where: str = INDEX_NAME) -> IndexFile:
        """Parse every split (a format 1 index becomes one split, ``train``)."""
        d = Index.check_header(d, where)
        names = sorted(d["splits"]) if d.get("format_version", 0) >= 2 else [DEFAULT_SPLIT]
        return cls({name: Index.from_json(d, where, name) for name in names})


@dataclass(frozen=True)
class RejectRecord:
    """One line of ``rejected.jsonl``."""

    line: int
    id: str | None
    stage: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "stage": self.stage, "reason": self.reason, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RejectRecord:
        return cls(line=int(d["line"]), id=d.get("id"), stage=str(d["stage"]), reason=str(d["reason"]),
                   detail=str(d.get("detail", "")))


@dataclass(frozen=True)
class ChunkRecord:
    """What one chunk of a pack run produced: its shard and its accounting (also the ``--resume`` record).

    Attributes:
        index: the chunk (= shard) number.
        items: input rows in the chunk.
        shard: the shard written.
        rows: rows written.
        rejected: the chunk's rejected rows.
        images_written, images_dropped, tags_dropped, text_truncated: counters.
        signature: what the chunk's output depends on outside the manifest (image file sizes and mtimes), so
            that ``--resume`` can redo a chunk whose inputs changed.
    """

    index: int
    items: int
    shard: ShardInfo
    rows: int
    rejected: tuple[RejectRecord, ...] = ()
    images_written: int = 0
    images_dropped: int = 0
    tags_dropped: int = 0
    text_truncated: int = 0
    signature: str = ""

    @property
    def image_count_histogram(self) -> dict[str, int]:
        return self.shard.image_count_histogram

    @property
    def images(self) -> int:
        return self.images_written

    @property
    def files(self) -> tuple[str, ...]:
        return (self.shard.path,)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "items": self.items, "shard": self.shard.to_json(), "rows": self.rows,
                "rejected": [r.to_json() for r in self.rejected], "images_written": self.images_written,
                "images_dropped": self.images_dropped, "tags_dropped": self.tags_dropped,
                "text_truncated": self.text_truncated, "signature": self.signature}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkRecord:
        """Parse a record (KeyError/TypeError/ValueError/InputError when damaged: the caller redoes the chunk)."""
        return cls(index=int(d["index"]), items=int(d["items"]), shard=ShardInfo.from_json(d["shard"]),
                   rows=int(d["rows"]), rejected=tuple(RejectRecord.from_json(r) for r in d["rejected"]),
                   images_written=int(d["images_written"]), images_dropped=int(d["images_dropped"]),
                   tags_dropped=int(d["tags_dropped"]), text_truncated=int(d["text_truncated"]),
                   signature=str(d.get("signature", "")))

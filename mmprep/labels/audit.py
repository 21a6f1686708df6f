"""Audit a tag vocabulary against its annotations and its aligned files (translations, thresholds, embeddings).

:func:`audit_labels` reads the vocabulary, streams every annotation file once, checks every aligned file, and
returns an :class:`AuditReport`: declared size vs tags used, never-used tags, unknown names and out-of-range ids
(with counts and the first ``file:line``), duplicates exact and after normalisation, empty entries, missing final
newlines, per-aligned-file counts and their own duplicates/whitespace, and frequency statistics. Nothing here prints.

Annotation formats (detected from content, overridable):

* ``ram-json``: Recognize-Anything training JSON, a list of ``{"image_path", "caption": [...],
  "union_label_id": [ids], "parse_label_id": [[ids], ...]}``. Streamed in ~1 MiB batches: each batch is cut at an
  element boundary and parsed in one call (orjson when installed), then counted with numpy, out-of-range and
  unknown ids included (their first line is found only when a new one appears); a batch with anything unusual
  (wrong types, a cut that was not a real boundary) is redone record by record with the standard library's
  ``json`` (the reference semantics), so results and line numbers are exact and memory stays bounded. Tag counts
  come from ``union_label_id``; ids in ``parse_label_id`` count as used and are range-checked;
  ``len(parse_label_id)`` must equal ``len(caption)``. A record that is not an object or has no list of
  ``union_label_id`` is a problem, not a sample.
* ``json`` / ``jsonl`` / ``csv`` / ``parquet``: manifests whose tags column holds names or ids.
* ``ram-text`` (auto), ``ram-text-ids``, ``ram-text-names``: RAM benchmark annotations, ``image,tag,tag`` (names),
  ``image,id id id``, ``image,id,id`` or ``image id id id`` (0-based ids); a bare image name has no tags.
"""

from __future__ import annotations

import array
import codecs
import csv
import gc
import io
import json
import math
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np

from mmprep.errors import InputError, MissingDependencyError, UsageError
from mmprep.inputs.manifest import ColumnMap, RawRecord, iter_records, open_binary, to_sample
from mmprep.labels.vocab import Vocabulary, load_vocab, normalize_tag
from mmprep.records import Rejected
from mmprep.runtime.files import atomic_write as atomic_write_bytes

try:  # optional: parses JSON batches ~2x faster than the standard library
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only without the dev extra
    _orjson = None

__all__ = [
    "ALIGNED_KINDS",
    "ANNOTATION_FORMATS",
    "FAIL_ON_CATEGORIES",
    "AlignedReport",
    "AnnotationFileReport",
    "AuditReport",
    "DuplicateGroup",
    "EmbeddingReport",
    "FrequencyStats",
    "Location",
    "Problem",
    "TagCount",
    "UnknownTag",
    "VocabReport",
    "audit_aligned",
    "audit_embeddings",
    "audit_labels",
    "audit_vocab",
    "detect_annotation_format",
    "plot_format",
    "plot_frequency",
    "write_tag_list",
]

ANNOTATION_FORMATS: tuple[str, ...] = (
    "ram-json", "json", "jsonl", "csv", "parquet", "ram-text", "ram-text-ids", "ram-text-names",
)
FAIL_ON_CATEGORIES: tuple[str, ...] = ("never-used", "unknown", "duplicates", "misaligned", "invalid", "hygiene")
ALIGNED_KINDS: tuple[str, ...] = ("translations", "thresholds", "descriptions")

_TAG_COLUMNS = ("tags", "labels", "union_label_id", "tag_ids")
_MAX_TRACKED = 10_000  # distinct unknown names/ids kept with their first location (the rest are only counted)
_BATCH = 1 << 20  # bytes of RAM JSON parsed per call
_READ = 4 << 20  # bytes read per read() call
_DIGITS = re.compile(r"-?\d+")


# -- report dataclasses ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Location:
    """Where something was first seen: ``file:line``, and the record's 1-based position in that file."""

    file: str
    line: int
    record: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class TagCount:
    """A vocabulary tag and how many samples' tag lists hold it."""

    id: int
    name: str
    count: int


@dataclass(frozen=True, slots=True)
class UnknownTag:
    """A tag used in annotations that the vocabulary lacks: a name not in it, or an id out of range.

    ``kind`` is ``"name"`` or ``"id"``; ``count`` is the number of occurrences; ``first`` where it first appears.
    """

    kind: str
    value: str | int
    count: int
    first: Location


@dataclass(frozen=True, slots=True)
class Problem:
    """A kind of malformed annotation record (a reason code), how often it occurs and its first occurrence."""

    code: str
    count: int
    first: Location
    detail: str


@dataclass(frozen=True, slots=True)
class DuplicateGroup:
    """Entries of a list that are the same tag: ``exact`` when every raw entry is identical, else they only match
    after normalisation (case, surrounding whitespace, ``_`` vs space)."""

    key: str
    ids: tuple[int, ...]
    entries: tuple[str, ...]
    exact: bool


@dataclass(frozen=True)
class VocabReport:
    """Facts and hygiene findings about the vocabulary file itself.

    ``entries`` is the number of entries (a missing final newline does not drop the last one; ``wc -l`` then
    says ``entries - 1``); ``size`` is the declared size (largest id + 1).
    """

    path: str
    format: str
    entries: int
    size: int
    sha256: str
    final_newline: bool | None
    has_bom: bool
    crlf_lines: int
    first_crlf_line: int | None
    empty_ids: tuple[int, ...]
    whitespace_ids: tuple[int, ...]
    duplicates: tuple[DuplicateGroup, ...]
    first_line: int = 1

    @property
    def duplicate_entries(self) -> int:
        """Entries beyond the first of each duplicate group."""
        return sum(len(g.ids) - 1 for g in self.duplicates)

    def hygiene_count(self) -> int:
        """Number of hygiene findings: empty/whitespace entries, missing final newline, BOM, CRLF."""
        return (
            len(self.empty_ids) + len(self.whitespace_ids) + (self.final_newline is False) + self.has_bom
            + (self.crlf_lines > 0)
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["duplicate_entries"] = self.duplicate_entries
        return d


@dataclass(frozen=True)
class AlignedReport:
    """A file that must hold exactly one entry per vocabulary id (a translation list, a threshold list, ...).

    ``invalid`` lists ``(line, entry, reason)`` for entries that are not what the kind needs (thresholds that are
    not floats in [0, 1], description entries that are not ``{tag: [...]}``); ``name_mismatches`` lists
    ``(id, name in the file, vocabulary name)`` for description files whose tags differ from the vocabulary's.
    Lines are 1-based for text files; for JSON files they are 0-based list positions (= ids). An empty entry of a
    threshold file is invalid (it is not a number), not an ``empty_lines`` hygiene finding.
    """

    path: str
    kind: str
    entries: int
    expected: int
    final_newline: bool | None
    has_bom: bool
    crlf_lines: int
    empty_lines: tuple[int, ...]
    whitespace_lines: tuple[int, ...]
    duplicates: tuple[DuplicateGroup, ...]
    invalid: tuple[tuple[int, str, str], ...]
    stats: dict[str, Any] = field(default_factory=dict)
    name_mismatches: tuple[tuple[int, str, str], ...] = ()

    @property
    def aligned(self) -> bool:
        """True when the file has exactly one entry per vocabulary id."""
        return self.entries == self.expected

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["aligned"] = self.aligned
        d["trailing_whitespace"] = len(self.whitespace_lines)
        return d


@dataclass(frozen=True)
class EmbeddingReport:
    """An embedding matrix: its shape against the vocabulary size.

    A 2-D matrix with rows equal to the size is aligned (``k == 1``); rows equal to size × K are description-set
    embeddings (``k == K``), as are 3-D tensors ``[size, K, dim]``; anything else, a 1-D vector included, is
    misaligned (``k`` is None). ``kind == "label"`` (``label=PATH``) requires one row per tag: ``k == 1`` and 2-D.
    """

    path: str
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    rows: int
    expected: int
    k: int | None
    kind: str = "auto"

    @property
    def aligned(self) -> bool:
        if self.kind == "label":
            return self.k == 1 and len(self.shape) == 2
        return self.k is not None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["aligned"] = self.aligned
        return d


@dataclass(frozen=True)
class AnnotationFileReport:
    """One annotation file: its format, how many samples and tag references it held, and malformed records."""

    path: str
    format: str
    samples: int
    tag_refs: int
    problems: int


@dataclass(frozen=True)
class FrequencyStats:
    """How the used tags are distributed over the samples.

    ``coverage`` maps a share of all tag occurrences ("50%", "90%", "99%") to the smallest number of tags that
    together account for it. ``most_used`` and ``least_used`` (of the used) list ``top`` tags each;
    ``counts_by_id`` has every tag's count (index = id, 0 for never-used ids).
    """

    samples: int
    samples_without_tags: int
    occurrences: int
    tags_per_sample: dict[str, float | int | None]
    coverage: dict[str, int]
    used_once: int
    most_used: tuple[TagCount, ...]
    least_used: tuple[TagCount, ...]
    counts_by_id: tuple[int, ...] = field(default=(), repr=False)


@dataclass
class AuditReport:
    """Everything :func:`audit_labels` found.

    Attributes:
        vocab: facts about the vocabulary file.
        declared_size: the vocabulary's size (largest id + 1); ``declared_size_given`` is ``--declared-size``.
        annotations: one entry per annotation file.
        distinct_used: vocabulary tags used at least once (None without annotation files).
        never_used: vocabulary tags never used, by id (None without annotation files).
        unknown: names not in the vocabulary and ids out of its range, most frequent first, each with its first
            ``file:line``; ``unknown_occurrences`` counts all their occurrences. Only the first
            10,000 distinct values are listed; ``unknown_untracked`` counts the occurrences of the others
            (``unknown_truncated`` says whether there were any).
        normalised_matches: names that matched a tag only after normalisation (case, ``_``, whitespace).
        problems: malformed records by reason code (wrong types, ids that are not integers, ...).
        parse_only_ids: RAM JSON ids seen in ``parse_label_id`` but never in ``union_label_id``.
        aligned, embeddings: one entry per aligned file / embedding matrix.
        frequency: how the tags are distributed (None without annotation files).
        counts: occurrences per id (numpy; the JSON report has them as ``frequency.counts_by_id``).
    """

    vocab: VocabReport
    declared_size: int
    annotations: list[AnnotationFileReport]
    distinct_used: int | None
    never_used: list[TagCount] | None
    unknown: list[UnknownTag]
    unknown_occurrences: int
    normalised_matches: list[UnknownTag]
    problems: list[Problem]
    parse_only_ids: list[int]
    aligned: list[AlignedReport]
    embeddings: list[EmbeddingReport]
    frequency: FrequencyStats | None
    counts: np.ndarray | None = field(default=None, repr=False)  # per-id occurrences
    declared_size_given: int | None = None
    vocab_names: dict[int, str] = field(default_factory=dict, repr=False)
    unknown_untracked: int = 0

    @property
    def unknown_truncated(self) -> bool:
        """Whether more distinct unknown names/ids occurred than ``unknown`` lists."""
        return self.unknown_untracked > 0

    @property
    def used(self) -> list[TagCount]:
        """Vocabulary tags used at least once (in a tag list, or for RAM JSON in a parse list)."""
        if self.counts is None:
            return []
        never = {t.id for t in self.never_used or ()}
        names = self.vocab_names
        return [TagCount(i, names.get(i, ""), int(self.counts[i])) for i in sorted(names) if i not in never]

    @property
    def findings(self) -> dict[str, int]:
        """Number of findings per ``--fail-on`` category."""
        misaligned = sum(not a.aligned for a in self.aligned) + sum(not e.aligned for e in self.embeddings)
        misaligned += sum(len(a.name_mismatches) for a in self.aligned)
        if self.declared_size_given is not None and self.declared_size_given != self.vocab.entries:
            misaligned += 1
        invalid = sum(p.count for p in self.problems) + sum(len(a.invalid) for a in self.aligned)
        hygiene = self.vocab.hygiene_count() + len(self.normalised_matches) + sum(
            len(a.empty_lines) + len(a.whitespace_lines) + (a.final_newline is False) + a.has_bom
            + (a.crlf_lines > 0)
            for a in self.aligned
        )
        return {
            "never-used": len(self.never_used or ()),
            "unknown": len(self.unknown),
            "duplicates": len(self.vocab.duplicates) + sum(len(a.duplicates) for a in self.aligned),
            "misaligned": misaligned,
            "invalid": invalid,
            "hygiene": hygiene,
        }

    def failing(self, categories: Iterable[str]) -> list[str]:
        """The categories among ``categories`` (``any`` = all) that have findings."""
        cats = set(categories)
        if "any" in cats:
            cats = set(FAIL_ON_CATEGORIES)
        found = self.findings
        return [c for c in FAIL_ON_CATEGORIES if c in cats and found[c] > 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab,
            "declared_size": self.declared_size,
            "declared_size_given": self.declared_size_given,
            "annotations": self.annotations,
            "samples": self.frequency.samples if self.frequency else 0,
            "distinct_used": self.distinct_used,
            "never_used": self.never_used,
            "unknown": self.unknown,
            "unknown_occurrences": self.unknown_occurrences,
            "unknown_truncated": self.unknown_truncated,
            "unknown_untracked": self.unknown_untracked,
            "normalised_matches": self.normalised_matches,
            "problems": self.problems,
            "parse_only_ids": self.parse_only_ids,
            "aligned": self.aligned,
            "embeddings": self.embeddings,
            "frequency": self.frequency,
            "findings": self.findings,
        }


# -- vocabulary ----------------------------------------------------------------------------------------------


def _line_ending_facts(path: str) -> tuple[int, int | None]:
    """(number of CRLF lines, first CRLF line) of a text file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return 0, None
    n = data.count(b"\r\n")
    if not n:
        return 0, None
    return n, data.count(b"\n", 0, data.index(b"\r\n")) + 1


def _duplicate_groups(ids: Sequence[int], raw: Sequence[str]) -> tuple[DuplicateGroup, ...]:
    groups: dict[str, list[int]] = {}
    for k, entry in enumerate(raw):
        key = normalize_tag(entry)
        if key:
            groups.setdefault(key, []).append(k)
    out = []
    for key, ks in groups.items():
        if len(ks) > 1:
            entries = tuple(raw[k] for k in ks)
            out.append(DuplicateGroup(key, tuple(ids[k] for k in ks), entries, len(set(entries)) == 1))
    return tuple(out)


def audit_vocab(vocab: Vocabulary) -> VocabReport:
    """Hygiene facts of a loaded vocabulary: duplicates, empty and whitespace entries, BOM, CRLF, final newline."""
    crlf, first_crlf = _line_ending_facts(vocab.path) if vocab.has_crlf else (0, None)
    return VocabReport(
        path=vocab.path,
        format=vocab.format,
        entries=len(vocab),
        size=vocab.size,
        sha256=vocab.sha256,
        final_newline=vocab.final_newline,
        has_bom=vocab.has_bom,
        crlf_lines=crlf,
        first_crlf_line=first_crlf,
        empty_ids=tuple(i for i, n in zip(vocab.ids, vocab.names, strict=True) if not n),
        whitespace_ids=tuple(i for i, r in zip(vocab.ids, vocab.raw, strict=True) if r.strip() and r != r.strip()),
        duplicates=_duplicate_groups(vocab.ids, vocab.raw),
        first_line=vocab.first_line,
    )


# -- aligned files -------------------------------------------------------------------------------------------


def _split_kind(spec: str) -> tuple[str | None, str]:
    kind, sep, rest = spec.partition("=")
    if sep and kind in ALIGNED_KINDS:
        return kind, rest
    return None, spec


def audit_aligned(spec: str | Path, vocab: Vocabulary) -> AlignedReport:
    """Check a file that must have one entry per vocabulary id.

    ``spec`` is a path, optionally prefixed ``KIND=`` (``translations``, ``thresholds``, ``descriptions``). Without
    a kind: a ``.json`` file is ``descriptions`` (a list of ``{tag: [descriptions]}`` objects or of names), a text
    file whose entries are mostly numbers is ``thresholds`` (each must be a float in [0, 1]), anything else
    ``translations``.
    """
    kind, path = _split_kind(str(spec))
    if not Path(path).exists():
        raise InputError(f"{path}: aligned file not found")
    if kind == "descriptions" or (kind is None and path.lower().endswith(".json")):
        return _audit_descriptions(path, vocab)
    lst = load_vocab(path, role="aligned")
    expected = vocab.size
    floats: list[float | None] = []
    for entry in lst.names:
        try:
            floats.append(float(entry))
        except ValueError:
            floats.append(None)
    nonempty = [n for n in lst.names if n]
    if kind is None:
        numeric = sum(f is not None for f in floats)
        kind = "thresholds" if nonempty and numeric * 2 > len(nonempty) else "translations"
    line0 = lst.first_line
    invalid: list[tuple[int, str, str]] = []
    stats: dict[str, Any] = {}
    duplicates: tuple[DuplicateGroup, ...] = ()
    if kind == "thresholds":
        good = []
        for k, (entry, f) in enumerate(zip(lst.names, floats, strict=True)):
            if not entry:
                invalid.append((k + line0, entry, "empty, not a number"))
            elif f is None:
                invalid.append((k + line0, entry, "not a number"))
            elif not (0.0 <= f <= 1.0):  # also rejects nan
                invalid.append((k + line0, entry, "outside [0, 1]"))
            else:
                good.append(f)
        if good:
            arr = np.asarray(good)
            values, counts = np.unique(arr, return_counts=True)
            order = np.argsort(-counts, kind="stable")[:5]
            stats = {
                "min": float(arr.min()), "max": float(arr.max()), "mean": round(float(arr.mean()), 6),
                "distinct": int(values.size),
                "most_common": [[float(values[i]), int(counts[i])] for i in order],
            }
    else:
        duplicates = _duplicate_groups(range(len(lst.raw)), lst.raw)
    crlf, _ = _line_ending_facts(path) if lst.has_crlf else (0, None)
    return AlignedReport(
        path=path,
        kind=kind,
        entries=len(lst.names),
        expected=expected,
        final_newline=lst.final_newline,
        has_bom=lst.has_bom,
        crlf_lines=crlf,
        empty_lines=() if kind == "thresholds" else tuple(k + line0 for k, n in enumerate(lst.names) if not n),
        whitespace_lines=tuple(k + line0 for k, r in enumerate(lst.raw) if r.strip() and r != r.strip()),
        duplicates=duplicates,
        invalid=tuple(invalid),
        stats=stats,
    )


def _audit_descriptions(path: str, vocab: Vocabulary) -> AlignedReport:
    """RAM++ tag descriptions: a JSON list of one-key objects ``{tag: [description, ...]}`` (or plain names)."""
    p = Path(path)
    with open_binary(p) as fh:
        data = fh.read()
    has_bom = data.startswith(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8-sig")
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{p}:{line}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise InputError(f"{p}: expected a JSON list with one entry per tag, got {type(value).__name__}",
                         hint="use KIND=PATH with translations/thresholds for text files")
    names: list[str] = []
    invalid: list[tuple[int, str, str]] = []
    mismatches: list[tuple[int, str, str]] = []
    ks: list[int] = []
    for k, item in enumerate(value):
        if isinstance(item, dict) and len(item) == 1:
            (name, descs), = item.items()
            if isinstance(descs, list):
                ks.append(len(descs))
            else:
                invalid.append((k, str(name), "descriptions are not a list"))
        elif isinstance(item, str):
            name = item
        else:
            invalid.append((k, repr(item)[:60], "not a {tag: [descriptions]} object or a name"))
            name = ""
        names.append(name)
        expected_name = vocab.id_to_name.get(k)
        if name and expected_name is not None and normalize_tag(name) != normalize_tag(expected_name):
            mismatches.append((k, name, expected_name))
    stats: dict[str, Any] = {}
    if ks:
        stats = {"descriptions_min": min(ks), "descriptions_max": max(ks)}
    return AlignedReport(
        path=path, kind="descriptions", entries=len(value), expected=vocab.size,
        final_newline=text.endswith("\n") if text else None, has_bom=has_bom, crlf_lines=text.count("\r\n"),
        empty_lines=(), whitespace_lines=tuple(k for k, n in enumerate(names) if n.strip() and n != n.strip()),
        duplicates=_duplicate_groups(range(len(names)), names), invalid=tuple(invalid), stats=stats,
        name_mismatches=tuple(mismatches),
    )


# -- embeddings ----------------------------------------------------------------------------------------------


def _pick(tensors: dict[str, tuple[tuple[int, ...], str]], key: str | None, path: str) -> tuple[str | None, Any]:
    if not tensors:
        raise InputError(f"{path}: holds no tensors")
    if key is not None:
        if key not in tensors:
            raise InputError(f"{path}: no tensor '{key}'", hint="tensors: " + ", ".join(sorted(tensors)[:20]))
        return key, tensors[key]
    matrices = {k: v for k, v in tensors.items() if len(v[0]) >= 2}
    if len(tensors) == 1:
        return next(iter(tensors.items()))
    if len(matrices) == 1:
        return next(iter(matrices.items()))
    raise InputError(
        f"{path}: holds {len(tensors)} tensors, cannot tell which is the embedding matrix",
        hint=f"name one as {path}#KEY; tensors: " + ", ".join(sorted(tensors)[:20]),
    )


def _read_safetensors_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not an object)")
    out = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list):
            out[k] = (tuple(int(s) for s in v["shape"]), str(v.get("dtype", "?")))
    return out


def _read_torch(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "embed", purpose=f"reading the torch file {path}") from None
    try:
        try:  # memory-map big matrices (zip format); older files cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: embeddings file not found") from None
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable torch tensor file: {msg[:200]}",
                         hint="save the matrix with torch.save(tensor, path)") from None
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def visit(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix or "<tensor>"] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        elif isinstance(value, dict) and depth < 3:
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, (list, tuple)) and depth < 3:
            for k, v in enumerate(value):
                visit(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)

    visit("", obj, 0)
    if not out:
        raise InputError(f"{path}: holds no tensor (a {type(obj).__name__})")
    return out


def _read_numpy(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the embeddings file: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):  # numpy would call anything else "pickled"
        raise InputError(f"{path}: not a .npy/.npz file (no NumPy or zip header)",
                         hint="save the matrix with numpy.save(path, array)")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"<array>": (tuple(loaded.shape), str(loaded.dtype))}
        with loaded:
            return {k: (tuple(loaded[k].shape), str(loaded[k].dtype)) for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npy/.npz file: {str(exc)[:200]}") from None


def audit_embeddings(spec: str | Path, vocab_size: int) -> EmbeddingReport:
    """Read an embedding matrix's shape (``.pt``/``.pth``/``.bin`` via torch, ``.npy``/``.npz``, ``.safetensors``)
    and compare its rows with the vocabulary size. ``PATH#KEY`` picks one tensor of a file that holds several;
    ``label=PATH`` says the matrix must have exactly one row per tag (a description set of size × K rows is then
    misaligned)."""
    spec = str(spec)
    kind = "auto"
    if spec.startswith("label=") and not Path(spec).exists():
        kind, spec = "label", spec.removeprefix("label=")
    path, _, key = spec.rpartition("#") if "#" in spec and not Path(spec).exists() else (spec, "", "")
    if not Path(path).exists():
        raise InputError(f"{path}: embeddings file not found")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a directory, expected an embeddings file")
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        tensors = _read_safetensors_header(path)
    elif suffix in (".npy", ".npz"):
        tensors = _read_numpy(path)
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        tensors = _read_torch(path)
    else:
        raise InputError(f"{path}: unknown embeddings format '{suffix}'",
                         hint="use .pt/.pth (torch), .npy/.npz (numpy) or .safetensors")
    name, (shape, dtype) = _pick(tensors, key or None, path)
    rows = shape[0] if shape else 0
    k: int | None = None
    if vocab_size > 0 and len(shape) >= 2:  # a 1-D vector (a bias, a threshold list) is no embedding matrix
        if len(shape) >= 3 and rows == vocab_size:
            k = shape[1]
        elif rows == vocab_size:
            k = 1
        elif rows % vocab_size == 0 and rows > 0:
            k = rows // vocab_size
    shown = None if name in ("<tensor>", "<array>") else name
    return EmbeddingReport(path=path, key=shown, shape=shape, dtype=dtype, rows=rows, expected=vocab_size, k=k,
                           kind=kind)


# -- the tally -----------------------------------------------------------------------------------------------

LocFn = Callable[[], Location]


class _Tally:
    """Counts per vocabulary id, unknowns, problems and tags-per-sample, shared by every annotation file."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.size = vocab.size
        self.known = np.zeros(self.size, dtype=bool)
        self.known[list(vocab.ids)] = True
        self.all_known = bool(self.known.all())
        self.counts = np.zeros(self.size, dtype=np.int64)
        self.parse_used = np.zeros(self.size, dtype=bool)
        self.lens_hist = np.zeros(64, dtype=np.int64)
        self.samples = 0
        self.empty = 0
        self.refs = 0
        self.unknown: dict[tuple[str, str | int], list[Any]] = {}
        self.unknown_untracked = 0
        self.normalised: dict[str, list[Any]] = {}
        self.problems: dict[str, list[Any]] = {}
        self.problem_total = 0
        self._pending: list[int] = []
        self._pending_lens: list[int] = []
        self._name_cache: dict[str, int | None] = {}

    # per-record (slow, exact) path
    def problem(self, code: str, detail: str, loc: LocFn) -> None:
        self.problem_total += 1
        entry = self.problems.get(code)
        if entry is None:
            self.problems[code] = [1, loc(), detail]
        else:
            entry[0] += 1

    def _unknown(self, kind: str, value: str | int, loc: LocFn, n: int = 1) -> None:
        """Count ``n`` occurrences of an unknown name/id whose first occurrence (in file order) is at ``loc``."""
        key = (kind, value)
        entry = self.unknown.get(key)
        if entry is not None:
            entry[0] += n
        elif len(self.unknown) < _MAX_TRACKED:
            self.unknown[key] = [n, loc()]
        else:
            self.unknown_untracked += n

    def add_ids(self, ids: Sequence[int], loc: LocFn, *, count: bool = True) -> None:
        """Check integer ids; ``count=False`` only marks them used (RAM parse lists)."""
        size, known = self.size, self.known
        good = []
        for i in ids:
            if 0 <= i < size and known[i]:
                good.append(i)
            else:
                self._unknown("id", i, loc)
        if count:
            self._pending.extend(good)
            self._pending_lens.append(len(ids))
            if len(self._pending) > 1_000_000:
                self.flush()
        elif good:
            self.parse_used[good] = True

    def add_tags(self, tags: Sequence[str | int], loc: LocFn) -> None:
        """Check a sample's tags as written: integer ids or names (exact match first, then normalised)."""
        good = []
        for t in tags:
            if isinstance(t, int):
                if 0 <= t < self.size and self.known[t]:
                    good.append(t)
                else:
                    self._unknown("id", t, loc)
                continue
            name = t.strip()
            cached = self._name_cache.get(name, -1)
            if cached == -1:
                cached = self.vocab.name_to_id.get(name)
                if cached is None:
                    cached = self.vocab.normalized_to_id.get(normalize_tag(name))
                    if cached is not None:
                        cached = -2 - cached  # marks a normalised-only match
                if len(self._name_cache) < 200_000:
                    self._name_cache[name] = cached
            if cached is None:
                self._unknown("name", name, loc)
            elif cached <= -2:
                good.append(-2 - cached)
                entry = self.normalised.get(name)
                if entry is None:
                    self.normalised[name] = [1, loc(), -2 - cached]
                else:
                    entry[0] += 1
            else:
                good.append(cached)
        self._pending.extend(good)
        self._pending_lens.append(len(tags))
        if len(self._pending) > 1_000_000:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.asarray(self._pending, dtype=np.int64), minlength=self.size)
            self.refs += len(self._pending)
            self._pending.clear()
        if self._pending_lens:
            lens = np.asarray(self._pending_lens, dtype=np.int64)
            self._add_lens(lens)
            self._pending_lens.clear()

    def _add_lens(self, lens: np.ndarray) -> None:
        if not lens.size:
            return
        hist = np.bincount(lens)
        if hist.size > self.lens_hist.size:
            grown = np.zeros(hist.size, dtype=np.int64)
            grown[: self.lens_hist.size] = self.lens_hist
            self.lens_hist = grown
        self.lens_hist[: hist.size] += hist
        self.samples += int(lens.size)
        self.empty += int(hist[0])

    # RAM JSON: per batch
    def ram_batch_fast(self, values: list[Any], loc_of: Callable[[int], Location]) -> bool:
        """Count a batch of RAM records in bulk; False (and nothing counted) if any record needs a closer look.

        Out-of-range and unknown ids are counted here too, exactly as :meth:`ram_record` would (``loc_of(k)`` is
        the location of ``values[k]``, asked for only when an unknown id is first seen); wrong types are not.
        """
        try:
            us = list(map(_IG_UNION, values))  # TypeError for a record that is not an object
        except (KeyError, TypeError):
            return False
        if not us or set(map(type, us)) != {list}:
            return False
        ps: list[Any] = []
        inner: list[Any] = []
        if "parse_label_id" in values[0]:
            try:
                ps = list(map(_IG_PARSE, values))
                cs = list(map(_IG_CAPTION, values))
            except KeyError:
                return False
            if set(map(type, ps)) != {list} or set(map(type, cs)) != {list}:
                return False
            if list(map(len, ps)) != list(map(len, cs)):
                return False
            inner = list(chain.from_iterable(ps))
            if inner and set(map(type, inner)) != {list}:
                return False
            pflat = list(chain.from_iterable(inner))
        else:
            if any(map(_HAS_PARSE, values)):
                return False
            pflat = []
        flat = list(chain.from_iterable(us))
        arr = _int_array(flat)
        parr = _int_array(pflat)
        if arr is None or parr is None or not (_no_bools(flat, arr) and _no_bools(pflat, parr)):
            return False
        lens = np.fromiter(map(len, us), dtype=np.int64, count=len(us))
        bad, pbad = self._unknown_mask(arr), self._unknown_mask(parr)
        if bad is not None or pbad is not None:
            found: list[tuple[np.ndarray, np.ndarray, int]] = []  # (unknown ids, their records, 0 parse / 1 union)
            if pbad is not None:  # the record of each parse id: records -> their parse lists -> ids
                lists = np.repeat(np.arange(len(ps)), np.fromiter(map(len, ps), dtype=np.int64, count=len(ps)))
                prec = np.repeat(lists, np.fromiter(map(len, inner), dtype=np.int64, count=len(inner)))
                found.append((parr[pbad], prec[pbad], 0))
                parr = parr[~pbad]
            if bad is not None:
                found.append((arr[bad], np.repeat(np.arange(len(us)), lens)[bad], 1))
                arr = arr[~bad]
            self._bulk_unknown(found, loc_of)
        self.counts += np.bincount(arr, minlength=self.size)
        self.refs += int(arr.size)
        if parr.size:
            self.parse_used[parr] = True
        self._add_lens(lens)
        return True

    def _unknown_mask(self, ids: np.ndarray) -> np.ndarray | None:
        """Which ids are out of range or not in the vocabulary; None when all are known (the common case)."""
        if not ids.size:
            return None
        lo, hi = ids.min(), ids.max()
        if lo >= 0 and hi < self.size and (self.all_known or self.known[ids].all()):
            return None
        bad = (ids < 0) | (ids >= self.size)
        if not self.all_known:
            bad |= ~self.known[np.where(bad, 0, ids)]
        return bad

    def _bulk_unknown(self, found: list[tuple[np.ndarray, np.ndarray, int]], loc_of: Callable[[int], Location]
                      ) -> None:
        """Count a batch's unknown ids in the order :meth:`ram_record` meets them (record by record, its parse
        lists before its union list), so that first locations and the tracking cap come out the same."""
        values = np.concatenate([v for v, _r, _p in found])
        records = np.concatenate([r for _v, r, _p in found])
        keys = np.concatenate([r * 2 + p for _v, r, p in found])
        order = np.argsort(keys, kind="stable")
        values, records = values[order], records[order]
        distinct, first, counts = np.unique(values, return_index=True, return_counts=True)
        for j in np.argsort(first, kind="stable").tolist():
            k = int(records[first[j]])
            self._unknown("id", int(distinct[j]), lambda k=k: loc_of(k), int(counts[j]))

    def ram_record(self, value: Any, loc: LocFn) -> None:
        """One RAM training record, checked field by field (the reference for :meth:`ram_batch_fast`)."""
        if not isinstance(value, dict):
            self.problem("not_object", f"expected a JSON object, got {_typename(value)}", loc)
            return
        union = value.get("union_label_id", _MISSING)
        if union is _MISSING:
            self.problem("missing_union_label_id", "no 'union_label_id' field", loc)
            return
        if not isinstance(union, list):
            self.problem("bad_union_label_id", f"'union_label_id' is {_typename(union)}, expected a list", loc)
            return
        ids = self._int_ids(union, "union_label_id", loc)
        if "parse_label_id" in value:
            parse = value["parse_label_id"]
            caption = value.get("caption", _MISSING)
            if not isinstance(parse, list):
                self.problem("bad_parse_label_id", f"'parse_label_id' is {_typename(parse)}, expected a list", loc)
            else:
                pids: list[int] = []
                for item in parse:
                    if isinstance(item, list):
                        pids.extend(self._int_ids(item, "parse_label_id", loc))
                    else:
                        self.problem("bad_parse_label_id",
                                     f"'parse_label_id' holds {_typename(item)}, expected lists of ids", loc)
                self.add_ids(pids, loc, count=False)
                if caption is _MISSING:
                    self.problem("parse_caption_mismatch", "'parse_label_id' without 'caption'", loc)
                elif not isinstance(caption, list) or len(caption) != len(parse):
                    n = len(caption) if isinstance(caption, list) else _typename(caption)
                    self.problem("parse_caption_mismatch",
                                 f"{len(parse)} parse_label_id lists for caption of {n} items", loc)
        self.add_ids(ids, loc)

    def _int_ids(self, items: list[Any], fieldname: str, loc: LocFn) -> list[int]:
        out = []
        for i in items:
            if isinstance(i, int) and not isinstance(i, bool):
                out.append(i)
            else:
                self.problem("bad_id", f"'{fieldname}' holds {i!r:.40}, expected integer ids", loc)
        return out


_MISSING = object()


def _int_array(items: list[Any]) -> np.ndarray | None:
    """The items as a 1-D int64 array, or None unless every item is an integer that fits in 64 bits.

    (``bool`` is an ``int`` here: callers rule booleans out separately.)
    """
    try:
        buf = array.array("q", items)
    except (TypeError, OverflowError):
        return None
    return np.frombuffer(buf, dtype=np.int64)


_IG_UNION = itemgetter("union_label_id")
_IG_PARSE = itemgetter("parse_label_id")
_IG_CAPTION = itemgetter("caption")


def _no_bools(items: list[Any], arr: np.ndarray) -> bool:
    """No item is a boolean (array("q") reads True/False as 1/0, so only those values need a look)."""
    small = np.flatnonzero(arr <= 1)
    if not small.size:
        return True
    if small.size * 8 > arr.size:
        return set(map(type, items)) == {int}
    return set(map(type, map(items.__getitem__, small.tolist()))) == {int}


def _HAS_PARSE(d: dict[str, Any]) -> bool:
    return "parse_label_id" in d


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# -- RAM JSON streaming --------------------------------------------------------------------------------------

_WSB = re.compile(rb"[ \t\r\n]*")
_WSS = re.compile(r"[ \t\r\n]*")
_CUT = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_STRUCT = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)


class _WalkError(Exception):
    def __init__(self, pos: int, msg: str) -> None:
        super().__init__(msg)
        self.pos = pos
        self.msg = msg


def _complete_in(text: str, i: int) -> bool:
    """Whether the JSON value starting at ``text[i]`` ends inside ``text`` (brackets and strings balance)."""
    c = text[i]
    if c not in "[{\"":
        return re.compile(r"[,\]\s]").search(text, i) is not None
    depth = 0
    for m in _STRUCT.finditer(text, i):
        tok = m.group()
        if tok[0] == '"':
            if len(tok) < 2 or not tok.endswith('"') or _odd_backslashes(tok):
                return False  # an unterminated string runs to the end of the text
            if depth == 0:
                return True
        elif tok in "[{":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return True
    return False


def _odd_backslashes(tok: str) -> bool:
    n = 0
    for ch in reversed(tok[1:-1]):
        if ch != "\\":
            break
        n += 1
    return n % 2 == 1


def _walk(
    text: str, i: int, *, final: bool, allow_close: bool, stop_at: int | None = None
) -> tuple[list[tuple[int, Any]], int, str]:
    """Parse JSON list elements one at a time from ``text[i]`` (an element start, after ``[`` or ``,``).

    Returns ``(items, end, state)``: ``items`` are ``(start index, value)``; ``state`` is ``"end"`` (the closing
    ``]`` was consumed; ``end`` is after it), ``"stop"`` (``end`` >= ``stop_at`` at an element start) or
    ``"more"`` (the text ends inside an element that starts at ``end``). Raises _WalkError on malformed JSON.
    """
    raw_decode = _DECODER.raw_decode
    n = len(text)
    items: list[tuple[int, Any]] = []
    while True:
        i = _WSS.match(text, i).end()  # type: ignore[union-attr]
        if i >= n:
            if final:
                raise _WalkError(i, "unexpected end of file inside the JSON list")
            return items, i, "more"
        if text[i] == "]":
            if allow_close:
                return items, i + 1, "end"
            raise _WalkError(i, "expected a value after ',' (trailing comma?)")
        try:
            value, end = raw_decode(text, i)
        except json.JSONDecodeError as exc:
            if not final and not _complete_in(text, i):
                return items, i, "more"
            raise _WalkError(exc.pos, f"invalid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # e.g. an integer longer than Python converts
            raise _WalkError(i, f"unreadable JSON value: {str(exc)[:120]}") from None
        j = _WSS.match(text, end).end()  # type: ignore[union-attr]
        if j >= n:
            if final:
                raise _WalkError(j, "unexpected end of file inside the JSON list")
            return items, i, "more"
        items.append((i, value))
        if text[j] == "]":
            return items, j + 1, "end"
        if text[j] != ",":
            raise _WalkError(j, "expected ',' or ']' between list elements")
        i = j + 1
        allow_close = False
        if stop_at is not None and i >= stop_at:
            return items, i, "stop"


_DECODER = json.JSONDecoder()


def _loads(data: bytes) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass  # the standard library accepts a little more (NaN, integers beyond 64 bits); let it decide
    return json.loads(data)


def _count_newlines(buf: bytes, start: int, end: int) -> int:
    if end - start < 65536:
        return buf.count(b"\n", start, end)
    return int(np.count_nonzero(np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start) == 10))


@dataclass
class _Batch:
    values: list[Any]
    record0: int  # 1-based record number of values[0]
    line0: int  # line where values[0] starts
    seg: bytes  # the bytes of the elements (for lazy line numbers)
    lines: list[int] | None = None  # start line of each element, when known
    bulk: bool = True  # parsed in one call (orjson when installed) rather than element by element

    def line_of(self, k: int) -> int:
        if self.lines is None:
            text = self.seg.decode("utf-8", errors="replace")
            items, _, _ = _walk(text + "]", 0, final=True, allow_close=False)
            line, prev, lines = self.line0, 0, []
            for start, _v in items:
                line += text.count("\n", prev, start)
                prev = start
                lines.append(line)
            self.lines = lines
        return self.lines[k]


class _RamJsonReader:
    """Split a JSON list into batches of whole elements (bounded memory), tracking lines and record numbers."""

    def __init__(self, stream: IO[bytes], name: str, progress: Callable[[int], None] | None) -> None:
        self.stream = stream
        self.name = name
        self.progress = progress
        self.buf = b""
        self.pos = 0
        self.line = 1
        self.record = 0
        self.eof = False
        self.bytes_done = 0

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(_READ)
        if not chunk:
            self.eof = True
            return False
        self.bytes_done += self.pos
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _advance(self, new_pos: int) -> None:
        self.line += _count_newlines(self.buf, self.pos, new_pos)
        if self.progress is not None:
            self.progress(new_pos - self.pos)
        self.pos = new_pos

    def _skip_ws(self) -> None:
        while True:
            self._advance(_WSB.match(self.buf, self.pos).end())  # type: ignore[union-attr]
            if self.pos < len(self.buf) or not self._fill():
                return

    def _error(self, msg: str, line: int | None = None) -> InputError:
        return InputError(f"{self.name}:{line or self.line}: {msg}")

    def batches(self) -> Iterator[_Batch]:
        self._fill()
        if self.buf.startswith(b"\xef\xbb\xbf"):
            self.pos = 3
        self._skip_ws()
        if self.pos >= len(self.buf):
            raise InputError(f"{self.name}: empty file, expected a JSON list")
        if self.buf[self.pos] != 0x5B:  # '['
            raise self._error("expected a JSON list of records (a file starting with '[')")
        self._advance(self.pos + 1)
        first = True
        while True:
            if not self.eof and len(self.buf) - self.pos < _BATCH:
                self._fill()
            self._skip_ws()
            if self.pos >= len(self.buf):
                raise self._error("unexpected end of file inside the JSON list")
            if self.buf[self.pos] == 0x5D and first:  # ']': an empty list
                self._advance(self.pos + 1)
                self._check_trailing()
                return
            batch, done = self._next_batch(first)
            first = False
            if batch is not None:
                yield batch
            if done:
                self._check_trailing()
                return

    def _next_batch(self, first: bool) -> tuple[_Batch | None, bool]:
        buf, pos = self.buf, self.pos
        seg: bytes | None = None
        nxt = -1
        last = False
        if self.eof and len(buf) - pos <= 2 * _BATCH:
            tail = buf[pos:].rstrip(b" \t\r\n")
            if tail.endswith(b"]"):
                seg, last = tail[:-1], True
        if seg is None:
            limit = min(len(buf), pos + _BATCH)
            j = buf.rfind(b"}", pos, limit)
            tries = 0
            while j != -1 and tries < 64:
                m = _CUT.match(buf, j)
                if m:
                    seg, nxt = buf[pos: j + 1], m.end() - 1
                    break
                j = buf.rfind(b"}", pos, j)
                tries += 1
            if seg is None and not self.eof:
                # no element boundary in the window (a huge element): read on until there is one
                scanned = len(buf) - pos
                while seg is None and self._fill():
                    buf, pos = self.buf, self.pos
                    m = _CUT.search(buf, pos + max(0, scanned - 64))
                    scanned = len(buf) - pos
                    if m:
                        seg, nxt = buf[pos: m.start() + 1], m.end() - 1
                if seg is None:
                    return None, False  # at EOF now; the next round takes the tail
        values = None
        if seg is not None:
            try:
                values = _loads(b"[" + seg + b"]")
            except (ValueError, RecursionError):
                values = None  # not a real boundary, or malformed: decide element by element
        if values is None or not isinstance(values, list):
            return self._walk_batch(first, len(seg) if seg is not None and not last else None)
        batch = _Batch(values, self.record + 1, self.line, seg)  # type: ignore[arg-type]
        self.record += len(values)
        if last:
            self._advance(len(buf.rstrip(b" \t\r\n")))
            return batch, True
        self._advance(nxt)
        return batch, False

    def _walk_batch(self, first: bool, stop_bytes: int | None) -> tuple[_Batch | None, bool]:
        """Exact element-by-element parsing from the current position (a true element start)."""
        while True:
            data = self.buf[self.pos:]
            try:
                text, used = codecs.utf_8_decode(data, "strict", self.eof)
            except UnicodeDecodeError as exc:
                line = self.line + data.count(b"\n", 0, exc.start)
                raise self._error(f"not valid UTF-8 (byte {self.bytes_done + self.pos + exc.start})", line) from None
            stop_at = None
            if stop_bytes is not None:
                stop_at = len(codecs.utf_8_decode(data[:stop_bytes], "replace", False)[0])
            try:
                items, end, state = _walk(
                    text, 0, final=self.eof and used == len(data), allow_close=first, stop_at=stop_at
                )
            except _WalkError as exc:
                raise self._error(exc.msg, self.line + text.count("\n", 0, exc.pos)) from None
            if state == "more" and not items:
                if not self._fill():
                    self.eof = True
                continue
            line, prev, lines = self.line, 0, []
            for start, _v in items:
                line += text.count("\n", prev, start)
                prev = start
                lines.append(line)
            values = [v for _s, v in items]
            consumed = len(text[:end].encode("utf-8"))
            seg = data[:consumed]
            batch = _Batch(values, self.record + 1, lines[0] if lines else self.line, seg, lines, bulk=False)
            self.record += len(values)
            self._advance(self.pos + consumed)
            return batch, state == "end"

    def _check_trailing(self) -> None:
        self._skip_ws()
        if self.pos < len(self.buf):
            raise self._error("unexpected data after the end of the JSON list")


def _scan_ram_json(
    stream: IO[bytes], name: str, tally: _Tally, progress: Callable[[int], None] | None
) -> int:
    """Audit one RAM training JSON stream; returns the number of records."""
    reader = _RamJsonReader(stream, name, progress)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the parsed batches are acyclic; collection passes over them only cost time
    try:
        for batch in reader.batches():
            if tally.ram_batch_fast(batch.values, lambda k, b=batch: Location(name, b.line_of(k), b.record0 + k)):
                continue
            values = batch.values
            if batch.bulk:  # parsed in bulk: re-read with the standard library, the reference semantics
                values = _reference_values(batch.seg, values)  # (orjson reads integers beyond 64 bits as floats)
            for k, value in enumerate(values):
                tally.ram_record(value, _batch_loc(name, batch, k))
            tally.flush()
    finally:
        if gc_was_enabled:
            gc.enable()
    return reader.record


def _reference_values(seg: bytes, values: list[Any]) -> list[Any]:
    try:
        return json.loads(b"[" + seg + b"]")
    except (ValueError, RecursionError):
        return values


def _batch_loc(name: str, batch: _Batch, k: int) -> LocFn:
    return lambda: Location(name, batch.line_of(k), batch.record0 + k)


# -- other annotation formats --------------------------------------------------------------------------------


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


def _scan_manifest(path: str, name: str, fmt: str, tags_column: str | None, tally: _Tally) -> None:
    column = tags_column
    checked = False
    if fmt == "csv":  # check the header before reading rows (a CSV row reader closed early warns)
        header = _csv_header(path)
        if header is not None:
            column = _tags_column(name, RawRecord(name, 1, dict.fromkeys(header)), column)
            checked = True
    with closing(iter_records(path, fmt)) as records:
        for n, rec in enumerate(records, 1):
            loc = _fixed_loc(name, rec.line, n)
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


def _fixed_loc(name: str, line: int, record: int) -> LocFn:
    return lambda: Location(name, line, record)


def _text_lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, int, str | None, str]]:
    """(line, bytes, text or None when not UTF-8, error) for each non-empty line.

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
            yield lineno, nbytes, raw.decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            yield lineno, nbytes, None, f"not valid UTF-8 (byte {exc.start})"


def _text_tokens(line: str) -> tuple[list[str], bool]:
    """The tag tokens of a RAM benchmark line (after the image name), and whether the line uses commas."""
    if "," in line:
        return line.split(",", 1)[1].split(","), True
    return line.split()[1:], False


def _looks_like_ids(line: str) -> bool | None:
    """True if the line's tags are integer ids, False if they are names, None if it has no tags."""
    tokens, commas = _text_tokens(line)
    pieces = [p for t in tokens for p in t.split()] if commas else tokens
    if not pieces:
        return None
    if not commas:
        return True if all(_DIGITS.fullmatch(p) for p in pieces) else None
    return all(_DIGITS.fullmatch(p) for p in pieces)


def _scan_ram_text(
    stream: IO[bytes], name: str, fmt: str, tally: _Tally, progress: Callable[[int], None] | None
) -> None:
    lines = _text_lines(stream, name)
    head: list[tuple[int, int, str | None, str]] = []
    mode = {"ram-text-ids": "ids", "ram-text-names": "names"}.get(fmt)
    if mode is None:  # decide from the first 1000 lines: names if any line has a tag that is not a number
        votes: set[bool] = set()
        for item in lines:
            head.append(item)
            if item[2] is not None and (v := _looks_like_ids(item[2])) is not None:
                votes.add(v)
            if len(head) >= 1000:
                break
        mode = "names" if False in votes else "ids"
    records = 0
    for lineno, nbytes, text, error in chain(head, lines):
        records += 1
        if progress is not None:
            progress(nbytes)
        loc = _fixed_loc(name, lineno, records)
        if text is None:
            tally.problem("not_utf8", error, loc)
            continue
        tokens, commas = _text_tokens(text)
        if mode == "ids":
            ids = []
            for p in [p for t in tokens for p in t.split()] if commas else tokens:
                if _DIGITS.fullmatch(p):
                    ids.append(int(p))
                else:
                    tally.problem("bad_id", f"'{p[:40]}' is not an integer id", loc)
            tally.add_ids(ids, loc)
        else:
            names = []
            for t in tokens if commas else ():
                if t.strip():
                    names.append(t.strip())
                else:
                    tally.problem("empty_tag", "an empty tag between commas", loc)
            tally.add_tags(names, loc)


# -- the audit -----------------------------------------------------------------------------------------------


def _frequency(tally: _Tally, top: int) -> FrequencyStats:
    names = tally.vocab.id_to_name
    counts = tally.counts
    total = int(counts.sum())
    ordered = np.sort(counts[counts > 0])[::-1]
    cum = np.cumsum(ordered)
    coverage = {}
    for share in (0.5, 0.9, 0.99):
        coverage[f"{round(share * 100)}%"] = int(np.searchsorted(cum, share * total) + 1) if total else 0
    hist = tally.lens_hist
    n = int(hist.sum())
    per: dict[str, float | int | None] = {"min": None, "mean": None, "median": None, "p90": None, "max": None}
    if n:
        nz = np.flatnonzero(hist)
        cumh = np.cumsum(hist)
        per = {
            "min": int(nz[0]),
            "mean": round(float((np.arange(hist.size) * hist).sum() / n), 3),
            "median": int(np.searchsorted(cumh, (n + 1) // 2)),
            "p90": int(np.searchsorted(cumh, math.ceil(0.9 * n))),
            "max": int(nz[-1]),
        }
    used_ids = np.flatnonzero(counts)
    by_count = used_ids[np.lexsort((used_ids, -counts[used_ids]))]
    least = used_ids[np.lexsort((used_ids, counts[used_ids]))]
    return FrequencyStats(
        samples=tally.samples,
        samples_without_tags=tally.empty,
        occurrences=total,
        tags_per_sample=per,
        coverage=coverage,
        used_once=int((counts == 1).sum()),
        most_used=tuple(TagCount(int(i), names.get(int(i), ""), int(counts[i])) for i in by_count[:top]),
        least_used=tuple(TagCount(int(i), names.get(int(i), ""), int(counts[i])) for i in least[:top]),
        counts_by_id=tuple(counts.tolist()),
    )


def audit_labels(
    vocab: str | Path | Vocabulary,
    annotations: Sequence[str | Path] = (),
    *,
    fmt: str | None = None,
    tags_column: str | None = None,
    aligned: Sequence[str | Path] = (),
    embeddings: Sequence[str | Path] = (),
    declared_size: int | None = None,
    top: int = 20,
    progress: Callable[[int], None] | None = None,
) -> AuditReport:
    """Audit a vocabulary against annotation files and aligned files.

    Args:
        vocab: the vocabulary (a path to a txt/JSON/CSV list, or a loaded :class:`Vocabulary`).
        annotations: annotation files (``-`` = standard input, at most once); none = check the vocabulary and
            aligned files only.
        fmt: force one of :data:`ANNOTATION_FORMATS` for every annotation file (default: detect per file).
        tags_column: the manifest column with tag names or ids (default: the first of tags/labels/union_label_id/
            tag_ids present).
        aligned: files with one entry per id (``KIND=PATH`` to force translations/thresholds/descriptions).
        embeddings: embedding matrices (``PATH#KEY`` to pick a tensor).
        declared_size: the size the model expects (e.g. ``class_num``), compared with the vocabulary.
        top: how many most/least used tags the frequency statistics list.
        progress: called with the number of bytes read so far since the last call (0 = still alive).

    Raises:
        InputError: a missing, empty or malformed vocabulary, a missing or malformed annotation/aligned file
            (naming file and line).
        UsageError: a bad format name or two ``-`` inputs.
    """
    if fmt is not None and fmt not in ANNOTATION_FORMATS:
        raise UsageError(f"unknown annotation format '{fmt}'", hint="choose one of " + ", ".join(ANNOTATION_FORMATS))
    if sum(str(a) == "-" for a in annotations) > 1:
        raise UsageError("standard input ('-') can be read only once")
    if tags_column is not None and fmt in ("ram-json", "ram-text", "ram-text-ids", "ram-text-names"):
        raise UsageError(f"--tags-column does not apply to --format {fmt}",
                         hint="it names the tags column of json/jsonl/csv/parquet manifests")
    voc = vocab if isinstance(vocab, Vocabulary) else load_vocab(vocab)
    if len(voc) == 0:
        raise InputError(f"{voc.path or 'vocabulary'}: the vocabulary has no entries",
                         hint="a vocabulary holds one tag per line (or a JSON list / a CSV with a 'name' column)")
    vreport = audit_vocab(voc)
    tally = _Tally(voc)
    files: list[AnnotationFileReport] = []
    for path in annotations:
        files.append(_scan_file(str(path), fmt, tags_column, tally, progress))
    aligned_reports = [audit_aligned(a, voc) for a in aligned]
    emb_reports = [audit_embeddings(e, voc.size) for e in embeddings]

    if annotations:
        used_mask = (tally.counts > 0) | tally.parse_used
        names = voc.id_to_name
        never = [TagCount(i, names[i], 0) for i in voc.ids if not used_mask[i]]
        parse_only = [int(i) for i in np.flatnonzero(tally.parse_used & (tally.counts == 0))]
        distinct: int | None = int(used_mask.sum())
        freq: FrequencyStats | None = _frequency(tally, top)
    else:
        never, parse_only, distinct, freq = None, [], None, None
    unknown = sorted(
        (UnknownTag(kind, value, c, loc) for (kind, value), (c, loc) in tally.unknown.items()),
        key=lambda u: (-u.count, u.kind, str(u.value)),
    )
    normalised = sorted(
        (UnknownTag("name", name, c, loc) for name, (c, loc, _i) in tally.normalised.items()),
        key=lambda u: (-u.count, str(u.value)),
    )
    problems = sorted(
        (Problem(code, c, loc, detail) for code, (c, loc, detail) in tally.problems.items()),
        key=lambda p: (-p.count, p.code),
    )
    return AuditReport(
        vocab=vreport,
        declared_size=voc.size,
        declared_size_given=declared_size,
        annotations=files,
        distinct_used=distinct,
        never_used=never,
        unknown=unknown,
        unknown_occurrences=sum(u.count for u in unknown) + tally.unknown_untracked,
        normalised_matches=normalised,
        problems=problems,
        parse_only_ids=parse_only,
        aligned=aligned_reports,
        embeddings=emb_reports,
        frequency=freq,
        counts=tally.counts if annotations else None,
        vocab_names=dict(voc.id_to_name),
        unknown_untracked=tally.unknown_untracked,
    )


def _scan_file(
    path: str, fmt: str | None, tags_column: str | None, tally: _Tally, progress: Callable[[int], None] | None
) -> AnnotationFileReport:
    name = "<stdin>" if path == "-" else path
    before = (tally.samples, tally.refs, tally.problem_total)
    fh = open_binary(path)
    try:
        stream: Any = fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(fh)  # type: ignore[arg-type]
        chosen = fmt or detect_annotation_format(path, stream.peek(65536)[:65536], tags_column)
        if chosen == "ram-json":
            _scan_ram_json(stream, name, tally, progress)
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


# -- follow-up outputs ---------------------------------------------------------------------------------------


def write_tag_list(path: str | Path, tags: Iterable[TagCount], *, counts: bool = False) -> int:
    """Write ``id<TAB>name`` lines (``id<TAB>name<TAB>count`` with ``counts``) under a temporary name, then rename
    it into place; returns the number written. Raises RunFailed if the file cannot be written."""
    lines = [f"{t.id}\t{t.name}\t{t.count}\n" if counts else f"{t.id}\t{t.name}\n" for t in tags]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return len(lines)


def plot_format(path: str | Path) -> str:
    """The image format ``plot_frequency`` will write for ``path`` (its extension), checked before any work.

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``plot`` extra).
        UsageError: the extension is missing or not a format matplotlib writes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", purpose="--plot") from None
    supported = sorted(FigureCanvasAgg.get_supported_filetypes())
    fmt = Path(str(path)).suffix.lower().removeprefix(".")
    if fmt not in supported:
        what = f"format '{fmt}' is not supported" if fmt else "has no extension naming the image format"
        raise UsageError(f"--plot {path}: {what}", hint="end the file name in one of ." + ", .".join(supported))
    return fmt


def plot_frequency(report: AuditReport, path: str | Path) -> None:
    """Draw the long tail: tag counts sorted from most to least used on a log scale, never-used tags marked.

    The format follows the extension (see :func:`plot_format`); the file is written under a temporary name and
    renamed into place. Needs matplotlib (the ``plot`` extra); raises MissingDependencyError without it.
    """
    if report.counts is None:
        raise UsageError("--plot needs annotation files to count tags in")
    fmt = plot_format(path)
    import matplotlib.pyplot as plt

    counts = np.sort(report.counts[report.counts > 0])[::-1]
    never = len(report.never_used or ())
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    x = np.arange(1, counts.size + 1)
    if counts.size:
        ax.plot(x, counts, color="#1f77b4", lw=1.5, label=f"{counts.size} used tags")
        ax.set_yscale("log")
    if never:
        start = counts.size + 1
        ax.axvspan(start - 0.5, start + never - 0.5, color="#d62728", alpha=0.25,
                   label=f"{never} never-used tags")
        ax.plot(np.arange(start, start + never), np.full(never, 0.8 if counts.size else 1.0), "|",
                color="#d62728", ms=6)
    ax.set_xlabel("tags, most to least used")
    ax.set_ylabel("samples with the tag (log)")
    ax.set_title(f"Tag frequency long tail: {Path(report.vocab.path).name} ({report.vocab.entries} tags)")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

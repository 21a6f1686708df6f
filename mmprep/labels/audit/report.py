"""The audit's findings as typed values: :class:`AuditReport` and the reports it is made of.

Every class here is plain data (frozen where it can be) with a ``to_dict`` where the JSON report needs more than
its fields; nothing reads files or prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

__all__ = [
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
    "TagList",
    "UnknownTag",
    "VocabReport",
]

#: The ``--fail-on`` categories, in report order (``AuditReport.findings`` counts each).
FAIL_ON_CATEGORIES: tuple[str, ...] = ("never-used", "unknown", "duplicates", "misaligned", "invalid", "hygiene")


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


class TagList(Sequence[TagCount]):
    """Tags with one count each, made into :class:`TagCount` values only when read: a list of millions of tags (the
    never-used tags of a huge vocabulary) costs eight bytes a tag until it is written out.

    Args:
        ids: the tag ids, in list order.
        names: id → name.
        counts: each listed tag's count (same length as ``ids``); None: every count is 0.
    """

    __slots__ = ("_counts", "_ids", "_names")

    def __init__(self, ids: np.ndarray, names: Mapping[int, str], counts: np.ndarray | None = None) -> None:
        self._ids = np.asarray(ids, dtype=np.int64)
        self._names = names
        self._counts = counts

    @property
    def ids(self) -> np.ndarray:
        """The tag ids (a read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._ids.size)

    @overload
    def __getitem__(self, k: int) -> TagCount: ...

    @overload
    def __getitem__(self, k: slice) -> list[TagCount]: ...

    def __getitem__(self, k: int | slice) -> TagCount | list[TagCount]:
        if isinstance(k, slice):
            return self._make(self._ids[k].tolist(), None if self._counts is None else self._counts[k].tolist())
        i = int(self._ids[k])
        return TagCount(i, self._names.get(i, ""), 0 if self._counts is None else int(self._counts[k]))

    def __iter__(self) -> Iterator[TagCount]:
        step = 1 << 16
        for start in range(0, len(self), step):
            yield from self[start : start + step]

    def _make(self, ids: list[int], counts: list[int] | None) -> list[TagCount]:
        get = self._names.get
        if counts is None:
            return [TagCount(i, get(i, ""), 0) for i in ids]
        return [TagCount(i, get(i, ""), c) for i, c in zip(ids, counts, strict=True)]

    def tolist(self) -> list[TagCount]:
        """Every entry as a :class:`TagCount` (the JSON report writes them so)."""
        return self[:]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TagList):
            return self.tolist() == other.tolist()
        if isinstance(other, list | tuple):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TagList({len(self)} tags)"


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
    """An embedding matrix: its shape against the vocabulary size, and its width against the expected one.

    A 2-D matrix with rows equal to the size is aligned (``k == 1``); rows equal to size × K are description-set
    embeddings (``k == K``), as are 3-D tensors ``[size, K, dim]``; anything else, a 1-D vector included, is
    misaligned (``k`` is None). ``kind == "label"`` (``label=PATH``) requires one row per tag: ``k == 1`` and 2-D.
    ``dim`` is the last dimension (the embedding width); with ``expected_dim`` given (``--embedding-dim``: RAM's
    ``wordvec_proj`` takes 512), another width is misaligned too (``width_ok`` is False).
    """

    path: str
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    rows: int
    expected: int
    k: int | None
    kind: str = "auto"
    dim: int | None = None
    expected_dim: int | None = None

    @property
    def rows_ok(self) -> bool:
        """The rows fit the vocabulary (one per tag, or K per tag)."""
        if self.kind == "label":
            return self.k == 1 and len(self.shape) == 2
        return self.k is not None

    @property
    def width_ok(self) -> bool:
        """The width is the expected one (always True without an expectation)."""
        return self.expected_dim is None or self.dim == self.expected_dim

    @property
    def aligned(self) -> bool:
        return self.rows_ok and self.width_ok

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["aligned"] = self.aligned
        d["width_ok"] = self.width_ok
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
    never_used: Sequence[TagCount] | None
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
    vocab_names: Mapping[int, str] = field(default_factory=dict, repr=False)
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
        counts, names = self.counts, self.vocab_names
        mask = np.zeros(counts.size, dtype=bool)
        ids = np.fromiter(names, dtype=np.int64, count=len(names))
        mask[ids[(ids >= 0) & (ids < counts.size)]] = True
        never = self.never_used or ()
        mask[never.ids if isinstance(never, TagList) else np.fromiter((t.id for t in never), dtype=np.int64,
                                                                     count=len(never))] = False
        used = np.flatnonzero(mask)
        return [TagCount(i, names.get(i, ""), c) for i, c in zip(used.tolist(), counts[used].tolist(), strict=True)]

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


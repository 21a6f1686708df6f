"""Hygiene of a list of tags (the vocabulary, or a file aligned with it): duplicates and line endings.

:func:`audit_vocab` gives the vocabulary's :class:`~mmprep.labels.audit.report.VocabReport`; the helpers are shared
with the aligned-file checks.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmprep.labels.audit.report import DuplicateGroup, VocabReport
from mmprep.labels.vocab import Vocabulary, normalize_tag

__all__ = ["LineEndings", "audit_vocab", "duplicate_groups", "line_endings"]


@dataclass(frozen=True, slots=True)
class LineEndings:
    """How many lines of a text file end in CRLF, and the first such line (1-based; None when none does)."""

    crlf_lines: int = 0
    first_crlf_line: int | None = None


def line_endings(path: str) -> LineEndings:
    """The CRLF facts of a text file (none for a file that cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return LineEndings()
    n = data.count(b"\r\n")
    if not n:
        return LineEndings()
    return LineEndings(n, data.count(b"\n", 0, data.index(b"\r\n")) + 1)


def duplicate_groups(ids: Sequence[int], raw: Sequence[str]) -> tuple[DuplicateGroup, ...]:
    """Entries of ``raw`` (with ids ``ids``) that are the same tag after normalisation, in first-seen order.

    Linear in the number of entries and light on memory: every entry's normalised form is hashed (and dropped), the
    hashes are sorted to find the entries that may repeat one another, and only those are compared by their
    normalised names (so a hash collision never joins two different tags).
    """
    import numpy as np

    n = len(raw)
    if n < 2:
        return ()
    hashes = np.fromiter(map(hash, map(normalize_tag, raw)), dtype=np.int64, count=n)
    order = np.argsort(hashes)  # any order among equal hashes: the candidates are sorted by position below
    ordered = hashes[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return ()
    repeated = np.zeros(n, dtype=bool)  # in sorted order: entries whose hash another entry shares
    repeated[1:] |= same
    repeated[:-1] |= same
    candidates = np.sort(order[repeated])
    groups: dict[str, list[int]] = {}
    for k in candidates.tolist():
        key = normalize_tag(raw[k])
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
    import numpy as np

    endings = line_endings(vocab.path) if vocab.has_crlf else LineEndings()
    n = len(vocab)
    raw = vocab.raw
    stripped = list(map(str.strip, raw))  # the same string objects where nothing was stripped
    empty = np.flatnonzero(np.fromiter(map(operator.not_, stripped), dtype=bool, count=n))
    padded = np.flatnonzero(np.fromiter(map(operator.ne, raw, stripped), dtype=bool, count=n)
                            & np.fromiter(map(bool, stripped), dtype=bool, count=n))
    del stripped
    ids = vocab.ids
    return VocabReport(
        path=vocab.path,
        format=vocab.format,
        entries=n,
        size=vocab.size,
        sha256=vocab.sha256,
        final_newline=vocab.final_newline,
        has_bom=vocab.has_bom,
        crlf_lines=endings.crlf_lines,
        first_crlf_line=endings.first_crlf_line,
        empty_ids=tuple(ids[k] for k in empty.tolist()),
        whitespace_ids=tuple(ids[k] for k in padded.tolist()),
        duplicates=duplicate_groups(ids, raw),
        first_line=vocab.first_line,
    )

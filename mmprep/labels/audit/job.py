"""The audit itself: a vocabulary against its annotation files and its aligned files, into an :class:`AuditReport`.

Nothing here prints; the pieces live beside it: :mod:`.hygiene` (the vocabulary's own facts), :mod:`.formats` (each
annotation file, counted into a :class:`~mmprep.labels.audit.tally.Tally`), :mod:`.aligned` (aligned files and
embedding matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmprep.errors import InputError, UsageError
from mmprep.labels.audit.aligned import audit_aligned, audit_embeddings
from mmprep.labels.audit.formats import ANNOTATION_FORMATS, RAM_FORMATS, scan_file
from mmprep.labels.audit.hygiene import audit_vocab
from mmprep.labels.audit.report import AnnotationFileReport, AuditReport, FrequencyStats, TagList
from mmprep.labels.audit.tally import Tally, frequency_stats
from mmprep.labels.vocab import Vocabulary, load_vocab

__all__ = ["audit_labels"]


def audit_labels(
    vocab: str | Path | Vocabulary,
    annotations: Sequence[str | Path] = (),
    *,
    fmt: str | None = None,
    tags_column: str | None = None,
    aligned: Sequence[str | Path] = (),
    embeddings: Sequence[str | Path] = (),
    declared_size: int | None = None,
    embedding_dim: int | None = None,
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
        embedding_dim: the width the model expects of an embedding matrix (RAM's ``wordvec_proj`` takes 512); a
            matrix of another width is misaligned. :func:`~mmprep.labels.audit.aligned.embedding_width` reads it
            from the file a new matrix replaces.
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
    if embedding_dim is not None and (isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int)
                                      or embedding_dim < 1):
        raise UsageError(f"--embedding-dim must be a positive width, got {embedding_dim!r}")
    if tags_column is not None and fmt in RAM_FORMATS:
        raise UsageError(f"--tags-column does not apply to --format {fmt}",
                         hint="it names the tags column of json/jsonl/csv/parquet manifests")
    voc = vocab if isinstance(vocab, Vocabulary) else load_vocab(vocab)
    if len(voc) == 0:
        raise InputError(f"{voc.path or 'vocabulary'}: the vocabulary has no entries",
                         hint="a vocabulary holds one tag per line (or a JSON list / a CSV with a 'name' column)")
    vreport = audit_vocab(voc)
    tally = Tally(voc)
    files: list[AnnotationFileReport] = []
    for path in annotations:
        files.append(scan_file(str(path), fmt, tags_column, tally, progress))
    aligned_reports = [audit_aligned(a, voc) for a in aligned]
    emb_reports = [audit_embeddings(e, voc.size, embedding_dim) for e in embeddings]

    never: TagList | None = None
    parse_only: list[int] = []
    distinct: int | None = None
    freq: FrequencyStats | None = None
    if annotations:
        used_mask = (tally.counts > 0) | tally.parse_used
        never_ids = np.flatnonzero(~used_mask & tally.known)  # ascending: the vocabulary's order
        if not voc.sequential:  # the vocabulary's own order when its ids are not sorted
            order = {i: k for k, i in enumerate(voc.ids)}
            never_ids = np.asarray(sorted(never_ids.tolist(), key=order.__getitem__), dtype=np.int64)
        never = TagList(never_ids, voc.names_by_id)
        parse_only = [int(i) for i in np.flatnonzero(tally.parse_used & (tally.counts == 0))]
        distinct = int(used_mask.sum())
        freq = frequency_stats(tally, top)
    unknown = tally.unknown_tags()
    return AuditReport(
        vocab=vreport,
        declared_size=voc.size,
        declared_size_given=declared_size,
        annotations=files,
        distinct_used=distinct,
        never_used=never,
        unknown=unknown,
        unknown_occurrences=sum(u.count for u in unknown) + tally.unknown_untracked,
        normalised_matches=tally.normalised_matches(),
        problems=tally.problem_list(),
        parse_only_ids=parse_only,
        aligned=aligned_reports,
        embeddings=emb_reports,
        frequency=freq,
        counts=tally.counts if annotations else None,
        vocab_names=voc.names_by_id,
        unknown_untracked=tally.unknown_untracked,
    )

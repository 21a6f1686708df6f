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

The modules, top down: :mod:`.job` (``audit_labels``) uses :mod:`.formats` (detecting and counting annotation
files; RAM JSON through the stream parser in :mod:`.ramjson`) into a :mod:`.tally`, :mod:`.hygiene` (the
vocabulary's own facts) and :mod:`.aligned` (aligned files and embedding matrices); :mod:`.report` holds the
result types and :mod:`.outputs` writes tag lists and the frequency plot.
"""

from mmprep.labels.audit.aligned import ALIGNED_KINDS, audit_aligned, audit_embeddings, embedding_width
from mmprep.labels.audit.formats import ANNOTATION_FORMATS, detect_annotation_format
from mmprep.labels.audit.hygiene import audit_vocab
from mmprep.labels.audit.job import audit_labels
from mmprep.labels.audit.outputs import plot_format, plot_frequency, write_tag_list
from mmprep.labels.audit.report import (
    FAIL_ON_CATEGORIES,
    AlignedReport,
    AnnotationFileReport,
    AuditReport,
    DuplicateGroup,
    EmbeddingReport,
    FrequencyStats,
    Location,
    Problem,
    TagCount,
    TagList,
    UnknownTag,
    VocabReport,
)

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
    "TagList",
    "UnknownTag",
    "VocabReport",
    "audit_aligned",
    "audit_embeddings",
    "audit_labels",
    "audit_vocab",
    "detect_annotation_format",
    "embedding_width",
    "plot_format",
    "plot_frequency",
    "write_tag_list",
]

"""``inspect``: what a packed directory holds (a summary of its index and its small columns).

The summary comes from ``index.json`` plus a few small columns (``n_tokens``, ``truncated``, tags); pixels are
not read. The contact sheet of ``inspect --sheet`` is in :mod:`mmprep.dataset.sheet`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mmprep.dataset.format import count_field
from mmprep.dataset.reader import PackedDataset
from mmprep.errors import InputError

__all__ = [
    "DatasetSummary",
    "EncodedImagesSummary",
    "PixelSummary",
    "ShardSummary",
    "TagCount",
    "TagSummary",
    "TokenSummary",
    "summarize",
]


@dataclass(frozen=True)
class PixelSummary:
    """The padded pixel tensors: as stored (the ``pixels`` metadata) and the resize mode."""

    dtype: str
    shape: list[int]
    layout: str
    normalized: bool
    mean: list[float] | None
    std: list[float] | None
    resize_mode: str | None
    bytes_per_row: int


@dataclass(frozen=True)
class EncodedImagesSummary:
    """Images stored as encoded files (``--pad none``)."""

    storage: str  # "encoded"
    encoding: str | None


@dataclass(frozen=True)
class TokenSummary:
    """Tokens per row before truncation (``n_tokens``), and how many rows were truncated to ``max_length``."""

    min: int
    mean: float
    p50: float
    p95: float
    max: int
    max_length: int
    truncated: int


class TagCount(NamedTuple):
    """A tag (its name, or ``#id`` when the vocabulary is not found) and the rows that carry it."""

    tag: str
    rows: int


@dataclass(frozen=True)
class TagSummary:
    """Tags per row, distinct tags, the most frequent; for ``tag_ids``, where the names came from.

    Attributes:
        names_from: ``vocabulary`` or ``ids`` for ``tag_ids``; None for tags stored as names (packed without a
            vocabulary), in which case the vocabulary fields are left out of the JSON.
    """

    per_row_min: int
    per_row_mean: float
    per_row_max: int
    distinct: int
    top: list[TagCount]
    vocab_size: int | None = None
    names_from: str | None = None
    vocab_file: str | None = None
    vocab_lookup: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``output.to_jsonable``): without the vocabulary fields when no vocabulary applies."""
        out: dict[str, Any] = {"per_row_min": self.per_row_min, "per_row_mean": self.per_row_mean,
                               "per_row_max": self.per_row_max, "distinct": self.distinct, "top": self.top}
        if self.names_from is not None:
            out.update(vocab_size=self.vocab_size, names_from=self.names_from, vocab_file=self.vocab_file,
                       vocab_lookup=self.vocab_lookup)
        return out


@dataclass(frozen=True)
class ShardSummary:
    """One shard: file name, rows, bytes."""

    path: str
    rows: int
    bytes: int


@dataclass
class DatasetSummary:
    """What :func:`summarize` reports (the ``--json`` of ``mmprep inspect``)."""

    path: str
    layout: str
    rows: int
    shards: int
    bytes: int
    bytes_per_row: float
    read: int
    rejected: int
    rejected_by_reason: dict[str, int]
    image_count_histogram: dict[str, int]
    images: int
    pixels: PixelSummary | EncodedImagesSummary | None
    text: dict[str, Any] | None  # the ``text`` metadata as stored (tokenizer, max length, ...)
    tokens: TokenSummary | None
    tags: TagSummary | None
    shard_list: list[ShardSummary] = field(default_factory=list)
    split: str = "train"
    columns: list[str] = field(default_factory=list)


def summarize(ds: PackedDataset, *, vocab: str | os.PathLike[str] | None = None, top_tags: int = 10) -> DatasetSummary:
    """Summarise a packed dataset from its index and its small columns.

    Args:
        ds: the dataset.
        vocab: a vocabulary file for tag names (default: the one recorded at pack time, when reachable).
        top_tags: how many of the most frequent tags to list.

    Raises:
        InputError: the text metadata's max length is not a whole number.
    """
    totals = ds.index.totals
    shards = [ShardSummary(path=s.name, rows=s.rows, bytes=s.bytes) for s in ds.shards]
    size = sum(s.bytes for s in ds.shards)
    pixels: PixelSummary | EncodedImagesSummary | None = None
    if ds.pixels is not None:
        px = ds.metadata["pixels"]
        pixels = PixelSummary(dtype=px["dtype"], shape=px["shape"], layout=px["layout"], normalized=px["normalized"],
                              mean=px.get("mean"), std=px.get("std"), resize_mode=ds.metadata.get("resize_mode"),
                              bytes_per_row=ds.pixels.row_bytes)
    elif ds.layout == "encoded":
        pixels = EncodedImagesSummary(storage="encoded", encoding=(ds.metadata.get("images") or {}).get("encoding"))
    tokens = None
    text = ds.metadata.get("text")
    if text and len(ds):
        nt = np.asarray(ds.column("n_tokens"), dtype=np.int64)
        max_length = _count(text.get("max_length"), "metadata.text.max_length", ds)
        tokens = TokenSummary(min=int(nt.min()), mean=round(float(nt.mean()), 2), p50=float(np.percentile(nt, 50)),
                              p95=float(np.percentile(nt, 95)), max=int(nt.max()), max_length=max_length,
                              truncated=int(np.count_nonzero(nt > max_length)))
    tags = _tag_stats(ds, vocab, top_tags) if len(ds) else None
    return DatasetSummary(
        path=str(ds.path), layout=ds.layout, rows=len(ds), shards=len(ds.shards), bytes=size,
        bytes_per_row=round(size / len(ds), 1) if len(ds) else 0.0,
        read=totals.read, rejected=totals.rejected, rejected_by_reason=dict(totals.rejected_by_reason),
        image_count_histogram=dict(totals.image_count_histogram), images=totals.images_written,
        pixels=pixels, text=text, tokens=tokens, tags=tags, shard_list=shards, split=ds.split,
        columns=ds.column_names,
    )


def _count(value: Any, name: str, ds: PackedDataset) -> int:
    """A count from the metadata, or an InputError that names the field and its value."""
    n = count_field(value)
    if n is None:
        raise InputError(f"{ds.index_file}: {name} is {value!r}, not a whole number",
                         hint="the index is damaged; run `mmprep verify` on the directory")
    return n


def _tag_stats(ds: PackedDataset, vocab: str | os.PathLike[str] | None, top: int) -> TagSummary | None:
    counter: Counter[Any] = Counter()
    label: Callable[[Any], str]
    if "tag_ids" in ds.column_names:
        lists = ds.column("tag_ids")
        found = ds.find_vocab(vocab)
        names = found.names
        for t in lists:
            counter.update(np.asarray(t).tolist())

        def label(i: int) -> str:
            return names[i] if names is not None and 0 <= i < len(names) else f"#{i}"

        vocab_meta = ds.metadata.get("vocab") or {}
        extra: dict[str, Any] = dict(vocab_size=vocab_meta.get("size"),
                                     names_from="vocabulary" if names is not None else "ids",
                                     vocab_file=str(found.path) if found.path is not None else None,
                                     vocab_lookup=found.how)
    elif "tags" in ds.column_names:
        lists = ds.column("tags")
        for t in lists:
            counter.update(t)
        label = str
        extra = {}
    else:
        return None
    per_row = np.asarray([len(t) for t in lists], dtype=np.int64)
    return TagSummary(per_row_min=int(per_row.min()), per_row_mean=round(float(per_row.mean()), 2),
                      per_row_max=int(per_row.max()), distinct=len(counter),
                      top=[TagCount(label(k), c) for k, c in counter.most_common(top)], **extra)

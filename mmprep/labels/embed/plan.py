"""How a tag's texts become its rows: the texts behind each tag (templates or descriptions) and how their vectors
combine (one row per text, or RAM's ensemble: L2-normalise each, average, re-normalise)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mmprep.labels.embed.encoder import TagEmbedder

__all__ = ["Plan", "Rows", "l2_normalize"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Each row (last axis) divided by its L2 norm (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclass(frozen=True)
class Rows:
    """Rows computed for some tags (``[tags * rows_per_tag, D]``), with the number of texts encoded for them, how
    many were distinct, and how many distinct texts reached the token limit."""

    matrix: np.ndarray
    texts: int = 0
    unique_texts: int = 0
    truncated: int = 0

    def counted_with(self, other: Rows) -> Rows:
        """These rows, with ``other``'s text counts added (two encoding passes of one run)."""
        return Rows(self.matrix, self.texts + other.texts, self.unique_texts + other.unique_texts,
                    self.truncated + other.truncated)


class Plan:
    """The texts behind each tag and how their vectors combine into the tag's rows.

    ``encoded_tags`` and ``encode_seconds`` add up over every :meth:`rows` call (the reuse check's sample included).
    """

    def __init__(self, per_tag: list[list[str]], rows_per_tag: int, normalize: bool) -> None:
        self.per_tag = per_tag  # texts of each tag (T templates, or K descriptions)
        self.rows_per_tag = rows_per_tag  # 1 (templates / reduced descriptions) or K
        self.normalize = normalize
        self.encoded_tags = 0  # tags encoded so far (verification sample + computed tags)
        self.encode_seconds = 0.0

    def rows(self, encoder: TagEmbedder, tag_ids: Sequence[int], batch_size: int,
             progress: Callable[[int, int], None] | None) -> Rows:
        """Rows for the given tag ids: ``[len(tag_ids) * rows_per_tag, D]``."""
        if not tag_ids:
            return Rows(np.zeros((0, 0), dtype=np.float32))
        width = len(self.per_tag[tag_ids[0]])
        texts = [t for i in tag_ids for t in self.per_tag[i]]
        started = time.perf_counter()
        encoded = encoder.encode(texts, batch_size=batch_size, progress=progress)
        self.encode_seconds += time.perf_counter() - started
        self.encoded_tags += len(tag_ids)
        unique = len(set(texts))
        vecs = encoded.vectors.reshape(len(tag_ids), width, -1)
        if self.rows_per_tag == width:  # one row per text (a single template, or K descriptions kept apart)
            rows = vecs.reshape(len(tag_ids) * width, -1)
            matrix = l2_normalize(rows) if self.normalize else rows
        else:  # ensemble (RAM): L2-normalise each text's vector, average per tag, re-normalise
            mean = l2_normalize(vecs).mean(axis=1)
            matrix = l2_normalize(mean) if self.normalize else mean
        return Rows(matrix, len(texts), unique, encoded.truncated)

"""Reusing an older matrix: keep the rows of tags present in both vocabularies (matched by normalised name), compute
only the new tags, after recomputing a sample of the kept ones and refusing when they no longer match (another
model, template set, pooling or cleaning)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError, RunFailed
from mmprep.labels.embed.encoder import TagEmbedder
from mmprep.labels.embed.files import load_embeddings, sidecar_path
from mmprep.labels.embed.plan import Plan, Rows, l2_normalize
from mmprep.labels.vocab import Vocabulary, load_vocab, normalize_tag

__all__ = ["ReuseReport", "Reused", "VerifyReport", "reuse_rows"]

#: ``hook(stage)``: the progress callback of a stage ("verify", "embed"), or None.
StageHook = Callable[[str], Callable[[int, int], None] | None]


@dataclass(frozen=True)
class VerifyReport:
    """The consistency check of reused rows: cosine between recomputed and old rows."""

    checked_tags: int
    min_cosine: float | None
    mean_cosine: float | None
    worst_tag: str | None
    threshold: float
    all_checked: bool
    passed: bool


@dataclass(frozen=True)
class ReuseReport:
    """What reuse kept, computed and dropped.

    ``kept`` and ``new`` count ids of the new vocabulary (old row copied / row computed); ``dropped`` counts ids of
    the old vocabulary whose normalised name is in no new tag, and ``dropped_tags`` holds their names, one per id.
    """

    old_path: str
    old_vocab: str
    kept: int
    new: int
    dropped: int
    new_tags: tuple[str, ...]
    dropped_tags: tuple[str, ...]
    verify: VerifyReport

    def to_sidecar(self) -> dict[str, Any]:
        """The ``reuse`` entry of the sidecar JSON."""
        v = self.verify
        return {
            "old_path": self.old_path, "old_vocab": self.old_vocab, "kept": self.kept, "new": self.new,
            "dropped": self.dropped,
            "verify": {"checked_tags": v.checked_tags, "min_cosine": v.min_cosine, "mean_cosine": v.mean_cosine,
                       "threshold": v.threshold, "all_checked": v.all_checked},
        }


@dataclass(frozen=True)
class Reused:
    """The new matrix (old rows kept, new rows computed), its text counts, and what reuse did."""

    rows: Rows
    report: ReuseReport


@dataclass(frozen=True)
class _Match:
    """The new vocabulary against the old one: each new id's old id (None: a new tag), and the old names dropped."""

    old_ids: list[int | None]
    kept: list[int]
    new: list[int]
    dropped: list[str]


def reuse_rows(
    voc: Vocabulary,
    old_path: Path,
    old_vocab: Vocabulary | str | Path,
    plan: Plan,
    encoder: TagEmbedder,
    batch_size: int,
    verify_sample: int,
    verify_all: bool,
    min_cosine: float,
    hook: StageHook,
    warnings: list[str],
) -> Reused:
    """The matrix of ``voc`` with the rows of ``old_path`` (made for ``old_vocab``) kept where the tags match.

    Appends notes for the user to ``warnings``.

    Raises:
        InputError: the old matrix does not fit ``old_vocab`` (row count, or the vocabulary its sidecar records).
        RunFailed: the recomputed sample does not match the old rows (cosine below ``min_cosine``, other width).
    """
    ov = old_vocab if isinstance(old_vocab, Vocabulary) else load_vocab(old_vocab)
    old = _old_matrix(old_path, ov, plan.rows_per_tag, encoder, warnings)
    match = _match(voc, ov)
    checked = _verify(voc, old_path, old, match, plan, encoder, batch_size, verify_sample, verify_all, min_cosine,
                      hook("verify"))
    if checked.report.checked_tags == 0 and match.kept:  # verify_sample == 0
        warnings.append("reuse without a consistency check (--verify-sample 0)")
    rows = _assemble(voc, old_path, old, match, plan, encoder, batch_size, hook("embed")).counted_with(checked.rows)
    report = ReuseReport(
        old_path=str(old_path), old_vocab=ov.path, kept=len(match.kept), new=len(match.new),
        dropped=len(match.dropped), new_tags=tuple(voc.names[i] for i in match.new),
        dropped_tags=tuple(match.dropped), verify=checked.report,
    )
    return Reused(rows, report)


def _old_matrix(old_path: Path, ov: Vocabulary, k: int, encoder: TagEmbedder, warnings: list[str]) -> np.ndarray:
    """The old matrix, checked against its vocabulary (row count, and the vocabulary its sidecar records)."""
    old = load_embeddings(old_path)
    if old.shape[0] != len(ov) * k:
        raise InputError(
            f"{old_path}: {old.shape[0]} rows, but {ov.path or 'the old vocabulary'} has {len(ov)} tags"
            + (f" x {k} rows per tag = {len(ov) * k}" if k > 1 else ""),
            hint="pass the vocabulary the old matrix was made for (--old-vocab)",
        )
    side = sidecar_path(old_path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict):
            if meta.get("vocab_sha256") not in (None, ov.sha256):
                raise InputError(
                    f"{ov.path}: is not the vocabulary {old_path} was made for (its sidecar {side.name} records "
                    f"another vocab_sha256)",
                    hint=f"pass the vocabulary recorded in {side}: {meta.get('vocab_path')}",
                )
            if meta.get("model_config_sha256") not in (None, encoder.info.config_sha256):
                warnings.append(f"{side.name}: the old matrix was made with another model config "
                                f"({meta.get('model_path')})")
    return old


def _match(voc: Vocabulary, ov: Vocabulary) -> _Match:
    old_ids = [ov.normalized_to_id.get(normalize_tag(nm)) for nm in voc.names]
    kept = [i for i, o in enumerate(old_ids) if o is not None]
    new = [i for i, o in enumerate(old_ids) if o is None]
    # An old id is dropped when its normalised name is in no new tag; with duplicate names in the old vocabulary
    # every duplicate id counts as kept, not only the one ``normalized_to_id`` returns.
    new_names = {normalize_tag(nm) for nm in voc.names}
    dropped = [nm for nm in ov.names if normalize_tag(nm) not in new_names]
    return _Match(old_ids, kept, new, dropped)


@dataclass(frozen=True)
class _Checked:
    """The recomputed sample's rows (their text counts count) and the check's report."""

    rows: Rows
    report: VerifyReport


def _old_id(match: _Match, i: int) -> int:
    o = match.old_ids[i]
    assert o is not None  # i is a kept id
    return o


def _verify(
    voc: Vocabulary,
    old_path: Path,
    old: np.ndarray,
    match: _Match,
    plan: Plan,
    encoder: TagEmbedder,
    batch_size: int,
    verify_sample: int,
    verify_all: bool,
    min_cosine: float,
    progress: Callable[[int, int], None] | None,
) -> _Checked:
    """Recompute a sample of the kept tags and compare with their old rows; raises RunFailed when they differ."""
    kept, k = match.kept, plan.rows_per_tag
    if verify_all or len(kept) <= verify_sample:
        sample = kept
    else:
        rng = np.random.default_rng(0)
        sample = sorted(rng.choice(kept, size=max(verify_sample, 0), replace=False).tolist())
    if not sample:
        return _Checked(Rows(np.zeros((0, 0), dtype=np.float32)), VerifyReport(0, None, None, None, min_cosine, True,
                                                                               True))
    fresh = plan.rows(encoder, sample, batch_size, progress)
    if fresh.matrix.shape[1] != old.shape[1]:
        raise RunFailed(
            f"reuse refused: {old_path} has {old.shape[1]}-d rows, {encoder.info.path} makes "
            f"{fresh.matrix.shape[1]}-d rows: the old matrix came from another model",
            hint="drop --reuse to recompute every tag",
        )
    old_rows = np.concatenate([old[_old_id(match, i) * k : _old_id(match, i) * k + k] for i in sample])
    cos = np.sum(l2_normalize(fresh.matrix) * l2_normalize(old_rows), axis=1).reshape(len(sample), k).min(axis=1)
    worst = int(np.argmin(cos))
    verify = VerifyReport(
        checked_tags=len(sample), min_cosine=float(cos[worst]), mean_cosine=float(cos.mean()),
        worst_tag=voc.names[sample[worst]], threshold=min_cosine, all_checked=len(sample) == len(kept),
        passed=bool(cos[worst] >= min_cosine),
    )
    if not verify.passed:
        raise RunFailed(
            f"reuse refused: recomputed {len(sample)} reused tags and the old rows of {old_path} do not match "
            f"(min cosine {verify.min_cosine:.4f} for {verify.worst_tag!r}, mean {verify.mean_cosine:.4f}, "
            f"threshold {min_cosine}); kept would be {len(kept)}, new {len(match.new)}, "
            f"dropped {len(match.dropped)}",
            hint="the old matrix came from another model, template set, pooling or cleaning; use the settings it "
            "was made with, or drop --reuse to recompute every tag",
        )
    return _Checked(fresh, verify)


def _assemble(
    voc: Vocabulary,
    old_path: Path,
    old: np.ndarray,
    match: _Match,
    plan: Plan,
    encoder: TagEmbedder,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> Rows:
    """Compute the new tags' rows and put them with the kept old rows into the new matrix."""
    k = plan.rows_per_tag
    computed: Rows | None = None
    if match.new:
        computed = plan.rows(encoder, match.new, batch_size, progress)
        if computed.matrix.shape[1] != old.shape[1]:
            raise RunFailed(f"reuse refused: {old_path} has {old.shape[1]}-d rows, the model makes "
                            f"{computed.matrix.shape[1]}-d")
    matrix = np.empty((len(voc) * k, old.shape[1]), dtype=np.float32)
    for i in match.kept:
        o = _old_id(match, i)
        matrix[i * k : i * k + k] = old[o * k : o * k + k]
    if computed is not None:
        for pos, i in enumerate(match.new):
            matrix[i * k : i * k + k] = computed.matrix[pos * k : pos * k + k]
        return Rows(matrix, computed.texts, computed.unique_texts, computed.truncated)
    return Rows(matrix)

"""The embed-labels job: a vocabulary's tag-embedding matrix (row ``i`` = tag id ``i``), computed or partly reused,
written with its sidecar.

The steps, in order: check the vocabulary and the options; plan the texts behind each tag (:mod:`.templates`,
:mod:`.plan`); load the encoder (:mod:`.encoder`); compute the rows (or keep an old matrix's, :mod:`.reuse`); describe
the result in the sidecar; write both (:mod:`.files`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprep import __version__
from mmprep.errors import InputError, UsageError
from mmprep.labels.embed.encoder import EncoderInfo, TagEmbedder, load_encoder
from mmprep.labels.embed.files import check_suffix, save_embeddings
from mmprep.labels.embed.messages import some
from mmprep.labels.embed.plan import Plan
from mmprep.labels.embed.reuse import ReuseReport, StageHook, reuse_rows
from mmprep.labels.embed.templates import (
    CLEAN_MODES,
    check_template,
    descriptions_for_vocab,
    is_ram,
    load_descriptions,
    tag_texts,
)
from mmprep.labels.vocab import Vocabulary, load_vocab
from mmprep.runtime.files import sha256_file

__all__ = ["EmbedResult", "ProgressHook", "embed_labels"]

#: ``hook(stage, n_done, total)``: called after each batch; ``stage`` is "embed" or "verify".
ProgressHook = Callable[[str, int, int], None]


@dataclass
class EmbedResult:
    """The outcome of :func:`embed_labels`; ``embeddings`` is the matrix (not part of the JSON report)."""

    embeddings: np.ndarray
    out: str | None
    sidecar: str | None
    sidecar_data: dict[str, Any]
    n_tags: int
    rows_per_tag: int
    dim: int
    texts: int
    unique_texts: int
    truncated: int
    seconds: float
    load_seconds: float
    encode_seconds: float
    encoded_tags: int
    encoder: EncoderInfo
    reuse: ReuseReport | None = None
    unused_descriptions: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.embeddings.shape[0]), int(self.embeddings.shape[1]))

    @property
    def tags_per_s(self) -> float | None:
        """Encoding throughput: tags encoded (incl. the reuse check's sample) per second of encoding."""
        return self.encoded_tags / self.encode_seconds if self.encode_seconds > 0 and self.encoded_tags else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "sidecar": self.sidecar,
            "shape": list(self.shape),
            "n_tags": self.n_tags,
            "rows_per_tag": self.rows_per_tag,
            "dim": self.dim,
            "texts": self.texts,
            "unique_texts": self.unique_texts,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 4),
            "load_seconds": round(self.load_seconds, 4),
            "encode_seconds": round(self.encode_seconds, 4),
            "encoded_tags": self.encoded_tags,
            "tags_per_s": self.tags_per_s,
            "encoder": self.encoder,
            "text": self.sidecar_data.get("text"),
            "normalize": self.sidecar_data.get("normalize"),
            "reuse": self.reuse,
            "unused_descriptions": list(self.unused_descriptions),
            "warnings": self.warnings,
        }



@dataclass(frozen=True)
class _Texts:
    """The plan of the texts behind each tag, and what the sidecar records about them."""

    plan: Plan
    templates: tuple[str, ...]
    clean: str
    descriptions: dict[str, Any] | None  # the sidecar's text.descriptions (None: templates)
    unused_descriptions: list[str] = field(default_factory=list)


def embed_labels(
    vocab: Vocabulary | str | Path,
    model: str | Path | TagEmbedder,
    out: str | Path | None = None,
    *,
    templates: Sequence[str] | None = None,
    template_source: str | None = None,
    descriptions: str | Path | None = None,
    reduce: str = "none",
    clean: str | None = None,
    normalize: bool = True,
    pooling: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 128,
    max_length: int | None = None,
    tokenizer: str | Path | None = None,
    reuse: str | Path | None = None,
    old_vocab: Vocabulary | str | Path | None = None,
    verify_sample: int = 32,
    verify_all: bool = False,
    min_cosine: float = 0.99,
    progress: ProgressHook | None = None,
) -> EmbedResult:
    """Compute (or partly reuse) the tag-embedding matrix of a vocabulary and optionally write it.

    Args:
        vocab: the vocabulary (row ``i`` is tag id ``i``).
        model: a model directory or an already loaded :class:`~mmprep.labels.embed.encoder.TagEmbedder`.
        out: where to write (``.pth``/``.pt``/``.npy``/``.safetensors``) plus ``<out>.json``; None: don't write.
        templates: prompt templates (``{}`` = cleaned tag, ``{article}`` = a/an, see :func:`tag_texts`); None or
            ``["{}"]``: the bare tag. More than one: per-template L2-normalise, average, re-normalise (without
            ``normalize``: average only).
        template_source: where the templates came from (recorded), e.g. ``ram`` or a file name.
        descriptions: a description-set JSON (RAM++); rows become ``[N * K, D]`` (tag ``i`` owns rows
            ``i*K .. i*K+K-1``), or ``[N, D]`` with ``reduce="mean"``. Excludes ``templates``.
        reduce: ``none`` or ``mean`` (descriptions only: average the K descriptions like RAM++'s open-set builder).
        clean: tag cleaning mode (:func:`clean_tag`); None: ``ram`` with :data:`RAM_TEMPLATES`, else ``default``.
        normalize: L2-normalise every output row.
        pooling, device, dtype, max_length, tokenizer: see :func:`load_encoder`.
        batch_size: texts per forward pass.
        reuse: an older matrix whose rows are kept for tags also in ``old_vocab`` (matched by normalised name).
        old_vocab: the vocabulary ``reuse`` was made for (required with ``reuse``).
        verify_sample: how many kept tags to recompute for the consistency check (``verify_all``: all of them).
        min_cosine: refuse to reuse when any recomputed row has a lower cosine to its old row.
        progress: ``hook(stage, n, total)`` after each batch.

    Raises:
        InputError: unreadable/malformed inputs, descriptions with missing tags or unequal counts.
        UsageError: contradictory or bad options.
        RunFailed: the reuse consistency check failed, or the output could not be written.
    """
    started = time.perf_counter()
    voc = _checked_vocab(vocab)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    tmpl = tuple(templates) if templates else ("{}",)
    clean = _clean_mode(clean, tmpl)
    _check_options(templates, descriptions, reduce, verify_sample, min_cosine, reuse, old_vocab, out)
    texts = _plan_texts(voc, tmpl, clean, descriptions, reduce, normalize)

    load_started = time.perf_counter()
    encoder = model if isinstance(model, TagEmbedder) else load_encoder(
        model, pooling=pooling, device=device, dtype=dtype, max_length=max_length, tokenizer=tokenizer
    )
    load_seconds = time.perf_counter() - load_started
    warnings = _encoder_warnings(encoder.info, normalize, texts.unused_descriptions)
    hook = _stage_hook(progress)

    reuse_report: ReuseReport | None = None
    if reuse is not None:
        assert old_vocab is not None
        reused = reuse_rows(voc, Path(reuse), old_vocab, texts.plan, encoder, batch_size, verify_sample, verify_all,
                            min_cosine, hook, warnings)
        rows, reuse_report = reused.rows, reused.report
    else:
        rows = texts.plan.rows(encoder, list(range(len(voc))), batch_size, hook("embed"))
    if rows.truncated:
        warnings.append(f"{rows.truncated} texts reached the {encoder.info.max_length}-token limit and were truncated")
    sidecar = _sidecar(voc, encoder.info, rows.matrix, texts, template_source, normalize, reduce, reuse_report)
    saved = save_embeddings(rows.matrix, out, sidecar=sidecar) if out is not None else None
    return EmbedResult(
        embeddings=rows.matrix,
        out=str(saved.matrix) if saved is not None else None,
        sidecar=str(saved.sidecar) if saved is not None and saved.sidecar is not None else None,
        sidecar_data=sidecar,
        n_tags=len(voc),
        rows_per_tag=texts.plan.rows_per_tag,
        dim=int(rows.matrix.shape[1]),
        texts=rows.texts,
        unique_texts=rows.unique_texts,
        truncated=rows.truncated,
        seconds=time.perf_counter() - started,
        load_seconds=load_seconds,
        encode_seconds=texts.plan.encode_seconds,
        encoded_tags=texts.plan.encoded_tags,
        encoder=encoder.info,
        reuse=reuse_report,
        unused_descriptions=tuple(texts.unused_descriptions),
        warnings=warnings,
    )


def _checked_vocab(vocab: Vocabulary | str | Path) -> Vocabulary:
    """The vocabulary, which must have ids 0..N-1 in order and no empty name (one row per id)."""
    voc = vocab if isinstance(vocab, Vocabulary) else load_vocab(vocab)
    if len(voc) == 0:
        raise InputError(f"{voc.path or 'vocabulary'}: the vocabulary is empty")
    if voc.ids != tuple(range(len(voc))):
        raise InputError(f"{voc.path}: tag ids are not 0..{len(voc) - 1} in order; a matrix needs one row per id",
                         hint="use a vocabulary without gaps in its ids")
    empty = [i for i, n in enumerate(voc.names) if not n]
    if empty:
        lines = ", ".join(str(i + voc.first_line) for i in empty[:8])
        raise InputError(f"{voc.path}: {len(empty)} empty tag names (line {lines})",
                         hint="every id needs a name; fix the lines (removing them would shift the ids)")
    return voc


def _clean_mode(clean: str | None, templates: tuple[str, ...]) -> str:
    """The tag cleaning mode: ``ram`` with RAM's templates unless given, else ``default``."""
    if clean is None:
        clean = "ram" if is_ram(templates) else "default"
    if clean not in CLEAN_MODES:
        raise UsageError(f"unknown --clean mode '{clean}'", hint=f"use one of: {', '.join(CLEAN_MODES)}")
    return clean


def _check_options(
    templates: Sequence[str] | None,
    descriptions: str | Path | None,
    reduce: str,
    verify_sample: int,
    min_cosine: float,
    reuse: str | Path | None,
    old_vocab: Vocabulary | str | Path | None,
    out: str | Path | None,
) -> None:
    """Raise UsageError for a bad or contradictory option, before anything is loaded."""
    if reduce not in ("none", "mean"):
        raise UsageError(f"unknown --reduce '{reduce}'", hint="use none or mean")
    if reduce != "none" and descriptions is None:
        raise UsageError("--reduce applies to --descriptions only")
    if descriptions is not None and templates and tuple(templates) != ("{}",):
        raise UsageError("--descriptions and templates exclude each other",
                         hint="descriptions are used verbatim; drop --template/--templates")
    if verify_sample < 0:
        raise UsageError(f"--verify-sample must be 0 or more, got {verify_sample}")
    if not 0.0 <= min_cosine <= 1.0:
        raise UsageError(f"--min-cosine must be between 0 and 1, got {min_cosine}")
    if (reuse is None) != (old_vocab is None):
        raise UsageError("--reuse and --old-vocab go together", hint="pass the old matrix and the vocabulary it was "
                         "made for")
    if out is not None:
        check_suffix(Path(out), "output")
    if reuse is not None:
        check_suffix(Path(reuse), "embedding")


def _plan_texts(
    voc: Vocabulary,
    tmpl: tuple[str, ...],
    clean: str,
    descriptions: str | Path | None,
    reduce: str,
    normalize: bool,
) -> _Texts:
    """The texts of every tag: its template renderings, or its K descriptions (one row each, or their mean)."""
    for t in tmpl:
        check_template(t, "template")
    if descriptions is None:
        per_tag = [tag_texts(n, tmpl, clean) for n in voc.names]
        return _Texts(Plan(per_tag, 1, normalize), tmpl, clean, None)
    dpath = Path(descriptions)
    matched = descriptions_for_vocab(load_descriptions(dpath), voc, source=str(dpath))
    info = {"path": str(dpath), "sha256": sha256_file(dpath), "per_tag": matched.k, "reduce": reduce}
    rows_per_tag = 1 if reduce == "mean" else matched.k
    return _Texts(Plan(matched.per_tag, rows_per_tag, normalize), tmpl, clean, info, matched.unused)


def _encoder_warnings(info: EncoderInfo, normalize: bool, unused: list[str]) -> list[str]:
    """The notes for the user known once the encoder is loaded (more are added as the job runs)."""
    warnings = list(info.warnings)
    if not normalize and info.declared_normalize:
        warnings.append(f"{info.path}: modules.json declares a Normalize module; --no-normalize leaves the "
                        "rows unnormalised, unlike the model's sentence-transformers output")
    if unused:
        warnings.append(f"{len(unused)} description tags are not in the vocabulary and were ignored: {some(unused)}")
    return warnings


def _stage_hook(progress: ProgressHook | None) -> StageHook:
    """``hook(stage)``: the per-batch callback of a stage, reporting to ``progress`` (None without one)."""

    def hook(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda n, total: progress(stage, n, total)

    return hook


def _sidecar(
    voc: Vocabulary,
    info: EncoderInfo,
    matrix: np.ndarray,
    texts: _Texts,
    template_source: str | None,
    normalize: bool,
    reduce: str,
    reuse: ReuseReport | None,
) -> dict[str, Any]:
    """The sidecar JSON: how the matrix was made (its keys and their order are the file format)."""
    dim = int(matrix.shape[1])
    tmpl, desc_info = texts.templates, texts.descriptions
    return {
        "mmprep_version": __version__,
        "shape": [int(matrix.shape[0]), dim],
        "rows_per_tag": texts.plan.rows_per_tag,
        "dim": dim,
        "dtype": "float32",
        "vocab_path": voc.path,
        "vocab_sha256": voc.sha256,
        "vocab_size": len(voc),
        "model_path": info.path,
        "model_config_sha256": info.config_sha256,
        "model_type": info.model_type,
        "encoder": {
            "kind": info.kind,
            "pooling": info.pooling,
            "pooling_source": info.pooling_source,
            "projection": info.projection,
            "max_length": info.max_length,
            "lowercase": info.lowercase,
            "compute_dtype": info.dtype,
            "device": info.device,
        },
        "text": {
            "clean": texts.clean if desc_info is None else None,
            "templates": None if desc_info else list(tmpl),
            "template_source": None if desc_info else (template_source or ("none" if tmpl == ("{}",) else "inline")),
            "article": (None if desc_info or not any("{article}" in t for t in tmpl)
                        else "ram" if is_ram(tmpl) else "vowel"),
            "ensemble": (("l2-normalise each, mean, re-normalise" if normalize else "l2-normalise each, mean")
                         if (desc_info is None and len(tmpl) > 1) or (desc_info is not None and reduce == "mean")
                         else None),
            "descriptions": desc_info,
        },
        "normalize": "l2" if normalize else "none",
        "reuse": reuse.to_sidecar() if reuse is not None else None,
    }

"""Tag (label) embedding matrices: one row per tag id, computed with a local transformers text encoder.

Recognize-Anything (RAM) freezes a ``[4585, 512]`` CLIP text-embedding matrix with one row per tag id, and RAM++ a
``[4585 x 51, 512]`` one (51 descriptions per tag). This module regenerates such matrices for any vocabulary:

* **Encoders.** Any transformers text encoder from a local directory (nothing is downloaded). CLIP checkpoints
  (``model_type`` ``clip`` or ``clip_text_model``) give their *projected* text embedding, the same vector as
  ``CLIPModel.get_text_features`` / ``CLIPTextModelWithProjection.text_embeds``: the final hidden state at the EOS
  token, multiplied by ``text_projection``. Other encoders (BERT, sentence-transformers, ...) use the pooling their
  folder declares in ``1_Pooling/config.json`` (sentence-transformers layout), else mean pooling over the attention
  mask (the documented default); ``pooling=`` overrides.
* **Text.** Tag names are cleaned (see :func:`clean_tag`) and put into prompt templates (see :func:`tag_texts`):
  none (the bare tag), one, several (a file) or the built-in ``ram`` ensemble (:data:`RAM_TEMPLATES`), which
  renders exactly the texts of RAM's open-set builder. With more than one template each
  template's embedding is L2-normalised, the template embeddings are averaged and the mean is re-normalised (RAM's
  open-set builder). Description sets (RAM++ ``{tag: [descriptions]}``) give ``K`` rows per tag instead.
* **Order.** Row ``i`` (or rows ``i*K .. i*K+K-1``) always belongs to tag id ``i``. Texts are deduplicated and
  encoded in batches sorted by token length; results are scattered back to their original positions.
* **Reuse.** Rows of an older matrix can be kept for tags present in both vocabularies (matched by
  :func:`mmprep.labels.vocab.normalize_tag`); only new tags are computed. A sample of kept tags is recomputed first and
  the reuse is refused when the cosine to the old rows is below a threshold (another model or template set).
* **Files.** ``.pth``/``.pt`` (a float32 tensor that ``torch.load`` returns), ``.npy`` and ``.safetensors`` (one
  tensor named ``embedding``), written atomically, plus a sidecar JSON ``<out>.json`` describing how the matrix was
  made.

torch, transformers and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmprep import __version__
from mmprep.errors import InputError, MissingDependencyError, RunFailed, UsageError
from mmprep.labels.vocab import Vocabulary, load_vocab, normalize_tag

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "BUILTIN_TEMPLATES",
    "CLEAN_MODES",
    "OUTPUT_SUFFIXES",
    "POOLINGS",
    "RAM_TEMPLATES",
    "EmbedResult",
    "EncoderInfo",
    "ProgressHook",
    "ReuseReport",
    "TextEncoder",
    "VerifyReport",
    "clean_tag",
    "descriptions_for_vocab",
    "embed_labels",
    "load_descriptions",
    "load_embeddings",
    "load_encoder",
    "load_templates",
    "render_template",
    "save_embeddings",
    "set_torch_threads",
    "sidecar_path",
    "tag_texts",
]

#: Pooling modes. ``eos``: the last non-padding token (for CLIP: the EOS token followed by ``text_projection``);
#: ``mean``: mean over the attention mask; ``cls``: the first token; ``max``: element-wise max over the attention
#: mask; ``mean_sqrt_len``: the masked sum divided by sqrt(length) (sentence-transformers' ``mean_sqrt_len_tokens``).
POOLINGS: tuple[str, ...] = ("eos", "mean", "cls", "max", "mean_sqrt_len")

#: Default pooling for non-CLIP encoders whose folder declares none.
DEFAULT_POOLING = "mean"

#: Tag cleaning modes, see :func:`clean_tag`.
CLEAN_MODES: tuple[str, ...] = ("default", "ram", "none")

#: Output formats by file suffix.
OUTPUT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".npy", ".safetensors")

#: The tensor name used inside ``.safetensors`` files.
SAFETENSORS_KEY = "embedding"

# The 63 prompt templates of Recognize-Anything's open-set label-embedding builder
# (github.com/xinyu1205/recognize-anything, ram/utils/openset_utils.py, ``multiple_templates``; Apache-2.0), themselves
# adapted from the CLIP / ViLD prompt-ensembling lists. RAM prefixes every rendered text that starts with "a" or "the"
# with "This is "; that prefix is written into the templates here. RAM fills ``{}`` with ``processed_name(name)``
# (``clean="ram"``) and ``{article}`` with ``article(name)``: "an" when the *raw* name starts with a lower-case
# vowel (so "Aerial photography" gets "a"). :func:`tag_texts` does both for these templates, so its texts are RAM's.
_RAM_BASE_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)

#: RAM's open-set template ensemble (63 templates, "This is " prefix applied as RAM does). ``{}`` is the cleaned tag,
#: ``{article}`` follows RAM's rule (see :func:`tag_texts`).
RAM_TEMPLATES: tuple[str, ...] = tuple(
    "This is " + t if t.startswith(("a", "the")) else t for t in _RAM_BASE_TEMPLATES
)

#: Built-in template sets, selectable by name: ``none`` (the bare tag), ``photo`` (CLIP's "a photo of a {}."),
#: ``ram`` (:data:`RAM_TEMPLATES`).
BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "none": ("{}",),
    "photo": ("a photo of a {}.",),
    "ram": RAM_TEMPLATES,
}

#: ``hook(stage, n_done, total)``: called after each batch; ``stage`` is "embed" or "verify".
ProgressHook = Callable[[str, int, int], None]

_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------------------------
# Text: cleaning, templates, descriptions
# --------------------------------------------------------------------------------------------------------------


def clean_tag(name: str, mode: str = "default") -> str:
    """The text a tag name contributes to a prompt.

    Modes:
        ``default``: ``_`` → space, runs of whitespace collapsed to one space, stripped; case kept (CLIP and
        uncased BERT tokenizers lower-case anyway).
        ``ram``: exactly RAM's ``processed_name(name, rm_dot=True)``: ``_`` → space, ``/`` → `` or ``,
        lower-cased, trailing ``.`` removed (whitespace is left as it is).
        ``none``: the name as loaded (surrounding whitespace already stripped by the vocabulary loader).
    """
    if mode == "none":
        return name
    if mode == "default":
        return _WS.sub(" ", name.replace("_", " ")).strip()
    if mode == "ram":
        return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")
    raise UsageError(f"unknown tag cleaning mode '{mode}'", hint=f"use one of: {', '.join(CLEAN_MODES)}")


def _article(text: str) -> str:
    return "an" if text[:1].casefold() in ("a", "e", "i", "o", "u") else "a"


def _ram_article(name: str) -> str:
    # RAM's ``article(name)``: ``"an" if name[0] in "aeiou" else "a"``, on the raw name, case-sensitive.
    return "an" if name[:1] in ("a", "e", "i", "o", "u") else "a"


def render_template(template: str, tag_text: str, *, article: str | None = None) -> str:
    """Fill a template: every ``{}`` becomes ``tag_text`` and ``{article}`` becomes ``article`` if given, else "an"
    when ``tag_text`` starts with a vowel (either case) and "a" otherwise."""
    return template.replace("{article}", article or _article(tag_text)).replace("{}", tag_text)


def _is_ram(templates: Sequence[str]) -> bool:
    return tuple(templates) == RAM_TEMPLATES


def tag_texts(name: str, templates: Sequence[str], clean: str | None = None) -> list[str]:
    """The prompt texts of one tag, one per template: ``name`` cleaned with :func:`clean_tag` and put into each.

    With :data:`RAM_TEMPLATES` the texts are RAM's: ``clean`` defaults to ``ram`` and ``{article}`` follows RAM's
    rule on the raw name ("an" only before a lower-case vowel: "There is a aerial photography in the scene.").
    With other templates ``clean`` defaults to ``default`` and ``{article}`` is "an" before a vowel of either case.
    """
    ram = _is_ram(templates)
    text = clean_tag(name, clean or ("ram" if ram else "default"))
    article = _ram_article(name) if ram else None
    return [render_template(t, text, article=article) for t in templates]


def load_templates(spec: str | Path) -> tuple[str, ...]:
    """Templates from a built-in name (``none``, ``photo``, ``ram``) or a text file.

    A file holds one template per line; blank lines and lines starting with ``#`` are skipped. Every template must
    contain ``{}`` (the tag); ``{article}`` is optional.
    """
    name = str(spec)
    if name in BUILTIN_TEMPLATES and not Path(name).exists():
        return BUILTIN_TEMPLATES[name]
    p = Path(spec)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(
            f"{p}: template file not found",
            hint=f"pass a file with one template per line, or a built-in set: {', '.join(BUILTIN_TEMPLATES)}",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read template file: {exc}") from None
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        _check_template(t, f"{p}:{lineno}")
        out.append(t)
    if not out:
        raise InputError(f"{p}: the template file has no templates",
                         hint="write one template per line, e.g. a photo of a {}.")
    return tuple(out)


def _check_template(template: str, where: str) -> None:
    if "{}" not in template:
        raise InputError(f"{where}: template {template!r} has no {{}} placeholder for the tag",
                         hint='write e.g. "a photo of a {}."')


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """Read a description-set JSON: RAM++'s list of one-key objects ``[{tag: [descriptions]}, ...]`` or an object
    ``{tag: [descriptions]}``. Returns tag → descriptions in file order.
    """
    p = Path(path)
    try:
        value = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(f"{p}: description file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read description file: {exc}") from None
    pairs: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict) or len(item) != 1:
                got = f"an object with {len(item)} keys" if isinstance(item, dict) else type(item).__name__
                raise InputError(
                    f"{p}: entry {i} is {got}, expected an object with one key {{tag: [descriptions]}}",
                    hint="RAM++ format: a list of one-key objects, or one object mapping every tag to its list",
                )
            pairs.append(next(iter(item.items())))
    else:
        raise InputError(f"{p}: expected a list of {{tag: [descriptions]}} objects or an object {{tag: [...]}}")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for tag, descs in pairs:
        if not isinstance(descs, list) or not descs or not all(isinstance(d, str) and d.strip() for d in descs):
            raise InputError(f"{p}: tag {tag!r}: descriptions must be a non-empty list of non-empty strings")
        key = normalize_tag(tag)
        if key in seen:
            raise InputError(f"{p}: tag {tag!r} appears more than once (also as {seen[key]!r})")
        seen[key] = tag
        out[tag] = descs
    return out


def descriptions_for_vocab(
    descriptions: dict[str, list[str]], vocab: Vocabulary, *, source: str = "descriptions"
) -> tuple[list[list[str]], list[str]]:
    """Descriptions per vocabulary tag, in vocabulary order (matched by normalised name).

    Returns (descriptions by tag id, unused description tags). Raises InputError when a tag has none or when the
    number of descriptions differs between tags (naming the tags).
    """
    by_norm = {normalize_tag(k): v for k, v in descriptions.items()}
    missing = [n for n in vocab.names if normalize_tag(n) not in by_norm]
    if missing:
        raise InputError(
            f"{source}: no descriptions for {len(missing)} of {len(vocab)} tags of {vocab.path or 'the vocabulary'}: "
            + _some(missing),
            hint="every vocabulary tag needs a description list (tags are matched by normalised name)",
        )
    rows = [by_norm[normalize_tag(n)] for n in vocab.names]
    counts: dict[int, int] = {}
    for r in rows:
        counts[len(r)] = counts.get(len(r), 0) + 1
    if len(counts) > 1:
        k = max(counts, key=lambda c: (counts[c], c))
        odd = [f"{n} ({len(r)})" for n, r in zip(vocab.names, rows, strict=True) if len(r) != k]
        raise InputError(
            f"{source}: every tag needs the same number of descriptions; {counts[k]} tags have {k}, "
            f"{len(odd)} differ: " + _some(odd, quote=False),
            hint=f"give every tag exactly {k} descriptions (the matrix has K rows per tag)",
        )
    used = {normalize_tag(n) for n in vocab.names}
    unused = [k for k in descriptions if normalize_tag(k) not in used]
    return rows, unused


def _some(items: Sequence[str], limit: int = 8, quote: bool = True) -> str:
    shown = [repr(x) if quote else x for x in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderInfo:
    """How a text encoder turns a text into a vector (recorded in the sidecar).

    Attributes:
        path: the model directory.
        model_type: ``config.json``'s ``model_type``.
        kind: ``clip`` (CLIP text tower) or ``encoder`` (any other transformers encoder).
        pooling: one of :data:`POOLINGS`.
        pooling_source: where the pooling came from (``--pooling``, ``1_Pooling/config.json``, ``clip``,
            ``default``).
        projection: whether CLIP's ``text_projection`` is applied.
        config_sha256: sha256 of the bytes of ``config.json``.
        max_length: token limit (texts are truncated to it).
        lowercase: texts are lower-cased first (sentence-transformers ``do_lower_case``).
        device: torch device the model runs on.
        dtype: compute dtype (pooling and outputs are float32).
        declared_normalize: the folder's ``modules.json`` declares a sentence-transformers ``Normalize`` module.
        warnings: things the user should know (e.g. sentence-transformers modules that are not applied).
    """

    path: str
    model_type: str
    kind: str
    pooling: str
    pooling_source: str
    projection: bool
    config_sha256: str
    max_length: int
    lowercase: bool
    device: str
    dtype: str
    declared_normalize: bool = False
    warnings: tuple[str, ...] = ()


class TextEncoder:
    """A loaded text encoder: texts in, float32 vectors out (one per text, not normalised).

    Create it with :func:`load_encoder`.
    """

    def __init__(self, model: Any, tokenizer: Any, info: EncoderInfo, pad_id: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._pad_id = pad_id

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to ``max_length``, no padding)."""
        if not texts:
            return []
        if self.info.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.info.max_length,
            padding=False, return_attention_mask=False, return_token_type_ids=False,
        )
        return [list(ids) for ids in enc["input_ids"]]

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 128,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Encode texts. Returns (``[len(texts), D]`` float32 array in input order, number of texts that reached
        ``max_length`` tokens, i.e. were probably truncated).

        Identical texts are encoded once; batches are formed from texts sorted by token length (longest first) to
        minimise padding; ``progress(n_done_in_batch, n_unique)`` is called after each batch.
        """
        import torch

        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        index: dict[str, int] = {}
        inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
        unique = list(index)
        if not unique:
            return np.zeros((0, 0), dtype=np.float32), 0
        ids = self.tokenize(unique)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        truncated = int(np.count_nonzero(lengths >= self.info.max_length))
        order = np.argsort(-lengths, kind="stable")
        out: np.ndarray | None = None
        device = torch.device(self.info.device)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                width = int(lengths[sel[0]])
                input_ids = torch.full((len(sel), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(sel), width), dtype=torch.long)
                for row, j in enumerate(sel):
                    n = int(lengths[j])
                    input_ids[row, :n] = torch.tensor(ids[j], dtype=torch.long)
                    mask[row, :n] = 1
                vecs = self._forward(input_ids.to(device), mask.to(device))
                arr = vecs.detach().to("cpu", torch.float32).numpy()
                if out is None:
                    out = np.empty((len(unique), arr.shape[1]), dtype=np.float32)
                out[sel] = arr
                if progress is not None:
                    progress(len(sel), len(unique))
        assert out is not None
        return out[inverse], truncated

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        info = self.info
        if info.kind == "clip":
            if info.pooling == "eos" and info.projection:
                return self.model(input_ids=input_ids, attention_mask=mask).text_embeds.float()
            res = self.model.text_model(input_ids=input_ids, attention_mask=mask)
            if info.pooling == "eos":
                return res.pooler_output.float()
            hidden = res.last_hidden_state
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return _pool(hidden.float(), mask, info.pooling)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "eos":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1.0)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise UsageError(f"unknown pooling '{mode}'", hint=f"use one of: {', '.join(POOLINGS)}")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading logs and progress bars (library code never prints)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


_CLIP_TYPES = ("clip", "clip_text_model")
_TOKENIZER_GLOBS = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.tiktoken")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_ST_POOL_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "eos",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_POOL_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                  "lasttoken": "eos", "weightedmean": "weightedmean"}


def _read_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON in {what}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read {what}: {exc}") from None


def _st_transformer_dir(d: Path) -> Path | None:
    """The sub-folder holding the transformer in an older sentence-transformers layout (``0_Transformer/``)."""
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, "sentence-transformers modules.json")
    for mod in modules if isinstance(modules, list) else []:
        if isinstance(mod, dict) and str(mod.get("type", "")).endswith(".Transformer") and mod.get("path"):
            sub = d / str(mod["path"])
            if (sub / "config.json").is_file():
                return sub
    return None


@dataclass(frozen=True)
class _STLayout:
    """sentence-transformers folder facts."""

    pooling: str | None  # declared pooling, None if none
    source: str  # where the pooling came from
    warnings: list[str]
    max_seq: int | None  # sentence_bert_config.json max_seq_length
    lower: bool  # do_lower_case
    normalize: bool  # modules.json declares a Normalize module


def _st_layout(d: Path) -> _STLayout:
    """What a sentence-transformers folder declares (all defaults for a plain transformers folder)."""
    warnings: list[str] = []
    normalize = False
    pool_dir = d / "1_Pooling"
    modules_file = d / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file, "sentence-transformers modules.json")
        if isinstance(modules, list):
            for mod in modules:
                if not isinstance(mod, dict):
                    continue
                mtype = str(mod.get("type", ""))
                short = mtype.rsplit(".", 1)[-1]
                if short == "Pooling" and mod.get("path"):
                    pool_dir = d / str(mod["path"])
                elif short == "Normalize":
                    normalize = True
                elif short not in ("Transformer", "Pooling"):
                    warnings.append(
                        f"modules.json declares {mtype} ({mod.get('path')}), which mmprep does not apply: the "
                        "vectors are the pooled transformer outputs"
                    )
    pooling: str | None = None
    source = "default"
    cfg_file = pool_dir / "config.json"
    if cfg_file.is_file():
        cfg = _read_json(cfg_file, "pooling config")
        if not isinstance(cfg, dict):
            raise InputError(f"{cfg_file}: expected a JSON object")
        if isinstance(cfg.get("pooling_mode"), str):
            modes = [_ST_POOL_NAMES.get(cfg["pooling_mode"], cfg["pooling_mode"])]
        else:
            modes = [name for key, name in _ST_POOL_KEYS.items() if cfg.get(key)]
        if len(modes) != 1 or modes[0] not in POOLINGS:
            raise InputError(
                f"{cfg_file}: pooling {'+'.join(modes) or 'none'} is not supported",
                hint=f"pass --pooling with one of: {', '.join(POOLINGS)}",
            )
        pooling, source = modes[0], f"{pool_dir.name}/config.json"
    max_seq: int | None = None
    lower = False
    sb = d / "sentence_bert_config.json"
    if sb.is_file():
        sbc = _read_json(sb, "sentence_bert_config.json")
        if isinstance(sbc, dict):
            if isinstance(sbc.get("max_seq_length"), int) and sbc["max_seq_length"] > 0:
                max_seq = sbc["max_seq_length"]
            lower = bool(sbc.get("do_lower_case", False))
    return _STLayout(pooling, source, warnings, max_seq, lower, normalize)


def set_torch_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads for this process (0: leave torch's default); returns the count in use.

    On a machine whose cores are busy with other work, fewer threads (often 1) can be several times faster, because
    torch's worker threads wait for each other at every operation.
    """
    import torch

    if threads < 0:
        raise UsageError(f"--threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available to torch",
                             hint="use --device cpu (or auto)")
        return device
    raise UsageError(f"unknown device '{device}'", hint="use auto, cpu or cuda")


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"unknown dtype '{dtype}'", hint="use auto, float32, float16 or bfloat16")
    if dtype == "float16" and device == "cpu":
        raise UsageError("--dtype float16 needs a GPU", hint="use --dtype float32 or bfloat16 on CPU")
    return dtype


def load_encoder(
    path: str | Path,
    *,
    pooling: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    tokenizer: str | Path | None = None,
) -> TextEncoder:
    """Load a text encoder from a local directory (never from the network).

    Args:
        path: a directory with ``config.json``, weights (``*.safetensors`` / ``*.bin``) and tokenizer files.
        pooling: override the pooling (one of :data:`POOLINGS`); None: CLIP → ``eos`` + projection, others → the
            folder's ``1_Pooling/config.json``, else ``mean``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: ``auto`` (float16 on GPU, float32 on CPU), ``float32``, ``float16`` (GPU only) or ``bfloat16``.
        max_length: token limit; default: the smallest of sentence-transformers' ``max_seq_length``, the
            tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``.
        tokenizer: a separate tokenizer directory (default: ``path``).

    Raises:
        InputError: the directory is missing, is not a transformers model, or its weights do not fit its config.
        UsageError: a bad pooling, device or dtype.
    """
    d = Path(path)
    hint = "pass a local directory holding config.json, the weights and the tokenizer files (nothing is downloaded)"
    if not d.exists():
        raise InputError(f"{d}: model directory not found", hint=hint)
    if not d.is_dir():
        raise InputError(f"{d}: is a file, expected a model directory", hint=hint)
    model_dir = d if (d / "config.json").is_file() else (_st_transformer_dir(d) or d)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{d}: not a transformers model directory (no config.json)", hint=hint)
    cfg_bytes = cfg_file.read_bytes()
    try:
        cfg_json = json.loads(cfg_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_file}: invalid JSON: {exc}") from None
    if not isinstance(cfg_json, dict) or "model_type" not in cfg_json:
        raise InputError(f"{cfg_file}: not a transformers model config (no model_type)", hint=hint)
    if not any(any(model_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise InputError(f"{model_dir}: no model weights (model.safetensors or pytorch_model.bin)", hint=hint)
    if pooling is not None and pooling not in POOLINGS:
        raise UsageError(f"unknown pooling '{pooling}'", hint=f"use one of: {', '.join(POOLINGS)}")

    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(exc.name or "torch", "embed", purpose="embed-labels") from None

    model_type = str(cfg_json["model_type"])
    kind = "clip" if model_type in _CLIP_TYPES else "encoder"
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    st = _st_layout(d)
    warnings = list(st.warnings)
    if kind == "clip":
        if pooling == "cls":
            raise UsageError("--pooling cls does not apply to CLIP: its first token never sees the text (causal mask)",
                             hint="use eos (the projected CLIP embedding, default), mean or max")
        chosen, source = (pooling, "--pooling") if pooling else ("eos", "clip")
    else:
        chosen, source = (pooling, "--pooling") if pooling else (st.pooling or DEFAULT_POOLING, st.source)

    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if not tok_dir.is_dir():
        raise InputError(f"{tok_dir}: tokenizer directory not found")
    tok_hint = "the directory needs tokenizer files (tokenizer.json, or vocab.json+merges.txt, or vocab.txt, or a " \
        "sentencepiece *.model); pass --tokenizer DIR if they live elsewhere"
    if not any(any(tok_dir.glob(g)) for g in _TOKENIZER_GLOBS):
        # transformers 5 would silently build an empty tokenizer (special tokens only) from config.json alone.
        raise InputError(f"{tok_dir}: no tokenizer files", hint=tok_hint)
    with _quiet_transformers():
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable folders
            raise InputError(f"{tok_dir}: cannot load a tokenizer: {_first_line(exc)}", hint=tok_hint) from None
        if len(tok) <= 16:
            raise InputError(f"{tok_dir}: the tokenizer has only {len(tok)} tokens; its files were not understood",
                             hint=tok_hint)
        projection = False
        try:
            if kind == "clip":
                model, projection = _load_clip(model_dir, cfg_json, transformers)
            else:
                model, info = transformers.AutoModel.from_pretrained(
                    str(model_dir), local_files_only=True, output_loading_info=True
                )
                _check_loading(model_dir, info, ignore_prefixes=("pooler.",))
                if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
                    model = model.get_encoder()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{model_dir}: cannot load the model: {_first_line(exc)}", hint=hint) from None
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dt]
    model = model.to(device=dev, dtype=torch_dtype).eval()

    limits = [x for x in (st.max_seq, _int_or_none(getattr(tok, "model_max_length", None)),
                          _int_or_none(getattr(_text_config(model.config), "max_position_embeddings", None)))
              if x is not None and 0 < x < 1_000_000]
    if max_length is not None:
        if max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {max_length}")
        limit = max_length
    else:
        limit = min(limits) if limits else 512
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    info = EncoderInfo(
        path=str(d), model_type=model_type, kind=kind, pooling=chosen, pooling_source=source,
        projection=projection and chosen == "eos", config_sha256=hashlib.sha256(cfg_bytes).hexdigest(),
        max_length=limit, lowercase=st.lower, device=dev, dtype=dt, declared_normalize=st.normalize,
        warnings=tuple(warnings),
    )
    if kind == "clip" and chosen == "eos" and not projection:
        info = replace(info, warnings=(*info.warnings, f"{d}: the checkpoint has no text_projection; using the "
                                        "unprojected EOS embedding (pooler_output)"))
    return TextEncoder(model, tok, info, int(pad_id))


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _text_config(cfg: Any) -> Any:
    return getattr(cfg, "text_config", None) or cfg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_loading(d: Path, info: dict[str, Any], ignore_prefixes: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore_prefixes))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = missing or mismatched
        raise InputError(
            f"{d}: the weights do not fit config.json: {len(bad)} tensors "
            f"{'missing' if missing else 'with the wrong shape'} ({_some(bad, 3, quote=False)})",
            hint="the directory is not a complete checkpoint of this architecture",
        )


def _load_clip(d: Path, cfg_json: dict[str, Any], transformers: Any) -> tuple[Any, bool]:
    """CLIPTextModelWithProjection from a CLIPModel or a CLIP text-tower checkpoint; (model, has projection)."""
    config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    if cfg_json["model_type"] == "clip":
        text_cfg = config.text_config
        # CLIPConfig keeps the projection size at the top level; the text tower needs it to build text_projection.
        text_cfg.projection_dim = config.projection_dim
    else:
        text_cfg = config
    model, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        str(d), config=text_cfg, local_files_only=True, output_loading_info=True
    )
    missing = set(info.get("missing_keys", ()))
    has_projection = "text_projection.weight" not in missing
    info = dict(info, missing_keys=missing - {"text_projection.weight"})
    _check_loading(d, info)
    return model, has_projection


# --------------------------------------------------------------------------------------------------------------
# Matrix files
# --------------------------------------------------------------------------------------------------------------


def sidecar_path(out: str | Path) -> Path:
    """The sidecar JSON next to an output matrix: ``<out>.json`` (e.g. ``tags.pth.json``)."""
    p = Path(out)
    return p.with_name(p.name + ".json")


def _suffix(path: Path, what: str) -> str:
    s = path.suffix.lower()
    if s not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path}: unknown {what} format '{s or '(none)'}'",
                         hint=f"use one of: {', '.join(OUTPUT_SUFFIXES)}")
    return s


def _new_file_mode(path: Path) -> int:
    """The mode a plainly created file would get: the existing file's, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_embeddings(
    matrix: np.ndarray, path: str | Path, *, sidecar: dict[str, Any] | None = None
) -> tuple[Path, Path | None]:
    """Write a float32 ``[rows, D]`` matrix atomically in the format given by the suffix, plus the sidecar JSON.

    ``.pth``/``.pt``: ``torch.save`` of a contiguous float32 tensor (``torch.load`` returns it); ``.npy``: numpy;
    ``.safetensors``: one tensor named ``embedding`` (small string metadata copied from the sidecar).
    Returns (matrix path, sidecar path or None).
    """
    p = Path(path)
    suffix = _suffix(p, "output")
    arr = np.ascontiguousarray(matrix, dtype=np.float32)
    if arr.ndim != 2:
        raise UsageError(f"expected a 2-D matrix, got shape {arr.shape}")
    try:
        if suffix in (".pth", ".pt"):
            import torch

            tensor = torch.from_numpy(arr.copy())
            _atomic_write(p, lambda fh: torch.save(tensor, fh))
        elif suffix == ".npy":
            _atomic_write(p, lambda fh: np.save(fh, arr, allow_pickle=False))
        else:
            try:
                from safetensors.numpy import save as st_save
            except ImportError:  # pragma: no cover
                raise MissingDependencyError("safetensors", "embed", purpose="writing .safetensors") from None
            meta = {"format": "pt"}
            if sidecar:
                for key in ("vocab_sha256", "model_config_sha256", "rows_per_tag"):
                    if key in sidecar:
                        meta[key] = str(sidecar[key])
            blob = st_save({SAFETENSORS_KEY: arr}, metadata=meta)
            _atomic_write(p, lambda fh: fh.write(blob))
        side: Path | None = None
        if sidecar is not None:
            side = sidecar_path(p)
            text = json.dumps(sidecar, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            _atomic_write(side, lambda fh: fh.write(text.encode("utf-8")))
    except OSError as exc:
        raise RunFailed(f"{p}: cannot write the embedding matrix: {exc.strerror or exc}") from None
    return p, side


def load_embeddings(path: str | Path) -> np.ndarray:
    """Read a 2-D embedding matrix (``.pth``/``.pt``/``.npy``/``.safetensors``) as float32.

    A ``.pth`` may hold a tensor or a dict with exactly one tensor (or an ``embedding`` entry); it is loaded with
    ``weights_only=True`` (no code runs).
    """
    p = Path(path)
    suffix = _suffix(p, "embedding")
    if not p.is_file():
        raise InputError(f"{p}: embedding file not found")
    try:
        if suffix in (".pth", ".pt"):
            import torch

            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                obj = tensors.get(SAFETENSORS_KEY) if SAFETENSORS_KEY in tensors else (
                    next(iter(tensors.values())) if len(tensors) == 1 else None)
            if not isinstance(obj, torch.Tensor):
                raise InputError(f"{p}: expected a tensor (or a dict with one tensor), got {type(obj).__name__}")
            arr = obj.detach().to(torch.float32).numpy()
        elif suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(p))
            if SAFETENSORS_KEY in tensors:
                arr = tensors[SAFETENSORS_KEY]
            elif len(tensors) == 1:
                arr = next(iter(tensors.values()))
            else:
                raise InputError(f"{p}: {len(tensors)} tensors and none named '{SAFETENSORS_KEY}'")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read the embedding matrix: {_first_line(exc)}") from None
    if arr.ndim != 2:
        raise InputError(f"{p}: expected a 2-D matrix [rows, dim], got shape {tuple(arr.shape)}")
    return np.asarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# The embed-labels job
# --------------------------------------------------------------------------------------------------------------


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


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class _Plan:
    """The texts behind each tag and how their vectors combine into the tag's rows."""

    def __init__(self, per_tag: list[list[str]], rows_per_tag: int, normalize: bool) -> None:
        self.per_tag = per_tag  # texts of each tag (T templates, or K descriptions)
        self.rows_per_tag = rows_per_tag  # 1 (templates / reduced descriptions) or K
        self.normalize = normalize
        self.encoded_tags = 0  # tags encoded so far (verification sample + computed tags)
        self.encode_seconds = 0.0

    def rows(self, encoder: TextEncoder, tag_ids: Sequence[int], batch_size: int,
             progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, int, int, int]:
        """Rows for the given tag ids: ([len(tag_ids) * rows_per_tag, D], texts, unique texts, truncated)."""
        if not tag_ids:
            return np.zeros((0, 0), dtype=np.float32), 0, 0, 0
        width = len(self.per_tag[tag_ids[0]])
        texts = [t for i in tag_ids for t in self.per_tag[i]]
        started = time.perf_counter()
        vecs, truncated = encoder.encode(texts, batch_size=batch_size, progress=progress)
        self.encode_seconds += time.perf_counter() - started
        self.encoded_tags += len(tag_ids)
        unique = len(set(texts))
        vecs = vecs.reshape(len(tag_ids), width, -1)
        if self.rows_per_tag == width:  # one row per text (a single template, or K descriptions kept apart)
            rows = vecs.reshape(len(tag_ids) * width, -1)
            return (_l2(rows) if self.normalize else rows), len(texts), unique, truncated
        # Ensemble (RAM): L2-normalise each text's vector, average per tag, re-normalise.
        mean = _l2(vecs).mean(axis=1)
        return (_l2(mean) if self.normalize else mean), len(texts), unique, truncated


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embed_labels(
    vocab: Vocabulary | str | Path,
    model: str | Path | TextEncoder,
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
        model: a model directory or an already loaded :class:`TextEncoder`.
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
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    tmpl = tuple(templates) if templates else ("{}",)
    if clean is None:
        clean = "ram" if _is_ram(tmpl) else "default"
    if clean not in CLEAN_MODES:
        raise UsageError(f"unknown --clean mode '{clean}'", hint=f"use one of: {', '.join(CLEAN_MODES)}")
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
        _suffix(Path(out), "output")
    if reuse is not None:
        _suffix(Path(reuse), "embedding")

    for t in tmpl:
        _check_template(t, "template")
    unused: list[str] = []
    desc_info: dict[str, Any] | None = None
    if descriptions is not None:
        dpath = Path(descriptions)
        per_tag, unused = descriptions_for_vocab(load_descriptions(dpath), voc, source=str(dpath))
        k = len(per_tag[0])
        rows_per_tag = 1 if reduce == "mean" else k
        desc_info = {"path": str(dpath), "sha256": _file_sha256(dpath), "per_tag": k, "reduce": reduce}
    else:
        per_tag = [tag_texts(n, tmpl, clean) for n in voc.names]
        rows_per_tag = 1
    plan = _Plan(per_tag, rows_per_tag, normalize)

    load_started = time.perf_counter()
    encoder = model if isinstance(model, TextEncoder) else load_encoder(
        model, pooling=pooling, device=device, dtype=dtype, max_length=max_length, tokenizer=tokenizer
    )
    load_seconds = time.perf_counter() - load_started
    warnings = list(encoder.info.warnings)
    if not normalize and encoder.info.declared_normalize:
        warnings.append(f"{encoder.info.path}: modules.json declares a Normalize module; --no-normalize leaves the "
                        "rows unnormalised, unlike the model's sentence-transformers output")
    if unused:
        warnings.append(f"{len(unused)} description tags are not in the vocabulary and were ignored: {_some(unused)}")

    def hook(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda n, total: progress(stage, n, total)

    n = len(voc)
    reuse_report: ReuseReport | None = None
    if reuse is not None:
        assert old_vocab is not None
        matrix, reuse_report, texts, unique, truncated = _with_reuse(
            voc, Path(reuse), old_vocab, plan, encoder, batch_size, verify_sample, verify_all, min_cosine,
            hook, warnings,
        )
    else:
        matrix, texts, unique, truncated = plan.rows(encoder, list(range(n)), batch_size, hook("embed"))
    if truncated:
        warnings.append(f"{truncated} texts reached the {encoder.info.max_length}-token limit and were truncated")
    dim = int(matrix.shape[1])
    sidecar = {
        "mmprep_version": __version__,
        "shape": [int(matrix.shape[0]), dim],
        "rows_per_tag": rows_per_tag,
        "dim": dim,
        "dtype": "float32",
        "vocab_path": voc.path,
        "vocab_sha256": voc.sha256,
        "vocab_size": n,
        "model_path": encoder.info.path,
        "model_config_sha256": encoder.info.config_sha256,
        "model_type": encoder.info.model_type,
        "encoder": {
            "kind": encoder.info.kind,
            "pooling": encoder.info.pooling,
            "pooling_source": encoder.info.pooling_source,
            "projection": encoder.info.projection,
            "max_length": encoder.info.max_length,
            "lowercase": encoder.info.lowercase,
            "compute_dtype": encoder.info.dtype,
            "device": encoder.info.device,
        },
        "text": {
            "clean": clean if desc_info is None else None,
            "templates": None if desc_info else list(tmpl),
            "template_source": None if desc_info else (template_source or ("none" if tmpl == ("{}",) else "inline")),
            "article": (None if desc_info or not any("{article}" in t for t in tmpl)
                        else "ram" if _is_ram(tmpl) else "vowel"),
            "ensemble": (("l2-normalise each, mean, re-normalise" if normalize else "l2-normalise each, mean")
                         if (desc_info is None and len(tmpl) > 1) or (desc_info is not None and reduce == "mean")
                         else None),
            "descriptions": desc_info,
        },
        "normalize": "l2" if normalize else "none",
        "reuse": _reuse_sidecar(reuse_report),
    }
    written: tuple[Path, Path | None] = (Path(), None)
    if out is not None:
        written = save_embeddings(matrix, out, sidecar=sidecar)
    return EmbedResult(
        embeddings=matrix,
        out=str(written[0]) if out is not None else None,
        sidecar=str(written[1]) if written[1] is not None else None,
        sidecar_data=sidecar,
        n_tags=n,
        rows_per_tag=rows_per_tag,
        dim=dim,
        texts=texts,
        unique_texts=unique,
        truncated=truncated,
        seconds=time.perf_counter() - started,
        load_seconds=load_seconds,
        encode_seconds=plan.encode_seconds,
        encoded_tags=plan.encoded_tags,
        encoder=encoder.info,
        reuse=reuse_report,
        unused_descriptions=tuple(unused),
        warnings=warnings,
    )


def _reuse_sidecar(r: ReuseReport | None) -> dict[str, Any] | None:
    if r is None:
        return None
    v = r.verify
    return {
        "old_path": r.old_path, "old_vocab": r.old_vocab, "kept": r.kept, "new": r.new, "dropped": r.dropped,
        "verify": {"checked_tags": v.checked_tags, "min_cosine": v.min_cosine, "mean_cosine": v.mean_cosine,
                   "threshold": v.threshold, "all_checked": v.all_checked},
    }


def _with_reuse(
    voc: Vocabulary,
    old_path: Path,
    old_vocab: Vocabulary | str | Path,
    plan: _Plan,
    encoder: TextEncoder,
    batch_size: int,
    verify_sample: int,
    verify_all: bool,
    min_cosine: float,
    hook: Callable[[str], Callable[[int, int], None] | None],
    warnings: list[str],
) -> tuple[np.ndarray, ReuseReport, int, int, int]:
    ov = old_vocab if isinstance(old_vocab, Vocabulary) else load_vocab(old_vocab)
    old = load_embeddings(old_path)
    k = plan.rows_per_tag
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
    old_ids = [ov.normalized_to_id.get(normalize_tag(nm)) for nm in voc.names]
    kept_new = [i for i, o in enumerate(old_ids) if o is not None]
    new_ids = [i for i, o in enumerate(old_ids) if o is None]
    # An old id is dropped when its normalised name is in no new tag; with duplicate names in the old vocabulary
    # every duplicate id counts as kept, not only the one ``normalized_to_id`` returns.
    new_names = {normalize_tag(nm) for nm in voc.names}
    dropped = [nm for nm in ov.names if normalize_tag(nm) not in new_names]

    # Consistency check: recompute a sample of kept tags and compare with their old rows.
    if verify_all or len(kept_new) <= verify_sample:
        sample = kept_new
    else:
        rng = np.random.default_rng(0)
        sample = sorted(rng.choice(kept_new, size=max(verify_sample, 0), replace=False).tolist())
    texts = unique = truncated = 0
    if sample:
        fresh, texts, unique, truncated = plan.rows(encoder, sample, batch_size, hook("verify"))
        if fresh.shape[1] != old.shape[1]:
            raise RunFailed(
                f"reuse refused: {old_path} has {old.shape[1]}-d rows, {encoder.info.path} makes {fresh.shape[1]}-d "
                "rows: the old matrix came from another model",
                hint="drop --reuse to recompute every tag",
            )
        old_rows = np.concatenate([old[old_ids[i] * k : old_ids[i] * k + k] for i in sample])  # type: ignore[operator]
        cos = np.sum(_l2(fresh) * _l2(old_rows), axis=1).reshape(len(sample), k).min(axis=1)
        worst = int(np.argmin(cos))
        verify = VerifyReport(
            checked_tags=len(sample), min_cosine=float(cos[worst]), mean_cosine=float(cos.mean()),
            worst_tag=voc.names[sample[worst]], threshold=min_cosine, all_checked=len(sample) == len(kept_new),
            passed=bool(cos[worst] >= min_cosine),
        )
        if not verify.passed:
            raise RunFailed(
                f"reuse refused: recomputed {len(sample)} reused tags and the old rows of {old_path} do not match "
                f"(min cosine {verify.min_cosine:.4f} for {verify.worst_tag!r}, mean {verify.mean_cosine:.4f}, "
                f"threshold {min_cosine}); kept would be {len(kept_new)}, new {len(new_ids)}, dropped {len(dropped)}",
                hint="the old matrix came from another model, template set, pooling or cleaning; use the settings it "
                "was made with, or drop --reuse to recompute every tag",
            )
    else:
        verify = VerifyReport(0, None, None, None, min_cosine, True, True)
        if kept_new:  # verify_sample == 0
            warnings.append("reuse without a consistency check (--verify-sample 0)")

    rows: np.ndarray | None = None
    if new_ids:
        rows, t2, u2, tr2 = plan.rows(encoder, new_ids, batch_size, hook("embed"))
        texts, unique, truncated = texts + t2, unique + u2, truncated + tr2
        if rows.shape[1] != old.shape[1]:
            raise RunFailed(f"reuse refused: {old_path} has {old.shape[1]}-d rows, the model makes {rows.shape[1]}-d")
    matrix = np.empty((len(voc) * k, old.shape[1]), dtype=np.float32)
    for i in kept_new:
        o = old_ids[i]
        assert o is not None
        matrix[i * k : i * k + k] = old[o * k : o * k + k]
    if rows is not None:
        for pos, i in enumerate(new_ids):
            matrix[i * k : i * k + k] = rows[pos * k : pos * k + k]
    report = ReuseReport(
        old_path=str(old_path), old_vocab=ov.path, kept=len(kept_new), new=len(new_ids), dropped=len(dropped),
        new_tags=tuple(voc.names[i] for i in new_ids), dropped_tags=tuple(dropped), verify=verify,
    )
    return matrix, report, texts, unique, truncated

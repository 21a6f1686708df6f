"""The text stage: render a sample's text into one string and tokenise batches of strings to fixed length.

Text shapes (what :meth:`TextEncoder.render` accepts):

* a plain string;
* a list of captions (RAM, COCO): ``caption="first"`` takes the first, ``"random"`` one chosen per sample
  (deterministic: a hash of ``seed`` and the sample id), ``"all"`` joins every caption, each stripped of
  surrounding whitespace, with ``separator`` (default one space);
* a conversation: LLaVA ``[{"from": "human"|"gpt"|..., "value": str}]`` or OpenAI-style
  ``[{"role": ..., "content": ...}]`` whose content is a string or a list of typed parts
  (``{"type": "text", "text"|"value": str}``, ``{"type": "image"|"image_url", ...}``); a dict holding such a list
  under ``messages`` or ``conversations`` is unwrapped. Typed image parts become the image placeholder at their
  position and the parts are concatenated (the LLaMA-Factory convention, so ``<image>`` counts are preserved).
  Roles ``human`` and ``gpt`` become ``user`` and ``assistant``. The conversation is rendered with the tokenizer's
  chat template (``add_generation_prompt=False``) when it has one; a leading BOS written by the template is dropped
  when the tokenizer adds its own special tokens, so it appears once. Without a chat template the plain layout is
  one line per turn, ``"<role>: <content>"``, joined with ``"\\n"``. Chat templates need ``jinja2``.

Image placeholders: with ``check_placeholders`` on and an image count given, a conversation must hold exactly one
placeholder per image; a plain string or caption is checked only when it holds at least one placeholder (a caption
without any is a plain image caption, as in CLIP-style pairs).

Tokenisation (:meth:`TextEncoder.encode_batch`) runs the whole batch through the fast (Rust) tokenizer once without
truncation, so the true token count is known, then truncates and pads with numpy exactly as
``tokenizer(texts, padding="max_length", truncation=True, max_length=N)`` does: special tokens are kept and the
content is cut on the truncation side.

Tokenizer cache: building an encoder the first time loads the tokenizer with transformers (which imports torch
when it is installed: about a second and a half). What the encoder takes from it (the backend's JSON, the special
tokens, the chat-template flag, ``model_max_length``) is then stored under ``<cache>/tokenizers/<key>.json``, where
``<cache>`` is ``$MMPREP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmprep``, else ``~/.cache/mmprep``, and the key is a
sha256 of the tokenizer directory's files (names and bytes; model weight files by name and size only) and of the
versions of the packages that convert tokenizers. A later encoder for a directory with the same files is built from
that entry without importing transformers, with the same ids and the same recorded values. ``MMPREP_NO_CACHE=1``
turns the cache off; a cache that cannot be written is skipped silently, a corrupt entry is rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError, MissingDependencyError, UsageError

__all__ = [
    "IMAGE_PART_TYPES",
    "MAX_LENGTH_LIMIT",
    "LengthHistogram",
    "TextConfig",
    "TextEncoder",
    "TextError",
    "TokenBatch",
    "count_placeholders",
    "inline_images",
    "sample_image_count",
    "tokenizer_cache_dir",
    "tokenizer_cache_key",
]

#: Typed content-part types that stand for an image.
IMAGE_PART_TYPES: frozenset[str] = frozenset({"image", "image_url"})
_TEXT_PART_TYPES = frozenset({"text"})
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
_PADDING_SIDES = ("right", "left")
_CAPTION_MODES = ("first", "all", "random")
#: The largest ``max_length`` accepted: every row is padded to it, so larger values only exhaust memory.
MAX_LENGTH_LIMIT = 1 << 20


@dataclass(frozen=True)
class TextConfig:
    """How texts are rendered and tokenised.

    Attributes:
        max_length: every row has exactly this many ids (padded or truncated).
        padding_side: ``right`` or ``left``: where pad ids go.
        truncation_side: ``right`` or ``left``: which end of the content is cut (special tokens are kept).
        add_special_tokens: add the tokenizer's special tokens (``[CLS]``/``[SEP]``, BOS/EOS).
        caption: for a list of captions: ``first``, ``all`` (joined with ``separator``) or ``random``.
        seed: seed for ``caption="random"``; the choice is a hash of the seed and the sample id.
        separator: joins captions for ``caption="all"`` (each caption is stripped first).
        pad_token: the pad token to use (must exist in the vocabulary); needed or defaulted for tokenizers without
            one (GPT-2), where the fallback is the EOS token, with a warning.
        image_placeholder: the image placeholder string (``<image>``).
        check_placeholders: require one placeholder per image (see the module docs for when this applies).
    """

    max_length: int = 77
    padding_side: str = "right"
    truncation_side: str = "right"
    add_special_tokens: bool = True
    caption: str = "first"
    seed: int = 0
    separator: str = " "
    pad_token: str | None = None
    image_placeholder: str = "<image>"
    check_placeholders: bool = True

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad value."""
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise UsageError(f"--max-length must be a positive integer, got {self.max_length!r}")
        if self.max_length > MAX_LENGTH_LIMIT:
            raise UsageError(
                f"--max-length {self.max_length:,} is above the limit of {MAX_LENGTH_LIMIT:,} ids per row",
                hint="every row is padded to --max-length: use the length the model takes (the length report of "
                "mmprep tokenize shows the smallest one that covers 99% of rows)",
            )
        if self.padding_side not in _PADDING_SIDES:
            raise UsageError(f"--padding-side must be right or left, got {self.padding_side!r}")
        if self.truncation_side not in _PADDING_SIDES:
            raise UsageError(f"--truncation-side must be right or left, got {self.truncation_side!r}")
        if self.caption not in _CAPTION_MODES:
            raise UsageError(f"--caption must be one of first, all, random, got {self.caption!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        if not isinstance(self.separator, str):
            raise UsageError(f"the caption separator must be a string, got {self.separator!r}")
        if self.pad_token is not None and (not isinstance(self.pad_token, str) or not self.pad_token):
            raise UsageError(f"--pad-token must be a non-empty token, got {self.pad_token!r}")
        if not isinstance(self.image_placeholder, str) or not self.image_placeholder:
            raise UsageError(f"the image placeholder must be a non-empty string, got {self.image_placeholder!r}")


class TextError(Exception):
    """A per-sample text problem: ``reason`` is a short code, ``detail`` a sentence.

    Reasons: ``text_missing``, ``text_empty``, ``text_bad_type``, ``placeholder_mismatch``, ``chat_template_error``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (TextError, (self.reason, self.detail))


@dataclass(frozen=True)
class TokenBatch:
    """Fixed-length token ids for a batch of texts.

    Attributes:
        input_ids: int32 ``[N, max_length]``.
        attention_mask: uint8 ``[N, max_length]``, 1 on real tokens, 0 on padding.
        n_tokens: int32 ``[N]``, the true token count before truncation (with special tokens when added).
        truncated: bool ``[N]``, ``n_tokens > max_length``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return int(self.n_tokens.shape[0])


# -- text shapes ------------------------------------------------------------------------------------------


def _unwrap(text: object) -> object:
    if isinstance(text, dict):
        for key in ("messages", "conversations"):
            if isinstance(text.get(key), list):
                return text[key]
    return text


def _typename(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _walk_parts(value: object) -> Iterator[dict[str, Any]]:
    """Every typed content part (a dict with a ``type``) inside a text value."""
    if isinstance(value, dict):
        if isinstance(value.get("type"), str):
            yield value
        else:
            for key in ("messages", "conversations", "content", "value"):
                if key in value:
                    yield from _walk_parts(value[key])
    elif isinstance(value, list):
        for item in value:
            yield from _walk_parts(item)


def count_placeholders(text: object, placeholder: str = "<image>") -> int:
    """Count image placeholders in any text shape.

    Counts every occurrence of ``placeholder`` in every string (plain text, each caption of a list, each turn's
    content or text part) plus one per typed image part (``{"type": "image"|"image_url"}``). Values that are not
    text count 0; this function never raises.
    """
    if isinstance(text, str):
        return text.count(placeholder)
    if isinstance(text, list):
        return sum(count_placeholders(item, placeholder) for item in text)
    if isinstance(text, dict):
        kind = text.get("type")
        if isinstance(kind, str):
            if kind in IMAGE_PART_TYPES:
                return 1
            return sum(count_placeholders(text.get(k), placeholder) for k in ("text", "value"))
        return sum(
            count_placeholders(text[k], placeholder)
            for k in ("messages", "conversations", "content", "value")
            if k in text
        )
    return 0


def _part_ref(part: dict[str, Any]) -> str | None:
    for key in ("value", "image", "image_url", "url", "path"):
        ref = part.get(key)
        if isinstance(ref, dict):
            ref = ref.get("url") or ref.get("path")
        if isinstance(ref, str) and ref:
            return ref
    return None


def inline_images(text: object) -> list[str]:
    """Image references carried by typed image parts (LLaMA-Factory v1 ``{"type": "image_url", "value": path}``)."""
    refs = []
    for part in _walk_parts(text):
        if part.get("type") in IMAGE_PART_TYPES:
            ref = _part_ref(part)
            if ref is not None:
                refs.append(ref)
    return refs


def sample_image_count(sample: Any) -> int:
    """The number of images a sample has: its images column, else the references in typed image parts."""
    if sample.images:
        return len(sample.images)
    return len(inline_images(sample.text))


def _turns(messages: list[Any], placeholder: str) -> list[tuple[str, str]]:
    """Normalise a conversation to ``(role, content)`` strings; raises TextError."""
    turns: list[tuple[str, str]] = []
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise TextError("text_bad_type", f"conversation turn {i} is {_typename(msg)}, expected an object")
        if "role" in msg or "content" in msg:
            role, content = msg.get("role"), msg.get("content")
        elif "from" in msg or "value" in msg:
            role, content = msg.get("from"), msg.get("value")
        else:
            raise TextError(
                "text_bad_type", f"conversation turn {i} has neither role/content nor from/value (keys: {sorted(msg)})"
            )
        if not isinstance(role, str) or not role:
            raise TextError("text_bad_type", f"conversation turn {i} has no role")
        if isinstance(content, list):
            content = _join_parts(content, i, placeholder)
        elif not isinstance(content, str):
            raise TextError("text_bad_type", f"conversation turn {i} content is {_typename(content)}")
        turns.append((_ROLE_ALIASES.get(role, role), content))
    return turns


def _join_parts(parts: list[Any], turn: int, placeholder: str) -> str:
    pieces: list[str] = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PART_TYPES:
            pieces.append(placeholder)
        elif kind in _TEXT_PART_TYPES:
            value = part.get("text") if part.get("text") is not None else part.get("value")
            if not isinstance(value, str):
                raise TextError("text_bad_type", f"conversation turn {turn}: a text part holds {_typename(value)}")
            pieces.append(value)
        else:
            raise TextError(
                "text_bad_type",
                f"conversation turn {turn}: unsupported content part {kind!r:.40}"
                + ("" if isinstance(part, dict) else f" ({_typename(part)})"),
            )
    return "".join(pieces)


def _pick_index(seed: int, sample_id: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


# -- the encoder ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging and warnings while loading (library code never prints)."""
    # transformers prints an advisory at import when torch is absent (tokenizers need no torch).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _load_hf_tokenizer(path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise MissingDependencyError("transformers", "text", purpose="tokenisation") from None
    hint = (
        "the directory must hold a tokenizer saved by save_pretrained(): tokenizer.json or vocab files "
        "(vocab.txt, vocab.json + merges.txt, tokenizer.model) plus tokenizer_config.json"
    )
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable directories
        _raise_if_needs_sentencepiece(path)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load a tokenizer: {msg:.300}", hint=hint) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise InputError(
            f"{path}: only a slow (Python) tokenizer could be loaded ({type(tok).__name__})",
            hint="mmprep needs a fast tokenizer: save one with tokenizer.save_pretrained() from a fast tokenizer "
            "(writes tokenizer.json), or install sentencepiece/protobuf so it can be converted",
        )
    return tok


_SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _raise_if_needs_sentencepiece(path: Path) -> None:
    """A SentencePiece-only directory without the ``sentencepiece`` package: say so (transformers' own message
    then names an unrelated package, ``tiktoken``)."""
    if (path / "tokenizer.json").is_file() or importlib.util.find_spec("sentencepiece") is not None:
        return
    model = next((name for name in _SENTENCEPIECE_FILES if (path / name).is_file()), None)
    if model is not None:
        raise InputError(
            f"{path}: cannot load a tokenizer: it holds a SentencePiece model ({model}) but no tokenizer.json, and "
            "converting one needs the 'sentencepiece' package, which is not installed",
            hint="install it with: pip install sentencepiece protobuf; or save the tokenizer with save_pretrained() "
            "from a fast tokenizer where sentencepiece is installed, which writes tokenizer.json",
        )


# -- the tokenizer cache ----------------------------------------------------------------------------------

_CACHE_FORMAT = 1
#: Packages whose versions decide how a tokenizer directory is converted to a fast tokenizer.
_CACHE_KEY_PACKAGES = ("tokenizers", "transformers", "sentencepiece", "protobuf", "tiktoken")
#: Model weights (never read by a tokenizer) enter the key by name and size, so a model directory stays cheap.
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"})
#: The subdirectory transformers reads extra chat templates from.
_CHAT_TEMPLATE_SUBDIR = "additional_chat_templates"


@dataclass(frozen=True)
class _TokenizerInfo:
    """What :class:`TextEncoder` takes from a transformers tokenizer: the content of a cache entry.

    ``name_or_path`` is not part of it: transformers sets it to the directory as passed, which the encoder knows.
    """

    backend: str  # the fast tokenizer's JSON (``backend_tokenizer.to_str()``)
    pad_token: str | None
    pad_token_id: int | None
    eos_token: str | None
    bos_token: str | None
    has_chat_template: bool
    model_max_length: int | None

    @classmethod
    def from_hf(cls, hf: Any) -> _TokenizerInfo:
        def token(name: str) -> str | None:
            value = getattr(hf, name, None)
            return None if value is None else str(value)

        pad_id = getattr(hf, "pad_token_id", None)
        model_max = getattr(hf, "model_max_length", None)
        return cls(
            backend=hf.backend_tokenizer.to_str(),
            pad_token=token("pad_token"),
            pad_token_id=None if pad_id is None else int(pad_id),
            eos_token=token("eos_token"),
            bos_token=token("bos_token"),
            has_chat_template=bool(getattr(hf, "chat_template", None)),
            model_max_length=model_max if isinstance(model_max, int) and not isinstance(model_max, bool) else None,
        )

    def to_json(self) -> bytes:
        return json.dumps({"format": _CACHE_FORMAT, **self.__dict__}, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _TokenizerInfo | None:
        """The entry's content, or None when it is not a complete entry of this format."""
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        types: dict[str, tuple[type, ...]] = {
            "backend": (str,), "pad_token": (str, type(None)), "pad_token_id": (int, type(None)),
            "eos_token": (str, type(None)), "bos_token": (str, type(None)), "has_chat_template": (bool,),
            "model_max_length": (int, type(None)),
        }
        if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT or set(obj) != {"format", *types}:
            return None
        for name, allowed in types.items():
            value = obj[name]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                return None
        del obj["format"]
        return cls(**obj)


def tokenizer_cache_dir() -> Path | None:
    """Where converted tokenizers are cached, or None when ``MMPREP_NO_CACHE`` is set (to anything but 0)."""
    if os.environ.get("MMPREP_NO_CACHE", "") not in ("", "0"):
        return None
    base = os.environ.get("MMPREP_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        try:
            base = str(Path(xdg) / "mmprep") if xdg else str(Path.home() / ".cache" / "mmprep")
        except RuntimeError:  # no home directory
            return None
    return Path(base) / "tokenizers"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def tokenizer_cache_key(path: str | os.PathLike[str]) -> str:
    """The cache key of a tokenizer directory: sha256 of the cache format, the converting packages' versions and
    the directory's files (regular files directly in it and in ``additional_chat_templates/``: name and bytes,
    model weights by name and size; other entries by name), in sorted order.

    Raises:
        OSError: the directory or one of its files cannot be read.
    """
    root = Path(path)
    h = hashlib.sha256(f"mmprep tokenizer cache {_CACHE_FORMAT}\n".encode())
    for pkg in _CACHE_KEY_PACKAGES:
        h.update(f"{pkg}={_package_version(pkg)}\n".encode())
    names = sorted(os.listdir(root))
    if _CHAT_TEMPLATE_SUBDIR in names and (root / _CHAT_TEMPLATE_SUBDIR).is_dir():
        names += sorted(f"{_CHAT_TEMPLATE_SUBDIR}/{n}" for n in os.listdir(root / _CHAT_TEMPLATE_SUBDIR))
    for name in names:
        file = root / name
        label = json.dumps(name)  # quoted: names cannot run into each other
        if not file.is_file():  # follows symlinks (the Hugging Face cache links snapshot files to blobs)
            h.update(f"entry {label}\n".encode())
            continue
        size = file.stat().st_size
        if file.suffix.lower() in _WEIGHT_SUFFIXES:
            h.update(f"weights {label} {size}\n".encode())
            continue
        h.update(f"file {label} {size}\n".encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _load_tokenizer(path: Path) -> tuple[_TokenizerInfo, Any, Any | None]:
    """The tokenizer facts, a fresh backend built from them, and the transformers tokenizer when it was loaded.

    A cache hit loads nothing but the backend; a miss loads with transformers and writes the entry (best effort).
    """
    from tokenizers import Tokenizer

    cache = tokenizer_cache_dir()
    entry: Path | None = None
    cached: _TokenizerInfo | None = None
    if cache is not None:
        try:
            entry = cache / f"{tokenizer_cache_key(path)}.json"
            cached = _TokenizerInfo.from_json(entry.read_bytes())
        except OSError:  # no entry yet, or an unreadable one or directory: a miss
            cached = None
    if cached is not None:
        # tokenizers raises a plain Exception on JSON it cannot read: a corrupt entry is a miss, rewritten below.
        with contextlib.suppress(Exception):
            return cached, Tokenizer.from_str(cached.backend), None
    hf = _load_hf_tokenizer(path)
    info = _TokenizerInfo.from_hf(hf)
    # The entry holds no path: write it only when transformers named the tokenizer after the directory as given.
    if entry is not None and str(getattr(hf, "name_or_path", "") or path) == str(path):
        from mmprep.errors import RunFailed
        from mmprep.runtime.files import atomic_write as atomic_write_bytes

        with contextlib.suppress(OSError, RunFailed):  # a cache that cannot be written is no error
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(entry, info.to_json())
    return info, Tokenizer.from_str(info.backend), hf


def _special_layout(backend: Any) -> tuple[int, int]:
    """How many special tokens the post-processor puts before and after a single sequence."""
    total = backend.num_special_tokens_to_add(False)
    if total == 0:
        return 0, 0
    for probe in ("a", "hello", "0", "x y", "。"):
        bare = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        if not bare or len(full) != len(bare) + total:
            continue
        for start in range(total + 1):
            if full[start : start + len(bare)] == bare:
                return start, total - start
    raise InputError(
        "the tokenizer's post-processor does not put special tokens around the text as a prefix and suffix",
        hint="pass --no-special-tokens, or use a tokenizer with a standard post-processor",
    )


class TextEncoder:
    """Render texts and tokenise batches with one tokenizer loaded from a local directory.

    Construction loads the tokenizer once (``AutoTokenizer``, fast tokenizers only, or its entry in the tokenizer
    cache: see the module docs) and keeps a private copy of its Rust backend with padding and truncation switched
    off. Instances pickle as that backend's JSON plus a few settings, so a worker process re-creates one in
    milliseconds without importing transformers (the transformers tokenizer is loaded lazily only to apply a chat
    template).

    Attributes:
        cfg: the text configuration.
        tokenizer_dir: where the tokenizer was loaded from.
        name_or_path: the tokenizer's ``name_or_path``.
        vocab_size: number of ids including added tokens (every id is below it).
        pad_token: the pad token used; ``pad_token_id`` its id.
        has_chat_template: conversations are rendered with the tokenizer's chat template.
        special_prefix, special_suffix: special tokens added before/after the text (0 with special tokens off).
        warnings: notes for the user (pad token fallback, max length above the model's).

    Raises:
        InputError: the directory is missing or holds no loadable fast tokenizer.
        UsageError: a bad config, a ``pad_token`` not in the vocabulary, no pad token and no EOS to fall back on,
            or a max length that leaves no room between the special tokens.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike[str], cfg: TextConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        path = Path(tokenizer_dir)
        if not path.exists():
            raise InputError(f"{path}: no such tokenizer directory", hint="pass a local directory (no hub downloads)")
        if not path.is_dir():
            raise InputError(f"{path}: is not a directory", hint="pass the directory that holds the tokenizer files")
        self.tokenizer_dir = str(path)
        info, backend, hf = _load_tokenizer(path)
        self._hf: Any | None = hf
        backend.no_padding()
        backend.no_truncation()
        self._backend: Any = backend
        # transformers names the tokenizer after the directory as passed; a cache hit knows no other name.
        self.name_or_path = str(getattr(hf, "name_or_path", "") or path) if hf is not None else str(path)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.has_chat_template = info.has_chat_template
        self.warnings: tuple[str, ...] = ()
        notes: list[str] = []

        self.pad_token, self.pad_token_id = self._resolve_pad(info, backend, notes)
        if cfg.add_special_tokens:
            self.special_prefix, self.special_suffix = _special_layout(backend)
        else:
            self.special_prefix, self.special_suffix = 0, 0
        n_special = self.special_prefix + self.special_suffix
        if cfg.max_length <= n_special:
            raise UsageError(
                f"--max-length {cfg.max_length} leaves no room for text: the tokenizer adds {n_special} special tokens",
                hint=f"use --max-length {n_special + 1} or more, or --no-special-tokens",
            )
        model_max = info.model_max_length
        if model_max is not None and 0 < model_max < 1_000_000 and cfg.max_length > model_max:
            notes.append(
                f"--max-length {cfg.max_length} is above this tokenizer's model_max_length {model_max}: "
                "the model may not accept rows that long"
            )
        self._strip_bos = self._template_bos(info, backend)
        self.warnings = tuple(notes)

    # -- construction helpers ---------------------------------------------------------------------------
    def _resolve_pad(self, info: _TokenizerInfo, backend: Any, notes: list[str]) -> tuple[str, int]:
        wanted = self.cfg.pad_token
        if wanted is not None:
            pid = backend.token_to_id(wanted)
            if pid is None:
                raise UsageError(
                    f"--pad-token {wanted!r} is not a token of the tokenizer in {self.tokenizer_dir}",
                    hint="choose an existing token"
                    + (f", e.g. the EOS token {info.eos_token!r}" if info.eos_token else ""),
                )
            return wanted, int(pid)
        if info.pad_token is not None and info.pad_token_id is not None:
            return info.pad_token, info.pad_token_id
        eos = info.eos_token
        if eos is not None and backend.token_to_id(eos) is not None:
            pid = int(backend.token_to_id(eos))
            notes.append(
                f"the tokenizer has no pad token: padding with the EOS token {eos!r} (id {pid}); padded positions "
                "have attention_mask 0. Pass --pad-token to choose another"
            )
            return eos, pid
        raise UsageError(
            f"the tokenizer in {self.tokenizer_dir} has no pad token and no EOS token to pad with",
            hint="pass --pad-token TOKEN with a token of its vocabulary",
        )

    def _template_bos(self, info: _TokenizerInfo, backend: Any) -> str | None:
        """The BOS text to drop from chat-templated output (the tokenizer adds it itself), or None."""
        bos = info.bos_token
        if not self.has_chat_template or not self.cfg.add_special_tokens or not bos:
            return None
        bos_id = backend.token_to_id(bos)
        if bos_id is None or self.special_prefix == 0:
            return None
        first = backend.encode("a", add_special_tokens=True).ids[:1]
        return bos if first == [bos_id] else None

    # -- pickling: the backend JSON, not the transformers object ---------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_backend"] = self._backend.to_str()
        state["_hf"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        state = dict(state)
        backend = Tokenizer.from_str(state["_backend"])
        backend.no_padding()
        backend.no_truncation()
        state["_backend"] = backend
        self.__dict__.update(state)

    def _hf_tokenizer(self) -> Any:
        if self._hf is None:
            self._hf = _load_hf_tokenizer(Path(self.tokenizer_dir))
        return self._hf

    # -- rendering --------------------------------------------------------------------------------------
    def render(self, text: object, *, sample_id: str = "", image_count: int | None = None) -> str:
        """Turn one sample's text (any supported shape) into the string that is tokenised.

        Args:
            text: a string, a list of captions, or a conversation (see the module docs).
            sample_id: used to pick a caption for ``caption="random"``.
            image_count: the sample's number of images; when given (and ``check_placeholders``), placeholders
                are checked against it.

        Raises:
            TextError: ``text_missing``, ``text_empty``, ``text_bad_type``, ``placeholder_mismatch`` or
                ``chat_template_error``.
            UsageError: a conversation needs the chat template and ``jinja2`` is not installed.
        """
        cfg = self.cfg
        ph = cfg.image_placeholder
        text = _unwrap(text)
        if text is None:
            raise TextError("text_missing", "the sample has no text")
        if isinstance(text, str):
            rendered, conversation, count = text, False, text.count(ph)
            if not text.strip():
                raise TextError("text_empty", "the text is empty")
        elif isinstance(text, list):
            if not text:
                raise TextError("text_empty", "the text is an empty list")
            if all(isinstance(t, str) for t in text):
                rendered = self._pick_caption(text, sample_id)
                conversation, count = False, rendered.count(ph)
                if not rendered.strip():
                    raise TextError("text_empty", "the chosen caption is empty")
            else:
                turns = _turns(text, ph)
                conversation = True
                count = sum(c.count(ph) for _, c in turns)
                if not any(c.strip() for _, c in turns):
                    raise TextError("text_empty", "every turn of the conversation is empty")
                rendered = self._render_turns(turns)
        else:
            raise TextError(
                "text_bad_type", f"the text is {_typename(text)}; expected a string, captions or a conversation"
            )
        if cfg.check_placeholders and image_count is not None and (conversation or count > 0) and count != image_count:
            raise TextError(
                "placeholder_mismatch",
                f"{count} {ph} placeholder{'s' if count != 1 else ''} but {image_count} "
                f"image{'s' if image_count != 1 else ''}",
            )
        return rendered

    def _pick_caption(self, captions: list[str], sample_id: str) -> str:
        mode = self.cfg.caption
        if mode == "first":
            return captions[0]
        if mode == "random":
            return captions[_pick_index(self.cfg.seed, sample_id, len(captions))]
        return self.cfg.separator.join(c.strip() for c in captions if c.strip())

    def _render_turns(self, turns: list[tuple[str, str]]) -> str:
        if not self.has_chat_template:
            return "\n".join(f"{role}: {content}" for role, content in turns)
        try:
            import jinja2  # noqa: F401  (transformers renders chat templates with it but does not require it)
        except ImportError:
            raise UsageError(
                f"rendering conversations with the chat template of {self.tokenizer_dir} needs the 'jinja2' "
                "package, which is not installed",
                hint="install it with: pip install jinja2",
            ) from None
        hf = self._hf_tokenizer()
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception as exc:  # jinja2 TemplateError (raise_exception in the template), TypeError, ...
            raise TextError("chat_template_error", f"the chat template failed: {exc}") from None
        if not isinstance(out, str):  # pragma: no cover - tokenize=False returns str
            raise TextError("chat_template_error", f"the chat template returned {_typename(out)}")
        if self._strip_bos and out.startswith(self._strip_bos):
            out = out[len(self._strip_bos) :]
        return out

    # -- tokenising -------------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenise a batch in one call to the fast tokenizer, then truncate and pad to ``max_length``.

        Ids equal ``tokenizer(texts, padding="max_length", truncation=True, max_length=L)`` with the configured
        sides; ``n_tokens`` is the count before truncation.
        """
        cfg = self.cfg
        L = cfg.max_length
        n_rows = len(texts)
        if n_rows == 0:
            return TokenBatch(
                np.zeros((0, L), np.int32), np.zeros((0, L), np.uint8), np.zeros(0, np.int32), np.zeros(0, bool)
            )
        texts = texts if isinstance(texts, list) else list(texts)
        encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        encs = encode(texts, add_special_tokens=cfg.add_special_tokens)
        ids = [e.ids for e in encs]
        n = np.fromiter(map(len, ids), dtype=np.int64, count=n_rows)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(n.sum()))
        starts = np.cumsum(n) - n
        m = np.minimum(n, L)  # tokens kept per row
        truncated = n > L
        rows = np.repeat(np.arange(n_rows), m)
        j = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)  # output position within the kept tokens
        # Kept positions before `cut` come from the start of the row, the rest from its end (specials kept).
        cut = L - self.special_suffix if cfg.truncation_side == "right" else self.special_prefix
        shift = np.where(truncated[rows] & (j >= cut), n[rows] - L, 0)
        values = flat[starts[rows] + j + shift]
        cols = j if cfg.padding_side == "right" else j + np.repeat(L - m, m)
        input_ids = np.full((n_rows, L), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((n_rows, L), dtype=np.uint8)
        input_ids[rows, cols] = values
        attention_mask[rows, cols] = 1
        return TokenBatch(input_ids, attention_mask, n.astype(np.int32), truncated)


# -- length report ----------------------------------------------------------------------------------------


class LengthHistogram:
    """Exact token-count histogram (memory grows with the longest row, not with the number of rows)."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, n_tokens: np.ndarray) -> None:
        """Add a batch of token counts."""
        if len(n_tokens) == 0:
            return
        binc = np.bincount(np.asarray(n_tokens, dtype=np.int64))
        if len(binc) > len(self.counts):
            binc[: len(self.counts)] += self.counts
            self.counts = binc
        else:
            self.counts[: len(binc)] += binc

    def quantile(self, q: float) -> int | None:
        """Nearest-rank quantile: the smallest count ``v`` with at least a fraction ``q`` of rows ``<= v``."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, int(np.ceil(q * total - 1e-9)))
        return int(np.searchsorted(np.cumsum(self.counts), rank))

    def over(self, max_length: int) -> int:
        """Rows with more than ``max_length`` tokens."""
        return int(self.counts[max_length + 1 :].sum())

    def summary(self, max_length: int) -> dict[str, Any]:
        """p50/p90/p99/max, mean, truncated rows and percent at ``max_length``, the max length covering 99%."""
        total = self.total
        mean = float((self.counts * np.arange(len(self.counts))).sum() / total) if total else None
        truncated = self.over(max_length)
        return {
            "rows": total,
            "p50": self.quantile(0.50),
            "p90": self.quantile(0.90),
            "p99": self.quantile(0.99),
            "max": int(np.flatnonzero(self.counts)[-1]) if total else None,
            "mean": mean,
            "max_length": max_length,
            "truncated": truncated,
            "truncated_pct": 100.0 * truncated / total if total else 0.0,
            "covers_99_pct": self.quantile(0.99),
        }

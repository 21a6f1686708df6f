"""Loading a tokenizer directory: through the content-keyed tokenizer cache, else with transformers.

Building an encoder the first time loads the tokenizer with transformers (which imports torch when it is
installed: about a second and a half). What the encoder takes from it (:class:`TokenizerInfo`: the backend's JSON,
the special tokens, the chat-template flag, ``model_max_length``) is then stored under
``<cache>/tokenizers/<key>.json``, where ``<cache>`` is ``$MMPREP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmprep``,
else ``~/.cache/mmprep``, and the key is a sha256 of the tokenizer directory's files (names and bytes; model weight
files by name and size only) and of the versions of the packages that convert tokenizers. A later load of a
directory with the same files is built from that entry without importing transformers, with the same ids and the
same recorded values. ``MMPREP_NO_CACHE=1`` turns the cache off; a cache that cannot be written is skipped
silently, a corrupt entry is rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.cachedir import cache_root
from mmprep.errors import InputError, MissingDependencyError, RunFailed, UsageError
from mmprep.runtime.files import atomic_write
from mmprep.text.hf import custom_code_error, quiet_transformers

__all__ = [
    "LoadedTokenizer",
    "TokenizerInfo",
    "describe_tokenizer_folder",
    "load_hf_tokenizer",
    "load_tokenizer",
    "tokenizer_cache_dir",
    "tokenizer_cache_key",
]


def load_hf_tokenizer(path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise MissingDependencyError("transformers", "text", purpose="tokenisation") from None
    hint = (
        "the directory must hold a tokenizer saved by save_pretrained(): tokenizer.json or vocab files "
        "(vocab.txt, vocab.json + merges.txt, tokenizer.model) plus tokenizer_config.json"
    )
    try:
        with quiet_transformers():
            # trust_remote_code=False: never run a folder's own code, and never let transformers prompt for it
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True,
                                                trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable directories
        custom = custom_code_error(path, "tokenizer")
        if custom is not None:
            raise custom from None
        _raise_if_needs_sentencepiece(path)
        missing = describe_tokenizer_folder(path)
        if missing is not None:
            raise InputError(f"{path}: cannot load a tokenizer: {missing}", hint=hint) from None
        raise InputError(f"{path}: cannot load a tokenizer: {_one_line(exc)}", hint=hint) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise InputError(
            f"{path}: only a slow (Python) tokenizer could be loaded ({type(tok).__name__})",
            hint="mmprep needs a fast tokenizer: save one with tokenizer.save_pretrained() from a fast tokenizer "
            "(writes tokenizer.json), or install sentencepiece/protobuf so it can be converted",
        )
    return tok


#: Files that hold a tokenizer's vocabulary, each with the files it needs beside it.
_VOCAB_FILES = {"tokenizer.json": (), "vocab.txt": (), "vocab.json": ("merges.txt",), "merges.txt": ("vocab.json",),
                "tokenizer.model": (), "spiece.model": (), "sentencepiece.bpe.model": (), "tekken.json": ()}


def describe_tokenizer_folder(path: Path, shown: int = 6) -> str | None:
    """What a tokenizer folder lacks, as the end of a sentence (``the folder is empty``, ``it holds a, b but no
    tokenizer.json and no vocabulary files (...)``), or None when its files look complete."""
    try:
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        return f"the folder cannot be listed ({exc.strerror or exc})"
    if not names:
        return ("the folder is empty: it needs tokenizer.json, or vocabulary files (vocab.txt, vocab.json with "
                "merges.txt, or tokenizer.model) with tokenizer_config.json")
    held = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    present = set(names)
    for name, partners in _VOCAB_FILES.items():
        lacking = [p for p in partners if p not in present]
        if name in present and lacking:
            return f"the folder holds {held} but not {' or '.join(lacking)}, which {name} needs beside it"
    if not present & set(_VOCAB_FILES):
        return (f"the folder holds {held} but no tokenizer.json and no vocabulary files (vocab.txt, vocab.json with "
                "merges.txt, or tokenizer.model)")
    if "tokenizer.json" not in present and not present & {"tokenizer_config.json", "config.json"}:
        return (f"the folder holds {held} but no tokenizer_config.json, which names the tokenizer class for its "
                "vocabulary files")
    return None


def _check_vocabulary(path: Path, backend: Any) -> None:
    """Refuse a tokenizer whose vocabulary holds special tokens only: transformers builds one from
    tokenizer_config.json alone, and every word would become the unknown token."""
    vocab = set(backend.get_vocab(with_added_tokens=False))
    added = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    if vocab - added:
        return
    missing = describe_tokenizer_folder(path) or "its files hold no vocabulary"
    raise InputError(f"{path}: cannot load a tokenizer: {missing}; the tokenizer built from it knows only its "
                     f"{len(vocab | added)} special token(s)",
                     hint="point --tokenizer at the folder save_pretrained() wrote, with its vocabulary files")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' span several), cut at a word with an ellipsis."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


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
class TokenizerInfo:
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
    def from_hf(cls, hf: Any) -> TokenizerInfo:
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
    def from_json(cls, data: bytes) -> TokenizerInfo | None:
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
    root = cache_root()
    return None if root is None else root / "tokenizers"


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


@dataclass(frozen=True)
class LoadedTokenizer:
    """A loaded tokenizer: its facts, a fresh Rust backend built from them, and the transformers tokenizer when
    it was loaded (None on a cache hit).

    ``name_or_path`` is the tokenizer's name: transformers' ``name_or_path`` when it was loaded, else the
    directory as given (a cache hit knows no other name).
    """

    info: TokenizerInfo
    backend: Any  # tokenizers.Tokenizer
    hf: Any | None  # transformers.PreTrainedTokenizerFast
    name_or_path: str


def load_tokenizer(path: Path) -> LoadedTokenizer:
    """Load the tokenizer in ``path``, from its cache entry when there is a valid one.

    A cache hit loads nothing but the backend; a miss loads with transformers and writes the entry (best effort).

    Raises:
        InputError: the directory holds no loadable fast tokenizer.
    """
    from tokenizers import Tokenizer

    cache = tokenizer_cache_dir()
    entry: Path | None = None
    cached: TokenizerInfo | None = None
    if cache is not None:
        try:
            entry = cache / f"{tokenizer_cache_key(path)}.json"
            cached = TokenizerInfo.from_json(entry.read_bytes())
        except OSError:  # no entry yet, or an unreadable one or directory: a miss
            cached = None
    if cached is not None:
        # tokenizers raises a plain Exception on JSON it cannot read: a corrupt entry is a miss, rewritten below.
        backend = None
        with contextlib.suppress(Exception):
            backend = Tokenizer.from_str(cached.backend)
        if backend is not None:
            _check_vocabulary(path, backend)
            return LoadedTokenizer(cached, backend, None, str(path))
    hf = load_hf_tokenizer(path)
    _check_vocabulary(path, hf.backend_tokenizer)
    info = TokenizerInfo.from_hf(hf)
    # transformers names the tokenizer after the directory as passed.
    name = str(getattr(hf, "name_or_path", "") or path)
    # The entry holds no path: write it only when transformers named the tokenizer after the directory as given.
    if entry is not None and name == str(path):
        # a cache that cannot be written (or a link where the entry goes) is no error
        with contextlib.suppress(OSError, RunFailed, UsageError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, info.to_json())
    return LoadedTokenizer(info, Tokenizer.from_str(info.backend), hf, name)

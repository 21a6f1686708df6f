"""The text stage: render a sample's text into one string and tokenise batches of strings to fixed length.

Text shapes (what :meth:`TextEncoder.render` accepts; the rendering itself is :mod:`mmprep.text.render`):

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

Tokenizers are loaded through the content-keyed tokenizer cache (:mod:`mmprep.text.cache`): a directory whose
files were seen before is built from its cache entry without importing transformers.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmprep.errors import InputError, UsageError
from mmprep.text.bounded import TemplateTimeout, TemplateTooLarge, run_bounded
from mmprep.text.cache import TokenizerInfo, load_hf_tokenizer, load_tokenizer
from mmprep.text.config import TextConfig, TextError, TokenBatch
from mmprep.text.render import (
    Turn,
    plain_turns,
    render_text,
    typename,
)

__all__ = ["TEMPLATE_SECONDS", "TextEncoder"]

#: How long one row's chat template may run (real templates take well under a millisecond).
TEMPLATE_SECONDS = 5.0


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
        loaded = load_tokenizer(path)
        info, backend = loaded.info, loaded.backend
        self._hf: Any | None = loaded.hf
        self._template: Any = False  # the compiled chat template, found on first use (None: not found)
        backend.no_padding()
        backend.no_truncation()
        self._backend: Any = backend
        self.name_or_path = loaded.name_or_path
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
    def _resolve_pad(self, info: TokenizerInfo, backend: Any, notes: list[str]) -> tuple[str, int]:
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

    def _template_bos(self, info: TokenizerInfo, backend: Any) -> str | None:
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
        state["_template"] = False
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
            self._hf = load_hf_tokenizer(Path(self.tokenizer_dir))
        return self._hf

    def _compiled_template(self) -> Any:
        """The ``jinja2.Template`` transformers renders the chat template with (its compile cache hands out the same
        object), so that :func:`~mmprep.text.bounded.run_bounded` can bound it cheaply; None when this
        transformers keeps it elsewhere (the bounds then hold all the same, more slowly)."""
        if self._template is False:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._template = _compile_jinja_template(self._hf_tokenizer().get_chat_template())
            except Exception:  # another transformers: the trace-based bounds apply
                self._template = None
        return self._template

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
        return render_text(text, self.cfg, sample_id=sample_id, image_count=image_count,
                           render_turns=self._render_turns)

    def _render_turns(self, turns: list[Turn]) -> str:
        if not self.has_chat_template:
            return plain_turns(turns)
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
        limit = self.cfg.max_text_bytes

        def render() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

        try:
            # UTF-8 takes at least a byte a character: more characters than the cap allows bytes is over it
            out = run_bounded(render, max_chars=limit, seconds=TEMPLATE_SECONDS, template=self._compiled_template())
        except TemplateTooLarge:
            raise TextError("text_too_large", f"the chat template rendered more than {limit:,} characters (stopped "
                            f"there), above --max-text-bytes {limit:,}") from None
        except TemplateTimeout:
            raise TextError("chat_template_timeout", f"the chat template ran longer than {TEMPLATE_SECONDS:g} s "
                            "(stopped there: a loop that does not end?)") from None
        except Exception as exc:  # jinja2 TemplateError (raise_exception in the template), TypeError, ...
            raise TextError("chat_template_error", f"the chat template failed: {exc}") from None
        if not isinstance(out, str):  # pragma: no cover - tokenize=False returns str
            raise TextError("chat_template_error", f"the chat template returned {typename(out)}")
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

"""Text settings and the values the text stage hands on: :class:`TextConfig`, :class:`TextError`, :class:`TokenBatch`.

Nothing heavy is imported here (numpy only for type checking), so commands can build a config cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmprep.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_MAX_TEXT_BYTES", "MAX_LENGTH_LIMIT", "MAX_TEXT_BYTES_LIMIT", "TextConfig", "TextError", "TokenBatch",
]

_PADDING_SIDES = ("right", "left")
_CAPTION_MODES = ("first", "all", "random")
#: The largest ``max_length`` accepted: every row is padded to it, so larger values only exhaust memory.
MAX_LENGTH_LIMIT = 1 << 20
#: The default cap on one row's text, before it is tokenised: far above any caption or conversation (1 MiB is some
#: 250,000 tokens), far below what hurts (a 100 MB text takes minutes and gigabytes to tokenise).
DEFAULT_MAX_TEXT_BYTES = 1 << 20
#: The largest ``max_text_bytes`` accepted (one Arrow string value holds at most 2 GiB).
MAX_TEXT_BYTES_LIMIT = 1 << 30


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
        max_text_bytes: the largest text of one row, in UTF-8 bytes: the text as given and as rendered (a chat
            template's output is stopped as soon as it passes the cap); a row over it is rejected
            (``text_too_large``) before it is tokenised.
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
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES

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
        cap = self.max_text_bytes
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TEXT_BYTES_LIMIT:
            shown = f"{cap:,}" if isinstance(cap, int) and not isinstance(cap, bool) else repr(cap)
            raise UsageError(f"--max-text-bytes must be 1 to {MAX_TEXT_BYTES_LIMIT:,} (1 GiB), got {shown}",
                             hint=f"the default, {DEFAULT_MAX_TEXT_BYTES:,} bytes (1 MiB), fits any caption or "
                             "conversation")


class TextError(Exception):
    """A per-sample text problem: ``reason`` is a short code, ``detail`` a sentence.

    Reasons: ``text_missing``, ``text_empty``, ``text_bad_type``, ``placeholder_mismatch``, ``text_too_large``
    (over ``max_text_bytes``), ``chat_template_error``, ``chat_template_timeout`` (a template that did not finish
    within its time bound).
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

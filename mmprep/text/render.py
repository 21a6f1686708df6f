"""Rendering a sample's text into the one string that is tokenised: the pure text functions (no tokenizer).

Shapes, placeholders and conversation turns are described in :mod:`mmprep.text.encoder`; what needs the tokenizer
(its chat template) is passed in as ``render_turns``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from mmprep.records import Sample
from mmprep.text.config import TextConfig, TextError

__all__ = [
    "IMAGE_PART_TYPES",
    "Turn",
    "check_text_size",
    "conversation_turns",
    "count_placeholders",
    "inline_images",
    "pick_caption",
    "plain_turns",
    "render_text",
    "sample_image_count",
    "typename",
]

#: Typed content-part types that stand for an image.
IMAGE_PART_TYPES: frozenset[str] = frozenset({"image", "image_url"})
_TEXT_PART_TYPES = frozenset({"text"})
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}

#: One conversation turn: ``(role, content)``, the role normalised (``human`` -> ``user``, ``gpt`` -> ``assistant``).
Turn = tuple[str, str]


def _unwrap(text: object) -> object:
    if isinstance(text, dict):
        for key in ("messages", "conversations"):
            if isinstance(text.get(key), list):
                return text[key]
    return text


def typename(value: object) -> str:
    """How a value reads in a message: ``an object``, ``a list``, ``null``, ... (else its type name)."""
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


def sample_image_count(sample: Sample) -> int:
    """The number of images a sample has: its images column, else the references in typed image parts."""
    if sample.images:
        return len(sample.images)
    return len(inline_images(sample.text))


def conversation_turns(text: object, placeholder: str = "<image>") -> list[Turn] | None:
    """The turns of a conversation (roles normalised: ``human`` -> ``user``, ``gpt`` -> ``assistant``; typed
    content parts joined, image parts as ``placeholder``), or None when ``text`` is no conversation (a string,
    captions, nothing).

    Raises:
        TextError: a malformed conversation (``text_bad_type``).
    """
    text = _unwrap(text)
    if isinstance(text, list) and text and not all(isinstance(t, str) for t in text):
        return _turns(text, placeholder)
    return None


def _turns(messages: list[Any], placeholder: str) -> list[Turn]:
    """Normalise a conversation to ``(role, content)`` strings; raises TextError."""
    turns: list[Turn] = []
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise TextError("text_bad_type", f"conversation turn {i} is {typename(msg)}, expected an object")
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
            raise TextError("text_bad_type", f"conversation turn {i} content is {typename(content)}")
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
                raise TextError("text_bad_type", f"conversation turn {turn}: a text part holds {typename(value)}")
            pieces.append(value)
        else:
            raise TextError(
                "text_bad_type",
                f"conversation turn {turn}: unsupported content part {kind!r:.40}"
                + ("" if isinstance(part, dict) else f" ({typename(part)})"),
            )
    return "".join(pieces)


def check_text_size(text: str, cfg: TextConfig, what: str = "the text") -> None:
    """Raise ``text_too_large`` when ``text`` is over ``cfg.max_text_bytes`` UTF-8 bytes.

    The common case costs one ``len``: a text of at most a quarter of the cap in characters fits whatever they are.
    """
    limit = cfg.max_text_bytes
    n = len(text)
    if n * 4 <= limit:
        return
    size = n if n > limit else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        shown = f"{size:,} bytes" if n <= limit else f"{n:,} characters"
        raise TextError("text_too_large", f"{what} is {shown}, above --max-text-bytes {limit:,}")


def _pick_index(seed: int, sample_id: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def pick_caption(captions: list[str], cfg: TextConfig, sample_id: str) -> str:
    """The caption ``cfg.caption`` chooses: the first, one picked by a hash of the seed and the sample id, or all
    of them (stripped, the empty ones left out) joined with ``cfg.separator``."""
    mode = cfg.caption
    if mode == "first":
        return captions[0]
    if mode == "random":
        return captions[_pick_index(cfg.seed, sample_id, len(captions))]
    return cfg.separator.join(c.strip() for c in captions if c.strip())


def plain_turns(turns: list[Turn]) -> str:
    """The layout without a chat template: one ``"<role>: <content>"`` line per turn."""
    return "\n".join(f"{role}: {content}" for role, content in turns)


def render_text(
    text: object,
    cfg: TextConfig,
    *,
    sample_id: str = "",
    image_count: int | None = None,
    render_turns: Callable[[list[Turn]], str] = plain_turns,
) -> str:
    """Turn one sample's text (any supported shape) into the string that is tokenised.

    Args:
        text: a string, a list of captions, or a conversation (see :mod:`mmprep.text.encoder`).
        cfg: the caption mode, separator, seed and placeholder settings.
        sample_id: used to pick a caption for ``caption="random"``.
        image_count: the sample's number of images; when given (and ``check_placeholders``), placeholders
            are checked against it.
        render_turns: lays a conversation out as one string (the tokenizer's chat template, or
            :func:`plain_turns`).

    Raises:
        TextError: ``text_missing``, ``text_empty``, ``text_bad_type``, ``placeholder_mismatch``, ``text_too_large``
            (the text, the chosen caption, a conversation's turns or its rendering over ``cfg.max_text_bytes``; checked
            before anything is tokenised) and whatever ``render_turns`` raises, e.g. ``chat_template_error``.
    """
    ph = cfg.image_placeholder
    text = _unwrap(text)
    if text is None:
        raise TextError("text_missing", "the sample has no text")
    if isinstance(text, str):
        check_text_size(text, cfg)
        rendered, conversation, count = text, False, text.count(ph)
        if not text.strip():
            raise TextError("text_empty", "the text is empty")
    elif isinstance(text, list):
        if not text:
            raise TextError("text_empty", "the text is an empty list")
        if all(isinstance(t, str) for t in text):
            rendered = pick_caption(text, cfg, sample_id)
            check_text_size(rendered, cfg, "the caption" if cfg.caption != "all" else "the text of the joined captions")
            conversation, count = False, rendered.count(ph)
            if not rendered.strip():
                raise TextError("text_empty", "the chosen caption is empty")
        else:
            turns = _turns(text, ph)
            if sum(len(c) for _, c in turns) * 4 > cfg.max_text_bytes:  # checked before the template runs on it
                check_text_size("".join(c for _, c in turns), cfg, "the conversation's text")
            conversation = True
            count = sum(c.count(ph) for _, c in turns)
            if not any(c.strip() for _, c in turns):
                raise TextError("text_empty", "every turn of the conversation is empty")
            rendered = render_turns(turns)
            check_text_size(rendered, cfg, "the rendered conversation")
    else:
        raise TextError(
            "text_bad_type", f"the text is {typename(text)}; expected a string, captions or a conversation"
        )
    if cfg.check_placeholders and image_count is not None and (conversation or count > 0) and count != image_count:
        raise TextError(
            "placeholder_mismatch",
            f"{count} {ph} placeholder{'s' if count != 1 else ''} but {image_count} "
            f"image{'s' if image_count != 1 else ''}",
        )
    return rendered

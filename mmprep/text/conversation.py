"""Conversations as trainers read them: ShareGPT ``messages`` with alternating turns, and prompt/answer pairs.

The pure functions behind ``pack --target``: :func:`prompt_and_answer` (the first user turn is the prompt, the
last assistant turn the answer, for RL trainers such as EasyR1), :func:`sharegpt_problem` (why LLaMA-Factory's
ShareGPT converter would drop a conversation), and :func:`fit_placeholders` (one image placeholder per image, in
the placeholder the trainers expect). Turns come from :func:`mmprep.text.render.conversation_turns`.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmprep.text.config import TextError
from mmprep.text.render import Turn

__all__ = ["TRAINER_PLACEHOLDER", "fit_placeholders", "prompt_and_answer", "sharegpt_problem"]

#: The image placeholder EasyR1 splits prompts at and LLaMA-Factory counts (its ``IMAGE_PLACEHOLDER`` default).
TRAINER_PLACEHOLDER = "<image>"
_USER_SLOT = ("user", "observation")
_ASSISTANT_SLOT = ("assistant", "function_call")


def prompt_and_answer(turns: Sequence[Turn]) -> tuple[str | None, str | None]:
    """The first user turn's content (the prompt) and the last assistant turn's (the answer); None for a missing
    one."""
    prompt = next((content for role, content in turns if role == "user"), None)
    answer = next((content for role, content in reversed(turns) if role == "assistant"), None)
    return prompt, answer


def sharegpt_problem(turns: Sequence[Turn]) -> str | None:
    """Why LLaMA-Factory's ShareGPT converter would drop this conversation as broken, None when it would keep it.

    Its rule (``SharegptDatasetConverter``): an optional first ``system`` turn, then turns alternating between the
    user side (``user``, ``observation``) and the assistant side (``assistant``, ``function_call``), starting with
    the user side, in an even number.
    """
    rest = list(turns[1:]) if turns and turns[0][0] == "system" else list(turns)
    if not rest:
        return "the conversation has no turn besides the system prompt"
    for k, (role, _) in enumerate(rest):
        want = _USER_SLOT if k % 2 == 0 else _ASSISTANT_SLOT
        if role not in want:
            return f"turn {k + 1 + (len(turns) - len(rest))} is '{role}', expected {' or '.join(want)}"
    if len(rest) % 2:
        return f"{len(rest)} turns after the system prompt: the last must be an assistant turn"
    return None


def fit_placeholders(texts: Sequence[str], placeholder: str, *, kept: int, original: int, first: int = 0) -> list[str]:
    """``texts`` (the parts of one sample's prompt, in order) with exactly one :data:`TRAINER_PLACEHOLDER` per kept
    image.

    The sample's text must hold one ``placeholder`` per image it had (``original``), or none: then ``kept``
    placeholders are put in front of ``texts[first]`` (a caption or question that does not mark its image). The
    placeholders of images dropped by ``--too-many-images truncate`` (those after the first ``kept``) are removed,
    and ``placeholder`` becomes :data:`TRAINER_PLACEHOLDER` where it differs.

    Raises:
        TextError: ``placeholder_mismatch`` naming both counts.
    """
    count = sum(t.count(placeholder) for t in texts)
    out = list(texts)
    if count == 0:
        if kept and out:
            out[first] = TRAINER_PLACEHOLDER * kept + out[first]
        return out
    if count != original:
        raise TextError("placeholder_mismatch", f"{count} {placeholder} placeholder{'s' if count != 1 else ''} but "
                                                f"{original} image{'s' if original != 1 else ''}")
    seen = 0
    for i, text in enumerate(out):
        parts = text.split(placeholder)
        pieces = [parts[0]]
        for part in parts[1:]:
            seen += 1
            pieces.append((TRAINER_PLACEHOLDER if seen <= kept else "") + part)
        out[i] = "".join(pieces)
    return out

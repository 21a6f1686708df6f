"""The texts behind a tag: cleaning its name, prompt templates (RAM's ensemble among them) and RAM++ description sets.

Tag names are cleaned (:func:`clean_tag`) and put into prompt templates (:func:`tag_texts`): none (the bare tag),
one, several (a file, :func:`load_templates`) or the built-in ``ram`` ensemble (:data:`RAM_TEMPLATES`), which renders
exactly the texts of RAM's open-set builder. Description sets (RAM++ ``{tag: [descriptions]}``) give ``K`` texts per
tag instead (:func:`load_descriptions`, :func:`descriptions_for_vocab`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import InputError, UsageError
from mmprep.labels.embed.messages import some
from mmprep.labels.vocab import Vocabulary, normalize_tag, read_bounded

__all__ = [
    "BUILTIN_TEMPLATES",
    "CLEAN_MODES",
    "RAM_TEMPLATES",
    "VocabDescriptions",
    "check_template",
    "clean_tag",
    "descriptions_for_vocab",
    "is_ram",
    "load_descriptions",
    "load_templates",
    "render_template",
    "tag_texts",
]

#: Tag cleaning modes, see :func:`clean_tag`.
CLEAN_MODES: tuple[str, ...] = ("default", "ram", "none")

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


def is_ram(templates: Sequence[str]) -> bool:
    """Whether ``templates`` are RAM's ensemble (:data:`RAM_TEMPLATES`)."""
    return tuple(templates) == RAM_TEMPLATES


def tag_texts(name: str, templates: Sequence[str], clean: str | None = None) -> list[str]:
    """The prompt texts of one tag, one per template: ``name`` cleaned with :func:`clean_tag` and put into each.

    With :data:`RAM_TEMPLATES` the texts are RAM's: ``clean`` defaults to ``ram`` and ``{article}`` follows RAM's
    rule on the raw name ("an" only before a lower-case vowel: "There is a aerial photography in the scene.").
    With other templates ``clean`` defaults to ``default`` and ``{article}`` is "an" before a vowel of either case.
    """
    ram = is_ram(templates)
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
    if not p.exists():
        raise InputError(
            f"{p}: template file not found",
            hint=f"pass a file with one template per line, or a built-in set: {', '.join(BUILTIN_TEMPLATES)}",
        )
    try:
        text = read_bounded(p, "template").decode("utf-8-sig")  # bounded: not /dev/zero, no endless line
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: cannot read template file: {exc}") from None
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        check_template(t, f"{p}:{lineno}")
        out.append(t)
    if not out:
        raise InputError(f"{p}: the template file has no templates",
                         hint="write one template per line, e.g. a photo of a {}.")
    return tuple(out)


def check_template(template: str, where: str) -> None:
    """Raise InputError (naming ``where``) unless ``template`` has the ``{}`` placeholder."""
    if "{}" not in template:
        raise InputError(f"{where}: template {template!r} has no {{}} placeholder for the tag",
                         hint='write e.g. "a photo of a {}."')


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """Read a description-set JSON: RAM++'s list of one-key objects ``[{tag: [descriptions]}, ...]`` or an object
    ``{tag: [descriptions]}``. Returns tag → descriptions in file order.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: description file not found")
    try:
        value = json.loads(read_bounded(p, "description", line_limit=False).decode("utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{p}: the JSON is nested too deeply to be a description file") from None
    except UnicodeDecodeError as exc:
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


@dataclass(frozen=True)
class VocabDescriptions:
    """A description set matched to a vocabulary: ``per_tag[i]`` are tag ``i``'s descriptions (all of the same
    number K); ``unused`` are the description tags that are in no vocabulary tag."""

    per_tag: list[list[str]]
    unused: list[str]

    @property
    def k(self) -> int:
        """Descriptions per tag."""
        return len(self.per_tag[0])


def descriptions_for_vocab(
    descriptions: dict[str, list[str]], vocab: Vocabulary, *, source: str = "descriptions"
) -> VocabDescriptions:
    """Descriptions per vocabulary tag, in vocabulary order (matched by normalised name).

    Raises InputError when a tag has none or when the number of descriptions differs between tags (naming the tags).
    """
    by_norm = {normalize_tag(k): v for k, v in descriptions.items()}
    missing = [n for n in vocab.names if normalize_tag(n) not in by_norm]
    if missing:
        raise InputError(
            f"{source}: no descriptions for {len(missing)} of {len(vocab)} tags of {vocab.path or 'the vocabulary'}: "
            + some(missing),
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
            f"{len(odd)} differ: " + some(odd, quote=False),
            hint=f"give every tag exactly {k} descriptions (the matrix has K rows per tag)",
        )
    used = {normalize_tag(n) for n in vocab.names}
    unused = [k for k in descriptions if normalize_tag(k) not in used]
    return VocabDescriptions(rows, unused)



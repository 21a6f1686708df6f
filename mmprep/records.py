"""Records that flow through every command: a manifest row as a :class:`Sample`, or a :class:`Rejected` row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EmbeddedImage", "ImageRef", "Rejected", "RowReject", "Sample", "describe_image_ref", "image_ref_key"]


@dataclass(frozen=True, slots=True)
class EmbeddedImage:
    """An image whose encoded bytes are in the input itself (a Hugging Face ``Image`` value ``{bytes, path}`` or a
    binary cell of a Parquet or Arrow manifest), not in a file the manifest names.

    The bytes travel either here (``data``) or in a spool file the reader wrote (``offset``, ``size``), so chunks of
    rows stay small on their way to the workers. ``path`` is the name stored beside the bytes (never opened).

    Attributes:
        size: the number of encoded bytes.
        path: the stored file name, or None.
        data: the bytes, when held in memory.
        offset: where the bytes start in the spool file, when spooled (-1 otherwise).
    """

    size: int
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    offset: int = -1


#: An image reference of a sample: a path (relative to the image root, or a URI), or embedded bytes.
ImageRef = str | EmbeddedImage


def describe_image_ref(ref: ImageRef) -> str:
    """How an image reference reads in a message: the path, or ``embedded image (N bytes, path 'x')``; never the
    bytes."""
    if isinstance(ref, EmbeddedImage):
        return f"embedded image ({ref.size:,} bytes" + (f", path '{ref.path}')" if ref.path else ")")
    return f"'{ref}'"


def image_ref_key(ref: ImageRef) -> str:
    """A stable text key of a reference (the same for the same input, wherever its bytes are held)."""
    if isinstance(ref, EmbeddedImage):
        return f"<embedded:{ref.size}:{ref.path or ''}>"
    return ref


@dataclass(frozen=True, slots=True)
class Sample:
    """One manifest row, mapped onto mmprep's fields.

    Attributes:
        id: the sample id (from the id column, else ``"L<line>"``).
        images: image references: paths as written in the manifest (relative to the image root), or
            :class:`EmbeddedImage` for image bytes held in the input itself.
        text: a plain string, a list of captions, or a conversation (list of dicts); None when absent.
        tags: tag names or integer ids as written.
        line: 1-based position in the input: the line for JSONL/CSV, the record number for JSON/Parquet.
        source: the manifest file name (for messages).
        extra: the record's other columns (not id, images or tags), as read; filled only when asked for.
    """

    id: str
    images: tuple[ImageRef, ...] = ()
    text: Any = None
    tags: tuple[str | int, ...] = ()
    line: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input row that did not make it into the output, and why.

    Attributes:
        line: 1-based input position (as :attr:`Sample.line`).
        id: the sample id when known.
        stage: where it failed: ``manifest``, ``image``, ``text``, ``labels`` or ``write``.
        reason: a short machine-readable code (e.g. ``image_missing``, ``invalid_json``); counts group by it.
        detail: a human sentence naming the file or value.
    """

    line: int
    id: str | None
    stage: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "stage": self.stage, "reason": self.reason, "detail": self.detail}


class RowReject(Exception):
    """Raised by a per-sample step when the row cannot be used; caught in one place, which records a
    :class:`Rejected` for the row.

    Attributes:
        stage: ``manifest``, ``image``, ``text``, ``labels``...
        reason: the machine-readable code.
        detail: the human sentence (without the ``file:line:`` prefix, which the catcher adds).
    """

    def __init__(self, stage: str, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (RowReject, (self.stage, self.reason, self.detail))

    def for_sample(self, sample: Sample) -> Rejected:
        """The reject record of ``sample``, its detail prefixed with ``source:line:``."""
        detail = f"{sample.source}:{sample.line}: {self.detail}"
        return Rejected(sample.line, sample.id, self.stage, self.reason, detail)

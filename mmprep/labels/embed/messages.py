"""Pieces of one-line error messages shared by the embed modules."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["first_line", "some"]


def some(items: Sequence[str], limit: int = 8, quote: bool = True) -> str:
    """The first ``limit`` items, comma-separated (``repr`` with ``quote``), then "and N more"."""
    shown = [repr(x) if quote else x for x in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

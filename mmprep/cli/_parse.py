"""Parsers for flag values shared by several commands (image sizes and colours live in ``mmprep.images.decode``)."""

from __future__ import annotations

import re

from mmprep.errors import UsageError

__all__ = ["parse_bytes"]

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def parse_bytes(value: str, flag: str = "--shard-size") -> int:
    """``512MB``, ``1GiB``, ``1000000`` → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"{flag}: cannot read '{value}' as a size", hint="write e.g. 512MB, 1GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])

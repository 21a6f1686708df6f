"""Where mmprep keeps what it can rebuild: ``$MMPREP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmprep``, else
``~/.cache/mmprep``; none when ``MMPREP_NO_CACHE`` is set (to anything but 0). Standard library only: the command
line reads it before anything else is imported."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path | None:
    """The cache folder (not created here), or None when caching is off or there is no home directory."""
    if os.environ.get("MMPREP_NO_CACHE", "") not in ("", "0"):
        return None
    base = os.environ.get("MMPREP_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        return Path(xdg) / "mmprep" if xdg else Path.home() / ".cache" / "mmprep"
    except RuntimeError:  # no home directory
        return None

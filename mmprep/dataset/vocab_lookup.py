"""Finding the vocabulary file a packed dataset's ``tag_ids`` refer to (for tag names)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprep.errors import InputError
from mmprep.labels.vocab import load_vocab

__all__ = ["VocabLookup", "find_vocab"]


@dataclass(frozen=True)
class VocabLookup:
    """The result of :func:`find_vocab`: the file used (or None), how it was found, the names."""

    path: Path | None
    how: str
    names: list[str] | None


def find_vocab(
    root: Path | None,
    metadata: Mapping[str, Any],
    recorded: Any,
    vocab: str | os.PathLike[str] | None = None,
) -> VocabLookup:
    """Find the vocabulary the tag ids refer to, and say where it was found (or where it was looked for).

    Candidates, in order; the first whose sha256 matches the metadata wins: ``vocab``; the path recorded at
    pack time, which is relative to the folder ``pack`` ran in when it is not absolute, so it is tried relative
    to the working directory, then to the dataset's folder and each folder above it; the recorded file name
    inside the dataset's folder.

    Args:
        root: the dataset's folder (None for a dataset on a remote store: only ``vocab`` and the recorded path,
            absolute or relative to the working directory, are tried).
        metadata: the dataset's ``mmprep`` metadata (its ``vocab`` entry holds the file name, size and sha256).
        recorded: the ``vocab`` the pack settings recorded (a path, or None).
        vocab: a file to try first.
    """
    meta = metadata.get("vocab")
    cands: list[tuple[Path, str]] = []
    if vocab is not None:
        cands.append((Path(vocab), "the given vocabulary file"))
    if isinstance(recorded, str) and recorded:
        rp = Path(recorded)
        if rp.is_absolute():
            cands.append((rp, "the path recorded at pack time"))
        else:
            cands.append((Path.cwd() / rp, "the recorded path, relative to the working directory"))
            if root is not None:
                here = root.resolve()
                cands += [(d / rp, f"the recorded path, relative to {d}") for d in (here, *here.parents)]
        if root is not None:
            cands.append((root / rp.name, "its file name, inside the dataset's folder"))
    elif meta and meta.get("file") and root is not None:
        cands.append((root / str(meta["file"]), "its file name, inside the dataset's folder"))
    seen: set[Path] = set()
    wrong: list[str] = []
    for c, how in cands:
        key = Path(os.path.abspath(c))
        if key in seen or not c.is_file():
            continue
        seen.add(key)
        try:
            v = load_vocab(c)
        except InputError:
            wrong.append(f"{c} (not readable as a vocabulary)")
            continue
        if meta and meta.get("sha256") and v.sha256 != meta["sha256"]:
            wrong.append(f"{c} (a different file: its sha256 differs)")
            continue
        return VocabLookup(path=c, how=f"{c} ({how})", names=list(v.names))
    if vocab is None and not recorded and not (meta and meta.get("file")):
        return VocabLookup(path=None, how="no vocabulary recorded at pack time", names=None)
    what = f"'{recorded}' (recorded at pack time)" if recorded else "the vocabulary"
    looked = "the given file, " if vocab is not None else ""
    places = ("the working directory, the dataset's folder and the folders above it" if root is not None
              else "the working directory (the dataset is on a remote store)")
    how = f"{what} not found: looked at {looked}{places}; pass --vocab FILE"
    if wrong:
        how += "; skipped " + ", ".join(wrong)
    return VocabLookup(path=None, how=how, names=None)

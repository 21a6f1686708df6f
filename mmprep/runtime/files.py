"""Local file primitives every command writes through: atomic replace, hashing, and writes that never follow links.

The rules they enforce:

- Nothing half-written appears under a final name: :func:`atomic_write` writes a temporary sibling
  (``.NAME.tmp-<pid>-<random>``), flushes and fsyncs it, then renames it over the final name.
- Writes never follow a symbolic link: the final name and every folder created under an owned root are checked
  with ``lstat`` and opened with ``O_NOFOLLOW``; a link where mmprep would write is an error naming it, so a planted
  ``out/.mmprep/lock -> ~/.bashrc`` cannot make mmprep truncate a file outside its output.
- Hashing uses the standard library's :func:`hashlib.file_digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mmprep.errors import RunFailed, UsageError

__all__ = [
    "TEMP_MARK",
    "atomic_write",
    "ensure_dir",
    "fsync_dir",
    "is_temp_name",
    "open_append",
    "refuse_link",
    "sha256_file",
    "temp_name",
]

#: Part of every temporary name: ``.NAME.tmp-...``.
TEMP_MARK = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_name(final: str) -> str:
    """The temporary sibling name used while ``final`` is written."""
    return f".{final}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str, final: str | None = None) -> bool:
    """Whether ``name`` is a temporary name of mmprep's (of ``final`` when given)."""
    if final is not None:
        return name.startswith(f".{final}{TEMP_MARK}")
    return name.startswith(".") and TEMP_MARK in name


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def refuse_link(path: str | os.PathLike[str]) -> None:
    """Raise UsageError when ``path`` is a symbolic link (mmprep never writes through one)."""
    p = Path(path)
    if p.is_symlink():
        raise UsageError(f"{p}: is a symbolic link; mmprep does not write through links",
                         hint="remove the link or choose another output location")


def ensure_dir(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> Path:
    """Create ``path`` (and missing parents) and return it, refusing symbolic links on the way.

    With ``root``, ``path`` must lie under it and no folder from ``root`` (exclusive) down to ``path`` may be a
    link: a planted ``out/sub -> /elsewhere`` would otherwise receive the files meant for ``out/sub``.
    The root itself may be a link (the user chose it).

    Raises:
        UsageError: a link or a non-folder is in the way.
    """
    p = Path(path)
    parts: list[Path] = []
    if root is not None:
        base = Path(root)
        rel = os.path.relpath(p, base)
        if rel == os.curdir:
            base.mkdir(parents=True, exist_ok=True)
            return p
        if rel.startswith(os.pardir) or os.path.isabs(rel):
            raise UsageError(f"{p}: not inside {base}")
        cur = base
        base.mkdir(parents=True, exist_ok=True)
        for piece in Path(rel).parts:
            cur = cur / piece
            parts.append(cur)
    else:
        parts = [p]
    for folder in parts:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            try:
                os.mkdir(folder) if root is not None else folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                st = os.lstat(folder)
            else:
                continue
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"{folder}: is a symbolic link; mmprep does not write through links",
                             hint="remove the link or choose another output location")
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{folder}: exists and is not a directory")
    return p


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_new(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)  # the umask applies
    return os.fdopen(fd, "wb")


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | Callable[[BinaryIO], None],
    *,
    what: str = "",
    fsync: bool = True,
    fsync_folder: bool = True,
) -> None:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` atomically.

    ``fsync`` makes the file's bytes durable before the rename; ``fsync_folder`` also the rename (an fsync of the
    folder). A job writing many files into one folder can leave the folder to one fsync at its end.

    The final name is replaced by a rename, so it never shows a partial file, and a symbolic link at the final
    name is refused rather than followed (``os.replace`` would replace the link itself; refusing keeps the
    user's link and says why).

    Raises:
        UsageError: ``path`` is a symbolic link.
        RunFailed: the write failed (disk full, permissions): one line naming the file.
    """
    p = Path(path)
    refuse_link(p)
    tmp = p.with_name(temp_name(p.name))
    try:
        with _open_new(tmp) as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        label = f"{what} " if what else ""
        raise RunFailed(f"cannot write {label}{p}: {exc.strerror or exc}",
                        hint="check free disk space and permissions of the output directory") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync and fsync_folder:
        fsync_dir(p.parent)


@contextlib.contextmanager
def open_append(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open ``path`` for appending (created if missing) without following a symbolic link.

    Raises:
        UsageError: ``path`` is a symbolic link.
        RunFailed: it cannot be opened.
    """
    p = Path(path)
    refuse_link(p)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as exc:
        if p.is_symlink():
            refuse_link(p)
        raise RunFailed(f"cannot write {p}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "ab") as f:
        yield f

"""What ``mmprep`` can answer before importing Typer: ``--version``, help pages seen before, and which command
modules a run needs.

Python starts in about 0.05 s; importing Typer (which imports pydantic), Rich's help renderer and every command
module, building every command and drawing a help page in panels takes 0.5 to 1 s. So:

- ``mmprep --version`` prints the version at once;
- a help page (``mmprep --help``, ``mmprep COMMAND --help``, ``-h``) is drawn by Typer the first time and kept in
  the cache folder (:func:`mmprep.cachedir.cache_root`, ``help/``), keyed by everything that shapes it: mmprep's
  version and source files (their sizes and modification times, so an edited checkout redraws), the versions of
  Typer, Rich and Python, the terminal (size, whether stdout is one, its encoding) and the environment variables
  Rich and Typer read (``COLUMNS``, ``NO_COLOR``, ``TERM``...). Later identical requests print the kept page;
  ``MMPREP_NO_CACHE=1`` or a ``--config`` file (whose values show as defaults) always draws it anew;
- a run (or a shell completion) for one command imports and builds that command alone (:func:`modules_for`).

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["COMMANDS", "MODULES", "cached_help", "help_key", "modules_for", "record_help"]

#: Every command and the module under ``mmprep.cli`` that registers it.
COMMANDS = {
    "audit-labels": "cmd_labels", "embed-labels": "cmd_embed", "image-stats": "cmd_images",
    "normalize-images": "cmd_images", "tokenize": "cmd_text", "pack": "cmd_pack", "inspect": "cmd_read",
    "verify": "cmd_read",
}
#: The command modules in the order ``mmprep --help`` lists their commands.
MODULES = ("cmd_labels", "cmd_embed", "cmd_images", "cmd_text", "cmd_pack", "cmd_read")

_HELP = ("--help", "-h")
#: Root options that take a value (the command is the first word after the root options).
_ROOT_VALUE_OPTIONS = ("--config",)
#: Environment variables Rich and Typer read when drawing help.
_ENV = ("COLUMNS", "LINES", "TERMINAL_WIDTH", "NO_COLOR", "FORCE_COLOR", "PY_COLORS", "TERM", "COLORTERM",
        "TTY_COMPATIBLE", "TTY_INTERACTIVE", "GITHUB_ACTIONS", "JUPYTER_COLUMNS", "JUPYTER_LINES", "LANG", "LC_ALL",
        "LC_CTYPE", "PYTHONIOENCODING", "MMPREP_CONFIG")
_PACKAGE = Path(__file__).resolve().parents[1]


def _command_word(args: list[str]) -> str | None:
    """The command named in ``args`` (words after ``mmprep``), or None when there is none (yet)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _ROOT_VALUE_OPTIONS:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        return arg
    return None


def _completion_args() -> list[str] | None:
    """The words before the one being completed, when this run answers a shell completion."""
    if not os.environ.get("_MMPREP_COMPLETE"):
        return None
    try:
        if "COMP_WORDS" in os.environ:  # bash
            words = shlex.split(os.environ["COMP_WORDS"])
            return words[1 : int(os.environ.get("COMP_CWORD", len(words)))]
        line = os.environ.get("_TYPER_COMPLETE_ARGS", "")  # zsh, fish, PowerShell
        words = shlex.split(line)[1:]
        return words if line.endswith(" ") else words[:-1]
    except ValueError:  # an unbalanced quote being typed
        return []


def modules_for(argv: list[str]) -> tuple[str, ...]:
    """The command modules this run needs: the named command's alone, else all (root help, an unknown or
    misspelt command, a ``--config`` file, whose sections are checked against every command)."""
    args = _completion_args()
    if args is None:
        args = argv
    if os.environ.get("MMPREP_CONFIG") or any(a == "--config" or a.startswith("--config=") for a in args):
        return MODULES
    word = _command_word(args)
    return (COMMANDS[word],) if word in COMMANDS else MODULES


# -- help pages ------------------------------------------------------------------------------------------------------


def _help_request(argv: list[str]) -> bool:
    """``--help`` / ``-h`` alone, or after one command name."""
    if len(argv) == 1:
        return argv[0] in _HELP
    return len(argv) == 2 and argv[0] in COMMANDS and argv[1] in _HELP


def _terminal() -> tuple[bool, str, Any]:
    """Whether stdout is a terminal, its encoding, and the terminal size Rich would measure."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    size: Any = None
    for fd in (0, 1, 2):  # what Rich tries, in this order
        try:
            size = tuple(os.get_terminal_size(fd))
            break
        except (AttributeError, ValueError, OSError):
            continue
    return tty, str(getattr(sys.stdout, "encoding", "")), size


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:-"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def help_key(argv: list[str]) -> str:
    """The cache key of the help page ``argv`` asks for, in this terminal and environment."""
    import importlib.util

    from mmprep import __version__

    parts = [__version__, sys.version, "\0".join(argv), repr(_terminal())]
    parts += [f"{name}={os.environ.get(name)}" for name in _ENV]
    parts += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("TYPER", "_TYPER"))]
    for dirpath, dirnames, filenames in os.walk(_PACKAGE):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        parts += [_stamp(Path(dirpath) / f) for f in sorted(filenames) if f.endswith(".py")]
    for package in ("typer", "rich", "click"):
        spec = importlib.util.find_spec(package)
        parts.append(_stamp(Path(spec.origin)) if spec is not None and spec.origin else f"{package}:-")
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _help_file(argv: list[str]) -> Path | None:
    from mmprep.cachedir import cache_root

    root = cache_root()
    return None if root is None else root / "help" / f"{help_key(argv)}.txt"


def cached_help(argv: list[str]) -> str | None:
    """The help page ``argv`` asks for, as drawn before in the same terminal and environment, or None."""
    if not _help_request(argv) or os.environ.get("MMPREP_CONFIG"):
        return None
    path = _help_file(argv)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class _Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy; anything else (isatty, fileno, encoding) is the stream's."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.stream, "encoding", "utf-8"))

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


@contextlib.contextmanager
def record_help(argv: list[str]) -> Iterator[None]:
    """Keep the help page drawn inside the block (when ``argv`` asks for one and it ends with exit code 0)."""
    path = _help_file(argv) if _help_request(argv) and not os.environ.get("MMPREP_CONFIG") else None
    if path is None:
        yield
        return
    real = sys.stdout
    tee = _Tee(real)
    sys.stdout = tee
    try:
        yield
    except SystemExit as exc:
        if exc.code in (0, None) and tee.copy.getvalue():
            _save(path, tee.copy.getvalue())
        raise
    finally:
        sys.stdout = real


def _save(path: Path, text: str) -> None:
    """Write the page under a temporary name and rename it (best effort: a cache that cannot be written is none)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".help-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

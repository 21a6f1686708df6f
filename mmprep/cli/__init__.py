"""The ``mmprep`` command line: a thin Typer shell over the library.

Each subcommand lives in its own module under ``mmprep.cli`` and registers itself on the Typer app of
:mod:`mmprep.cli._app`. Command modules import nothing heavy at module level (no torch, transformers or ray), so
``mmprep --help`` stays quick; :func:`main` goes further (see :mod:`mmprep.cli._fast`): ``--version`` and help pages
seen before are answered without importing Typer, and a run imports and builds only the command it names.

``from mmprep.cli import app`` gives the app with every command registered.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

__all__ = ["app", "load", "main"]


def load(modules: tuple[str, ...] | None = None) -> typer.Typer:
    """The Typer app with the commands of ``modules`` registered (default: every command, in --help order)."""
    from mmprep.cli._app import app
    from mmprep.cli._fast import MODULES

    for name in modules if modules is not None else MODULES:
        importlib.import_module(f"mmprep.cli.{name}")
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point."""
    from mmprep.cli import _fast

    argv = sys.argv[1:]
    if argv == ["--version"]:
        from mmprep import __version__

        print(f"mmprep {__version__}")
        return
    page = _fast.cached_help(argv)
    if page is not None:
        try:
            sys.stdout.write(page)
            sys.stdout.flush()
        except BrokenPipeError:  # `mmprep --help | head`
            sys.stderr.close()
        return
    app = load(_fast.modules_for(argv))
    with _fast.record_help(argv):
        app(prog_name="mmprep")

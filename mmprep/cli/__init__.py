"""The ``mmprep`` command line: a thin Typer shell over the library.

Each subcommand lives in its own module under ``mmprep.cli`` and registers itself on :data:`app`. Command modules
import nothing heavy at module level (no torch, transformers or ray), so ``mmprep --help`` is instant.
"""

from __future__ import annotations

from mmprep.cli._app import app

# Register subcommands (import order = order in --help).
from mmprep.cli import cmd_labels  # noqa: F401  isort: skip
from mmprep.cli import cmd_embed  # noqa: F401  isort: skip
from mmprep.cli import cmd_images  # noqa: F401  isort: skip
from mmprep.cli import cmd_text  # noqa: F401  isort: skip
from mmprep.cli import cmd_pack  # noqa: F401  isort: skip
from mmprep.cli import cmd_read  # noqa: F401  isort: skip

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mmprep")

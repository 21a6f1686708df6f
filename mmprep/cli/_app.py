"""The Typer application object, the root callback (``--version``, ``--config``) and shared options."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, NoReturn

import typer

from mmprep import __version__
from mmprep.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, MmprepError
from mmprep.output import Output

app = typer.Typer(
    name="mmprep",
    help="Prepare multimodal (image + text + tag) datasets for training: audit, embed, normalise, tokenise, pack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Shared option aliases: every command spells these the same way.
JsonOpt = Annotated[bool, typer.Option("--json", help="Write the report as JSON on stdout (logs stay on stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr; no progress.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mmprep {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="FILE.toml",
            envvar="MMPREP_CONFIG",
            help="TOML file with a table per subcommand that supplies defaults for any flag.",
        ),
    ] = None,
) -> None:
    """Prepare multimodal datasets: every command reads real files, reports on stderr, and `--json` on stdout."""
    if config:
        from mmprep.config import load_config, to_default_map

        group = ctx.command
        commands = {}
        for name in group.list_commands(ctx):  # type: ignore[attr-defined]
            cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
            commands[name] = [p.name for p in cmd.params if p.name]
        try:
            ctx.default_map = to_default_map(config, load_config(config), commands)
        except MmprepError as exc:
            Output().error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None


def make_output(json_mode: bool = False, quiet: bool = False, verbose: bool = False) -> Output:
    """The Output object for one command run."""
    return Output(json_mode=json_mode, quiet=quiet, verbose=verbose)


def run_command(out: Output, fn: Callable[[], int | None]) -> NoReturn:
    """Run a command body and turn its outcome into an exit code.

    Known errors print one line (plus a hint) on stderr; unexpected ones print a one-line summary and a pointer
    to ``MMPREP_DEBUG=1``, which shows the traceback. Ctrl-C exits 130.
    """
    debug = os.environ.get("MMPREP_DEBUG", "") not in ("", "0")
    try:
        code = fn()
    except typer.Exit:
        raise
    except MmprepError as exc:
        if debug:
            traceback.print_exc(file=sys.stderr)
        out.error(exc.message, exc.hint)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): not our failure.
        sys.stderr.close()
        raise typer.Exit(EXIT_OK) from None
    except Exception as exc:
        if debug:
            traceback.print_exc(file=sys.stderr)
            out.error(f"internal error: {type(exc).__name__}: {exc}")
        else:
            out.error(
                f"internal error: {type(exc).__name__}: {exc}",
                hint="this is a bug in mmprep; rerun with MMPREP_DEBUG=1 for the traceback and report it",
            )
        raise typer.Exit(EXIT_FAILED) from None
    raise typer.Exit(code or EXIT_OK)

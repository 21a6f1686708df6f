"""The Typer application object, the root callback (``--version``, ``--config``) and shared options."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from mmprep import __version__
from mmprep.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, MmprepError
from mmprep.output import Output

# The key under which the root callback tells subcommands (ctx.meta is shared by nested contexts) which
# --config file supplied their defaults.
_CONFIG_META_KEY = "mmprep.config"


def _hide_flag_types(params: list[Any]) -> None:
    """Show flags without a type (Typer's help prints ``--json <bool>``, as if the flag took a value)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class _Group(TyperGroup):
    """The root command group: fixes the help of its own options and of every subcommand's."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _hide_flag_types(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _hide_flag_types(cmd.get_params(ctx))
        return cmd


class _Command(TyperCommand):
    """A subcommand: arguments named in capitals on the usage line and in help (``MANIFEST``, ``[FILES]...``), and
    options in help panels in the order of :data:`~mmprep.cli._options.PANELS` (those of a command with panels that
    name none, such as ``--json`` and ``--help``, go to the last one)."""

    def get_params(self, ctx: Any) -> list[Any]:
        from mmprep.cli._options import PANEL_RUN, PANELS

        params = super().get_params(ctx)
        for param in params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = str(param.name).upper()
        options = [p for p in params if p.param_type_name == "option"]
        if any(getattr(p, "rich_help_panel", None) for p in options):
            for param in options:
                if not getattr(param, "rich_help_panel", None):
                    setattr(param, "rich_help_panel", PANEL_RUN)  # noqa: B010  (typer's attribute, not click's)
            order = {name: k for k, name in enumerate(PANELS)}
            params.sort(key=lambda p: -1 if p.param_type_name != "option"
                        else order.get(getattr(p, "rich_help_panel", ""), len(order)))
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = str(param.metavar) if param.required else f"[{param.metavar}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class _Typer(typer.Typer):
    """Commands are :class:`_Command` unless they name another class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(
    name="mmprep",
    cls=_Group,
    help="Prepare multimodal (image + text + tag) datasets for training: audit, embed, normalise, tokenise, pack.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def config_key(param: Any) -> str:
    """The key a config file uses for a parameter.

    An option's first long flag without the dashes (the parameter ``json_`` of ``--json`` has the key ``json``);
    an argument's name with dashes for underscores.
    """
    longs = [opt for opt in getattr(param, "opts", ()) if opt.startswith("--")]
    return longs[0][2:] if longs else str(param.name).replace("_", "-")


def _verbose_callback(ctx: typer.Context, value: bool) -> bool:
    """With ``--verbose``, name the defaults this command takes from the ``--config`` file."""
    path = ctx.meta.get(_CONFIG_META_KEY)
    if value and path and ctx.default_map:
        keys = {p.name: config_key(p) for p in ctx.command.params}
        pairs = ", ".join(f"{keys.get(name, name)}={val!r}" for name, val in ctx.default_map.items())
        Output(verbose=True).debug(f"defaults from {path} [{ctx.info_name}]: {pairs} (flags given here win)")
    return value


# Shared option aliases: every command spells these the same way.
JsonOpt = Annotated[bool, typer.Option("--json", help="Write the report as JSON on stdout (logs stay on stderr).")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr: no tables, notes or progress.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", callback=_verbose_callback, help="More detail on stderr.")
]


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
    # transformers prints "PyTorch was not found..." on import when torch is absent, which is fine here
    # (tokenizers need no torch, and commands that do need it say so): keep that advisory off stderr.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if config:
        from mmprep.config import load_config, to_default_map

        group = ctx.command
        commands: dict[str, dict[str, str]] = {}
        for name in group.list_commands(ctx):  # type: ignore[attr-defined]
            cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
            commands[name] = {config_key(p): p.name for p in cmd.params if p.name}
        try:
            ctx.default_map = to_default_map(config, load_config(config), commands)
            ctx.meta[_CONFIG_META_KEY] = config
        except MmprepError as exc:
            Output().error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None


def make_output(json_mode: bool = False, quiet: bool = False, verbose: bool = False) -> Output:
    """The Output object for one command run."""
    return Output(json_mode=json_mode, quiet=quiet, verbose=verbose)


def run_command(out: Output, fn: Callable[[], int | None], *, interrupted_hint: str | None = None) -> NoReturn:
    """Run a command body and turn its outcome into an exit code.

    Known errors print one line (plus a hint) on stderr; unexpected ones print a one-line summary and a pointer
    to ``MMPREP_DEBUG=1``, which shows the traceback. Ctrl-C exits 130, with ``interrupted_hint`` (how to continue)
    under the error line.
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
        out.error("interrupted", interrupted_hint)
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

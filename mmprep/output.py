"""The only code that prints.

Human output (rich tables, logs, hints) and progress bars go to **stderr**; the machine report (``--json``) goes
to **stdout** and nothing else does. Progress bars are shown only when stderr is a terminal and not ``--quiet``.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Output", "Progress", "json_bytes", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, paths, enums, numpy scalars/arrays, sets and tuples into JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return to_jsonable(obj.tolist())
    return obj


#: Field names of the dataclasses without a ``to_dict`` that :func:`_orjson_default` has met.
_PLAIN_FIELDS: dict[type, tuple[str, ...]] = {}


def _orjson_default(obj: Any) -> Any:
    """What orjson cannot write itself, as :func:`to_jsonable` would have it (one level; orjson recurses)."""
    names = _PLAIN_FIELDS.get(type(obj))
    if names is not None:  # the common case in a long list: one dict comprehension
        return {name: getattr(obj, name) for name in names}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        names = _PLAIN_FIELDS[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
        return {name: getattr(obj, name) for name in names}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy values orjson does not take as they are
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def json_bytes(obj: Any) -> bytes:
    """``obj`` (dataclasses, paths, enums, numpy values, sets and tuples inside) as indented UTF-8 JSON.

    Written by orjson, which keeps a report of millions of entries (an audit of a 10-million-tag vocabulary)
    linear and light: no intermediate copy of the report is built. Non-finite floats become null. What orjson
    refuses (an integer beyond 64 bits, an unusual dict key) falls back to the standard library, with the same
    document as a result.
    """
    import orjson

    options = (orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
               | orjson.OPT_PASSTHROUGH_DATACLASS)
    collecting = gc.isenabled()
    gc.disable()  # writing creates millions of short-lived values and no cycles: collections only cost time
    try:
        return orjson.dumps(obj, default=_orjson_default, option=options)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")
    finally:
        if collecting:
            gc.enable()


class Progress:
    """A progress bar on stderr (tqdm) that is a no-op when hidden.

    While nothing counts yet, :meth:`phase` shows what the run is doing in place of the counters, and the bar is
    redrawn every :data:`REDRAW_S` seconds so its clock keeps running; :meth:`finish` sets the final frame to the
    true totals.
    """

    def __init__(self, bar: Any | None) -> None:
        self._bar = bar
        self._stop = threading.Event()
        self._redraw: threading.Thread | None = None

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def phase(self, text: str) -> None:
        """Show ``text`` (``loading the tokenizer``) where the counters go, until they do."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(text, refresh=True)
        if self._redraw is None:
            self._redraw = threading.Thread(target=self._keep_drawing, name="mmprep-progress-redraw", daemon=True)
            self._redraw.start()

    def _keep_drawing(self) -> None:
        bar = self._bar
        while not self._stop.wait(REDRAW_S):
            if bar is not None and time.time() - bar.last_print_t >= REDRAW_S:
                bar.refresh()

    def finish(self, n: int, **values: Any) -> None:
        """The final frame: ``n`` done (the total too, so it reads 100% whatever the estimate was)."""
        if self._bar is None:
            return
        self._stop.set()
        self._bar.total = n
        self._bar.n = n
        self._bar.set_postfix(values, refresh=False)
        self._bar.refresh()

    def close(self, *, keep: bool = False) -> None:
        """Remove the bar (``keep``: leave its last frame on the terminal)."""
        self._stop.set()
        if self._redraw is not None:
            self._redraw.join(timeout=1)
        if self._bar is not None:
            self._bar.leave = keep
            self._bar.close()


#: Seconds between redraws of a bar whose counters do not move (its clock keeps running).
REDRAW_S = 0.5


class Output:
    """Owns stdout and stderr for one command run.

    Args:
        json_mode: emit the report as JSON on stdout (and no tables).
        quiet: only warnings and errors on stderr: no tables, no info lines, no progress bars.
        verbose: extra detail (debug lines) on stderr.
        stdout: stream for data (default ``sys.stdout``).
        stderr: stream for humans (default ``sys.stderr``).
    """

    def __init__(
        self,
        *,
        json_mode: bool = False,
        quiet: bool = False,
        verbose: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        self._stdout = stdout
        self._stderr = stderr
        self._console: Any | None = None

    @property
    def stdout(self) -> TextIO:
        return self._stdout if self._stdout is not None else sys.stdout

    @property
    def stderr(self) -> TextIO:
        return self._stderr if self._stderr is not None else sys.stderr

    @property
    def console(self) -> Any:
        """A rich console bound to stderr (created lazily)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stderr, highlight=False, soft_wrap=True, width=_pipe_width(self.stderr))
        return self._console

    # -- logs -------------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """A note for humans (hidden by --quiet)."""
        if not self.quiet:
            self.console.print(message, markup=False)

    def debug(self, message: str) -> None:
        """Extra detail (shown only with --verbose)."""
        if self.verbose:
            self.console.print(f"[dim]{_escape(message)}[/dim]")

    def warn(self, message: str) -> None:
        """Something the user should know about; shown even with --quiet."""
        self.console.print(f"[yellow]warning:[/yellow] {_escape(message)}")

    def error(self, message: str, hint: str | None = None) -> None:
        self.console.print(f"[bold red]error:[/bold red] {_escape(message)}")
        if hint:
            self.console.print(f"[dim]hint:[/dim] {_escape(hint)}")

    # -- reports ----------------------------------------------------------------------------------------
    def emit_json(self, report: Any) -> None:
        """Write the report as one JSON document on stdout (see :func:`json_bytes`)."""
        data = json_bytes(report) + b"\n"
        binary = getattr(self.stdout, "buffer", None)
        if binary is not None:
            self.stdout.flush()
            binary.write(data)
            binary.flush()
        else:
            self.stdout.write(data.decode("utf-8"))
        self.stdout.flush()

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        caption: str | None = None,
    ) -> None:
        """Render a table on stderr (skipped with --json or --quiet)."""
        if self.json_mode or self.quiet:
            return
        from rich.table import Table

        table = Table(title=title, caption=caption, title_justify="left")
        cells = [[_fmt(v) for v in row] for row in rows]
        for i, col in enumerate(columns):
            # a cell too wide for the terminal wraps (a long file name folds onto the next line) instead of being
            # cut with an ellipsis
            table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
        for row in cells:
            table.add_row(*row)
        self.console.print(table)

    def show_progress(self) -> bool:
        if self.quiet or os.environ.get("MMPREP_NO_PROGRESS"):
            return False
        try:
            return self.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    @contextmanager
    def progress(self, total: int | None, desc: str, unit: str = "it", *, keep: bool = False) -> Iterator[Progress]:
        """A progress bar on stderr, shown only when stderr is a terminal.

        ``keep``: leave the bar's last frame on the terminal when the block ends without an exception (call
        :meth:`Progress.finish` first for the true totals); otherwise the bar is removed.
        """
        bar = None
        if self.show_progress():
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit=unit, file=self.stderr, dynamic_ncols=True, leave=False)
        prog = Progress(bar)
        ok = False
        try:
            yield prog
            ok = True
        finally:
            prog.close(keep=keep and ok)


#: The width tables get on a pipe or a file when COLUMNS is not set: wide enough for any table to keep its natural
#: width (rich would cut them to 80 columns), and a table is never wider than its content.
PIPE_WIDTH = 1000


def _pipe_width(stream: TextIO) -> int | None:
    """The console width for ``stream``: None on a terminal (rich measures it), else ``$COLUMNS`` when set, else
    :data:`PIPE_WIDTH`."""
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)

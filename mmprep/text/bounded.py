"""Running a chat template within bounds: its output size and its time.

A chat template is a Jinja program that comes with the tokenizer folder; one can loop for ever
(``{% for i in range(100000) %}{% for j in range(100000) %}…``) or render gigabytes. transformers renders it with
jinja2's sandbox, which stops attribute escapes but not loops or output. :func:`run_bounded` stops a template that
passes either bound by raising :class:`TemplateTooLarge` or :class:`TemplateTimeout` inside it; the caller rejects
the row and the run goes on.

Two ways, the cheap one where it applies:

* **Cheap** (the compiled template is known, the caller is the main thread, and no one else uses ``SIGALRM``):
  the template's root render function is wrapped once so that each piece of output it yields counts against the
  size bound of the current call (a context variable: a call without bounds passes through), and an interval timer
  (``SIGALRM``; the handler is installed on first use and stays, ignoring a signal when no template runs) stops a
  template still running after the time bound. A few microseconds per call.
* **Everywhere else**: a trace function (``sys.settrace``) looks at the template's own frames only (Jinja compiles a
  template to Python code whose file name is ``<template>``): every 1,024 template lines it checks the clock, and
  each piece of output counts. Correct in any thread, but the renderer runs 2-3 times slower under it.

One operation that builds a huge string at once (``{{ "x" * 10**9 }}``) is measured when it is yielded, after it
was built: the bound stops the row, not the allocation.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import FrameType
from typing import Any, TypeVar

__all__ = ["TEMPLATE_FILENAME", "TemplateTimeout", "TemplateTooLarge", "run_bounded"]

T = TypeVar("T")

#: The file name Jinja gives the code of a template made from a string (``Environment.from_string``).
TEMPLATE_FILENAME = "<template>"
_CHECK_EVERY = 1024  # template lines between two looks at the clock (trace mode)


class TemplateTooLarge(BaseException):
    """The template's output passed the size bound. (A BaseException, so that no ``except Exception`` inside the
    renderer (Jinja's own error handling) can swallow it.)"""


class TemplateTimeout(BaseException):
    """The template ran past its time bound."""


class _Budget:
    __slots__ = ("chars", "max_chars")

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0

    def add(self, piece: object) -> None:
        if type(piece) is str:
            self.chars += len(piece)
            if self.chars > self.max_chars:
                raise TemplateTooLarge


_BUDGET: ContextVar[_Budget | None] = ContextVar("mmprep_template_budget", default=None)


def run_bounded(render: Callable[[], T], *, max_chars: int, seconds: float, template: Any = None) -> T:
    """``render()`` with the Jinja template it runs bounded to ``max_chars`` characters of output and ``seconds``.

    Args:
        render: renders the template (e.g. a call to ``apply_chat_template``).
        max_chars: output characters allowed.
        seconds: time allowed.
        template: the compiled ``jinja2.Template`` that ``render`` runs, when known (the cheap way needs it).

    Raises:
        TemplateTooLarge: the output passed ``max_chars`` (the template was stopped there).
        TemplateTimeout: the template ran longer than ``seconds``.
    """
    if template is not None and _wrap(template) and _alarm_free():
        token = _BUDGET.set(_Budget(max_chars))
        try:
            with _alarm(seconds):
                return render()
        finally:
            _BUDGET.reset(token)
    return _traced(render, max_chars, seconds)


# -- the cheap way: a wrapped root render function and an interval timer --------------------------------------


def _wrap(template: Any) -> bool:
    """Make ``template`` count its output against the current budget (once per template); False if it does not
    look like a compiled Jinja template."""
    if getattr(template, "_mmprep_bounded", False):
        return True
    original = getattr(template, "root_render_func", None)
    if not callable(original):
        return False

    def root(context: Any) -> Iterator[Any]:
        budget = _BUDGET.get()
        if budget is None:
            yield from original(context)
            return
        for piece in original(context):
            budget.add(piece)
            yield piece

    try:
        template.root_render_func = root
        template._mmprep_bounded = True
    except AttributeError:  # pragma: no cover - a template class with slots
        return False
    return True


_armed = False  # a timer of run_bounded's is running (main thread only)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _armed:  # a late signal after the call returned does nothing
        raise TemplateTimeout


def _alarm_free() -> bool:
    """Whether this call may use ``SIGALRM``: the main thread (where Python runs signal handlers), no timer
    running, and no handler but the default or ours (installed on first use, it ignores a signal that arrives when
    no template runs)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    handler = signal.getsignal(signal.SIGALRM)
    if handler is not _on_alarm:
        if handler not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return False  # someone else's
        signal.signal(signal.SIGALRM, _on_alarm)
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


# -- everywhere else: a trace function on the template's frames ------------------------------------------------


class _Guard:
    __slots__ = ("budget", "deadline", "lines")

    def __init__(self, max_chars: int, seconds: float) -> None:
        self.budget = _Budget(max_chars)
        self.deadline = time.monotonic() + seconds
        self.lines = 0

    def on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        # Called for every new Python frame: trace the template's frames only.
        return self.on_line if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    def on_line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if not self.lines % _CHECK_EVERY and time.monotonic() > self.deadline:
                raise TemplateTimeout
        elif event == "return" and frame.f_code.co_name == "root":
            # The root render function is a generator: each 'return' event is one piece of output it yields
            # (blocks and includes are yielded through it).
            self.budget.add(arg)
        return self.on_line


def _traced(render: Callable[[], T], max_chars: int, seconds: float) -> T:
    guard = _Guard(max_chars, seconds)
    previous = sys.gettrace()
    sys.settrace(guard.on_call)
    try:
        return render()
    finally:
        sys.settrace(previous)

"""Recognize-Anything training JSON (one big list of records), streamed in bounded memory with exact line numbers.

:class:`RamJsonReader` cuts the list into ~1 MiB batches at element boundaries and parses each in one call (orjson
when installed); a cut that was not a real boundary, or malformed JSON, is redone element by element with the
standard library's decoder (:func:`_walk`), which names the line of the error. :func:`scan_ram_json` counts the
batches into a :class:`~mmprep.labels.audit.tally.Tally`: in bulk when it can, record by record (the reference
semantics, ``json``) when a batch holds anything unusual.
"""

from __future__ import annotations

import codecs
import gc
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import numpy as np

from mmprep.errors import InputError
from mmprep.labels.audit.report import Location
from mmprep.labels.audit.tally import Tally

__all__ = ["RamJsonReader", "scan_ram_json"]

_fast_loads: Callable[[bytes], Any] | None
try:  # optional: parses JSON batches ~2x faster than the standard library
    import orjson
except ImportError:  # pragma: no cover - exercised only without the dev extra
    _fast_loads = None
else:
    _fast_loads = orjson.loads

_BATCH = 1 << 20  # bytes of RAM JSON parsed per call
_READ = 4 << 20  # bytes read per read() call

_WSB = re.compile(rb"[ \t\r\n]*")
_WSS = re.compile(r"[ \t\r\n]*")
_CUT = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_STRUCT = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)


def _ws_end(pattern: re.Pattern[Any], data: Any, pos: int) -> int:
    """Where the whitespace starting at ``data[pos]`` ends (``pattern`` matches runs of whitespace)."""
    m = pattern.match(data, pos)
    return pos if m is None else m.end()


class _WalkError(Exception):
    def __init__(self, pos: int, msg: str) -> None:
        super().__init__(msg)
        self.pos = pos
        self.msg = msg


def _complete_in(text: str, i: int) -> bool:
    """Whether the JSON value starting at ``text[i]`` ends inside ``text`` (brackets and strings balance)."""
    c = text[i]
    if c not in "[{\"":
        return re.compile(r"[,\]\s]").search(text, i) is not None
    depth = 0
    for m in _STRUCT.finditer(text, i):
        tok = m.group()
        if tok[0] == '"':
            if len(tok) < 2 or not tok.endswith('"') or _odd_backslashes(tok):
                return False  # an unterminated string runs to the end of the text
            if depth == 0:
                return True
        elif tok in "[{":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return True
    return False


def _odd_backslashes(tok: str) -> bool:
    n = 0
    for ch in reversed(tok[1:-1]):
        if ch != "\\":
            break
        n += 1
    return n % 2 == 1


@dataclass(frozen=True, slots=True)
class _Walked:
    """What :func:`_walk` parsed: ``items`` are ``(start index, value)``; ``state`` is ``"end"`` (the closing ``]``
    was consumed; ``end`` is after it), ``"stop"`` (``end`` >= ``stop_at`` at an element start) or ``"more"`` (the
    text ends inside an element that starts at ``end``)."""

    items: list[tuple[int, Any]]
    end: int
    state: str


def _walk(text: str, i: int, *, final: bool, allow_close: bool, stop_at: int | None = None) -> _Walked:
    """Parse JSON list elements one at a time from ``text[i]`` (an element start, after ``[`` or ``,``).

    Raises _WalkError on malformed JSON.
    """
    raw_decode = _DECODER.raw_decode
    n = len(text)
    items: list[tuple[int, Any]] = []
    while True:
        i = _ws_end(_WSS, text, i)
        if i >= n:
            if final:
                raise _WalkError(i, "unexpected end of file inside the JSON list")
            return _Walked(items, i, "more")
        if text[i] == "]":
            if allow_close:
                return _Walked(items, i + 1, "end")
            raise _WalkError(i, "expected a value after ',' (trailing comma?)")
        try:
            value, end = raw_decode(text, i)
        except json.JSONDecodeError as exc:
            if not final and not _complete_in(text, i):
                return _Walked(items, i, "more")
            raise _WalkError(exc.pos, f"invalid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # e.g. an integer longer than Python converts
            raise _WalkError(i, f"unreadable JSON value: {str(exc)[:120]}") from None
        j = _ws_end(_WSS, text, end)
        if j >= n:
            if final:
                raise _WalkError(j, "unexpected end of file inside the JSON list")
            return _Walked(items, i, "more")
        items.append((i, value))
        if text[j] == "]":
            return _Walked(items, j + 1, "end")
        if text[j] != ",":
            raise _WalkError(j, "expected ',' or ']' between list elements")
        i = j + 1
        allow_close = False
        if stop_at is not None and i >= stop_at:
            return _Walked(items, i, "stop")


_DECODER = json.JSONDecoder()


def _loads(data: bytes) -> Any:
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except json.JSONDecodeError:  # orjson.JSONDecodeError is one
            pass  # the standard library accepts a little more (NaN, integers beyond 64 bits); let it decide
    return json.loads(data)


def _count_newlines(buf: bytes, start: int, end: int) -> int:
    if end - start < 65536:
        return buf.count(b"\n", start, end)
    return int(np.count_nonzero(np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start) == 10))


@dataclass
class _Batch:
    values: list[Any]
    record0: int  # 1-based record number of values[0]
    line0: int  # line where values[0] starts
    seg: bytes  # the bytes of the elements (for lazy line numbers)
    lines: list[int] | None = None  # start line of each element, when known
    bulk: bool = True  # parsed in one call (orjson when installed) rather than element by element

    def line_of(self, k: int) -> int:
        if self.lines is None:
            text = self.seg.decode("utf-8", errors="replace")
            line, prev, lines = self.line0, 0, []
            for start, _v in _walk(text + "]", 0, final=True, allow_close=False).items:
                line += text.count("\n", prev, start)
                prev = start
                lines.append(line)
            self.lines = lines
        return self.lines[k]

    def location(self, name: str, k: int) -> Location:
        """Where ``values[k]`` is in the file ``name``."""
        return Location(name, self.line_of(k), self.record0 + k)


class RamJsonReader:
    """Split a JSON list into batches of whole elements (bounded memory), tracking lines and record numbers."""

    def __init__(self, stream: IO[bytes], name: str, progress: Callable[[int], None] | None) -> None:
        self.stream = stream
        self.name = name
        self.progress = progress
        self.buf = b""
        self.pos = 0
        self.line = 1
        self.record = 0
        self.eof = False
        self.done = False  # the closing ']' was consumed
        self.bytes_done = 0

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(_READ)
        if not chunk:
            self.eof = True
            return False
        self.bytes_done += self.pos
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _advance(self, new_pos: int) -> None:
        self.line += _count_newlines(self.buf, self.pos, new_pos)
        if self.progress is not None:
            self.progress(new_pos - self.pos)
        self.pos = new_pos

    def _skip_ws(self) -> None:
        while True:
            self._advance(_ws_end(_WSB, self.buf, self.pos))
            if self.pos < len(self.buf) or not self._fill():
                return

    def _error(self, msg: str, line: int | None = None) -> InputError:
        return InputError(f"{self.name}:{line or self.line}: {msg}")

    def batches(self) -> Iterator[_Batch]:
        self._fill()
        if self.buf.startswith(b"\xef\xbb\xbf"):
            self.pos = 3
        self._skip_ws()
        if self.pos >= len(self.buf):
            raise InputError(f"{self.name}: empty file, expected a JSON list")
        if self.buf[self.pos] != 0x5B:  # '['
            raise self._error("expected a JSON list of records (a file starting with '[')")
        self._advance(self.pos + 1)
        first = True
        while True:
            if not self.eof and len(self.buf) - self.pos < _BATCH:
                self._fill()
            self._skip_ws()
            if self.pos >= len(self.buf):
                raise self._error("unexpected end of file inside the JSON list")
            if self.buf[self.pos] == 0x5D and first:  # ']': an empty list
                self._advance(self.pos + 1)
                self._check_trailing()
                return
            batch = self._next_batch(first)
            first = False
            if batch is not None:
                yield batch
            if self.done:
                self._check_trailing()
                return

    def _next_batch(self, first: bool) -> _Batch | None:
        """The next batch of whole elements (None: none complete yet); sets ``done`` at the end of the list."""
        buf, pos = self.buf, self.pos
        seg: bytes | None = None
        nxt = -1
        last = False
        if self.eof and len(buf) - pos <= 2 * _BATCH:
            tail = buf[pos:].rstrip(b" \t\r\n")
            if tail.endswith(b"]"):
                seg, last = tail[:-1], True
        if seg is None:
            limit = min(len(buf), pos + _BATCH)
            j = buf.rfind(b"}", pos, limit)
            tries = 0
            while j != -1 and tries < 64:
                m = _CUT.match(buf, j)
                if m:
                    seg, nxt = buf[pos: j + 1], m.end() - 1
                    break
                j = buf.rfind(b"}", pos, j)
                tries += 1
            if seg is None and not self.eof:
                # no element boundary in the window (a huge element): read on until there is one
                scanned = len(buf) - pos
                while seg is None and self._fill():
                    buf, pos = self.buf, self.pos
                    m = _CUT.search(buf, pos + max(0, scanned - 64))
                    scanned = len(buf) - pos
                    if m:
                        seg, nxt = buf[pos: m.start() + 1], m.end() - 1
                if seg is None:
                    return None  # at EOF now; the next round takes the tail
        values: Any = None
        if seg is not None:
            try:
                values = _loads(b"[" + seg + b"]")
            except (ValueError, RecursionError):
                values = None  # not a real boundary, or malformed: decide element by element
        if seg is None or not isinstance(values, list):
            return self._walk_batch(first, len(seg) if seg is not None and not last else None)
        batch = _Batch(values, self.record + 1, self.line, seg)
        self.record += len(values)
        if last:
            self._advance(len(buf.rstrip(b" \t\r\n")))
            self.done = True
            return batch
        self._advance(nxt)
        return batch

    def _walk_batch(self, first: bool, stop_bytes: int | None) -> _Batch:
        """Exact element-by-element parsing from the current position (a true element start)."""
        while True:
            data = self.buf[self.pos:]
            try:
                text, used = codecs.utf_8_decode(data, "strict", self.eof)
            except UnicodeDecodeError as exc:
                line = self.line + data.count(b"\n", 0, exc.start)
                raise self._error(f"not valid UTF-8 (byte {self.bytes_done + self.pos + exc.start})", line) from None
            stop_at = None
            if stop_bytes is not None:
                stop_at = len(codecs.utf_8_decode(data[:stop_bytes], "replace", False)[0])
            try:
                walked = _walk(text, 0, final=self.eof and used == len(data), allow_close=first, stop_at=stop_at)
            except _WalkError as exc:
                raise self._error(exc.msg, self.line + text.count("\n", 0, exc.pos)) from None
            items = walked.items
            if walked.state == "more" and not items:
                if not self._fill():
                    self.eof = True
                continue
            line, prev, lines = self.line, 0, []
            for start, _v in items:
                line += text.count("\n", prev, start)
                prev = start
                lines.append(line)
            values = [v for _s, v in items]
            consumed = len(text[:walked.end].encode("utf-8"))
            seg = data[:consumed]
            batch = _Batch(values, self.record + 1, lines[0] if lines else self.line, seg, lines, bulk=False)
            self.record += len(values)
            self._advance(self.pos + consumed)
            self.done = walked.state == "end"
            return batch

    def _check_trailing(self) -> None:
        self._skip_ws()
        if self.pos < len(self.buf):
            raise self._error("unexpected data after the end of the JSON list")


def scan_ram_json(stream: IO[bytes], name: str, tally: Tally, progress: Callable[[int], None] | None) -> int:
    """Audit one RAM training JSON stream; returns the number of records."""
    reader = RamJsonReader(stream, name, progress)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the parsed batches are acyclic; collection passes over them only cost time
    try:
        for batch in reader.batches():
            if tally.ram_batch_fast(batch.values, partial(batch.location, name)):
                continue
            values = batch.values
            if batch.bulk:  # parsed in bulk: re-read with the standard library, the reference semantics
                values = _reference_values(batch.seg, values)  # (orjson reads integers beyond 64 bits as floats)
            for k, value in enumerate(values):
                tally.ram_record(value, partial(batch.location, name, k))
            tally.flush()
    finally:
        if gc_was_enabled:
            gc.enable()
    return reader.record


def _reference_values(seg: bytes, values: list[Any]) -> list[Any]:
    try:
        return json.loads(b"[" + seg + b"]")
    except (ValueError, RecursionError):
        return values


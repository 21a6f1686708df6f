"""The tally every annotation file is counted into: tag counts per vocabulary id, unknown names and ids, malformed
records and tags per sample.

Records arrive one at a time (:meth:`Tally.add_tags`, :meth:`Tally.add_ids`, :meth:`Tally.ram_record`: the exact
reference) or, for RAM training JSON, a whole parsed batch at once (:meth:`Tally.ram_batch_fast`, counted with
numpy, which declines any batch that needs a closer look). :func:`frequency_stats` turns the counts into the
report's :class:`~mmprep.labels.audit.report.FrequencyStats`.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from mmprep.labels.audit.report import FrequencyStats, Location, Problem, TagCount, UnknownTag
from mmprep.labels.vocab import Vocabulary, normalize_tag

__all__ = ["LocFn", "Seen", "Tally", "fixed_loc", "frequency_stats"]

_MAX_TRACKED = 10_000  # distinct unknown names/ids kept with their first location (the rest are only counted)

#: Where a record is, asked for only when something about it is first seen (finding a line can cost a re-parse).
LocFn = Callable[[], Location]


def fixed_loc(name: str, line: int, record: int) -> LocFn:
    """A :data:`LocFn` for a location already known."""
    return lambda: Location(name, line, record)


@dataclass(slots=True)
class Seen:
    """Something counted with its first occurrence: ``detail`` for a problem, ``id`` for a normalised match."""

    count: int
    first: Location
    detail: str = ""
    id: int = -1


class Tally:
    """Counts per vocabulary id, unknowns, problems and tags-per-sample, shared by every annotation file."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.size = vocab.size
        if vocab.sequential:
            self.known = np.ones(self.size, dtype=bool)
        else:
            self.known = np.zeros(self.size, dtype=bool)
            self.known[np.fromiter(vocab.ids, dtype=np.int64, count=len(vocab.ids))] = True
        self.all_known = bool(self.known.all())
        self.counts = np.zeros(self.size, dtype=np.int64)
        self.parse_used = np.zeros(self.size, dtype=bool)
        self.lens_hist = np.zeros(64, dtype=np.int64)
        self.samples = 0
        self.empty = 0
        self.refs = 0
        self.unknown: dict[tuple[str, str | int], Seen] = {}
        self.unknown_untracked = 0
        self.normalised: dict[str, Seen] = {}
        self.problems: dict[str, Seen] = {}
        self.problem_total = 0
        self._pending: list[int] = []
        self._pending_lens: list[int] = []
        self._name_cache: dict[str, int | None] = {}

    # per-record (slow, exact) path
    def problem(self, code: str, detail: str, loc: LocFn) -> None:
        self.problem_total += 1
        entry = self.problems.get(code)
        if entry is None:
            self.problems[code] = Seen(1, loc(), detail)
        else:
            entry.count += 1

    def _unknown(self, kind: str, value: str | int, loc: LocFn, n: int = 1) -> None:
        """Count ``n`` occurrences of an unknown name/id whose first occurrence (in file order) is at ``loc``."""
        key = (kind, value)
        entry = self.unknown.get(key)
        if entry is not None:
            entry.count += n
        elif len(self.unknown) < _MAX_TRACKED:
            self.unknown[key] = Seen(n, loc())
        else:
            self.unknown_untracked += n

    def add_ids(self, ids: Sequence[int], loc: LocFn, *, count: bool = True) -> None:
        """Check integer ids; ``count=False`` only marks them used (RAM parse lists)."""
        size, known = self.size, self.known
        good = []
        for i in ids:
            if 0 <= i < size and known[i]:
                good.append(i)
            else:
                self._unknown("id", i, loc)
        if count:
            self._pending.extend(good)
            self._pending_lens.append(len(ids))
            if len(self._pending) > 1_000_000:
                self.flush()
        elif good:
            self.parse_used[good] = True

    def add_tags(self, tags: Sequence[str | int], loc: LocFn) -> None:
        """Check a sample's tags as written: integer ids or names (exact match first, then normalised)."""
        good = []
        for t in tags:
            if isinstance(t, int):
                if 0 <= t < self.size and self.known[t]:
                    good.append(t)
                else:
                    self._unknown("id", t, loc)
                continue
            name = t.strip()
            cached = self._name_cache.get(name, -1)
            if cached == -1:
                cached = self.vocab.name_to_id.get(name)
                if cached is None:
                    cached = self.vocab.normalized_to_id.get(normalize_tag(name))
                    if cached is not None:
                        cached = -2 - cached  # marks a normalised-only match
                if len(self._name_cache) < 200_000:
                    self._name_cache[name] = cached
            if cached is None:
                self._unknown("name", name, loc)
            elif cached <= -2:
                good.append(-2 - cached)
                entry = self.normalised.get(name)
                if entry is None:
                    self.normalised[name] = Seen(1, loc(), id=-2 - cached)
                else:
                    entry.count += 1
            else:
                good.append(cached)
        self._pending.extend(good)
        self._pending_lens.append(len(tags))
        if len(self._pending) > 1_000_000:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.asarray(self._pending, dtype=np.int64), minlength=self.size)
            self.refs += len(self._pending)
            self._pending.clear()
        if self._pending_lens:
            lens = np.asarray(self._pending_lens, dtype=np.int64)
            self._add_lens(lens)
            self._pending_lens.clear()

    def _add_lens(self, lens: np.ndarray) -> None:
        if not lens.size:
            return
        hist = np.bincount(lens)
        if hist.size > self.lens_hist.size:
            grown = np.zeros(hist.size, dtype=np.int64)
            grown[: self.lens_hist.size] = self.lens_hist
            self.lens_hist = grown
        self.lens_hist[: hist.size] += hist
        self.samples += int(lens.size)
        self.empty += int(hist[0])

    # RAM JSON: per batch
    def ram_batch_fast(self, values: list[Any], loc_of: Callable[[int], Location]) -> bool:
        """Count a batch of RAM records in bulk; False (and nothing counted) if any record needs a closer look.

        Out-of-range and unknown ids are counted here too, exactly as :meth:`ram_record` would (``loc_of(k)`` is
        the location of ``values[k]``, asked for only when an unknown id is first seen); wrong types are not.
        """
        try:
            us = list(map(_IG_UNION, values))  # TypeError for a record that is not an object
        except (KeyError, TypeError):
            return False
        if not us or set(map(type, us)) != {list}:
            return False
        ps: list[Any] = []
        inner: list[Any] = []
        if "parse_label_id" in values[0]:
            try:
                ps = list(map(_IG_PARSE, values))
                cs = list(map(_IG_CAPTION, values))
            except KeyError:
                return False
            if set(map(type, ps)) != {list} or set(map(type, cs)) != {list}:
                return False
            if list(map(len, ps)) != list(map(len, cs)):
                return False
            inner = list(chain.from_iterable(ps))
            if inner and set(map(type, inner)) != {list}:
                return False
            pflat = list(chain.from_iterable(inner))
        else:
            if any(map(_HAS_PARSE, values)):
                return False
            pflat = []
        flat = list(chain.from_iterable(us))
        arr = _int_array(flat)
        parr = _int_array(pflat)
        if arr is None or parr is None or not (_no_bools(flat, arr) and _no_bools(pflat, parr)):
            return False
        lens = np.fromiter(map(len, us), dtype=np.int64, count=len(us))
        bad, pbad = self._unknown_mask(arr), self._unknown_mask(parr)
        if bad is not None or pbad is not None:
            found: list[tuple[np.ndarray, np.ndarray, int]] = []  # (unknown ids, their records, 0 parse / 1 union)
            if pbad is not None:  # the record of each parse id: records -> their parse lists -> ids
                lists = np.repeat(np.arange(len(ps)), np.fromiter(map(len, ps), dtype=np.int64, count=len(ps)))
                prec = np.repeat(lists, np.fromiter(map(len, inner), dtype=np.int64, count=len(inner)))
                found.append((parr[pbad], prec[pbad], 0))
                parr = parr[~pbad]
            if bad is not None:
                found.append((arr[bad], np.repeat(np.arange(len(us)), lens)[bad], 1))
                arr = arr[~bad]
            self._bulk_unknown(found, loc_of)
        self.counts += np.bincount(arr, minlength=self.size)
        self.refs += int(arr.size)
        if parr.size:
            self.parse_used[parr] = True
        self._add_lens(lens)
        return True

    def _unknown_mask(self, ids: np.ndarray) -> np.ndarray | None:
        """Which ids are out of range or not in the vocabulary; None when all are known (the common case)."""
        if not ids.size:
            return None
        lo, hi = ids.min(), ids.max()
        if lo >= 0 and hi < self.size and (self.all_known or self.known[ids].all()):
            return None
        bad = (ids < 0) | (ids >= self.size)
        if not self.all_known:
            bad |= ~self.known[np.where(bad, 0, ids)]
        return bad

    def _bulk_unknown(self, found: list[tuple[np.ndarray, np.ndarray, int]], loc_of: Callable[[int], Location]
                      ) -> None:
        """Count a batch's unknown ids in the order :meth:`ram_record` meets them (record by record, its parse
        lists before its union list), so that first locations and the tracking cap come out the same."""
        values = np.concatenate([v for v, _r, _p in found])
        records = np.concatenate([r for _v, r, _p in found])
        keys = np.concatenate([r * 2 + p for _v, r, p in found])
        order = np.argsort(keys, kind="stable")
        values, records = values[order], records[order]
        distinct, first, counts = np.unique(values, return_index=True, return_counts=True)
        for j in np.argsort(first, kind="stable").tolist():
            k = int(records[first[j]])
            self._unknown("id", int(distinct[j]), partial(loc_of, k), int(counts[j]))

    def ram_record(self, value: Any, loc: LocFn) -> None:
        """One RAM training record, checked field by field (the reference for :meth:`ram_batch_fast`)."""
        if not isinstance(value, dict):
            self.problem("not_object", f"expected a JSON object, got {_typename(value)}", loc)
            return
        union = value.get("union_label_id", _MISSING)
        if union is _MISSING:
            self.problem("missing_union_label_id", "no 'union_label_id' field", loc)
            return
        if not isinstance(union, list):
            self.problem("bad_union_label_id", f"'union_label_id' is {_typename(union)}, expected a list", loc)
            return
        ids = self._int_ids(union, "union_label_id", loc)
        if "parse_label_id" in value:
            parse = value["parse_label_id"]
            caption = value.get("caption", _MISSING)
            if not isinstance(parse, list):
                self.problem("bad_parse_label_id", f"'parse_label_id' is {_typename(parse)}, expected a list", loc)
            else:
                pids: list[int] = []
                for item in parse:
                    if isinstance(item, list):
                        pids.extend(self._int_ids(item, "parse_label_id", loc))
                    else:
                        self.problem("bad_parse_label_id",
                                     f"'parse_label_id' holds {_typename(item)}, expected lists of ids", loc)
                self.add_ids(pids, loc, count=False)
                if caption is _MISSING:
                    self.problem("parse_caption_mismatch", "'parse_label_id' without 'caption'", loc)
                elif not isinstance(caption, list) or len(caption) != len(parse):
                    n = len(caption) if isinstance(caption, list) else _typename(caption)
                    self.problem("parse_caption_mismatch",
                                 f"{len(parse)} parse_label_id lists for caption of {n} items", loc)
        self.add_ids(ids, loc)

    def _int_ids(self, items: list[Any], fieldname: str, loc: LocFn) -> list[int]:
        out = []
        for i in items:
            if isinstance(i, int) and not isinstance(i, bool):
                out.append(i)
            else:
                self.problem("bad_id", f"'{fieldname}' holds {i!r:.40}, expected integer ids", loc)
        return out

    # the report's lists
    def unknown_tags(self) -> list[UnknownTag]:
        """Unknown names and out-of-range ids, most frequent first."""
        return sorted(
            (UnknownTag(kind, value, e.count, e.first) for (kind, value), e in self.unknown.items()),
            key=lambda u: (-u.count, u.kind, str(u.value)),
        )

    def normalised_matches(self) -> list[UnknownTag]:
        """Names that matched a tag only after normalisation, most frequent first."""
        return sorted(
            (UnknownTag("name", name, e.count, e.first) for name, e in self.normalised.items()),
            key=lambda u: (-u.count, str(u.value)),
        )

    def problem_list(self) -> list[Problem]:
        """Malformed records by reason code, most frequent first."""
        return sorted(
            (Problem(code, e.count, e.first, e.detail) for code, e in self.problems.items()),
            key=lambda p: (-p.count, p.code),
        )


_MISSING = object()


def _int_array(items: list[Any]) -> np.ndarray | None:
    """The items as a 1-D int64 array, or None unless every item is an integer that fits in 64 bits.

    (``bool`` is an ``int`` here: callers rule booleans out separately.)
    """
    try:
        buf = array.array("q", items)
    except (TypeError, OverflowError):
        return None
    return np.frombuffer(buf, dtype=np.int64)


_IG_UNION = itemgetter("union_label_id")
_IG_PARSE = itemgetter("parse_label_id")
_IG_CAPTION = itemgetter("caption")


def _no_bools(items: list[Any], arr: np.ndarray) -> bool:
    """No item is a boolean (array("q") reads True/False as 1/0, so only those values need a look)."""
    small = np.flatnonzero(arr <= 1)
    if not small.size:
        return True
    if small.size * 8 > arr.size:
        return set(map(type, items)) == {int}
    return set(map(type, map(items.__getitem__, small.tolist()))) == {int}


def _HAS_PARSE(d: dict[str, Any]) -> bool:
    return "parse_label_id" in d


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )



def frequency_stats(tally: Tally, top: int) -> FrequencyStats:
    """How the counted tags are distributed; ``top`` most and least used tags are listed."""
    names = tally.vocab.names_by_id
    counts = tally.counts
    total = int(counts.sum())
    ordered = np.sort(counts[counts > 0])[::-1]
    cum = np.cumsum(ordered)
    coverage = {}
    for share in (0.5, 0.9, 0.99):
        coverage[f"{round(share * 100)}%"] = int(np.searchsorted(cum, share * total) + 1) if total else 0
    hist = tally.lens_hist
    n = int(hist.sum())
    per: dict[str, float | int | None] = {"min": None, "mean": None, "median": None, "p90": None, "max": None}
    if n:
        nz = np.flatnonzero(hist)
        cumh = np.cumsum(hist)
        per = {
            "min": int(nz[0]),
            "mean": round(float((np.arange(hist.size) * hist).sum() / n), 3),
            "median": int(np.searchsorted(cumh, (n + 1) // 2)),
            "p90": int(np.searchsorted(cumh, math.ceil(0.9 * n))),
            "max": int(nz[-1]),
        }
    used_ids = np.flatnonzero(counts)
    by_count = used_ids[np.lexsort((used_ids, -counts[used_ids]))]
    least = used_ids[np.lexsort((used_ids, counts[used_ids]))]
    return FrequencyStats(
        samples=tally.samples,
        samples_without_tags=tally.empty,
        occurrences=total,
        tags_per_sample=per,
        coverage=coverage,
        used_once=int((counts == 1).sum()),
        most_used=tuple(TagCount(int(i), names.get(int(i), ""), int(counts[i])) for i in by_count[:top]),
        least_used=tuple(TagCount(int(i), names.get(int(i), ""), int(counts[i])) for i in least[:top]),
        counts_by_id=tuple(counts.tolist()),
    )


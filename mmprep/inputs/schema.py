"""One type per column of a JSON or CSV manifest, decided from every row (the schema pass of ``pack``).

JSON values have no declared types, and rows of a manifest need not agree, while a Parquet shard needs one type per
column, the same in every shard. :class:`ColumnTypes` sees each row's value once and keeps, per column, groups of
values whose types can be widened into one; the group with the most rows wins (ties: the group seen first), so the
result depends on the input alone (not on how it is cut into shards, nor on the number of workers).

The widening rule (:func:`unify`), applied in input order:

- ``null`` widens to any type (every column is nullable; a missing key is a null);
- ``int`` and ``float`` widen to ``float`` (64-bit);
- two lists widen to a list of their widened element types;
- two objects widen to an object with the union of their fields (fields in order of first appearance), each field
  widened; a field a row lacks is null in that row;
- nothing else widens: a string and a number, a list and an object, a boolean and an int stay apart;
- objects whose keys are data rather than field names (more than :data:`MAX_FIELDS` distinct keys over the input)
  become JSON text (:data:`JSON`), so a column of per-row maps cannot grow a schema of a million fields.

A value that does not fit its column's final type (:func:`fits`) is the row's fault, not the column's: ``pack``
rejects the row (reason ``bad_column``, naming the column and the line). Types are kept as small tuples here
(:data:`NULL`, :data:`BOOL`, ...) and turned into Arrow types once (:func:`to_arrow`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BOOL",
    "BYTES",
    "FLOAT",
    "INT",
    "JSON",
    "MAX_FIELDS",
    "NULL",
    "STR",
    "ColumnTypes",
    "JsonType",
    "clean_value",
    "fits",
    "to_arrow",
    "type_name",
    "unify",
    "value_type",
]

#: A type: ``("null",)``, ``("bool",)``, ``("int",)``, ``("float",)``, ``("str",)``, ``("bytes",)``,
#: ``("list", element)`` or ``("struct", ((name, type), ...))``.
JsonType = tuple[Any, ...]

NULL: JsonType = ("null",)
BOOL: JsonType = ("bool",)
INT: JsonType = ("int",)
FLOAT: JsonType = ("float",)
STR: JsonType = ("str",)
BYTES: JsonType = ("bytes",)
#: Objects stored as JSON text (see MAX_FIELDS).
JSON: JsonType = ("json",)
#: Distinct keys an object column may have before it is stored as JSON text.
MAX_FIELDS = 256
_INT64 = (-(1 << 63), 1 << 63)


def value_type(value: Any) -> JsonType | None:
    """The type of one value, None when its parts cannot share a type (a list holding a string and a number) or
    it is not a JSON value."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return STR
    if isinstance(value, bytes | bytearray):
        return BYTES
    if isinstance(value, list):
        element: JsonType | None = NULL
        for item in value:
            t = value_type(item)
            element = unify(element, t) if element is not None and t is not None else None
            if element is None:
                return None
        return ("list", element)
    if isinstance(value, dict):
        if len(value) > MAX_FIELDS:
            return JSON if all(isinstance(k, str) for k in value) else None
        fields = []
        for k, v in value.items():
            t = value_type(v)
            if t is None or not isinstance(k, str):
                return None
            fields.append((k, t))
        return ("struct", tuple(fields))
    return None


def unify(a: JsonType, b: JsonType) -> JsonType | None:
    """The narrowest type both ``a`` and ``b`` widen to (see the module docstring), None when there is none."""
    if a == b:
        return a
    if a == NULL:
        return b
    if b == NULL:
        return a
    if {a[0], b[0]} == {"int", "float"}:
        return FLOAT
    if a[0] == b[0] == "list":
        element = unify(a[1], b[1])
        return None if element is None else ("list", element)
    if {a[0], b[0]} <= {"struct", "json"} and "json" in (a[0], b[0]):
        return JSON
    if a[0] == b[0] == "struct":
        merged = dict(a[1])
        order = [name for name, _ in a[1]]
        for name, t in b[1]:
            if name in merged:
                u = unify(merged[name], t)
                if u is None:
                    return None
                merged[name] = u
            else:
                merged[name] = t
                order.append(name)
        if len(order) > MAX_FIELDS:
            return JSON
        return ("struct", tuple((name, merged[name]) for name in order))
    return None


def fits(value: Any, t: JsonType) -> bool:
    """Whether ``value`` can be stored in a column of type ``t`` (null always can)."""
    if value is None:
        return True
    kind = t[0]
    if kind == "null":
        return isinstance(value, dict) and not value  # an object without keys in a column no key ever reached
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value < _INT64[1]
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bytes":
        return isinstance(value, bytes | bytearray)
    if kind == "json":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list) and all(fits(v, t[1]) for v in value)
    if kind == "struct":
        if not isinstance(value, dict):
            return False
        if not t[1]:
            return not value
        known = dict(t[1])
        return all(k in known and fits(v, known[k]) for k, v in value.items())
    return False


def _needs_cleaning(t: JsonType) -> bool:
    """Whether values of ``t`` need :func:`clean_value` (an object type without fields, or JSON text inside)."""
    if t[0] == "json":
        return True
    if t[0] == "list":
        return _needs_cleaning(t[1])
    if t[0] == "struct":
        return not t[1] or any(_needs_cleaning(ft) for _, ft in t[1])
    return False


def clean_value(value: Any, t: JsonType) -> Any:
    """``value`` ready for Arrow: an object without keys becomes null where its type has no fields (Parquet cannot
    store an object type without fields, so such a type is stored as null); a :data:`JSON` object becomes its
    JSON text."""
    if value is None or not _needs_cleaning(t):
        return value
    if t[0] == "json":
        import json

        return json.dumps(value, ensure_ascii=False)
    if t[0] == "struct":
        if not t[1]:
            return None
        known = dict(t[1])
        return {k: clean_value(v, known[k]) for k, v in value.items()}
    if t[0] == "list":
        return [clean_value(v, t[1]) for v in value]
    return value


def to_arrow(t: JsonType) -> Any:
    """The Arrow type of ``t`` (64-bit ints and floats; an object type without fields becomes null)."""
    import pyarrow as pa

    kind = t[0]
    simple = {"null": pa.null, "bool": pa.bool_, "int": pa.int64, "float": pa.float64, "str": pa.string,
              "bytes": pa.binary, "json": pa.string}
    if kind in simple:
        return simple[kind]()
    if kind == "list":
        return pa.list_(to_arrow(t[1]))
    if not t[1]:
        return pa.null()
    return pa.struct([pa.field(name, to_arrow(ft)) for name, ft in t[1]])


def type_name(t: JsonType | None) -> str:
    """A short name: ``string``, ``int64``, ``list<string>``, ``struct<from: string, value: string>``."""
    if t is None:
        return "mixed"
    kind = t[0]
    names = {"null": "null", "bool": "bool", "int": "int64", "float": "double", "str": "string", "bytes": "binary",
             "json": "JSON text"}
    if kind in names:
        return names[kind]
    if kind == "list":
        return f"list<{type_name(t[1])}>"
    return "struct<" + ", ".join(f"{n}: {type_name(ft)}" for n, ft in t[1]) + ">"


@dataclass
class _Group:
    type: JsonType
    rows: int = 1


@dataclass
class ColumnTypes:
    """The type vote over every row of an input, per column.

    Feed it each row's carried values with :meth:`add` (in input order), then read :meth:`decided`.

    Attributes:
        order: column names in order of first appearance.
    """

    order: list[str] = field(default_factory=list)
    _groups: dict[str, list[_Group]] = field(default_factory=dict)
    _mixed: dict[str, int] = field(default_factory=dict)

    def add(self, values: Mapping[str, Any]) -> None:
        """Count one row's values (a missing column counts as null: it does not vote)."""
        for name, value in values.items():
            groups = self._groups.get(name)
            if groups is None:
                groups = self._groups[name] = []
                self.order.append(name)
            if value is None:
                continue
            t = value_type(value)
            if t is None:
                self._mixed[name] = self._mixed.get(name, 0) + 1
                continue
            for g in groups:
                u = unify(g.type, t)
                if u is not None:
                    g.type = u
                    g.rows += 1
                    break
            else:
                groups.append(_Group(t))

    def add_all(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def decided(self) -> dict[str, JsonType]:
        """Each column's type: the widened type of its largest group of compatible values (null: no value)."""
        out: dict[str, JsonType] = {}
        for name in self.order:
            groups = self._groups[name]
            best = max(groups, key=lambda g: g.rows, default=None)  # max keeps the first of equal counts
            out[name] = best.type if best is not None else NULL
        return out

    def votes(self, name: str) -> list[tuple[str, int]]:
        """Every type a column's values had and its rows, the winner first (for messages)."""
        groups = self._groups.get(name, [])
        best = max(groups, key=lambda g: g.rows, default=None)
        out = [(type_name(g.type), g.rows) for g in [best, *(g for g in groups if g is not best)] if g is not None]
        if self._mixed.get(name):
            out.append(("mixed", self._mixed[name]))
        return out

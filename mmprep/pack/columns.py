"""The columns a pack writes besides its own: the input's other columns, carried through, and a ``--target``'s.

**Carried columns.** Every manifest column that ``pack`` does not read as the id, images or tags is kept, unchanged,
under its own name: scalars, lists and nested objects keep their structure. The text column is kept too (a
conversation stays a list of turns next to the tokens), unless it is named ``text``: mmprep's own ``text`` column
holds it. ``--keep-columns`` keeps only the named ones, ``--drop-columns`` leaves the named ones out.

Every shard has the same schema, decided before the first shard from the whole input (:func:`plan_columns`, the
schema pass): a Parquet or Arrow input keeps its column types; a JSON or CSV input's types are voted on row by row
(:mod:`mmprep.inputs.schema`: null widens to anything, int to float, objects to the union of their fields, lists
to their widened element type; the largest group of compatible values wins). A value that does not fit its
column's type rejects its row (reason ``bad_column``, naming the column).

A manifest column may not take the name of a column mmprep writes (:data:`RESERVED`): the run stops before writing
(exit 2) and says which column and how to leave it out (``--drop-columns``). An input that is itself mmprep
output (its Parquet metadata says so) is the exception: its mmprep columns are recomputed, not carried.

**Targets** (``--target``): ``hf`` (the default) adds nothing. ``easyr1`` adds ``problem`` and ``answer``
(EasyR1's ``prompt_key``/``answer_key``): the manifest's own ``problem``/``answer`` columns when it has them,
else the first user turn (the prompt, with its image placeholders) and the last assistant turn (the answer) of
the conversation. ``llamafactory`` adds ``messages``: the conversation as ShareGPT turns ``{role, content}``
(roles ``system``/``user``/``assistant``), checked the way LLaMA-Factory checks them. Both put exactly one
``<image>`` per image in the text (none in the text: one per image in front of the first user turn) and store
the images encoded (``--pad none``), as the trainers load them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmprep.errors import RunFailed, UsageError
from mmprep.inputs.manifest import ColumnMap, ManifestSource, check_columns, iter_records, table_input
from mmprep.inputs.schema import STR, ColumnTypes, JsonType, clean_value, fits, to_arrow, type_name
from mmprep.pack.config import TARGETS, PackConfig
from mmprep.records import RowReject, Sample
from mmprep.text.config import TextError
from mmprep.text.conversation import fit_placeholders, prompt_and_answer, sharegpt_problem
from mmprep.text.render import conversation_turns, typename

__all__ = ["RESERVED", "TARGETS", "TARGET_COLUMNS", "CarriedColumn", "ColumnPlan", "InputSurvey", "plan_columns"]

#: The columns each target adds.
TARGET_COLUMNS: dict[str, tuple[str, ...]] = {"hf": (), "easyr1": ("problem", "answer"), "llamafactory": ("messages",)}
#: Every column name mmprep writes itself (whatever the layout), which an input column may not take.
RESERVED = frozenset({
    "id", "line", "image_count", "image_mask", "image_sizes", "content_boxes", "pixel_values", "images",
    "input_ids", "attention_mask", "n_tokens", "truncated", "tag_ids", "tags", "text", "image_paths",
})


@dataclass(frozen=True)
class CarriedColumn:
    """An input column kept in the output.

    Attributes:
        name: its name (in and out).
        arrow: its Arrow type in every shard.
        check: the type a JSON or CSV input's values were voted to (each value is checked against it); None for a
            Parquet or Arrow input, whose values have their column's type already.
        feature: its Hugging Face ``datasets`` feature from the input's metadata (an ``Image`` column stays one),
            None when the input had none.
        votes: the types the values had and their row counts, the winner first (for the reject message).
    """

    name: str
    arrow: Any
    check: JsonType | None = None
    feature: Any = None
    votes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ColumnPlan:
    """The extra columns of every shard: the target's, then the carried ones."""

    carried: tuple[CarriedColumn, ...] = ()
    target: str = "hf"
    #: the manifest's own ``problem`` / ``answer`` columns (``--target easyr1`` takes them when present)
    answer: CarriedColumn | None = None
    has_problem: bool = False

    def fields(self) -> list[Any]:
        """The Arrow fields, in column order: the target's, then the carried ones."""
        import pyarrow as pa

        out = []
        if self.target == "easyr1":
            out += [pa.field("problem", pa.string()),
                    pa.field("answer", self.answer.arrow if self.answer is not None else pa.string())]
        elif self.target == "llamafactory":
            turn = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
            out.append(pa.field("messages", pa.list_(turn)))
        out += [pa.field(c.name, c.arrow) for c in self.carried]
        return out

    def features(self) -> dict[str, Any]:
        """Hugging Face features the input declared, by column (carried columns only)."""
        out = {c.name: c.feature for c in self.carried if c.feature is not None}
        if self.answer is not None and self.answer.feature is not None:
            out["answer"] = self.answer.feature
        return out

    def identity(self) -> dict[str, Any]:
        """What the extra columns are (part of the run identity: ``--resume`` requires it unchanged)."""
        return {"target": self.target, "columns": [[f.name, str(f.type)] for f in self.fields()]}

    def names(self) -> list[str]:
        return [f.name for f in self.fields()]

    # -- per row ----------------------------------------------------------------------------------------------
    def values(self, s: Sample, *, kept: int, original: int, placeholder: str) -> dict[str, Any]:
        """The row's values of every extra column.

        Args:
            s: the sample (``extra`` holds its carried values).
            kept: images the row stores; original: images it had before ``--too-many-images truncate``.
            placeholder: the image placeholder of the input's texts.

        Raises:
            RowReject: ``bad_column`` (a value that does not fit its column), or a target's reasons
                (``prompt_missing``, ``answer_missing``, ``conversation_missing``, ``conversation_invalid``,
                ``placeholder_mismatch``, ``text_bad_type``).
        """
        out: dict[str, Any] = {}
        if self.target == "easyr1":
            out.update(self._easyr1(s, kept, original, placeholder))
        elif self.target == "llamafactory":
            out["messages"] = self._messages(s, kept, original, placeholder)
        for c in self.carried:
            out[c.name] = _checked(c, s.extra.get(c.name))
        return out

    def _easyr1(self, s: Sample, kept: int, original: int, placeholder: str) -> dict[str, Any]:
        turns = _turns(s, placeholder)
        first_user, last_assistant = prompt_and_answer(turns) if turns is not None else (None, None)
        given = s.extra.get("problem") if self.has_problem else None
        prompt: str | None
        if isinstance(given, str) and given.strip():
            prompt, where = given, "the problem column"
        elif turns is not None:
            prompt, where = first_user, "the first user turn"
        elif isinstance(s.text, str) and s.text.strip():
            prompt, where = s.text, "the text"
        else:
            prompt, where = None, ""
        if prompt is None:
            raise RowReject("text", "prompt_missing", "no problem to store: the row has no problem column value, no "
                                                      "user turn and no text")
        try:
            problem = fit_placeholders([prompt], placeholder, kept=kept, original=original)[0]
        except TextError as exc:
            raise RowReject("text", exc.reason, f"{exc.detail} in {where} (EasyR1 gives the model one image per "
                                                "<image> of the problem)") from None
        answer = s.extra.get("answer") if self.answer is not None else None
        if answer is not None and self.answer is not None:
            answer = _checked(self.answer, answer)
        elif last_assistant is not None and (self.answer is None or _holds_strings(self.answer)):
            answer = last_assistant
        else:
            raise RowReject("text", "answer_missing", "no answer to store: the row has no answer column value and "
                                                      "no assistant turn (EasyR1 reads it as the ground truth)")
        return {"problem": problem, "answer": answer}

    def _messages(self, s: Sample, kept: int, original: int, placeholder: str) -> list[dict[str, str]]:
        turns = _turns(s, placeholder)
        if turns is None:
            raise RowReject("text", "conversation_missing",
                            f"the text is {typename(s.text)}, not a conversation: --target llamafactory stores "
                            "ShareGPT messages (give a conversations/messages column)")
        problem = sharegpt_problem(turns)
        if problem is not None:
            raise RowReject("text", "conversation_invalid", f"{problem} (LLaMA-Factory drops such conversations)")
        first = next(k for k, (role, _) in enumerate(turns) if role in ("user", "observation"))
        try:
            contents = fit_placeholders([c for _, c in turns], placeholder, kept=kept, original=original,
                                        first=first)
        except TextError as exc:
            raise RowReject("text", exc.reason, exc.detail + " in the conversation") from None
        return [{"role": role, "content": c} for (role, _), c in zip(turns, contents, strict=True)]

    # -- per batch --------------------------------------------------------------------------------------------
    def arrays(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The extra columns of a batch of rows (each row as :meth:`values` returned it), as Arrow arrays."""
        import pyarrow as pa

        out = {}
        for f in self.fields():
            try:
                out[f.name] = pa.array([r[f.name] for r in rows], f.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                raise RunFailed(f"column '{f.name}': cannot store a value as {f.type}: {str(exc).splitlines()[0]}",
                                hint="please report this with the manifest row") from None
        return out


def _holds_strings(c: CarriedColumn) -> bool:
    import pyarrow as pa

    return c.check == STR if c.check is not None else bool(pa.types.is_string(c.arrow)
                                                            or pa.types.is_large_string(c.arrow))


def _turns(s: Sample, placeholder: str) -> list[tuple[str, str]] | None:
    try:
        return conversation_turns(s.text, placeholder)
    except TextError as exc:
        raise RowReject("text", exc.reason, exc.detail) from None


def _checked(c: CarriedColumn, value: Any) -> Any:
    """``value`` ready for column ``c``, or a ``bad_column`` reject naming the column."""
    if c.check is None:
        return value
    if not fits(value, c.check):
        votes = ", ".join(f"{n} row{'s' if n != 1 else ''} {t}" for t, n in c.votes)
        raise RowReject("manifest", "bad_column",
                        f"column '{c.name}': {_what(value)} does not fit the column's type {type_name(c.check)} "
                        f"(decided from the whole input{': ' + votes if votes else ''})")
    return clean_value(value, c.check)


def _what(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return f"binary data ({len(value):,} bytes)"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{typename(value)} {text[:60]}{'...' if len(text) > 60 else ''}"


@dataclass(frozen=True)
class InputSurvey:
    """What the schema pass found: the input's rows (records, rejected ones included) and the extra columns."""

    rows: int
    columns: ColumnPlan
    mmprep_input: bool = False
    notes: tuple[str, ...] = field(default=())


def plan_columns(cfg: PackConfig, source: ManifestSource, *, name: str | None = None) -> InputSurvey:
    """The schema pass: read the whole input once (a Parquet or Arrow input: its footers only), count its records
    and decide every extra column (see the module docstring).

    Raises:
        UsageError: ``--keep-columns``/``--drop-columns`` name a column the input does not have, or an input column
            takes the name of a column mmprep writes.
        InputError: the input cannot be read (as the manifest readers raise it).
    """
    table = table_input(source, cfg.format)
    cmap = cfg.columns
    candidates: dict[str, CarriedColumn] = {}
    sources_seen: set[str] = set()
    shown = name or ("<stdin>" if str(source) == "-" else str(source))
    mmprep_input = False
    if table is not None:
        schema = table.schema
        meta = schema.metadata or {}
        mmprep_input = b"mmprep" in meta
        features = _input_features(meta)
        if table.rows:
            check_columns(list(schema.names), cmap, name=shown, line=1, fmt=table.fmt, require_images=True)
        r = cmap.resolve(list(schema.names))
        consumed = {r.id, r.images, r.tags}
        for f in schema:
            if f.name in consumed or (f.name == "text" and r.text == "text"):
                continue
            if _is_target_source(cfg.target, f.name, r):
                sources_seen.add(f.name)
            candidates[f.name] = CarriedColumn(f.name, f.type, None, features.get(f.name))
        rows = table.rows
    else:
        types = ColumnTypes()
        rows = 0
        messages_as_extra = False
        checked = False
        for rec in iter_records(source, cfg.format, name=shown):
            rows += 1
            if rec.data is None:
                continue
            if not checked:
                checked = True
                check_columns(list(rec.data), cmap, name=shown, line=rec.line, fmt=rec.fmt, require_images=True)
            r = cmap.resolve(list(rec.data))
            consumed = {r.id, r.images, r.tags}
            values = {}
            for k, v in rec.data.items():
                if k in consumed or (k == "text" and r.text == "text"):
                    continue
                if _is_target_source(cfg.target, k, r):
                    sources_seen.add(k)
                elif k == "messages":
                    messages_as_extra = True
                values[k] = v
            types.add(values)
        if messages_as_extra and cfg.target == "llamafactory":
            sources_seen.discard("messages")
        for col, t in types.decided().items():
            candidates[col] = CarriedColumn(col, to_arrow(t), t, None, tuple(types.votes(col)))
    # the target's source columns become its columns
    answer = None
    has_problem = False
    if cfg.target == "easyr1":
        answer = candidates.pop("answer", None)
        has_problem = candidates.pop("problem", None) is not None
        if answer is not None and answer.check is not None and answer.check[0] == "null":
            answer = None  # a column that is always null holds no answer
    elif cfg.target == "llamafactory" and "messages" in sources_seen:
        candidates.pop("messages", None)
    names = list(candidates)
    notes: list[str] = []
    if cfg.keep_columns is not None:
        unknown = [c for c in cfg.keep_columns if c not in candidates]
        if unknown:
            raise UsageError(f"--keep-columns: {shown} has no column {', '.join(repr(c) for c in unknown)} to carry",
                             hint="columns it can carry: " + (", ".join(names) or "none"))
        names = [c for c in names if c in cfg.keep_columns]
    if cfg.drop_columns:
        unknown = [c for c in cfg.drop_columns if c not in candidates]
        if unknown:
            raise UsageError(f"--drop-columns: {shown} has no column {', '.join(repr(c) for c in unknown)} to drop",
                             hint="columns it carries: " + (", ".join(names) or "none"))
        names = [c for c in names if c not in cfg.drop_columns]
    taken = RESERVED | set(TARGET_COLUMNS.get(cfg.target, ()))
    clashes = [c for c in names if c in taken]
    if clashes and mmprep_input:
        names = [c for c in names if c not in taken]
        notes.append(f"recomputed the mmprep columns of the input: {', '.join(clashes)}")
    elif clashes:
        c = clashes[0]
        raise UsageError(f"{shown}: column '{c}' has the name of a column mmprep writes"
                         + (f" (with --target {cfg.target})" if c in TARGET_COLUMNS.get(cfg.target, ()) else ""),
                         hint=f"leave it out with --drop-columns {','.join(clashes)}, or rename it in the manifest")
    plan = ColumnPlan(carried=tuple(candidates[c] for c in names), target=cfg.target, answer=answer,
                      has_problem=has_problem)
    return InputSurvey(rows=rows, columns=plan, mmprep_input=mmprep_input, notes=tuple(notes))


def _is_target_source(target: str, column: str, resolved: ColumnMap) -> bool:
    """Whether an input column is where a target's column comes from (so it is not carried on its own)."""
    if target == "easyr1":
        return column in ("problem", "answer")
    if target == "llamafactory":
        return column == "messages" and resolved.text == "messages"
    return False


def _input_features(meta: Mapping[bytes, bytes]) -> dict[str, Any]:
    """The per-column features of an input written by Hugging Face ``datasets`` (its ``huggingface`` metadata)."""
    try:
        info = json.loads(meta[b"huggingface"])
        features = info["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return {}
    return dict(features) if isinstance(features, dict) else {}

"""Every other column kept: the input's columns carried through with one schema for every shard, the widening rule,
wrong-type values rejected with the column named, --keep-columns/--drop-columns, name clashes, typed inputs."""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _reliab_helpers import assert_nothing_lost, digests, rejects
from test_pack import SAMPLE
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import UsageError
from mmprep.images.decode import ImageConfig
from mmprep.inputs.schema import (
    FLOAT,
    INT,
    JSON,
    MAX_FIELDS,
    NULL,
    STR,
    ColumnTypes,
    fits,
    to_arrow,
    unify,
    value_type,
)
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack

runner = CliRunner()
CONVERSATIONS = SAMPLE / "conversations.jsonl"


def cfg(manifest: Path, out: Path, **kw) -> PackConfig:
    base = dict(manifest=str(manifest), out=str(out), image=ImageConfig(size=(16, 16), resize_mode="stretch"),
                limit_images=2, rows_per_shard=3)
    base.update(kw)
    return PackConfig(**base)


def read(out: Path) -> pa.Table:
    return pq.read_table(out / "data")


# -- the widening rule, on its own -------------------------------------------------------------------------------


def test_unify_widens_as_documented() -> None:
    assert unify(NULL, STR) == STR and unify(INT, NULL) == INT
    assert unify(INT, FLOAT) == FLOAT and unify(FLOAT, INT) == FLOAT
    assert unify(STR, INT) is None and unify(("bool",), INT) is None
    assert unify(("list", INT), ("list", FLOAT)) == ("list", FLOAT)
    assert unify(("list", NULL), ("list", STR)) == ("list", STR)  # an empty list fits any list
    a, b = value_type({"x": 1, "y": "s"}), value_type({"y": None, "z": [1.5]})
    assert unify(a, b) == ("struct", (("x", INT), ("y", STR), ("z", ("list", FLOAT))))
    assert unify(value_type({"x": 1}), value_type({"x": "one"})) is None
    assert value_type([1, "a"]) is None  # a list whose items share no type has no type
    assert fits(3, FLOAT) and not fits(True, INT) and not fits(1 << 63, INT) and fits(None, STR)
    assert not fits({"x": 1, "w": 2}, unify(a, b))  # a field the column does not have
    assert str(to_arrow(unify(a, b))) == "struct<x: int64, y: string, z: list<item: double>>"


def test_objects_keyed_by_data_become_json_text(tmp_path: Path) -> None:
    """A column of per-row maps ({image name: score}) would union into thousands of fields: past MAX_FIELDS
    distinct keys it is stored as JSON text instead, one schema still."""
    votes = ColumnTypes()
    votes.add_all({"m": {f"img{i}.jpg": i / 10}} for i in range(MAX_FIELDS + 1))
    assert votes.decided() == {"m": JSON} and to_arrow(JSON) == pa.string()
    (tmp_path / "a.png").write_bytes((SAMPLE / "images" / "coins.png").read_bytes())
    rows = [{"id": f"r{i}", "images": ["a.png"], "scores": {f"img{i}.jpg": i}} for i in range(MAX_FIELDS + 2)]
    rows[3]["scores"] = None
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    pack(cfg(manifest, out, rows_per_shard=100), workers=1)
    got = read(out).column("scores").to_pylist()
    assert read(out).schema.field("scores").type == pa.string()
    assert json.loads(got[0]) == {"img0.jpg": 0} and got[3] is None and len(got) == MAX_FIELDS + 2


def test_the_largest_group_of_compatible_values_wins_and_ties_go_to_the_first() -> None:
    votes = ColumnTypes()
    for v in [1, "a", 2.5, "b", 3, None, [1]]:
        votes.add({"c": v})
    assert votes.decided() == {"c": FLOAT}  # 1, 2.5, 3 widen to double: 3 rows; strings 2, a list 1
    assert votes.votes("c") == [("double", 3), ("string", 2), ("list<int64>", 1)]
    tie = ColumnTypes()
    tie.add_all([{"c": "x"}, {"c": 1}])
    assert tie.decided() == {"c": STR}
    empty = ColumnTypes()
    empty.add_all([{"c": None}, {}])
    assert empty.decided() == {"c": NULL}


# -- carried through a pack ---------------------------------------------------------------------------------------


def test_every_other_column_is_carried_with_its_structure(tmp_path: Path) -> None:
    """sample_data/conversations.jsonl: real LLaVA conversations with extra columns of several types."""
    out = tmp_path / "o"
    report = pack(cfg(CONVERSATIONS, out, image_root=str(SAMPLE)), workers=1)
    rows, rej = assert_nothing_lost(out, read=8)
    assert report.written == 7 and len(rows) == 7
    table = read(out)
    schema = table.schema
    assert schema.names[-7:] == ["conversations", "source", "difficulty", "score", "verified", "choices", "meta"]
    assert str(schema.field("conversations").type) == "list<element: struct<from: string, value: string>>"
    assert schema.field("difficulty").type == pa.float64()  # ints and one 1.5: widened to double
    assert schema.field("score").type == pa.float64() and schema.field("verified").type == pa.bool_()
    assert schema.field("choices").type == pa.list_(pa.string())
    assert str(schema.field("meta").type) == "struct<license: string, turns: int64, reviewer: string>"
    got = {r["id"]: r for r in table.to_pylist()}
    source = {json.loads(line)["id"]: json.loads(line) for line in CONVERSATIONS.read_text().splitlines()}
    for sid, row in got.items():
        want = source[sid]
        assert row["conversations"] == want["conversations"]  # the conversation as given, as structure
        assert row["verified"] == want["verified"] and row["choices"] == want.get("choices")
        assert row["score"] == want["score"] and row["difficulty"] == want["difficulty"]
        assert row["meta"] == {"license": None, "turns": None, "reviewer": None, **want["meta"]}
    # the one row whose difficulty is a string: rejected, the column and the line named
    assert [(r["line"], r["reason"]) for r in rej] == [(7, "bad_column")]
    assert "column 'difficulty'" in rej[0]["detail"] and "conversations.jsonl:7" in rej[0]["detail"]
    assert "7 rows double, 1 row string" in rej[0]["detail"]
    assert all(len(pq.read_schema(p).names) == len(schema.names) for p in (out / "data").iterdir())


def test_every_shard_has_the_schema_decided_from_the_whole_input(tmp_path: Path) -> None:
    """The first shard holds only nulls and ints for columns that later rows widen: its schema is still the
    whole input's, and every shard's is the same."""
    for name in ("a.png",):
        (tmp_path / name).write_bytes((SAMPLE / "images" / "coins.png").read_bytes())
    rows = [{"id": f"r{i}", "images": ["a.png"], "score": None if i < 3 else (1 if i < 6 else 0.5),
             "info": {"k": i} if i < 6 else {"k": i, "note": "late field"}, "topics": [] if i < 6 else ["x"]}
            for i in range(9)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    pack(cfg(manifest, out), workers=2)
    schemas = [pq.read_schema(p).remove_metadata() for p in sorted((out / "data").iterdir())]
    assert len(schemas) == 3 and all(s.equals(schemas[0]) for s in schemas)
    assert schemas[0].field("score").type == pa.float64()
    assert str(schemas[0].field("info").type) == "struct<k: int64, note: string>"
    assert schemas[0].field("topics").type == pa.list_(pa.string())
    assert read(out).column("score").to_pylist() == [None] * 3 + [1.0] * 3 + [0.5] * 3


def test_wrong_types_are_rejected_with_the_column_named_and_nothing_is_lost(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((SAMPLE / "images" / "coins.png").read_bytes())
    rows = [{"id": "ok1", "images": ["a.png"], "n": 1, "tags_extra": ["a"], "obj": {"x": 1}},
            {"id": "bad_n", "images": ["a.png"], "n": "one", "tags_extra": ["a"], "obj": {"x": 2}},
            {"id": "ok2", "images": ["a.png"], "n": 2, "tags_extra": [], "obj": {"x": 3}},
            {"id": "bad_list", "images": ["a.png"], "n": 3, "tags_extra": "a", "obj": {"x": 4}},
            {"id": "bad_obj", "images": ["a.png"], "n": 4, "tags_extra": ["b"], "obj": {"x": "four"}},
            {"id": "big", "images": ["a.png"], "n": 1 << 70, "tags_extra": ["c"], "obj": {"x": 5}},
            {"id": "ok3", "images": ["a.png"], "n": None, "obj": None}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    report = pack(cfg(manifest, out), workers=1)
    written, rej = assert_nothing_lost(out, read=7)
    assert [r["id"] for r in written] == ["ok1", "ok2", "ok3"] and report.rejected == 4
    by_id = {r["id"]: r for r in rej}
    assert {r["reason"] for r in rej} == {"bad_column"}
    assert "column 'n': a string \"one\"" in by_id["bad_n"]["detail"]
    assert "column 'tags_extra'" in by_id["bad_list"]["detail"]
    assert "column 'obj'" in by_id["bad_obj"]["detail"] and "struct<x: int64>" in by_id["bad_obj"]["detail"]
    assert "column 'n'" in by_id["big"]["detail"]  # beyond int64
    assert read(out).column("obj").to_pylist() == [{"x": 1}, {"x": 3}, None]


def test_keep_and_drop_columns(tmp_path: Path) -> None:
    kept = pack(cfg(CONVERSATIONS, tmp_path / "k", image_root=str(SAMPLE), keep_columns=("score", "meta")),
                workers=1)
    assert kept.columns == ["score", "meta"] and read(tmp_path / "k").column_names[-2:] == ["score", "meta"]
    none = pack(cfg(CONVERSATIONS, tmp_path / "n", image_root=str(SAMPLE), keep_columns=()), workers=1)
    assert none.columns == [] and none.written == 8  # difficulty (the bad column) is not kept: no reject
    dropped = pack(cfg(CONVERSATIONS, tmp_path / "d", image_root=str(SAMPLE), drop_columns=("difficulty",)),
                   workers=1)
    assert "difficulty" not in dropped.columns and dropped.written == 8 and "conversations" in dropped.columns
    with pytest.raises(UsageError, match=r"--keep-columns: .* has no column 'nope'"):
        pack(cfg(CONVERSATIONS, tmp_path / "x", keep_columns=("nope",)), workers=1)
    res = runner.invoke(app, ["pack", str(CONVERSATIONS), "--out", str(tmp_path / "y"), "--drop-columns", "sourse",
                              "--image-size", "16"])
    assert res.exit_code == 2 and "'sourse'" in res.stderr and "conversations, source" in res.stderr
    res = runner.invoke(app, ["pack", str(CONVERSATIONS), "--out", str(tmp_path / "z"), "--drop-columns", "score",
                              "--keep-columns", "meta"])
    assert res.exit_code == 2 and "exclude each other" in res.stderr
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_a_column_named_like_one_of_mmprep_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((SAMPLE / "images" / "coins.png").read_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "1", "image": "a.png", "line": 7, "image_count": 1}) + "\n")
    res = runner.invoke(app, ["pack", str(manifest), "--out", str(tmp_path / "o"), "--image-size", "16"])
    assert res.exit_code == 2, res.stderr
    assert "column 'line' has the name of a column mmprep writes" in res.stderr
    assert "--drop-columns line,image_count" in res.stderr and not (tmp_path / "o").exists()
    res = runner.invoke(app, ["pack", str(manifest), "--out", str(tmp_path / "o"), "--image-size", "16",
                              "--drop-columns", "line,image_count"])
    assert res.exit_code == 0, res.stderr


def test_parquet_inputs_keep_their_column_types(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((SAMPLE / "images" / "coins.png").read_bytes())
    table = pa.table({
        "id": ["a", "b"], "images": [["a.png"], ["a.png"]],
        "small": pa.array([1, 2], pa.int8()),
        "when": pa.array([datetime.datetime(2024, 1, 2, 3, 4, 5), None], pa.timestamp("ms")),
        "price": pa.array([decimal.Decimal("1.25"), decimal.Decimal("2.50")], pa.decimal128(6, 2)),
        "pairs": pa.array([[{"k": "x", "v": 1.5}], []], pa.list_(pa.struct([("k", pa.string()), ("v", pa.float32())]))),
        "raw": pa.array([b"\x00\x01", None], pa.binary()),
    })
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "o"
    for pad, extra in (("max", {}), ("none", {"image": ImageConfig(size=None, resize_mode="none")})):
        out = tmp_path / pad
        pack(cfg(manifest, out, pad=pad, **extra), workers=1)
        got = read(out)
        for name in ("small", "when", "price", "pairs", "raw"):
            assert got.schema.field(name).type == table.schema.field(name).type, name
            assert got.column(name).to_pylist() == table.column(name).to_pylist(), name


def test_resume_and_shuffle_keep_the_columns(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    base = dict(image_root=str(SAMPLE), shuffle=True, seed=3)
    pack(cfg(CONVERSATIONS, a, **base), workers=1)
    pack(cfg(CONVERSATIONS, b, **base), workers=2)
    assert digests(a) == digests(b)
    lines = CONVERSATIONS.read_text().splitlines()
    for row in read(a).to_pylist():
        assert json.loads(lines[row["line"] - 1])["conversations"] == row["conversations"]
    # an interrupted run resumes to the same bytes; other columns are another run
    (a / "index.json").unlink()
    first = sorted((a / "data").iterdir())[-1]
    first.unlink()
    report = pack(cfg(CONVERSATIONS, a, **base), workers=1, resume=True)
    assert report.resumed_shards == 2 and digests(a) == digests(b)
    with pytest.raises(UsageError, match=r"cannot resume .* columns"):
        pack(cfg(CONVERSATIONS, a, drop_columns=("meta",), **base), workers=1, resume=True)
    assert [r["reason"] for r in rejects(b)] == ["bad_column"]


def test_carried_columns_keep_their_datasets_features_in_a_form_every_version_reads(tmp_path: Path) -> None:
    """A Parquet written by datasets 4+ declares lists as `List`, which datasets 3.x cannot read: carried columns
    keep their features (an extra Image column stays an Image) written as `Sequence` / list literals."""
    import datasets

    mask = {"bytes": (SAMPLE / "images" / "coins.png").read_bytes(), "path": "coins.png"}
    features = datasets.Features({
        "images": datasets.List(datasets.Image()), "mask": datasets.Image(),
        "turns": datasets.List({"role": datasets.Value("string"), "text": datasets.Value("string")}),
        "scores": datasets.List(datasets.Value("float32"))})
    rows = {"images": [[mask]], "mask": [mask], "turns": [[{"role": "user", "text": "hi"}]], "scores": [[0.5]]}
    src = tmp_path / "in.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(src))
    assert '"List"' in pq.read_schema(src).metadata[b"huggingface"].decode()  # what datasets 5 writes
    out = tmp_path / "o"
    pack(cfg(src, out, pad="none", image=ImageConfig(size=None, resize_mode="none")), workers=1)
    meta = json.loads(pq.read_schema(next((out / "data").iterdir())).metadata[b"huggingface"])["info"]["features"]
    assert '"List"' not in json.dumps(meta)
    assert meta["mask"] == {"_type": "Image"} and meta["scores"]["_type"] == "Sequence"
    assert meta["turns"] == [{"role": {"_type": "Value", "dtype": "string"}, "text": {"_type": "Value",
                                                                                    "dtype": "string"}}]
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "c"))
    row = ds[0]
    assert row["mask"].size == (384, 303) and row["turns"] == [{"role": "user", "text": "hi"}]
    assert row["scores"] == [0.5] and row["images"][0].size == (384, 303)

"""Manifest reading: every format, positions for errors, row-level vs file-level problems."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmprep.errors import InputError
from mmprep.inputs.manifest import ColumnMap, iter_json_array, iter_records, iter_samples
from mmprep.records import Rejected, Sample


def test_sample_manifest_reads_every_row() -> None:
    items = list(iter_samples("sample_data/manifest.jsonl"))
    assert len(items) == 18
    assert all(isinstance(i, Sample) for i in items)
    first = items[0]
    assert first.id == "s001" and first.line == 1 and first.images == ("images/astronaut.jpg",)
    assert items[12].images == ("images/coffee.jpg", "images/chelsea.jpg", "images/coins.png", "images/brick.png")
    assert isinstance(items[13].text, list) and items[13].text[0]["from"] == "human"


def test_jsonl_row_level_problems_keep_line_numbers(tmp_path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(
        b'{"id": "a", "images": ["x.jpg"]}\n'
        b"{not json}\n"
        b"\n"
        b'{"id": "b", "images": "\xff\xfe.jpg"}\n'
        b"[1, 2]\n"
        b'{"id": "c", "images": 7}\n'
        b'{"id": "d", "images": ["y.jpg"], "tags": "cat"}\n'
    )
    items = list(iter_samples(p))
    assert [type(i).__name__ for i in items] == ["Sample", "Rejected", "Rejected", "Rejected", "Rejected", "Rejected"]
    rej = [i for i in items if isinstance(i, Rejected)]
    assert [(r.line, r.reason) for r in rej] == [
        (2, "invalid_json"), (4, "not_utf8"), (5, "bad_record"), (6, "bad_type"), (7, "bad_type")
    ]
    assert f"{p}:6" in rej[3].detail and "number" in rej[3].detail
    assert "list of tag names" in rej[4].detail


def test_csv_with_bom_crlf_and_list_cells(tmp_path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes(
        "\ufeffid,images,text,tags\r\n"
        'a,x.jpg,"hello, world",cat|dog\r\n'
        'b,"[""y.jpg"", ""z.jpg""]",second,"[1, 2]"\r\n'
        "c,w.jpg,third\r\n".encode()
    )
    items = list(iter_samples(p))
    a, b, c = items
    assert isinstance(a, Sample) and a.id == "a" and a.text == "hello, world" and a.tags == ("cat", "dog")
    assert isinstance(b, Sample) and b.images == ("y.jpg", "z.jpg") and b.tags == (1, 2) and b.line == 3
    assert isinstance(c, Rejected) and c.line == 4 and "expected 4 fields" in c.detail


def test_json_list_streams_with_line_numbers(tmp_path) -> None:
    p = tmp_path / "m.json"
    recs = [{"id": str(i), "image": f"{i}.jpg", "caption": ["a", "b"], "n": i * 1.5} for i in range(5)]
    p.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in recs) + "\n]\n")
    items = list(iter_samples(p))
    assert [i.id for i in items] == ["0", "1", "2", "3", "4"]
    # each element spans 8 lines (indent=1), starting on line 2
    assert [i.line for i in items] == [2 + 9 * k for k in range(5)]


def test_json_array_across_chunk_boundaries() -> None:
    values = [{"k": "x" * 700_000, "i": i} for i in range(4)] + [12345678901234567890, 3.25, "s", None]
    data = json.dumps(values).encode()
    got = [v for _, v, _ in iter_json_array(io.BytesIO(data), "mem")]
    assert got == values


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(),
                          st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)), max_size=30))
def test_json_array_matches_json_loads(values: list) -> None:
    data = json.dumps(values, indent=2).encode()
    got = [v for _, v, _ in iter_json_array(io.BytesIO(data), "mem")]
    assert got == values


def test_json_not_a_list_is_file_error(tmp_path) -> None:
    p = tmp_path / "m.json"
    p.write_text('{"id": 1}{"id": 2')
    with pytest.raises(InputError, match="expected a JSON list"):
        list(iter_records(p, "json"))
    p.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(InputError, match=r"m.json:1: "):
        list(iter_records(p))


def test_parquet_manifest_and_hf_image_structs(tmp_path) -> None:
    p = tmp_path / "m.parquet"
    table = pa.table({
        "id": ["a", "b"],
        "images": [
            [{"bytes": None, "path": "1.jpg"}],
            [{"bytes": None, "path": "2.jpg"}, {"bytes": None, "path": "3.jpg"}],
        ],
        "text": ["one", "two"],
    })
    pq.write_table(table, p)
    items = list(iter_samples(p))
    assert [i.images for i in items] == [("1.jpg",), ("2.jpg", "3.jpg")]
    assert [i.line for i in items] == [1, 2]


def test_real_hf_written_parquet_layout(tmp_path) -> None:
    # Same layout as a Parquet written by Hugging Face datasets: list<struct<bytes, path>> with bytes = null.
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"messages": pa.array([[{"role": "user", "content": "<image>hi"}]]),
                      "images": pa.array([[{"bytes": None, "path": "data/images/1.jpg"}]], pa.list_(img))})
    pq.write_table(table, tmp_path / "hf.parquet")
    (item,) = list(iter_samples(tmp_path / "hf.parquet"))
    assert isinstance(item, Sample) and item.images == ("data/images/1.jpg",) and item.id == "L1"
    assert item.text == [{"role": "user", "content": "<image>hi"}]


def test_missing_explicit_column_is_file_error(tmp_path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": "a", "images": ["x.jpg"]}\n')
    with pytest.raises(InputError, match="column 'pictures'"):
        list(iter_samples(p, ColumnMap(images="pictures")))


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file"):
        list(iter_records(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="is a directory"):
        list(iter_records(tmp_path))


def test_stdin(monkeypatch) -> None:
    data = b'{"id": "a", "images": ["x.jpg"]}\n{"id": "b", "images": ["y.jpg"]}\n'
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    items = list(iter_samples("-"))
    assert [i.id for i in items] == ["a", "b"]
    assert items[0].source == "<stdin>"

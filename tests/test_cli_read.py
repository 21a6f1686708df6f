"""`mmprep inspect` and `mmprep verify`: reports, contact sheet, and damaged copies caught by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _reader_helpers import copy_packed, packed
from PIL import Image
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.runtime.files import sha256_file as file_sha256

runner = CliRunner()
#: the shards of the packed sample (5 shards of split train)
S0, S1, S2 = (f"data/train-{k:05d}-of-00005.parquet" for k in range(3))


# -- inspect ------------------------------------------------------------------------------------------------------


def test_inspect_tables_on_stderr_and_json_on_stdout() -> None:
    path = str(packed("uint8"))
    human = runner.invoke(app, ["inspect", path])
    assert human.exit_code == 0, human.stderr
    assert human.stdout == ""
    for text in ("rows", "images per row", "tokens per row", "image_missing", "unknown_tag", "astronaut"):
        assert text in human.stderr
    result = runner.invoke(app, ["inspect", path, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    s = report["summary"]
    assert s["rows"] == 15 and s["shards"] == 5 and s["read"] == 18 and s["rejected"] == 3
    assert s["image_count_histogram"] == {"1": 11, "2": 2, "3": 1, "4": 1}
    assert s["rejected_by_reason"] == {"image_missing": 1, "image_truncated": 1, "unknown_tag": 1}
    assert s["pixels"]["shape"] == [4, 3, 32, 48] and s["pixels"]["dtype"] == "uint8"
    totals = json.loads((packed("uint8") / "index.json").read_text())["splits"]["train"]["totals"]
    assert s["tokens"]["max_length"] == 16 and s["tokens"]["max"] == 33
    assert s["tokens"]["truncated"] == totals["text_truncated"] == 8  # n_tokens over 16: 17,18,18,20,17,17,29,33
    assert s["tags"]["names_from"] == "vocabulary" and ["astronaut", 3] in s["tags"]["top"]
    assert s["bytes"] == sum(x["bytes"] for x in s["shard_list"]) and report["sheet"] is None


def test_inspect_sheet_draws_what_the_model_sees(tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    result = runner.invoke(app, ["inspect", str(packed("uint8")), "--sheet", str(out), "--samples", "4",
                                 "--seed", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)["sheet"]
    assert info["path"] == str(out) and len(info["indices"]) == 4 and info["tags"] == "vocabulary names"
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[:2] == (info["height"], info["width"])
    colours = {tuple(c) for c in img.reshape(-1, 3)[:: 7]}
    assert (0, 220, 90) in colours  # letterbox content boxes outlined
    assert (225, 60, 60) in colours  # empty slots hatched
    assert len(colours) > 500  # real photographs, not flat placeholders


def test_inspect_sheet_normalised_and_encoded(tmp_path: Path) -> None:
    for kind in ("float32", "encoded"):
        out = tmp_path / f"{kind}.png"
        result = runner.invoke(app, ["inspect", str(packed(kind)), "--sheet", str(out), "--samples", "3", "-q"])
        assert result.exit_code == 0, result.stderr
        with Image.open(out) as im:
            assert im.width > 300 and im.height > 150


def test_inspect_sheet_of_normalised_pixels_shows_the_same_colours(tmp_path: Path) -> None:
    from mmprep.dataset.reader import PackedDataset
    from mmprep.dataset.sheet import contact_sheet

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    contact_sheet(PackedDataset(packed("uint8")), a, indices=[2])
    contact_sheet(PackedDataset(packed("float32")), b, indices=[2])
    pa_, pb = np.asarray(Image.open(a).convert("RGB")).astype(int), np.asarray(Image.open(b).convert("RGB")).astype(int)
    assert pa_.shape == pb.shape
    # the image area (below the header, the first slot) is the same picture after de-normalising
    top = 10 + 16 * 4 + 8
    assert np.abs(pa_[top + 10:top + 60, 20:100] - pb[top + 10:top + 60, 20:100]).mean() < 1.5


def test_inspect_errors() -> None:
    result = runner.invoke(app, ["inspect", "no/such/dir"])
    assert result.exit_code == 2 and result.stdout == "" and "no such directory" in result.stderr
    result = runner.invoke(app, ["inspect", str(packed("uint8")), "--sheet", "/no/such/folder/x.png"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


# -- verify --------------------------------------------------------------------------------------------------------


def verify_json(path: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(path), "--json", *extra])
    return result.exit_code, json.loads(result.stdout)


def checks(report: dict) -> set[tuple[str, str]]:
    return {(f["where"], f["check"]) for f in report["findings"]}


def test_verify_intact_directories() -> None:
    for kind in ("uint8", "float32", "encoded"):
        code, report = verify_json(packed(kind), "--deep")
        assert code == 0 and report["ok"] and report["findings"] == [], report
        assert report["shards"] == report["shards_ok"] == 5 and report["rows"] == 15
    human = runner.invoke(app, ["verify", str(packed("uint8"))])
    assert human.exit_code == 0 and human.stdout == "" and "ok: split train: 5 shards, 15 rows" in human.stderr


def test_verify_flipped_byte_names_the_shard(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    shard = d / S2
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, report = verify_json(d)
    assert code == 1 and not report["ok"]
    assert (S2, "sha256") in checks(report)
    assert all(f["where"] == S2 for f in report["findings"])
    human = runner.invoke(app, ["verify", str(d)])
    assert human.exit_code == 1 and S2 in human.stderr and "sha256" in human.stderr


def test_verify_deleted_and_unlisted_shards(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    (d / S1).rename(d / "data/train-00009-of-00005.parquet")
    code, report = verify_json(d)
    assert code == 1
    found = checks(report)
    assert (S1, "missing") in found and ("data/train-00009-of-00005.parquet", "unlisted") in found
    assert ("index.json", "accounting") in found  # the shards now hold 11 rows, not 15


def test_verify_edited_index_and_rejects(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["rows"] = 5
    index["splits"]["train"]["totals"]["rejected_by_reason"]["image_missing"] = 2
    (d / "index.json").write_text(json.dumps(index))
    lines = (d / "rejected-train.jsonl").read_text().splitlines()
    (d / "rejected-train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    code, report = verify_json(d)
    assert code == 1
    found = checks(report)
    assert (S0, "rows") in found and (S0, "shard_record") in found
    assert ("index.json", "accounting") in found
    assert ("rejected-train.jsonl", "accounting") in found
    messages = " ".join(f["message"] for f in report["findings"])
    assert "2 lines, index.json says rejected 3" in messages


def test_verify_deep_catches_dirty_padding_with_a_consistent_hash(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    name = S0
    f = pq.ParquetFile(d / name)
    table = f.read()
    kv = f.metadata.metadata
    px = np.frombuffer(table.column("pixel_values").combine_chunks().buffers()[1], np.uint8).copy()
    row_bytes = px.size // table.num_rows
    px[row_bytes - 1] = 7  # the last byte of row 0 lies in slot 3, which s001 (one image) leaves empty
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), table.num_rows, [None, pa.py_buffer(px)])
    table = table.set_column(table.schema.get_field_index("pixel_values"), table.schema.field("pixel_values"), col)
    pq.write_table(table.replace_schema_metadata({k: v for k, v in kv.items() if k != b"ARROW:schema"}),
                   d / name, row_group_size=2)
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][0].update(bytes=(d / name).stat().st_size, sha256=file_sha256(d / name))
    (d / "index.json").write_text(json.dumps(index))
    code, report = verify_json(d)
    assert code == 0, report  # hashes, schema and the small columns all agree
    code, report = verify_json(d, "--deep")
    assert code == 1 and (S0, "padding") in checks(report)
    assert "row 0 slot 3" in report["findings"][0]["message"]


def test_verify_not_a_packed_dir(tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "not an mmprep packed directory" in result.stderr


@pytest.mark.parametrize("column", ["image_mask", "attention_mask"])
def test_verify_inconsistent_columns(tmp_path: Path, column: str) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    name = S1
    f = pq.ParquetFile(d / name)
    table, kv = f.read(), f.metadata.metadata
    rows = table.column(column).to_pylist()
    rows[1] = [1 - int(v) for v in rows[1]] if column == "attention_mask" else [not v for v in rows[1]]
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(column), pa.array(rows, table.schema.field(column).type))
    pq.write_table(table.replace_schema_metadata({k: v for k, v in kv.items() if k != b"ARROW:schema"}), d / name)
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][1].update(bytes=(d / name).stat().st_size, sha256=file_sha256(d / name))
    (d / "index.json").write_text(json.dumps(index))
    code, report = verify_json(d)
    assert code == 1 and checks(report) == {(name, column)}
    shutil.rmtree(d)


@pytest.mark.parametrize(("key", "value"), [("rows", "abc"), ("bytes", "x"), ("rows", 2.5), ("bytes", None)])
def test_verify_non_integer_index_fields_are_findings(tmp_path: Path, key: str, value: object) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][1][key] = value
    index["splits"]["train"]["shards"][2]["image_count_histogram"] = {"1": "three"}
    (d / "index.json").write_text(json.dumps(index))
    code, report = verify_json(d)
    assert code == 1
    found = checks(report)
    assert (S1, "index") in found and (S2, "index") in found
    messages = [f["message"] for f in report["findings"] if f["check"] == "index"]
    assert any(f"{key} is {value!r}" in m for m in messages), messages
    human = runner.invoke(app, ["verify", str(d)])
    assert human.exit_code == 1 and "internal error" not in human.stderr and S1 in human.stderr


@pytest.mark.parametrize(("edit", "message"), [
    (lambda ix: ix["splits"]["train"]["shards"][1].update(rows="abc"), f"shard entry 1 ({S1}): rows is 'abc'"),
    (lambda ix: ix["splits"]["train"]["shards"][0].update(bytes="x"), f"shard entry 0 ({S0}): bytes is 'x'"),
    (lambda ix: ix["splits"]["train"]["totals"]["image_count_histogram"].update({"1": "x"}),
     "totals.image_count_histogram['1'] is 'x'"),
    (lambda ix: ix["splits"]["train"]["totals"].update(images_written=[1]), "totals.images_written is [1]"),
    (lambda ix: ix.update(format_version="1"), "format_version is '1'"),
])
def test_inspect_damaged_index_is_one_line(tmp_path: Path, edit, message: str) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    index = json.loads((d / "index.json").read_text())
    edit(index)
    (d / "index.json").write_text(json.dumps(index))
    result = runner.invoke(app, ["inspect", str(d)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "internal error" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 2  # error and hint


def test_inspect_says_where_tag_names_come_from(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    result = runner.invoke(app, ["inspect", str(d), "--json"])
    tags = json.loads(result.stdout)["summary"]["tags"]
    assert tags["names_from"] == "vocabulary" and tags["vocab_file"].endswith("ram_tag_list.txt")
    assert "the path recorded at pack time" in tags["vocab_lookup"]
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["config"]["vocab"] = "nowhere/ram_tag_list.txt"
    (d / "index.json").write_text(json.dumps(index))
    result = runner.invoke(app, ["inspect", str(d)])
    assert result.exit_code == 0 and "warning: tags shown as ids" in result.stderr and "--vocab" in result.stderr

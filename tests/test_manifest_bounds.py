"""Manifests that are too long, malformed after their end, or nested too deeply: each is one line with its place,
and the rows around it are not lost (issue: unbounded inputs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import mmprep.inputs.manifest as manifest
from mmprep.errors import InputError
from mmprep.inputs.manifest import iter_json_array, iter_records, iter_samples
from mmprep.records import Rejected, Sample


def _rows(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "images": [f"{i}.jpg"], "text": f"row {i}"} for i in range(start, start + n)]


def test_two_concatenated_json_lists_are_a_file_error_with_the_line(tmp_path: Path) -> None:
    p = tmp_path / "ab.json"
    p.write_text(json.dumps(_rows(2)) + "\n" + json.dumps(_rows(2, 2)) + "\n")
    with pytest.raises(InputError, match=r"ab.json:2: data after the end of the JSON list"):
        list(iter_records(p))


@pytest.mark.parametrize("tail", ["garbage", "]", "{}", "\n\n  x"])
def test_anything_after_the_closing_bracket_is_an_error(tmp_path: Path, tail: str) -> None:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(_rows(3)) + tail)
    with pytest.raises(InputError, match="data after the end of the JSON list"):
        list(iter_records(p))


def test_trailing_whitespace_after_the_list_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(_rows(3)) + "\n \t\n")
    assert [r.line for r in iter_records(p)] == [1, 1, 1]


def test_a_device_is_not_a_manifest() -> None:
    with pytest.raises(InputError, match="/dev/zero: not a regular file or a pipe"):
        list(iter_records("/dev/zero"))


def test_an_overlong_jsonl_line_is_one_reject_and_the_next_rows_are_read(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", 1 << 20)
    p = tmp_path / "m.jsonl"
    rows = [json.dumps(r) for r in _rows(3)]
    huge = json.dumps({"id": "big", "images": ["x.jpg"], "text": "a" * (3 << 20)})
    p.write_text("\n".join([rows[0], huge, rows[1], rows[2]]) + "\n")
    got = list(iter_samples(p))
    assert [type(g).__name__ for g in got] == ["Sample", "Rejected", "Sample", "Sample"]
    rej = got[1]
    assert isinstance(rej, Rejected) and rej.line == 2 and "longer than 1 MB" in rej.detail
    assert [g.line for g in got] == [1, 2, 3, 4]


def test_an_endless_line_on_stdin_ends_with_one_reject(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream without a newline (what `cat /dev/zero |` sends) is read in bounded blocks, never whole."""
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", 1 << 16)
    data = b"\0" * (5 << 20) + b"\n" + json.dumps(_rows(1)[0]).encode() + b"\n"
    got = list(manifest._iter_jsonl(io.BufferedReader(io.BytesIO(data)), "<stdin>"))
    assert got[0].error and "longer than" in got[0].error and got[1].data == _rows(1)[0]


def test_csv_cells_over_128_kb_are_read(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    long_text = "word " * 60_000  # 300 KB: over the csv module's default field limit
    p.write_text(f"id,images,text\nr1,a.jpg,{long_text}\nr2,b.jpg,short\n")
    got = list(iter_samples(p))
    assert all(isinstance(g, Sample) for g in got) and len(got[0].text) == len(long_text)  # type: ignore[union-attr]


def test_an_overlong_csv_line_is_one_reject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", 1 << 16)
    p = tmp_path / "m.csv"
    p.write_text("id,images,text\nr1,a.jpg,ok\nr2,b.jpg," + "x" * (1 << 18) + "\nr3,c.jpg,ok\n")
    got = list(iter_samples(p))
    assert [g.line for g in got] == [2, 3, 4]
    assert isinstance(got[1], Rejected) and "longer than" in got[1].detail and isinstance(got[2], Sample)


def test_an_unclosed_csv_quote_names_the_lines_it_swallowed(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text('id,images,text\nr1,a.jpg,ok\nr2,b.jpg,"broken quote\nr3,c.jpg,swallowed\nr4,d.jpg,too\n')
    got = list(iter_samples(p))
    assert [g.line for g in got] == [2, 3]
    rej = got[1]
    assert isinstance(rej, Rejected) and rej.reason == "bad_record"
    assert "from line 3 to line 5" in rej.detail and "swallowed 2 line(s)" in rej.detail


def test_a_csv_list_cell_nested_too_deeply_is_a_row_reject(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    deep = "[" * 50_000 + "]" * 50_000
    p.write_text(f"id,images,text,tags\nr1,a.jpg,t,\"{deep}\"\nr2,b.jpg,t,cat\n")
    got = list(iter_samples(p))
    assert isinstance(got[0], Rejected) and got[0].reason == "bad_type" and got[0].line == 2
    assert isinstance(got[1], Sample)


def test_a_huge_json_list_element_is_parsed_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each 1 MB refill used to re-parse the element from its start (quadratic: 25/50/100 MB took 3/7/28 s).
    Counting the parse attempts shows the growth: now about log2(size / 1 MB), was size / 1 MB."""
    calls: list[int] = []
    real = manifest.json.JSONDecoder.raw_decode

    def counting(self: object, s: str, idx: int = 0) -> object:
        calls.append(len(s) - idx)
        return real(self, s, idx)  # type: ignore[arg-type]

    monkeypatch.setattr(manifest.json.JSONDecoder, "raw_decode", counting)
    element = {"id": "big", "images": ["a.jpg"], "text": "x" * (24 << 20)}
    data = json.dumps([element, _rows(1)[0]]).encode()
    got = list(iter_json_array(io.BufferedReader(io.BytesIO(data)), "m.json"))
    assert [v["id"] for _, v, _ in got] == ["big", "r0"]
    assert len(calls) <= 10, f"{len(calls)} parse attempts"
    assert sum(calls) <= 4 * len(data), "the text parsed adds up to a few times the input, not its square"


def test_a_json_list_element_over_the_limit_is_a_file_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", 2 << 20)
    data = json.dumps([{"id": "big", "text": "x" * (8 << 20)}]).encode()
    with pytest.raises(InputError, match=r"m.json:1: a list element longer than 2 MB"):
        list(iter_json_array(io.BufferedReader(io.BytesIO(data)), "m.json"))


@pytest.mark.parametrize("command", ["audit-labels", "tokenize", "normalize-images", "pack"])
def test_a_deep_csv_cell_is_a_row_problem_in_every_command(tmp_path: Path, command: str) -> None:
    """Was a RecursionError reported as an internal error by pack, audit-labels, normalize-images and tokenize."""
    from typer.testing import CliRunner

    from mmprep.cli import app

    repo = Path(__file__).resolve().parents[1]
    deep = "[" * 50_000 + "]" * 50_000
    (tmp_path / "a.jpg").write_bytes((repo / "sample_data" / "images" / "astronaut.jpg").read_bytes())
    p = tmp_path / "m.csv"
    p.write_text(f'id,images,text,tags\nr1,"{deep}",t,"{deep}"\nr2,a.jpg,t,cat\n')
    args = {
        "audit-labels": ["audit-labels", "--vocab", str(repo / "sample_data" / "ram_tag_list.txt"), str(p)],
        "tokenize": ["tokenize", str(p), "--tokenizer", str(repo / "sample_data" / "tokenizers" / "clip"),
                     "--max-length", "8", "--out", str(tmp_path / "t.parquet")],
        "normalize-images": ["normalize-images", str(p), "--out", str(tmp_path / "n"), "--image-size", "8"],
        "pack": ["pack", str(p), "--out", str(tmp_path / "o"), "--image-size", "8", "--workers", "1"],
    }[command]
    res = CliRunner().invoke(app, args)
    assert res.exit_code in (0, 1), res.stderr
    assert "internal error" not in res.stderr and "RecursionError" not in res.stderr


def _pack_args(tmp_path: Path, manifest_arg: str) -> list[str]:
    repo = Path(__file__).resolve().parents[1]
    return ["pack", manifest_arg, "--out", str(tmp_path / "o"), "--image-root", str(repo / "sample_data"),
            "--image-size", "8", "--workers", "1"]


def test_pack_refuses_a_device_as_manifest_before_reading_it(tmp_path: Path) -> None:
    """/dev/zero was copied as if it were a pipe until the disk was full; it is never a manifest."""
    from typer.testing import CliRunner

    from mmprep.cli import app

    res = CliRunner().invoke(app, _pack_args(tmp_path, "/dev/zero"))
    assert res.exit_code == 2, res.stderr
    assert "/dev/zero: not a regular file or a pipe" in res.stderr
    assert not (tmp_path / "o").exists()


def test_binary_data_on_standard_input_stops_the_copy_at_the_first_nul(tmp_path: Path) -> None:
    """`cat /dev/zero | mmprep pack -` must stop at once, not copy the stream to a temporary file until the disk is
    full; the error names the line and the byte."""
    from typer.testing import CliRunner

    from mmprep.cli import app

    rows = "".join(json.dumps(r) + "\n" for r in _rows(3))
    res = CliRunner().invoke(app, _pack_args(tmp_path, "-"), input=rows.encode() + b"\0" * (3 << 20))
    assert res.exit_code == 2, res.stderr
    assert f"<stdin>:4: holds a NUL byte (byte {len(rows.encode()):,})" in res.stderr
    assert not (tmp_path / "o").exists()

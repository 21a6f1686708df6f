"""Damaged and tampered datasets: one line naming the file and the field, never an internal error.

An index nested 100,000 deep, a truncated or corrupted shard, a count of 10**30, shard paths that are absolute or
leave the dataset folder (a tampered index must not make the reader open files elsewhere), and shards listed in a
subfolder (``data/...``), which are fine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _reader_helpers import copy_packed, packed, shard
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.dataset.reader import PackedDataset
from mmprep.dataset.verify import verify
from mmprep.errors import InputError

runner = CliRunner()


def edit_index(d: Path, edit) -> None:
    """Apply ``edit`` to the (only) split's entry of the index (the whole index of a format 1 folder)."""
    index = json.loads((d / "index.json").read_text())
    edit(next(iter(index["splits"].values())) if "splits" in index else index)
    (d / "index.json").write_text(json.dumps(index))


def one_line_error(stderr: str) -> str:
    """The error line of a failed command (asserting it is one line plus at most a hint, and no internal error)."""
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) <= 2 and all(not line.startswith("hint: ") or i == 1 for i, line in enumerate(lines)), stderr
    assert "internal error" not in stderr and "Traceback" not in stderr
    return lines[0]


def test_an_index_nested_100k_deep_is_one_line(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    (d / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    for cmd in ("verify", "inspect"):
        res = runner.invoke(app, [cmd, str(d)])
        assert res.exit_code == 2, res.stderr
        assert "index.json: nested too deeply to be an mmprep index" in one_line_error(res.stderr)
    with pytest.raises(InputError, match="nested too deeply"):
        PackedDataset(d)


def test_a_truncated_shard_is_one_line_naming_it(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    first = d / shard(d, 0)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["inspect", str(d)])
    assert res.exit_code == 2
    line = one_line_error(res.stderr)
    assert f"{first}: {len(data) // 2:,} bytes, index.json says {len(data):,} (a truncated or replaced shard)" in line
    assert "mmprep verify" in res.stderr
    # a later shard: the reader opens, and the read that reaches it names it
    d2 = copy_packed("uint8", tmp_path / "d2")
    third = d2 / shard(d2, 2)
    third.write_bytes(third.read_bytes()[:-200])
    ds = PackedDataset(d2)
    with pytest.raises(InputError, match=re.escape(shard(d2, 2)) + r": .* bytes, index.json says"):
        list(ds.iter_batches(4))
    with pytest.raises(InputError, match=re.escape(shard(d2, 2))):
        ds.take([9])


def test_a_corrupted_shard_of_the_right_size_is_one_line_naming_it(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    one = d / shard(d, 1)
    md = pq.ParquetFile(one).metadata
    col = md.row_group(0).column(md.schema.names.index("pixel_values"))
    data = bytearray(one.read_bytes())
    start = col.data_page_offset
    data[start:start + col.total_compressed_size] = bytes(col.total_compressed_size)  # the page header and data
    one.write_bytes(bytes(data))
    for prefetch in (0, 2):
        ds = PackedDataset(d, prefetch=prefetch)
        with pytest.raises(InputError) as err:
            list(ds.iter_batches(4))
        msg = str(err.value)
        assert msg.startswith(f"{one}: not a readable Parquet file (") and "\n" not in msg
        assert "mmprep verify" in (err.value.hint or "")
    with pytest.raises(InputError, match=re.escape(shard(d, 1)) + ": not a readable Parquet file"):
        PackedDataset(d).take([4])
    # the columns that are intact still read (inspect reads only small columns)
    assert runner.invoke(app, ["inspect", str(d)]).exit_code == 0


def test_a_count_of_10_to_the_30_is_one_line(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    edit_index(d, lambda ix: ix["shards"][1].update(rows=10**30))
    res = runner.invoke(app, ["inspect", str(d)])
    assert res.exit_code == 2
    line = one_line_error(res.stderr)
    assert f"shard entry 1 ({shard(d, 1)}): rows is 10000000000000000000… (31 digits), out of range" in line
    with pytest.raises(InputError, match="out of range"):
        PackedDataset(d)
    res = runner.invoke(app, ["verify", str(d), "--json"])
    assert res.exit_code == 1 and "internal error" not in res.stderr
    found = [(f["where"], f["check"]) for f in json.loads(res.stdout)["findings"]]
    assert (shard(d, 1), "index") in found
    d2 = copy_packed("uint8", tmp_path / "d2")
    edit_index(d2, lambda ix: ix["totals"].update(written=2**63))
    res = runner.invoke(app, ["inspect", str(d2)])
    assert res.exit_code == 2 and "totals.written is 9223372036854775808, out of range" in one_line_error(res.stderr)


@pytest.mark.parametrize("bad", ["abs", "dotdot", "uri", "backslash"])
def test_shard_paths_that_leave_the_dataset_are_refused(tmp_path: Path, bad: str) -> None:
    """A tampered index pointing at files outside the dataset folder: the reader refuses, verify reports, and
    neither opens the file (here a real, readable shard of another dataset)."""
    d = copy_packed("uint8", tmp_path / "d")
    other = copy_packed("uint8", tmp_path / "other")
    outside = other / shard(other, 1)
    path = {"abs": str(outside), "dotdot": f"../other/{shard(other, 1)}", "uri": outside.as_uri(),
            "backslash": "..\\other\\" + shard(other, 1).replace("/", "\\")}[bad]
    (d / shard(d, 1)).unlink()
    edit_index(d, lambda ix: ix["shards"][1].update(path=path))
    with pytest.raises(InputError) as err:
        PackedDataset(d)
    msg = str(err.value)
    assert msg.startswith(f"{d / 'index.json'}: shard entry 1 ({path}): path {path!r} ") and "\n" not in msg
    res = runner.invoke(app, ["inspect", str(d)])
    assert res.exit_code == 2 and "shard entry 1" in one_line_error(res.stderr)
    report = verify(d)
    assert not report.ok and (path, "index") in [(f.where, f.check) for f in report.findings]
    assert report.rows == 11  # the four shards inside the folder; the one outside was not read
    assert "missing" not in {f.check for f in report.findings if f.where == path}


def test_a_rejects_path_outside_the_dataset_is_refused(tmp_path: Path) -> None:
    d = copy_packed("uint8", tmp_path / "d")
    edit_index(d, lambda ix: ix.update(rejects="/etc/passwd"))
    with pytest.raises(InputError, match="rejects '/etc/passwd' is absolute"):
        PackedDataset(d)
    report = verify(d)
    assert ("index.json", "index") in [(f.where, f.check) for f in report.findings]
    assert not any("passwd" in f.where for f in report.findings)


def test_shards_in_a_subfolder_are_read(tmp_path: Path) -> None:
    """Shard paths are relative POSIX paths and may name a subfolder (the Hub layout puts shards in data/)."""
    d = copy_packed("uint8", tmp_path / "d")
    ds, ref = PackedDataset(d), PackedDataset(packed("uint8"))
    assert ds.shards[0].name == shard(d, 0) and shard(d, 0).startswith("data/")
    a, b = next(ds.iter_batches(15)), next(ref.iter_batches(15))
    assert a["id"] == b["id"] and np.array_equal(a["pixel_values"], b["pixel_values"])
    report = verify(d)
    assert report.rows == 15 and not [f for f in report.findings if f.check in ("missing", "index", "sha256")]

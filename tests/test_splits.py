"""The Hub layout with splits: `--split` adds a split to an output folder, the index and the card list them all, the
other splits' files are never touched, `data/` holds shards alone; readers pick a split and still read format 1."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_pack import SAMPLE, sample_cfg
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.dataset.reader import PackedDataset
from mmprep.dataset.verify import verify
from mmprep.errors import InputError, UsageError
from mmprep.pack.job import pack

runner = CliRunner()
FORMAT1 = Path(__file__).parent / "data" / "format1"


def files_of(out: Path, split: str) -> dict[str, str]:
    """sha256 of every file a split owns: its shards, rejects and run statistics."""
    found = [*out.glob(f"data/{split}-*.parquet"), out / f"rejected-{split}.jsonl", out / f"run-stats-{split}.json"]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def card_splits(out: Path) -> list[str]:
    """The splits the dataset card's YAML header declares (its `configs: data_files`)."""
    head = (out / "README.md").read_text().split("---")[1]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.strip().startswith("- split:")]


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample_data packed as `train`, then its first 5 rows as `test` into the same folder (no --overwrite)."""
    out = tmp_path_factory.mktemp("splits") / "out"
    assert pack(sample_cfg(out), workers=1).failed is None
    five = tmp_path_factory.mktemp("m") / "five.jsonl"
    five.write_text("".join((SAMPLE / "manifest.jsonl").read_text().splitlines(keepends=True)[:5]))
    report = pack(sample_cfg(out, manifest=str(five), split="test", image_root=str(SAMPLE)), workers=1)
    assert report.failed is None and report.written == 5 and report.split == "test"
    return out


def test_a_second_split_is_added_beside_the_first(two_splits: Path) -> None:
    out = two_splits
    index = json.loads((out / "index.json").read_text())
    assert index["format_version"] == 2 and sorted(index["splits"]) == ["test", "train"]
    assert [s["path"] for s in index["splits"]["test"]["shards"]] == ["data/test-00000-of-00001.parquet"]
    assert index["splits"]["test"]["rejects"] == "rejected-test.jsonl"
    assert index["splits"]["train"]["totals"]["written"] == 15 and index["splits"]["test"]["totals"]["written"] == 5
    assert card_splits(out) == ["test", "train"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [".mmprep", "README.md", "data", "index.json",
                                                     "rejected-test.jsonl", "rejected-train.jsonl",
                                                     "run-stats-test.json", "run-stats-train.json"]


def test_datasets_finds_both_splits(two_splits: Path, tmp_path: Path) -> None:
    import datasets

    whole = datasets.load_dataset(str(two_splits), cache_dir=str(tmp_path / "a"))  # through the card
    assert sorted(whole) == ["test", "train"] and whole["train"].num_rows == 15 and whole["test"].num_rows == 5
    assert whole["test"]["id"] == ["s001", "s002", "s003", "s004", "s005"]
    by_name = datasets.load_dataset("parquet", data_dir=str(two_splits / "data"), cache_dir=str(tmp_path / "b"))
    assert sorted(by_name) == ["test", "train"] and by_name["test"].num_rows == 5  # split names from file names


def test_readers_pick_a_split(two_splits: Path) -> None:
    assert len(PackedDataset(two_splits)) == 15  # two splits, one of them train: train by default
    test = PackedDataset(two_splits, split="test")
    assert len(test) == 5 and test.split == "test" and test[0]["id"] == "s001"
    with pytest.raises(InputError, match=r"no split 'dev' \(splits: test, train\)"):
        PackedDataset(two_splits, split="dev")
    for split in ("train", "test"):
        report = verify(two_splits, split=split, deep=True)
        assert report.ok and report.split == split, report.findings
    res = runner.invoke(app, ["inspect", str(two_splits), "--split", "test", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["rows"] == 5
    res = runner.invoke(app, ["verify", str(two_splits), "--split", "test"])
    assert res.exit_code == 0 and "split test: 1 shards, 5 rows" in res.stderr


def test_repacking_a_split_needs_overwrite_and_touches_no_other_split(two_splits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(two_splits, out)
    test_before = files_of(out, "test")
    with pytest.raises(UsageError, match="already holds split 'train'"):
        pack(sample_cfg(out), workers=1)
    report = pack(sample_cfg(out, rows_per_shard=4), workers=2, overwrite=True)  # other shard names now
    assert [s.path for s in report.shards] == [f"data/train-{k:05d}-of-00005.parquet" for k in range(5)]
    assert files_of(out, "test") == test_before
    assert not list((out / "data").glob("train-*-of-00003.parquet"))  # the earlier train shards, by name
    assert verify(out, split="train").ok and verify(out, split="test").ok
    assert card_splits(out) == ["test", "train"]


def test_a_failed_rerun_withdraws_its_split_from_the_index_and_the_card(two_splits: Path, tmp_path: Path) -> None:
    """The index lists only splits whose shards are all in place: a rerun that fails leaves its split out (and
    the others in)."""
    out = tmp_path / "out"
    shutil.copytree(two_splits, out)
    report = pack(sample_cfg(out, split="test", max_reject_rate=0.01), workers=1, overwrite=True)
    assert report.failed and "split 'test'" in report.failed
    index = json.loads((out / "index.json").read_text())
    assert list(index["splits"]) == ["train"] and card_splits(out) == ["train"]
    with pytest.raises(InputError, match="no split 'test'"):
        PackedDataset(out, split="test")
    assert report.rejected == 3 and (out / "rejected-test.jsonl").exists()


def test_a_foreign_file_in_data_stops_the_run(two_splits: Path, tmp_path: Path) -> None:
    """Trainers read every file in data/: a file mmprep did not write there is refused (even with --overwrite)
    and verify reports it."""
    out = tmp_path / "out"
    shutil.copytree(two_splits, out)
    (out / "data" / "notes.txt").write_text("mine\n")
    before = files_of(out, "train")
    for extra in ((), ("--overwrite",)):
        res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out), "--split", "val",
                                  "--image-size", "16", "--workers", "1", *extra])
        assert res.exit_code == 2, res.stderr
        assert "data/notes.txt" in res.stderr and "trainers read every file in data/" in res.stderr
    assert files_of(out, "train") == before and (out / "data" / "notes.txt").read_text() == "mine\n"
    findings = verify(out, split="train").findings
    assert [(f.where, f.check) for f in findings] == [("data/notes.txt", "foreign")]


def test_a_readme_mmprep_did_not_write_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my dataset\n")
    with pytest.raises(UsageError, match=r"README\.md exists and was not written by mmprep"):
        pack(sample_cfg(out), workers=1, overwrite=True)
    assert (out / "README.md").read_text() == "# my dataset\n" and not (out / "data").exists()


@pytest.mark.parametrize("name", ["tr-ain", "", "a/b", "x" * 65, "..", "train."])
def test_bad_split_names_are_usage_errors(tmp_path: Path, name: str) -> None:
    res = runner.invoke(app, ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(tmp_path / "o"),
                              "--split", name])
    assert res.exit_code == 2 and "--split" in res.stderr and "split name" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_format_1_directories_are_still_read() -> None:
    """A folder written by mmprep before the Hub layout (tests/data/format1): read, inspected and verified as
    split `train`."""
    ds = PackedDataset(FORMAT1)
    assert ds.split == "train" and ds.index.format_version == 1 and len(ds) == 4
    assert [s.name for s in ds.shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    batch = ds.take([0, 3])
    assert batch["id"] == ["s001", "s004"] and batch["pixel_values"].shape == (2, 2, 3, 16, 16)
    assert len(PackedDataset(FORMAT1, split="train")) == 4
    with pytest.raises(InputError, match="format 1 dataset holds one split"):
        PackedDataset(FORMAT1, split="test")
    report = verify(FORMAT1, deep=True)
    assert report.ok and report.rows == 4, report.findings
    res = runner.invoke(app, ["inspect", str(FORMAT1), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["rows"] == 4


def test_packing_into_a_format_1_directory_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(FORMAT1, out)
    (out / ".mmprep" / "chunks").mkdir(parents=True)  # the state a format 1 run left (its records name its files)
    (out / ".mmprep" / "run.json").write_text("{}")
    (out / ".mmprep" / "files.json").write_text(json.dumps(["index.json", "rejected.jsonl", "run-stats.json"]))
    for k in range(2):
        (out / ".mmprep" / "chunks" / f"{k:05d}.json").write_text(
            json.dumps({"record": {}, "files": [f"shard-{k:05d}.parquet"]}))
    with pytest.raises(UsageError, match="earlier mmprep format"):
        pack(sample_cfg(out), workers=1)
    with pytest.raises(UsageError, match="earlier mmprep format"):
        pack(sample_cfg(out), workers=1, resume=True)
    report = pack(sample_cfg(out), workers=1, overwrite=True)
    assert report.failed is None
    assert not (out / "rejected.jsonl").exists() and not (out / "run-stats.json").exists()
    assert not list(out.glob("shard-*")) and not (out / ".mmprep" / "run.json").exists()
    assert not list((out / ".mmprep" / "chunks").iterdir())
    assert PackedDataset(out).index.format_version == 2

"""What pack may write and delete, and when resume must refuse or redo (real symbolic links, real edits).

Each test here reproduces a way an earlier version silently damaged files outside the output or mixed two runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import UsageError
from mmprep.images.decode import ImageConfig
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack
from mmprep.text.config import TextConfig
from tests._reliab_helpers import digests, temp_files, write_noise_corpus

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "sample_data" / "tokenizers" / "clip"
VOCAB = REPO / "sample_data" / "ram_tag_list.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-row manifest over 8 images (every 13th row points at a missing file)."""
    return write_noise_corpus(tmp_path_factory.mktemp("corpus"), rows=40, side=64)


def cfg(manifest: Path, out: Path, **kw: Any) -> PackConfig:
    base: dict[str, Any] = dict(manifest=str(manifest), out=str(out),
                                image=ImageConfig(size=(16, 16), resize_mode="stretch"), limit_images=1,
                                rows_per_shard=8)
    base.update(kw)
    return PackConfig(**base)


def run(*args: str) -> Any:
    return runner.invoke(app, ["pack", *args, "--image-size", "16", "--resize-mode", "stretch", "--limit-images",
                               "1", "--rows-per-shard", "8", "--workers", "1"])


# -- symbolic links: never followed when writing


@pytest.mark.parametrize("resume", [False, True])
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(corpus: Path, tmp_path: Path,
                                                                   resume: bool) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    out = tmp_path / "o"
    (out / ".mmprep").mkdir(parents=True)
    (out / ".mmprep" / "lock").symlink_to(victim)
    res = run(str(corpus), "--out", str(out), *(["--resume"] if resume else []))
    assert res.exit_code == 2, res.stderr
    assert "symbolic link" in res.stderr and "lock" in res.stderr
    assert victim.read_text() == "keep\n"
    assert not list(out.glob("data/*"))


def test_a_symlinked_state_folder_is_refused(corpus: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "o"
    out.mkdir()
    (out / ".mmprep").symlink_to(elsewhere, target_is_directory=True)
    res = run(str(corpus), "--out", str(out))
    assert res.exit_code == 2 and "symbolic link" in res.stderr, res.stderr
    assert list(elsewhere.iterdir()) == []  # no run.json, chunks/ or lock written through the link


def test_a_symlink_at_a_shard_name_is_refused_not_followed(corpus: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "o"
    (out / "data").mkdir(parents=True)
    link = out / "data" / "train-00000-of-00005.parquet"
    link.symlink_to(victim)
    res = run(str(corpus), "--out", str(out), "--overwrite")
    assert res.exit_code == 2, res.stderr
    assert "data/train-00000-of-00005.parquet" in res.stderr and "symbolic link" in res.stderr
    assert "free disk space" not in res.stderr
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    assert not temp_files(out)
    (out / "data").rename(out / "elsewhere")  # a link at the data folder itself
    (out / "data").symlink_to(out / "elsewhere", target_is_directory=True)
    res = run(str(corpus), "--out", str(out), "--overwrite")
    assert res.exit_code == 2 and "symbolic link" in res.stderr, res.stderr
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in (out / "elsewhere").iterdir()) == [
        "train-00000-of-00005.parquet"]


# -- --overwrite deletes only what an earlier run wrote -------------------------------------------------------------


def test_overwrite_deletes_only_files_mmprep_wrote(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    pack(cfg(corpus, out), workers=1)
    (out / "shard-backups").mkdir()
    (out / "shard-backups" / "old.parquet").write_bytes(b"backup")
    (out / "shard-plan.md").write_text("my notes\n")
    (out / "notes.txt").write_text("mine\n")
    first = digests(out)
    report = pack(cfg(corpus, out, rows_per_shard=16), workers=1, overwrite=True)  # fewer, larger shards
    assert (out / "shard-backups" / "old.parquet").read_bytes() == b"backup"
    assert (out / "shard-plan.md").read_text() == "my notes\n" and (out / "notes.txt").read_text() == "mine\n"
    shards = sorted(p.relative_to(out).as_posix() for p in out.glob("data/train-*.parquet"))
    assert shards == [s.path for s in report.shards]  # the earlier run's extra shards are gone, by name
    assert len(shards) < sum(1 for k in first if k.startswith("data/"))


def test_overwrite_of_an_earlier_failed_run_removes_its_files(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    report = pack(cfg(corpus, out, max_reject_rate=0.01), workers=1)  # 4 of 40 rows miss their image
    assert report.failed and not (out / "index.json").exists() and (out / "rejected-train.jsonl").exists()
    report = pack(cfg(corpus, out), workers=1, overwrite=True)
    assert report.failed is None and (out / "index.json").exists()


# -- resume never mixes two runs


def _interrupt_after_first_shards(manifest: Path, out: Path, **kw: Any) -> None:
    """A finished pack stands in for an interrupted one: --resume must still check every kept chunk."""
    pack(cfg(manifest, out, **kw), workers=1)


def test_resume_refuses_a_tokenizer_whose_files_changed(corpus: Path, tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    shutil.copytree(CLIP, tok)
    out = tmp_path / "o"
    kw = dict(tokenizer=str(tok), text=TextConfig(max_length=16))
    _interrupt_after_first_shards(corpus, out, **kw)
    vocab = json.loads((tok / "vocab.json").read_text())
    a, b = "photo</w>", "cat</w>"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same path, other ids
    (tok / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UsageError, match="tokenizer_sha256"):
        pack(cfg(corpus, out, **kw), workers=1, resume=True)


def test_resume_refuses_a_vocabulary_whose_content_changed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    manifest = write_noise_corpus(root, rows=20, side=32)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "tags": ["cat"]}) + "\n" for r in rows))
    vocab = tmp_path / "tags.txt"
    vocab.write_text("dog\ncat\n")
    out = tmp_path / "o"
    _interrupt_after_first_shards(manifest, out, vocab=str(vocab))
    vocab.write_text("cat\ndog\n")  # same file, other ids
    with pytest.raises(UsageError, match="vocab_sha256"):
        pack(cfg(manifest, out, vocab=str(vocab)), workers=1, resume=True)


def test_resume_redoes_the_chunks_whose_images_changed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    manifest = write_noise_corpus(root, rows=40, side=32)
    out = tmp_path / "o"
    _interrupt_after_first_shards(manifest, out)
    before = digests(out)
    # img1.jpg is used by rows 1, 9, 17, 25, 33: every chunk of 8 rows holds one of them, except none
    Image.new("RGB", (32, 32), (250, 0, 0)).save(root / "img3.jpg")  # rows 3, 11, 19, 27, 35
    st = os.stat(root / "img3.jpg")
    os.utime(root / "img3.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = pack(cfg(manifest, out), workers=1, resume=True)
    assert report.resumed_shards == 0  # every chunk of 8 holds a row with img3.jpg
    fresh = tmp_path / "fresh"
    pack(cfg(manifest, fresh), workers=1)
    after = digests(out)
    assert {k: v for k, v in after.items() if not k.startswith(".mmprep")} == \
        {k: v for k, v in digests(fresh).items() if not k.startswith(".mmprep")}
    first_shard = "data/train-00000-of-00005.parquet"
    assert after[first_shard] != before[first_shard]


def test_resume_keeps_chunks_whose_images_did_not_change(tmp_path: Path) -> None:
    root = tmp_path / "c"
    manifest = write_noise_corpus(root, rows=40, side=32, every_missing=1000)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):  # the last chunk alone uses img7.jpg
        r["images"] = ["img7.jpg"] if i >= 32 else ["img0.png"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    _interrupt_after_first_shards(manifest, out)
    Image.new("RGB", (32, 32), (0, 0, 250)).save(root / "img7.jpg")
    report = pack(cfg(manifest, out), workers=1, resume=True)
    assert report.resumed_shards == 4  # shards 0-3 kept, shard 4 redone


# -- a run that writes nothing, and the order of the last writes


@pytest.mark.parametrize("body,name", [(b"", "m.jsonl"), (b"id,images,text\n", "m.csv"), (b"\n\n", "m.jsonl")])
def test_an_empty_input_is_a_failed_run(tmp_path: Path, body: bytes, name: str) -> None:
    manifest = tmp_path / name
    manifest.write_bytes(body)
    out = tmp_path / "o"
    res = run(str(manifest), "--out", str(out))
    assert res.exit_code == 1, res.stderr
    assert "no rows" in res.stderr
    assert not (out / "index.json").exists() and not list(out.glob("data/*"))


def test_disk_full_while_writing_the_run_statistics_publishes_no_index(corpus: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mmprep.runtime.files as files

    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "run-stats-train.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    out = tmp_path / "o"
    res = run(str(corpus), "--out", str(out))
    assert res.exit_code == 1 and "run-stats-train.json" in res.stderr and "No space left" in res.stderr
    assert not (out / "index.json").exists() and not temp_files(out)  # what is on disk agrees with exit 1


# -- normalize-images: no writes through links --------------------------------------------------------------------


def _image_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 10, 10)).save(root / "a.png")
    Image.new("RGB", (20, 10), (10, 200, 10)).save(root / "sub" / "b.png")
    return root


def test_normalize_images_refuses_a_symlinked_output_record(tmp_path: Path) -> None:
    src = _image_tree(tmp_path / "src")
    victim = tmp_path / "victim.jsonl"
    victim.write_text("mine\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "normalize-images.outputs.jsonl").symlink_to(victim)
    res = runner.invoke(app, ["normalize-images", str(src), "--out", str(out), "--image-size", "8"])
    assert res.exit_code != 0 and "symbolic link" in res.stderr, res.stderr
    assert victim.read_text() == "mine\n"


def test_normalize_images_writes_nothing_through_a_symlinked_subfolder(tmp_path: Path) -> None:
    src = _image_tree(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    res = runner.invoke(app, ["normalize-images", str(src), "--out", str(out), "--image-size", "8", "--json"])
    assert list(elsewhere.iterdir()) == []
    assert (out / "a.png").is_file()
    report = json.loads(res.stdout)
    assert report["written"] == 1 and report["reasons"] == {"write_failed": 1}
    rej = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rej[0]["path"].endswith("b.png") and "symbolic link" in rej[0]["detail"]


def test_a_refused_resume_names_the_flags_that_differ(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    pack(cfg(corpus, out), workers=1)
    res = runner.invoke(app, ["pack", str(corpus), "--out", str(out), "--resume", "--image-size", "24",
                              "--resize-mode", "stretch", "--limit-images", "1", "--rows-per-shard", "8",
                              "--compression", "lz4"])
    assert res.exit_code == 2
    assert "--image-size 16x16 -> 24x24" in res.stderr and '--compression "zstd" -> "lz4"' in res.stderr
    assert "row_group_rows" not in res.stderr  # derived from the image size: not a flag the user changed


@pytest.mark.parametrize("damage", [b"{not json", b"", b"\xff\xfe"])
def test_a_damaged_run_record_on_resume_is_one_line(corpus: Path, tmp_path: Path, damage: bytes) -> None:
    out = tmp_path / "o"
    pack(cfg(corpus, out), workers=1)
    (record,) = (out / ".mmprep").rglob("run.json")
    record.write_bytes(damage)
    res = run(str(corpus), "--out", str(out), "--resume")
    assert res.exit_code == 2, res.stderr
    assert "run.json" in res.stderr and "damaged" in res.stderr and "--overwrite" in res.stderr
    assert "internal error" not in res.stderr
    res = run(str(corpus), "--out", str(out), "--overwrite")
    assert res.exit_code == 0, res.stderr

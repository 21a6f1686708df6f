"""`mmprep pack`: round trips through every reader, accounting, determinism, resume, layouts, CLI contract."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.images.decode import ImageConfig, Normalization
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack
from mmprep.text.config import TextConfig

SAMPLE = Path("sample_data")
CLIP = str(SAMPLE / "tokenizers" / "clip")
VOCAB = str(SAMPLE / "ram_tag_list.txt")
runner = CliRunner()


def sample_cfg(out: Path, **kw) -> PackConfig:
    base = dict(
        manifest=str(SAMPLE / "manifest.jsonl"),
        out=str(out),
        image=ImageConfig(size=(64, 64), resize_mode="letterbox"),
        limit_images=4,
        tokenizer=CLIP,
        text=TextConfig(max_length=32),
        vocab=VOCAB,
        rows_per_shard=6,
    )
    base.update(kw)
    return PackConfig(**base)


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file of the dataset (data/ included), except the run statistics (timings) and the state."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith("run-stats")
            and ".mmprep" not in p.relative_to(out).parts}


def split_index(out: Path, split: str = "train") -> dict:
    """One split's entry of index.json."""
    return json.loads((out / "index.json").read_text())["splits"][split]


def shards(out: Path, split: str = "train") -> list[Path]:
    return sorted((out / "data").glob(f"{split}-*.parquet"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    report = pack(sample_cfg(out), workers=1)
    assert report.failed is None
    return out


def test_accounting_and_rejects(packed: Path) -> None:
    index = split_index(packed)
    t = index["totals"]
    assert t["read"] == 18
    assert t["written"] == 15
    assert t["rejected"] == 3
    assert t["read"] == t["written"] + t["rejected"]
    assert t["rejected_by_reason"] == {"image_missing": 1, "image_truncated": 1, "unknown_tag": 1}
    rejects = [json.loads(line) for line in (packed / "rejected-train.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"], r["stage"]) for r in rejects] == [
        (16, "s016", "image"), (17, "s017", "image"), (18, "s018", "labels")
    ]
    assert "does_not_exist.jpg" in rejects[0]["detail"]
    assert "feline friend" in rejects[2]["detail"]
    assert sum(s["rows"] for s in index["shards"]) == 15
    assert [s["path"] for s in index["shards"]] == ["data/train-00000-of-00003.parquet",
                                                    "data/train-00001-of-00003.parquet",
                                                    "data/train-00002-of-00003.parquet"]
    assert index["rejects"] == "rejected-train.jsonl"
    assert sorted(p.name for p in packed.iterdir()) == [".mmprep", "README.md", "data", "index.json",
                                                        "rejected-train.jsonl", "run-stats-train.json"]
    assert t["image_count_histogram"] == {"1": 11, "2": 2, "3": 1, "4": 1}
    for s in index["shards"]:
        data = (packed / s["path"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not list(packed.rglob(".*tmp*"))


def read_all(packed: Path):
    import pyarrow as pa

    return pa.concat_tables(pq.read_table(p) for p in shards(packed))


def test_pixels_masks_tokens_tags(packed: Path) -> None:
    table = read_all(packed)
    meta = json.loads(table.schema.metadata[b"mmprep"])
    assert meta["pixels"]["shape"] == [4, 3, 64, 64] and meta["pixels"]["dtype"] == "uint8"
    rows = {r["id"]: r for r in table.to_pylist()}
    # s003: two images (coffee 600x400, chelsea 451x300), letterboxed into 64x64
    r = rows["s003"]
    assert r["image_count"] == 2 and r["image_mask"] == [True, True, False, False]
    assert r["image_sizes"][:2] == [[600, 400], [451, 300]] and r["image_sizes"][2] == [0, 0]
    x0, y0, x1, y1 = r["content_boxes"][0]
    assert (x0, x1) == (0, 64) and y1 - y0 in (42, 43)
    px = np.frombuffer(r["pixel_values"], dtype=np.uint8).reshape(4, 3, 64, 64)
    assert not px[2:].any()  # padding slots are zeros
    assert (px[0][:, :y0, :] == 0).all()  # letterbox bands in the fill colour (black)
    # an independent check of the content: Pillow's own resize of the same file, same box
    ref = np.asarray(Image.open(SAMPLE / "images/coffee.jpg").convert("RGB").resize((x1 - x0, y1 - y0),
                                                                                  Image.BICUBIC))
    got = px[0][:, y0:y1, x0:x1].transpose(1, 2, 0).astype(int)
    # the default fast resampler (area filter) is within 3.2 of this; Pillow's own bilinear is 3.4 away
    assert np.abs(got - ref.astype(int)).mean() < 3.5
    # EXIF-rotated landscape: stored 1200x1800 with orientation 6, reported as 1800x1200
    assert rows["s009"]["image_sizes"][0] == [1800, 1200]
    # tokens: CLIP ids for the caption, padded to 32
    ids = rows["s001"]["input_ids"]
    assert len(ids) == 32 and ids[0] == 49406 and 49407 in ids
    n = rows["s001"]["n_tokens"]
    assert rows["s001"]["attention_mask"] == [1] * n + [0] * (32 - n)
    assert rows["s001"]["truncated"] is False
    vocab = (SAMPLE / "ram_tag_list.txt").read_text().split("\n")
    assert [vocab[i] for i in rows["s001"]["tag_ids"]] == ["astronaut", "flag", "woman", "suit", "portrait"]
    assert rows["s004"]["text"].startswith("A rocket lifts off")  # --caption first
    assert rows["s014"]["line"] == 14


def test_other_readers_agree(packed: Path) -> None:
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    files = [str(p) for p in shards(packed)]
    base = read_all(packed).to_pylist()
    ids = [r["id"] for r in base]
    df = pd.concat([pd.read_parquet(f) for f in files])
    assert list(df["id"]) == ids
    assert bytes(df.iloc[2]["pixel_values"]) == base[2]["pixel_values"]
    pl_df = pl.read_parquet(files)
    assert pl_df["id"].to_list() == ids and pl_df["n_tokens"].to_list() == [r["n_tokens"] for r in base]
    glob = str(packed / "data" / "*.parquet")
    con = duckdb.connect()
    got = con.execute(f"select id, image_count, input_ids, pixel_values from '{glob}' order by line").fetchall()
    assert [g[0] for g in got] == ids and [g[1] for g in got] == [r["image_count"] for r in base]
    assert list(got[0][2]) == base[0]["input_ids"] and bytes(got[4][3]) == base[4]["pixel_values"]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds["id"] == ids and ds[5]["tag_ids"] == base[5]["tag_ids"]
    assert ds[1]["pixel_values"] == base[1]["pixel_values"]


def test_deterministic_across_runs_and_workers(packed: Path, tmp_path) -> None:
    out = tmp_path / "again"
    pack(sample_cfg(out), workers=2)
    assert digests(out) == digests(packed)


def test_resume_after_losing_shards_is_identical(packed: Path, tmp_path) -> None:
    out = tmp_path / "partial"
    shutil.copytree(packed, out)
    # simulate a run killed after shard 0: later shards, their records and the final files are gone
    for name in ("data/train-00001-of-00003.parquet", "data/train-00002-of-00003.parquet", "index.json",
                 "README.md", "rejected-train.jsonl"):
        (out / name).unlink()
    (out / ".mmprep/splits/train/chunks/00002.json").unlink()
    (out / "data" / ".train-00001-of-00003.parquet.tmp-999").write_bytes(b"half")  # left by the killed worker
    report = pack(sample_cfg(out), workers=1, resume=True)
    assert report.resumed_shards == 1
    assert digests(out) == digests(packed)


def test_refuses_non_empty_dir_and_changed_resume(packed: Path, tmp_path) -> None:
    from mmprep.errors import UsageError

    with pytest.raises(UsageError, match="already holds split 'train'"):
        pack(sample_cfg(packed), workers=1)
    with pytest.raises(UsageError, match="cannot resume"):
        pack(sample_cfg(packed, limit_images=5), workers=1, resume=True)


def test_shards_record_the_resampler_and_resume_refuses_to_mix(packed: Path, tmp_path) -> None:
    import cv2
    import PIL
    import simplejpeg

    from mmprep.errors import UsageError

    meta = json.loads(pq.read_schema(next((packed / "data").glob("*.parquet"))).metadata[b"mmprep"])
    assert meta["decoder"]["resampler"] == "fast"
    libraries = meta["decoder"]["libraries"]
    assert libraries["pillow"] == PIL.__version__ and libraries["simplejpeg"] == simplejpeg.__version__
    assert libraries["opencv"].startswith(cv2.__version__)  # the wheel's version, e.g. 4.10.0.84 for 4.10.0
    index = json.loads((packed / "index.json").read_text())
    assert index["splits"]["train"]["config"]["image"]["resampler"] == "fast"
    # the Pillow path writes the shard metadata it always wrote (no decoder entry: its shards stay byte-identical)
    slow = tmp_path / "slow"
    pack(sample_cfg(slow, image=ImageConfig(size=(64, 64), resize_mode="letterbox", resampler="pillow")), workers=1)
    assert "decoder" not in json.loads(pq.read_schema(next((slow / "data").glob("*.parquet"))).metadata[b"mmprep"])
    slow_index = json.loads((slow / "index.json").read_text())
    assert slow_index["splits"]["train"]["config"]["image"]["resampler"] == "pillow"
    # a run made with one resampler (or other library versions) is never continued with another
    with pytest.raises(UsageError, match=r"cannot resume.*(resampler|decoder)"):
        pack(sample_cfg(slow), workers=1, resume=True)
    part = tmp_path / "part"
    shutil.copytree(packed, part)
    (run_file,) = (part / ".mmprep").rglob("run.json")
    run = json.loads(run_file.read_text())
    run["decoder"]["libraries"]["opencv"] = "4.0.0"
    run_file.write_text(json.dumps(run))
    with pytest.raises(UsageError, match=r"the image decoder: --resampler, or the versions"):
        pack(sample_cfg(part), workers=1, resume=True)


def test_small_row_groups_reuse_the_pixel_buffer_without_leaking_images(packed: Path, tmp_path) -> None:
    # one row per row group: each batch reuses the worker's pixel buffer, whose slots held the last row's images
    out = tmp_path / "rg1"
    pack(sample_cfg(out, row_group_rows=1), workers=1)
    rows = read_all(out).to_pylist()
    assert [r["pixel_values"] for r in rows] == [r["pixel_values"] for r in read_all(packed).to_pylist()]
    counts = [r["image_count"] for r in rows]
    assert max(counts) > 1 and 1 in counts[counts.index(max(counts)):]  # a 1-image row after a fuller one
    for r in rows:
        px = np.frombuffer(r["pixel_values"], dtype=np.uint8).reshape(4, 3, 64, 64)
        assert not px[r["image_count"]:].any() and all(px[k].any() for k in range(r["image_count"]))


def test_a_pack_worker_imports_neither_pandas_nor_pillow_plugins_for_plain_files(tmp_path) -> None:
    """Start cost: pa.array imports pandas on first use (~0.2 CPU-s per worker) and Pillow's plugin registry costs
    ~0.1 s; a worker packing plain JPEG/PNG files through the fast path needs neither."""
    import subprocess
    import sys

    code = f"""
import sys
from mmprep.images.decode import ImageConfig
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack
from mmprep.text.config import TextConfig
cfg = PackConfig(manifest={str(tmp_path / "m.jsonl")!r}, out={str(tmp_path / "o")!r}, image_root={str(SAMPLE)!r},
                 image=ImageConfig(size=(32, 32)), tokenizer={CLIP!r}, text=TextConfig(max_length=16), vocab={VOCAB!r})
r = pack(cfg, workers=1)
assert r.written == 2, r
import PIL.Image
print(int("pandas" in sys.modules), int(PIL.Image._initialized >= 2))
"""
    (tmp_path / "m.jsonl").write_text('{"id": "a", "images": ["images/chelsea.jpg", "images/camera.png"], '
                                      '"text": "a cat", "tags": ["cat"]}\n'
                                      '{"id": "b", "images": ["images/rocket.jpg"], "text": "a rocket", "tags": []}\n')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path.cwd(), check=True)
    assert out.stdout.split() == ["0", "0"], out.stderr[-2000:]


def test_shuffle_is_deterministic_and_maps_back(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    pack(sample_cfg(a, shuffle=True, seed=7), workers=1)
    pack(sample_cfg(b, shuffle=True, seed=7), workers=1)
    assert digests(a) == digests(b)
    rows = read_all(a).to_pylist()
    assert [r["line"] for r in rows] != sorted(r["line"] for r in rows)
    manifest = (SAMPLE / "manifest.jsonl").read_text().splitlines()
    for r in rows:
        assert json.loads(manifest[r["line"] - 1])["id"] == r["id"]


def test_too_many_images_truncate_and_float_layout(tmp_path) -> None:
    out = tmp_path / "t"
    cfg = sample_cfg(out, limit_images=2, too_many_images="truncate", image=ImageConfig(size=(32, 48),
                     resize_mode="stretch"), norm=Normalization.from_spec("clip", None, None, None, "float16", "HWC"))
    report = pack(cfg, workers=1)
    assert report.images_dropped == 1 + 2  # s005 has 3 images, s013 has 4
    table = read_all(out)
    meta = json.loads(table.schema.metadata[b"mmprep"])
    assert meta["pixels"]["shape"] == [2, 32, 48, 3] and meta["pixels"]["dtype"] == "float16"
    row = table.to_pylist()[4]  # s005
    px = np.frombuffer(row["pixel_values"], dtype=np.float16).reshape(2, 32, 48, 3)
    assert row["image_count"] == 2 and np.isfinite(px).all() and px.min() < -1.0


def test_pad_none_is_hf_image_storage(tmp_path) -> None:
    import datasets

    out = tmp_path / "enc"
    report = pack(sample_cfg(out, pad="none", image=ImageConfig(size=None, resize_mode="none")), workers=1)
    assert report.written == 15
    files = [str(p) for p in shards(out)]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    first = ds[0]
    assert isinstance(first["images"], list) and len(first["images"]) == first["image_count"] == 1
    assert first["images"][0].size == (512, 512)  # decoded by datasets' Image feature
    raw = pq.read_table(files[0]).to_pylist()[0]["images"][0]
    assert raw["bytes"] == (SAMPLE / "images/astronaut.jpg").read_bytes() and raw["path"] == "images/astronaut.jpg"


def test_cli_json_report_and_exit_codes(tmp_path) -> None:
    out = tmp_path / "cli"
    args = ["pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out), "--tokenizer", CLIP, "--vocab", VOCAB,
            "--image-size", "32", "--max-length", "16", "--workers", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["read"] == 18 and report["written"] == 15 and report["rejected"] == 3
    # non-empty output dir: usage error, nothing on stdout
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 2 and again.stdout == "" and "already holds split 'train'" in again.stderr
    # too many rejects: the run completes but fails, and publishes no index (its presence means success) ...
    fail = runner.invoke(app, [*args, "--overwrite", "--max-reject-rate", "0.1"])
    assert fail.exit_code == 1 and "max-reject-rate" in fail.stderr and "--resume" in fail.stderr
    assert not (out / "index.json").exists() and len((out / "rejected-train.jsonl").read_text().splitlines()) == 3
    # ... until a rerun with a higher bound resumes every shard and indexes them
    again = runner.invoke(app, [*args, "--resume", "--max-reject-rate", "0.5", "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["resumed_shards"] >= 1 and (out / "index.json").exists()
    # a run that writes nothing at all failed, whatever the bound
    none_ok = tmp_path / "none.jsonl"
    none_ok.write_text('{"id": "x", "images": ["missing.jpg"]}\n')
    empty = runner.invoke(app, ["pack", str(none_ok), "--out", str(tmp_path / "none"), "--image-size", "32",
                                "--workers", "1"])
    assert empty.exit_code == 1 and "no row was written" in empty.stderr and "image_missing 1" in empty.stderr
    assert not (tmp_path / "none" / "index.json").exists()
    # --on-error fail stops at the first bad row
    stop = runner.invoke(app, [*args, "--overwrite", "--on-error", "fail"])
    assert stop.exit_code == 1 and "does_not_exist.jpg" in stop.stderr
    # bad flag value
    bad = runner.invoke(app, [*args, "--overwrite", "--pad", "sideways"])
    assert bad.exit_code == 2 and "--pad" in bad.stderr


def test_config_file_supplies_defaults(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[pack]\ntokenizer = "{CLIP}"\nvocab = "{VOCAB}"\nimage-size = "32"\nmax-length = 16\n'
                   'workers = 1\nlimit-images = 2\n')
    out = tmp_path / "o"
    result = runner.invoke(app, ["--config", str(cfg), "pack", str(SAMPLE / "manifest.jsonl"), "--out", str(out),
                                 "--limit-images", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    index = split_index(out)
    assert index["config"]["limit_images"] == 4  # the command line wins
    assert index["config"]["text"]["max_length"] == 16  # the file supplies the rest
    bad = tmp_path / "bad.toml"
    bad.write_text("[pack]\nimage-sise = 3\n")
    result = runner.invoke(app, ["--config", str(bad), "pack", "x.jsonl", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "unknown key 'image-sise'" in result.stderr


def test_second_run_on_locked_dir_is_refused(tmp_path) -> None:
    import fcntl
    import os

    from mmprep.errors import UsageError

    out = tmp_path / "locked"
    (out / ".mmprep").mkdir(parents=True)
    fd = os.open(out / ".mmprep" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        with pytest.raises(UsageError, match="another mmprep run"):
            pack(sample_cfg(out), workers=1)
    finally:
        os.close(fd)


def test_truncating_images_keeps_conversation_placeholders_paired(tmp_path) -> None:
    """A conversation with one <image> per image, more images than --limit-images: with truncate the row is
    kept, the surplus images are dropped with their placeholders (text and slots stay paired)."""
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 10), (len(name) * 40, 0, 0)).save(tmp_path / f"{name}.png")
    conv = [{"from": "human", "value": "<image>\n<image>\n<image>\nWhat changes between these?"},
            {"from": "gpt", "value": "The colour."}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "c1", "images": ["a.png", "b.png", "c.png"], "conversations": conv}) + "\n")
    base = dict(manifest=str(manifest), image=ImageConfig(size=(8, 8), resize_mode="stretch"), limit_images=2,
                tokenizer=CLIP, text=TextConfig(max_length=64))
    rejected = pack(PackConfig(out=str(tmp_path / "r"), **base), workers=1)
    assert rejected.rejected_by_reason == {"too_many_images": 1}
    report = pack(PackConfig(out=str(tmp_path / "t"), too_many_images="truncate", **base), workers=1)
    assert report.written == 1 and report.images_dropped == 1
    row = read_all(tmp_path / "t").to_pylist()[0]
    assert row["image_count"] == 2 and row["image_paths"] == ["a.png", "b.png"]  # the slots kept
    assert row["text"].count("<image>") == 2 and "What changes between these?" in row["text"]


def test_pad_none_resizing_needs_re_encoding(tmp_path) -> None:
    """--pad none keeps the original files by default; resizing them needs an encode format (a resize mode with
    --encode-format original would be silently ignored, so it is refused)."""
    args = ["pack", str(SAMPLE / "manifest.jsonl"), "--pad", "none", "--workers", "1", "--json"]
    kept = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert kept.exit_code == 0, kept.stderr
    row = pq.read_table(shards(tmp_path / "a")[0]).to_pylist()[0]
    assert row["images"][0]["bytes"] == (SAMPLE / "images/astronaut.jpg").read_bytes()
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--resize-mode", "max-pixels",
                                  "--max-pixels", "4096"])
    assert refused.exit_code == 2 and "--encode-format original" in refused.stderr
    assert "--encode-format png" in refused.stderr and not (tmp_path / "b").exists()
    small = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--resize-mode", "max-pixels",
                                "--max-pixels", "4096", "--encode-format", "png"])
    assert small.exit_code == 0, small.stderr
    for row in pq.read_table(shards(tmp_path / "c")[0]).to_pylist():
        for img in row["images"]:
            with Image.open(__import__("io").BytesIO(img["bytes"])) as im:
                assert im.format == "PNG" and im.width * im.height <= 4096


def test_small_inputs_are_cut_into_enough_shards_for_every_worker(tmp_path) -> None:
    """With the default --shard-size, an input smaller than 16 full shards is cut into 16 shards (of 16 rows at
    least): the plan depends on the input only, so 1 and 2 workers write the same bytes. An explicit
    --shard-size is honoured as given."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _reliab_helpers import digests, write_noise_corpus

    manifest = write_noise_corpus(tmp_path / "c", rows=400, side=16, every_missing=1000)
    base = dict(manifest=str(manifest), image=ImageConfig(size=(8, 8), resize_mode="stretch"), limit_images=1)
    one = pack(PackConfig(out=str(tmp_path / "w1"), **base), workers=1)
    two = pack(PackConfig(out=str(tmp_path / "w2"), **base), workers=2)
    assert one.rows_per_shard == 25 and len(one.shards) == 16
    assert digests(tmp_path / "w1") == digests(tmp_path / "w2")
    tiny = pack(PackConfig(out=str(tmp_path / "t"), **{**base, "manifest": str(SAMPLE / "manifest.jsonl")}), workers=1)
    assert tiny.rows_per_shard == 16 and len(tiny.shards) == 2  # 18 rows: 16 + 2
    explicit = pack(PackConfig(out=str(tmp_path / "e"), shard_size=512 << 20, **base), workers=1)
    assert len(explicit.shards) == 1 and explicit.rows_per_shard > 400
    assert two.written == one.written == 399  # row 0 points at a missing image


def test_pad_none_row_groups_are_sized_by_image_bytes(tmp_path) -> None:
    """Encoded rows vary in size: their row groups hold ~32 MB of image files (estimated from the first rows),
    not a fixed number of rows, so a worker never holds gigabytes of large originals at once."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _reliab_helpers import write_noise_corpus

    manifest = write_noise_corpus(tmp_path / "c", rows=120, side=512, every_missing=1000)  # ~770 KB noise PNGs
    out = tmp_path / "o"
    report = pack(PackConfig(manifest=str(manifest), out=str(out), pad="none", image=ImageConfig(size=None,
                             resize_mode="none"), limit_images=1, rows_per_shard=120), workers=1)
    assert report.written == 119
    meta = pq.read_metadata(out / "data" / "train-00000-of-00001.parquet")
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert meta.num_row_groups >= 2 and max(sizes) < 119
    assert split_index(out)["config"]["row_group_rows"] == max(sizes)


def test_verbose_lists_the_plan_and_every_shard(tmp_path) -> None:
    args = ["pack", str(SAMPLE / "manifest.jsonl"), "--image-size", "16", "--rows-per-shard", "8", "--workers", "1"]
    loud = runner.invoke(app, [*args, "--out", str(tmp_path / "v"), "-v"])
    assert loud.exit_code == 0, loud.stderr
    assert "engine local, 1 worker(s); 8 rows per shard, 3 shard(s), 0 resumed" in loud.stderr
    assert loud.stderr.count("sha256 ") == 3 and loud.stdout == ""
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert "rows per shard" not in plain.stderr and "sha256 " not in plain.stderr


def _reference_slot(path: Path, box: list[int]) -> np.ndarray:
    """An independent picture of one letterboxed slot: Pillow's full decode, EXIF transpose, alpha over white,
    one bicubic resize to the content box (no draft, no mmprep code)."""
    from PIL import ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = im.convert("RGB")
    x0, y0, x1, y1 = box
    return np.asarray(rgb.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)).astype(int)


@pytest.mark.parametrize(("fmt", "compression"), [("json", "lz4"), ("csv", "none"), ("parquet", "snappy")])
def test_every_manifest_format_and_codec_round_trips_through_other_readers(tmp_path, fmt, compression) -> None:
    """The sample rows written as a JSON list, a CSV (lists as a|b cells) or a Parquet manifest pack to the same
    rows as the JSONL; DuckDB and Polars read every codec; every image of every row matches an independent Pillow
    rendering (EXIF, CMYK, grayscale and RGBA files included)."""
    import duckdb
    import polars as pl
    import pyarrow as pa

    records = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines()]
    records = [r for r in records if isinstance(r["text"], str)]  # one text type per column for CSV/Parquet
    path = tmp_path / f"m.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    elif fmt == "csv":
        lines = ["id,images,text,tags"] + [
            ",".join([r["id"], "|".join(r["images"]), json.dumps(r["text"]), "|".join(r["tags"])]) for r in records]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    base = dict(image=ImageConfig(size=(48, 48), resize_mode="letterbox"), limit_images=4, tokenizer=CLIP,
                text=TextConfig(max_length=32), vocab=VOCAB, rows_per_shard=5, image_root=str(SAMPLE))
    ref = pack(PackConfig(manifest=str(path), out=str(tmp_path / "o"), compression=compression, **base), workers=1)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    same = pack(PackConfig(manifest=str(jsonl), out=str(tmp_path / "j"), **base), workers=1)
    assert ref.written == same.written == len(records) - 3 and ref.rejected == 3
    glob = str(tmp_path / "o" / "data" / "*.parquet")
    cols = ["id", "image_count", "image_paths", "content_boxes", "pixel_values", "tag_ids", "input_ids"]
    ours = read_all(tmp_path / "j").select(cols).to_pylist()
    via_duckdb = duckdb.sql(f"select {', '.join(cols)} from read_parquet('{glob}') order by line").fetchall()
    via_polars = pl.read_parquet(glob).sort("line").select(cols).to_dicts()
    assert [r["id"] for r in ours] == [r[0] for r in via_duckdb] == [r["id"] for r in via_polars]
    assert [r["pixel_values"] for r in ours] == [r[4] for r in via_duckdb] == [r["pixel_values"] for r in via_polars]
    assert [r["tag_ids"] for r in ours] == [list(r[5]) for r in via_duckdb]
    checked = 0
    for row in via_polars:
        px = np.frombuffer(row["pixel_values"], dtype=np.uint8).reshape(4, 3, 48, 48)
        for k in range(row["image_count"]):
            x0, y0, x1, y1 = row["content_boxes"][k]
            got = px[k][:, y0:y1, x0:x1].transpose(1, 2, 0).astype(int)
            want = _reference_slot(SAMPLE / row["image_paths"][k], row["content_boxes"][k])
            # 48 px from up to 600 px: the default fast resampler is within 5.0 here, Pillow's bilinear within 4.9
            assert np.abs(got - want).mean() < 5.5, (row["id"], row["image_paths"][k])
            checked += 1
        assert not px[row["image_count"]:].any()
    assert checked == sum(r["image_count"] for r in ours) >= 15

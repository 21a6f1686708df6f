"""Embedded images in: Hugging Face Image values ({bytes, path}), lists of them and binary cells, in Parquet files
(written by `datasets` itself), `save_to_disk` folders and mmprep's own `--pad none` output, go through the same image
path as files (EXIF, pixel limit, truncation; rejects with reasons that never print bytes)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _reliab_helpers import assert_nothing_lost, subprocess_env
from test_pack import CLIP, SAMPLE, VOCAB
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.images.decode import ImageConfig
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack
from mmprep.records import EmbeddedImage
from mmprep.text.config import TextConfig

runner = CliRunner()
IMAGES = SAMPLE / "images"
BROKEN = Path(__file__).parent / "data" / "images" / "broken"
#: (file, problem, answer): photographs in several encodings and modes (EXIF orientation, CMYK, RGBA, grayscale)
ROWS = [("astronaut.jpg", "<image>Who is this?", "an astronaut"),
        ("landscape_exif6.jpg", "<image>Which way is up?", "left"),
        ("sample_cmyk.jpg", "<image>What does it say?", "RED"),
        ("horse.png", "<image>What animal?", "a horse"),
        ("camera.png", "<image>What does he hold?", "a camera")]


def padded(manifest: Path, out: Path, **kw) -> PackConfig:
    base = dict(manifest=str(manifest), out=str(out), image=ImageConfig(size=(40, 56), resize_mode="letterbox"),
                limit_images=2, rows_per_shard=2)
    base.update(kw)
    return PackConfig(**base)


def pixels(out: Path) -> dict[str, bytes]:
    """id -> the padded pixel tensor of the row."""
    return {r["id"]: r["pixel_values"] for r in pq.read_table(out / "data", columns=["id", "pixel_values"])
            .to_pylist()}


@pytest.fixture(scope="module")
def hf_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same rows, written by `datasets` as a Parquet file (an `images` list of Images, an `image` Image, a
    binary column) and as a save_to_disk folder, and as a plain manifest naming the files (the reference)."""
    from datasets import Dataset, Image, Sequence, Value

    root = tmp_path_factory.mktemp("hf")
    data = {"id": [f"r{k}" for k in range(len(ROWS))],
            "images": [[{"bytes": (IMAGES / f).read_bytes(), "path": f}] for f, _, _ in ROWS],
            "problem": [p for _, p, _ in ROWS], "answer": [a for _, _, a in ROWS],
            "level": list(range(len(ROWS)))}
    ds = Dataset.from_dict(data).cast_column("images", Sequence(Image()))
    ds.to_parquet(str(root / "list.parquet"))
    ds.save_to_disk(str(root / "saved"))
    single = Dataset.from_dict({"id": data["id"], "image": [i[0] for i in data["images"]]}).cast_column(
        "image", Image())
    single.to_parquet(str(root / "single.parquet"))
    binary = Dataset.from_dict({"id": data["id"], "image": [i[0]["bytes"] for i in data["images"]]}).cast_column(
        "image", Value("binary"))
    binary.to_parquet(str(root / "binary.parquet"))
    (root / "files.jsonl").write_text("".join(
        json.dumps({"id": f"r{k}", "images": [f]}) + "\n" for k, (f, _, _) in enumerate(ROWS)))
    return {"list": root / "list.parquet", "saved": root / "saved", "single": root / "single.parquet",
            "binary": root / "binary.parquet", "files": root / "files.jsonl"}


def test_every_embedded_form_gives_the_pixels_of_the_files(hf_inputs: dict[str, Path], tmp_path: Path) -> None:
    ref = tmp_path / "files"
    pack(padded(hf_inputs["files"], ref, image_root=str(IMAGES)), workers=1)
    want = pixels(ref)
    assert len(want) == len(ROWS)
    for kind in ("list", "saved", "single", "binary"):
        out = tmp_path / kind
        report = pack(padded(hf_inputs[kind], out), workers=2)
        assert report.failed is None and report.written == len(ROWS), (kind, report.rejected_by_reason)
        assert pixels(out) == want, kind
    sizes = {r["id"]: r["image_sizes"][0] for r in pq.read_table(tmp_path / "list" / "data").to_pylist()}
    assert sizes["r1"] == [1800, 1200]  # EXIF orientation 6 applied to the embedded bytes too
    carried = pq.read_table(tmp_path / "saved" / "data", columns=["id", "problem", "answer", "level"]).to_pylist()
    assert [(r["problem"], r["answer"], r["level"]) for r in carried] == [(p, a, k) for k, (_, p, a) in
                                                                          enumerate(ROWS)]


def test_easyr1_from_a_datasets_parquet_keeps_the_original_bytes(hf_inputs: dict[str, Path], tmp_path: Path) -> None:
    """A geometry3k-style input (images, problem, answer) packed for EasyR1: the manifest's problem and answer are
    used, the image bytes are stored as they came."""
    out = tmp_path / "o"
    res = runner.invoke(app, ["pack", str(hf_inputs["list"]), "--out", str(out), "--target", "easyr1",
                              "--workers", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    rows = pq.read_table(out / "data").to_pylist()
    for row, (f, p, a) in zip(rows, ROWS, strict=True):
        assert row["problem"] == p and row["answer"] == a and row["level"] is not None
        assert row["images"] == [{"bytes": (IMAGES / f).read_bytes(), "path": f}]


def test_broken_embedded_images_are_rejected_with_reasons_and_no_bytes(tmp_path: Path) -> None:
    cases = {"truncated": (IMAGES / "coffee_truncated.jpg").read_bytes(),
             "bomb": (BROKEN / "pillow_decompression_bomb.gif").read_bytes(),
             "not_an_image": b"%PDF-1.4 this is no image" + bytes(range(256)) * 40,
             "good": (IMAGES / "coins.png").read_bytes()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"id": list(cases), "image": pa.array(
        [{"bytes": b, "path": f"{k}.bin"} for k, b in cases.items()], image_type)})
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "o"
    pack(padded(manifest, out), workers=1)
    rows, rej = assert_nothing_lost(out, read=4)
    assert [r["id"] for r in rows] == ["good"]
    by_id = {r["id"]: r for r in rej}
    assert by_id["truncated"]["reason"] == "image_truncated"
    assert by_id["bomb"]["reason"] == "image_too_large"
    assert by_id["not_an_image"]["reason"] in ("image_unidentified", "image_unsupported_format")
    for r in rej:
        detail = r["detail"]
        assert f"embedded image ({len(cases[r['id']]):,} bytes, path '{r['id']}.bin')" in detail
        assert len(detail) < 300 and "\\x" not in detail and "b'" not in detail  # sizes and paths, never bytes


def test_a_bad_image_value_never_prints_its_bytes(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b"], "image": pa.array(
        [{"bytes": None, "path": None}, {"bytes": b"\x89PNG" + b"\x00" * 5000, "path": None}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "o"
    report = pack(padded(manifest, out), workers=1)
    assert report.rejected == 2
    rej = [json.loads(line) for line in (out / "rejected-train.jsonl").read_text().splitlines()]
    assert rej[0]["reason"] == "bad_type" and "bytes: null, path: null" in rej[0]["detail"]
    assert "embedded image (5,004 bytes)" in rej[1]["detail"] and "\\x00" not in rej[1]["detail"]


def test_pad_none_output_packed_again_gives_the_same_pixels(tmp_path: Path) -> None:
    """sample_data packed with --pad none (the original file bytes), then that output's data/ packed with
    --pad max: the same pixels, tokens and tags as packing the files; mmprep's own columns are recomputed."""
    base = dict(image=ImageConfig(size=(48, 48), resize_mode="letterbox"), limit_images=4, tokenizer=CLIP,
                text=TextConfig(max_length=24), vocab=VOCAB, rows_per_shard=5)
    enc = tmp_path / "enc"
    pack(PackConfig(manifest=str(SAMPLE / "manifest.jsonl"), out=str(enc), pad="none", **{
        **base, "image": ImageConfig(size=None, resize_mode="none")}), workers=1)
    direct = tmp_path / "direct"
    pack(PackConfig(manifest=str(SAMPLE / "manifest.jsonl"), out=str(direct), **base), workers=1)
    again = tmp_path / "again"
    report = pack(PackConfig(manifest=str(enc / "data"), out=str(again), **base), workers=2)
    assert report.written == 15 and report.rejected == 0 and report.columns == []
    assert report.notes and "recomputed the mmprep columns" in report.notes[0]
    a, b = pq.read_table(direct / "data"), pq.read_table(again / "data")
    for col in ("id", "pixel_values", "image_sizes", "content_boxes", "image_count", "input_ids", "tag_ids", "text"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert b.column("image_paths").to_pylist() == a.column("image_paths").to_pylist()  # the stored paths


def test_a_piped_parquet_is_copied_first_and_packs_like_the_file(hf_inputs: dict[str, Path], tmp_path: Path) -> None:
    args = ["--image-size", "32", "--rows-per-shard", "2", "--workers", "1", "--json"]
    res = runner.invoke(app, ["pack", str(hf_inputs["list"]), "--out", str(tmp_path / "file"), *args])
    assert res.exit_code == 0, res.stderr
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open(hf_inputs["list"], "rb") as f:
        piped = subprocess.run([sys.executable, "-m", "mmprep", "pack", "-", "--out", str(tmp_path / "pipe"), *args],
                               stdin=f, capture_output=True, env={**subprocess_env(), "TMPDIR": str(tmp)},
                               timeout=120, check=False)
    assert piped.returncode == 0, piped.stderr.decode()
    assert json.loads(piped.stdout)["written"] == len(ROWS)
    assert pixels(tmp_path / "pipe") == pixels(tmp_path / "file")
    assert list(tmp.iterdir()) == []  # the copy of the input and the image spool are gone


def test_rows_travel_to_workers_without_their_image_bytes(hf_inputs: dict[str, Path], tmp_path: Path) -> None:
    """The reader spools embedded bytes as it reads: a chunk of rows pickles to a few hundred bytes per row, not the
    size of its images."""
    from mmprep.pack.plan import plan_pack

    cfg = padded(hf_inputs["list"], tmp_path / "o")
    cfg.validate()
    plan = plan_pack(cfg)
    try:
        items = list(plan.items())
        refs = [ref for s in items for ref in s.images]
        assert all(isinstance(r, EmbeddedImage) and r.data is None and r.offset >= 0 for r in refs)
        image_bytes = sum(r.size for r in refs)
        assert len(pickle.dumps(items)) < image_bytes / 50
        assert Path(plan.images.spool).stat().st_size == image_bytes  # type: ignore[attr-defined]
    finally:
        plan.close()
    assert not Path(plan.images.spool).exists()  # type: ignore[attr-defined]


def test_folder_manifests_name_their_problem(tmp_path: Path, hf_inputs: dict[str, Path]) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"id": ["a"]}), "test": Dataset.from_dict({"id": ["b"]})}).save_to_disk(
        str(tmp_path / "dd"))
    res = runner.invoke(app, ["pack", str(tmp_path / "dd"), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 2 and "DatasetDict" in res.stderr and "dd/test" in res.stderr
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["pack", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "without Parquet files" in res.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    out = tmp_path / "o3"  # a folder of Parquet files is read in name order, rows numbered across them
    (tmp_path / "parts").mkdir()
    for k in range(2):
        pq.write_table(pq.read_table(hf_inputs["list"]).slice(k * 3, 3), tmp_path / "parts" / f"p{k}.parquet")
    report = pack(padded(tmp_path / "parts", out), workers=1)
    assert report.written == len(ROWS)
    assert [r["line"] for r in pq.read_table(out / "data", columns=["line"]).to_pylist()] == [1, 2, 3, 4, 5]
    assert np.array_equal(np.sort(list(pixels(out))), np.sort([f"r{k}" for k in range(len(ROWS))]))

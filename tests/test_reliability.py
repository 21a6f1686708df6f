"""Reliability and security of ``mmprep pack``: bad images, bad manifests, hostile paths, full or read-only disks.

Every test runs the real pack over real files (generated here, or Pillow's own broken test files copied into
tests/data/images/broken) and checks the promise: each input row is written or rejected with a specific reason
(read == written + rejected, each rejected line once), and nothing is left half-written under a final name.
Kills, Ctrl-C, dying workers and concurrent runs are in test_kill_resume.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from _reliab_helpers import (
    BROKEN,
    REPO,
    assert_nothing_lost,
    digests,
    jpeg_bytes,
    mmprep_cmd,
    png_bytes,
    png_claiming,
    rejects,
    remount,
    shard_file,
    subprocess_env,
    temp_files,
    tmpfs,
    without_dac_override,
    write_noise_corpus,
    written_rows,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.images.decode import ImageConfig
from mmprep.pack.config import PackConfig
from mmprep.pack.job import pack
from mmprep.text.config import TextConfig

runner = CliRunner()
CLIP = str(REPO / "sample_data" / "tokenizers" / "clip")
SIZE = 16


def cfg_for(manifest: Path, out: Path, **kw: Any) -> PackConfig:
    base: dict[str, Any] = dict(manifest=str(manifest), out=str(out),
                                image=ImageConfig(size=(SIZE, SIZE), resize_mode="stretch"), limit_images=2,
                                rows_per_shard=4)
    base.update(kw)
    return PackConfig(**base)


def by_id(rej: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rej}


# -- bad images ---------------------------------------------------------------------------------------------------

# case id -> (image references, expected reason or None when the row must be written, a fragment of the detail)
IMAGE_CASES: dict[str, tuple[list[str], str | None, str]] = {
    "good": (["good.jpg"], None, ""),
    "zero_bytes": (["zero.jpg"], "image_unidentified", "empty file (0 bytes)"),
    "random_bytes": (["random.jpg"], "image_unidentified", "not a recognised image format"),
    "html_error_page": (["error_page.jpg"], "image_unidentified", "not a recognised image format"),
    "png_named_jpg": (["png_named.jpg"], None, ""),
    "truncated_jpeg": (["truncated.jpg"], "image_truncated", ""),
    "truncated_png": (["truncated.png"], "image_truncated", ""),
    "pillow_truncated_jpeg": (["pillow_truncated_jpeg.jpg"], "image_truncated", "truncated"),
    "pillow_truncated_png": (["pillow_truncated_image.png"], "image_truncated", "truncated"),
    "header_50000x50000": (["huge_header.png"], "image_too_large", "2500000000 pixels"),
    "header_over_pixel_limit": (["big_header.png"], "image_too_large", "pixel limit"),
    "pillow_decompression_bomb_gif": (["pillow_decompression_bomb.gif"], "image_too_large", "decompression bomb"),
    "pillow_png_text_chunk_bomb": (["pillow_png_decompression_dos.png"], "image_metadata_too_large", "MAX_TEXT_CHUNK"),
    "pillow_zero_width_gif": (["pillow_zero_width.gif"], "image_unidentified", ""),
    "one_by_one_png": (["one.png"], None, ""),
    "one_by_one_jpeg": (["one.jpg"], None, ""),
    "directory": (["a_directory.jpg"], "image_not_a_file", "directory"),
    "fifo": (["a_fifo.jpg"], "image_not_a_file", "not a regular file"),
    "missing": (["missing.jpg"], "image_missing", "missing.jpg"),
    "symlink_loop": (["loop.jpg"], "image_unreadable", "symbolic links"),
    "second_image_bad": (["good.jpg", "truncated.jpg"], "image_truncated", "image 2 'truncated.jpg'"),
}

RUNS = {  # name -> (pack overrides, workers)
    "padded-w1": ({}, 1),
    "padded-w2": ({}, 2),
    "encoded-w1": ({"pad": "none", "image": ImageConfig(size=None, resize_mode="none", pixel_limit=4_000_000)}, 1),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_images")
    good_jpeg = jpeg_bytes(48, 40)
    files = {
        "good.jpg": good_jpeg,
        "zero.jpg": b"",
        "random.jpg": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "error_page.jpg": b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                          b"<body><h1>Not Found</h1></body></html>\n",
        "png_named.jpg": png_bytes(20, 10, (10, 20, 30)),
        "truncated.jpg": jpeg_bytes(64, 64)[:400],
        "truncated.png": png_bytes(64, 64, (1, 2, 3))[:90],
        "huge_header.png": png_claiming(50_000, 50_000),
        "big_header.png": png_claiming(3000, 3000),  # 9 M pixels: over the 4 M pixel limit set below
        "one.png": png_bytes(1, 1, (200, 100, 50)),
        "one.jpg": jpeg_bytes(1, 1),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    for name in ("pillow_truncated_jpeg.jpg", "pillow_truncated_image.png", "pillow_decompression_bomb.gif",
                 "pillow_png_decompression_dos.png", "pillow_zero_width.gif"):
        shutil.copy(BROKEN / name, root / name)
    (root / "a_directory.jpg").mkdir()
    os.mkfifo(root / "a_fifo.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    with open(root / "m.jsonl", "w") as f:
        for case, (refs, _, _) in IMAGE_CASES.items():
            f.write(json.dumps({"id": case, "images": refs, "text": case}) + "\n")
    return root


@pytest.fixture(scope="module", params=list(RUNS))
def image_run(request: pytest.FixtureRequest, image_root: Path, tmp_path_factory: pytest.TempPathFactory):
    overrides, workers = RUNS[request.param]
    out = tmp_path_factory.mktemp("bad_images_out") / "out"
    kw = {"image": ImageConfig(size=(SIZE, SIZE), resize_mode="stretch", pixel_limit=4_000_000), **overrides}
    report = pack(cfg_for(image_root / "m.jsonl", out, **kw), workers=workers)
    return request.param, out, report


def test_bad_images_lose_no_row(image_run) -> None:
    _, out, report = image_run
    rows, _ = assert_nothing_lost(out, read=len(IMAGE_CASES))
    assert report.read == len(IMAGE_CASES) and report.failed is None
    assert {r["id"] for r in rows} == {c for c, (_, reason, _) in IMAGE_CASES.items() if reason is None}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_reason(image_run, case: str) -> None:
    _, out, _ = image_run
    _, reason, fragment = IMAGE_CASES[case]
    got = by_id(rejects(out)).get(case)
    if reason is None:
        assert got is None, got
        return
    assert got is not None, f"{case} was written"
    line = list(IMAGE_CASES).index(case) + 1
    assert (got["reason"], got["stage"], got["line"]) == (reason, "image", line)
    assert fragment in got["detail"] and f"m.jsonl:{line}:" in got["detail"]


def test_content_decides_not_the_extension_and_tiny_images_are_accepted(image_run) -> None:
    name, out, _ = image_run
    rows = {r["id"]: r for p in sorted(out.glob("data/train-*.parquet")) for r in pq.read_table(p).to_pylist()}
    if name.startswith("encoded"):
        stored = rows["png_named_jpg"]["images"][0]
        assert stored["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and stored["path"] == "png_named.jpg"
        assert rows["one_by_one_png"]["image_sizes"] == [[1, 1]]
        return
    # a PNG named .jpg decodes as PNG: its uniform colour comes through the resize
    px = np.frombuffer(rows["png_named_jpg"]["pixel_values"], dtype=np.uint8).reshape(2, 3, SIZE, SIZE)
    assert rows["png_named_jpg"]["image_sizes"][0] == [20, 10]
    assert [int(px[0, c].min()) for c in range(3)] == [10, 20, 30] == [int(px[0, c].max()) for c in range(3)]
    # 1x1 images are accepted (policy): upscaled to the slot, original size recorded
    one = np.frombuffer(rows["one_by_one_png"]["pixel_values"], dtype=np.uint8).reshape(2, 3, SIZE, SIZE)
    assert rows["one_by_one_png"]["image_sizes"][0] == [1, 1] and rows["one_by_one_png"]["image_mask"] == [True, False]
    assert (one[0, 0] == 200).all() and (one[0, 1] == 100).all() and (one[0, 2] == 50).all()


def _can_drop_dac() -> str | None:
    """None when a subprocess can be made to respect file modes as root, else why not."""
    probe = Path(tempfile.mkdtemp()) / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        res = subprocess.run(without_dac_override(["/bin/cat", str(probe)]), capture_output=True, check=False)
    finally:
        shutil.rmtree(probe.parent)
    if res.returncode == 97:
        return "cannot drop CAP_DAC_OVERRIDE (no CAP_SETPCAP)"
    if res.returncode == 0:
        return "file modes are not enforced even without CAP_DAC_OVERRIDE"
    return None


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image(tmp_path: Path, workers: int) -> None:
    """chmod 000: rejected ``image_unreadable``. Root reads any file, so as root the pack runs in a subprocess
    whose capability bounding set lacks CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root that respects modes)."""
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").chmod(0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "ok", "images": ["ok.png"]}\n{"id": "secret", "images": ["secret.png"]}\n')
    out = tmp_path / "out"
    args = ["pack", str(manifest), "--out", str(out), "--image-size", "8", "--workers", str(workers), "--json"]
    if os.geteuid() != 0:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
    else:
        why = _can_drop_dac()
        if why:
            pytest.skip(f"running as root and {why}: cannot make a file unreadable")
        res = subprocess.run(without_dac_override(mmprep_cmd(*args)), capture_output=True, text=True,
                             env=subprocess_env(), cwd=tmp_path, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
    _, rej = assert_nothing_lost(out, read=2)
    assert [(r["id"], r["reason"]) for r in rej] == [("secret", "image_unreadable")]
    assert "permission denied" in rej[0]["detail"]


# -- hostile paths ------------------------------------------------------------------------------------------------


@pytest.fixture()
def hostile(tmp_path: Path) -> tuple[Path, Path, dict[str, str | None]]:
    """An image root, a real image outside it, and manifest rows that try to reach it (id -> reason)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(4, 4, (255, 0, 0)))
    (root / "inside.png").write_bytes(png_bytes(4, 4))
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(outside, root / "dir_link")
    os.symlink("../inside.png", root / "sub" / "link_in.png")
    rows = {
        "inside": ("inside.png", None),
        "inside_absolute": (str(root / "inside.png"), None),
        "symlink_inside": ("sub/link_in.png", None),
        "dotdot_inside": ("sub/../inside.png", None),
        "dotdot_escape": ("../outside/secret.png", "path_outside_root"),
        "deep_dotdot_escape": ("sub/../../outside/secret.png", "path_outside_root"),
        "absolute_outside": (str(outside / "secret.png"), "path_outside_root"),
        "symlink_out": ("link_out.png", "path_outside_root"),
        "symlinked_dir_out": ("dir_link/secret.png", "path_outside_root"),
        "nul_byte": ("inside.png\u0000.jpg", "path_invalid"),
    }
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": k, "images": [ref]}) + "\n" for k, (ref, _) in rows.items()))
    return manifest, root, {k: reason for k, (_, reason) in rows.items()}


@pytest.mark.parametrize("workers", [1, 2])
def test_paths_outside_the_image_root_are_refused(hostile, tmp_path: Path, workers: int) -> None:
    manifest, root, expected = hostile
    out = tmp_path / "out"
    pack(cfg_for(manifest, out, image_root=str(root)), workers=workers)
    _, rej = assert_nothing_lost(out, read=len(expected))
    got = {r["id"]: r["reason"] for r in rej}
    assert got == {k: v for k, v in expected.items() if v}
    assert all("outside the image root" in r["detail"] for r in rej if r["reason"] == "path_outside_root")


def test_allow_outside_root_lets_them_through(hostile, tmp_path: Path) -> None:
    manifest, root, expected = hostile
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-root", str(root),
                                 "--allow-outside-root", "--image-size", "4", "--workers", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    rows, rej = assert_nothing_lost(out, read=len(expected))
    assert [r["reason"] for r in rej] == ["path_invalid"]  # a NUL byte is never a path
    assert len(rows) == len(expected) - 1


# -- bad manifests ------------------------------------------------------------------------------------------------

# (raw line, expected reason or None if written); the line number is the position in this list
MANIFEST_LINES: list[tuple[bytes, str | None]] = [
    (b'{"id": "a1", "images": ["a.png"], "text": "fine", "tags": ["x"]}', None),
    (b'{"id": "a2", "images": ["a.png"], "text": "no closing brace"', "invalid_json"),
    (b'{"id": "a3", "images": ["a.png"], "text": "caf\xe9 latin-1"}', "not_utf8"),
    (b'{"id": "a4", "text": "no image column at all"}', "no_images"),
    (b'{"id": "a5", "images": 5, "text": "images as a number"}', "bad_type"),
    (b'{"id": "a6", "images": ["a.png"], "text": "tags as a string", "tags": "x,y"}', "bad_type"),
    (b'{"id": "a7", "images": ["a.png"], "text": null}', "text_missing"),
    (b'{"id": "a8", "images": ["a.png"], "text": "   "}', "text_empty"),
    (b'{"id": "a1", "images": ["a.png"], "text": "a duplicate id: the first wins"}', "duplicate_id"),
    (b'[1, 2, 3]', "bad_record"),
    (b'{"id": {"nested": 1}, "images": ["a.png"], "text": "id of a wrong type"}', "bad_type"),
    (b'{"id": "a12", "images": [null], "text": "a null path"}', "bad_type"),
    (b'{"id": "a13", "images": ["a.png"], "text": "a float tag", "tags": [1.5]}', "bad_type"),
    (b'{"id": "a14", "images": ["a.png"], "text": 42}', "text_bad_type"),
    (b'{"id": "a15", "images": [], "text": "an empty image list"}', "no_images"),
    (b'{"id": "a16", "images": ["a.png"], "text": "fine\\u00e9 \xc3\xa9 too"}', None),
    (b'"just a string"', "bad_record"),
    (b'{"id": 17, "images": "a.png", "text": "an integer id and a single path"}', None),
    # valid JSON, but a lone UTF-16 surrogate is no text: Parquet, tokenizers and file systems cannot hold it
    (b'{"id": "a19", "images": ["a.png"], "text": "lone \\ud800 surrogate"}', "not_utf8"),
    (b'{"id": "a20\\udfff", "images": ["a.png"], "text": "in the id"}', "not_utf8"),
    (b'{"id": "a21", "images": ["a\\udc00.png"], "text": "in a path"}', "not_utf8"),
    (b'{"id": "a22", "images": ["a.png"], "text": "a pair is fine: \\ud83d\\ude00"}', None),
    (b'{"id": "a23", "images": ["a.png"], "text": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "invalid_json"),
]


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("manifests")
    (d / "a.png").write_bytes(png_bytes())
    # a blank line between rows is not a row: it is neither written nor rejected
    body = b"\n".join(raw for raw, _ in MANIFEST_LINES[:9]) + b"\n\n" + b"\n".join(raw for raw, _ in MANIFEST_LINES[9:])
    (d / "m.jsonl").write_bytes(body + b"\n")
    return d


def _line_of(i: int) -> int:
    return i + 1 + (1 if i >= 9 else 0)  # the blank line after the 9th row


@pytest.mark.parametrize("workers", [1, 2])
def test_row_level_manifest_problems_are_rejects_with_lines(manifest_dir: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "out"
    report = pack(cfg_for(manifest_dir / "m.jsonl", out, tokenizer=CLIP, text=TextConfig(max_length=8)),
                  workers=workers)
    rows, rej = assert_nothing_lost(out, read=len(MANIFEST_LINES))
    expected = {_line_of(i): reason for i, (_, reason) in enumerate(MANIFEST_LINES) if reason}
    assert {r["line"]: r["reason"] for r in rej} == expected
    assert [r["line"] for r in rows] == [_line_of(i) for i, (_, reason) in enumerate(MANIFEST_LINES) if not reason]
    assert [r["id"] for r in rows] == ["a1", "a16", "17", "a22"]
    assert "lone surrogate" in got_detail(rej, 20) and "nested too deeply" in got_detail(rej, 24)
    got = {r["line"]: r for r in rej}
    # the column is just past the end of the line (where '}' was expected), not "column 1" of the next line
    assert f"at column {len(MANIFEST_LINES[1][0]) + 1}" in got[2]["detail"]
    assert got[9]["id"] == "a1" and "already used on line 1" in got[9]["detail"]
    assert all(r["detail"].startswith(f"{manifest_dir / 'm.jsonl'}:{r['line']}:") for r in rej)
    assert report.rejected_by_reason["bad_type"] == 5


def got_detail(rej: list[dict[str, Any]], line: int) -> str:
    return next(r["detail"] for r in rej if r["line"] == line)


def test_lone_surrogates_and_deep_nesting_in_a_json_list(tmp_path: Path) -> None:
    """The JSON-list reader rejects a lone-surrogate element with its line; an element nested too deeply to
    parse is a file-level error naming the line (the end of that element cannot be found)."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "m.json").write_text('[\n{"id": "ok", "images": ["a.png"]},\n'
                                     '{"id": "bad", "images": ["a.png"], "text": "\\udbff"},\n'
                                     '{"id": "ok2", "images": ["a.png"]}\n]\n')
    out = tmp_path / "out"
    pack(cfg_for(tmp_path / "m.json", out), workers=1)
    rows, rej = assert_nothing_lost(out, read=3)
    assert [r["id"] for r in rows] == ["ok", "ok2"]
    assert [(r["line"], r["reason"]) for r in rej] == [(3, "not_utf8")]
    deep = tmp_path / "deep.json"
    deep.write_text('[\n{"id": "ok", "images": ["a.png"]},\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n]\n")
    result = runner.invoke(app, ["pack", str(deep), "--out", str(tmp_path / "o2"), "--image-size", "8"])
    assert result.exit_code == 2 and "deep.json:3: invalid JSON: an element nested too deeply" in result.stderr


def test_csv_cells_are_parsed_by_content_not_by_file_name(tmp_path: Path) -> None:
    """A CSV read from stdin or from a file without a .csv name still splits ``a|b`` list cells."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    body = b"id,images,tags\nc1,a.png|a.png,x|y\n"
    (tmp_path / "manifest").write_bytes(body)  # no extension: the content says CSV
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(tmp_path / "manifest"), "--out", str(out), "--image-size", "8",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    assert written_rows(out, ("id", "tags", "image_count")) == [{"id": "c1", "tags": ["x", "y"], "image_count": 2}]
    out2 = tmp_path / "out2"
    result = runner.invoke(app, ["pack", "-", "--out", str(out2), "--image-size", "8", "--workers", "1",
                                 "--image-root", str(tmp_path)], input=body)
    assert result.exit_code == 0, result.stderr
    assert written_rows(out2, ("id", "tags", "image_count")) == written_rows(out, ("id", "tags", "image_count"))


def test_a_table_without_an_image_column_is_a_file_level_error(tmp_path: Path) -> None:
    """Every row of a CSV (or Parquet) shares its header: no image column means every row would be rejected."""
    (tmp_path / "m.csv").write_text("id,caption\n1,hello\n2,world\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(tmp_path / "m.csv"), "--out", str(out), "--image-size", "8"])
    assert result.exit_code == 2, result.stderr
    assert "no image column" in result.stderr and "--image-column" in result.stderr and "caption" in result.stderr
    assert not out.exists()
    (tmp_path / "m.jsonl").write_text('{"id": 1, "tags": ["x"]}\n')
    result = runner.invoke(app, ["pack", str(tmp_path / "m.jsonl"), "--out", str(out), "--image-size", "8",
                                 "--tags-column", "labels"])
    assert result.exit_code == 2 and "(--tags-column) not found" in result.stderr, result.stderr


def test_without_a_tokenizer_text_is_optional(manifest_dir: Path, tmp_path: Path) -> None:
    """Policy: with no --tokenizer the text column is stored as is; null becomes "" (image-only datasets)."""
    out = tmp_path / "out"
    pack(cfg_for(manifest_dir / "m.jsonl", out), workers=1)
    rows, rej = assert_nothing_lost(out, read=len(MANIFEST_LINES))
    assert "a7" in {r["id"] for r in rows} and not {"text_missing", "text_empty"} & {r["reason"] for r in rej}


def test_csv_with_bom_crlf_and_a_bad_row(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "m.csv").write_bytes(
        b"\xef\xbb\xbfid,images,text,tags\r\n"
        b"c1,a.png,hello,x|y\r\n"
        b'c2,"[""a.png"",""a.png""]","two\r\nlines",\r\n'
        b"c3,missing.png,gone,\r\n"
        b"c4,a.png,caf\xe9,\r\n"  # Latin-1, not UTF-8: this row only is rejected
        b"c5,a.png,last,\r\n"
    )
    out = tmp_path / "out"
    pack(cfg_for(tmp_path / "m.csv", out), workers=1)
    _, rej = assert_nothing_lost(out, read=5)
    assert [(r["line"], r["reason"]) for r in rej] == [(5, "image_missing"), (6, "not_utf8")]
    assert written_rows(out, ("id", "line", "text", "tags", "image_count")) == [
        {"id": "c1", "line": 2, "text": "hello", "tags": ["x", "y"], "image_count": 1},  # BOM not in the "id" name
        {"id": "c2", "line": 3, "text": "two\r\nlines", "tags": [], "image_count": 2},
        {"id": "c5", "line": 7, "text": "last", "tags": [], "image_count": 1},
    ]


FILE_LEVEL = {  # name -> (file name, content or None for absent, extra args, message fragment)
    "missing_file": ("nope.jsonl", None, [], "no such file"),
    "json_object_not_list": ("coco.json", b'{\n  "images": [{"file_name": "a.png"}],\n  "annotations": []\n}\n', [],
                             "expected a list of records"),
    "format_json_not_list": ("m.json", b'{"id": 1, "images": ["a.png"]}\n', ["--format", "json"],
                             "expected a JSON list"),
    "unknown_format": ("m.jsonl", b'{"id": 1, "images": ["a.png"]}\n', ["--format", "xml"], "unknown format 'xml'"),
    "explicit_column_absent": ("m.jsonl", b'{"id": 1, "images": ["a.png"]}\n', ["--image-column", "pictures"],
                               "column 'pictures' (--image-column) not found"),
    "manifest_is_a_directory": ("adir", "dir", [], "is a directory"),
    "json_list_not_utf8": ("m.json", b'[{"id": 1, "images": ["caf\xe9.png"]}]', [], "not valid UTF-8"),
    "csv_header_not_utf8": ("m.csv", b"id,imag\xe9s\n1,a.png\n", [], "header row is not valid UTF-8"),
    "csv_duplicate_header": ("m.csv", b"id,images,id\n1,a.png,2\n", [], "header row must name every column once"),
    "unrecognisable_content": ("m.bin", b"\x00\x01", [], "cannot tell the manifest format"),
}


@pytest.mark.parametrize("case", list(FILE_LEVEL))
def test_file_level_manifest_problems_exit_2_without_traceback(tmp_path: Path, case: str) -> None:
    name, content, extra, fragment = FILE_LEVEL[case]
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(path), "--out", str(out), "--image-size", "8", "--workers", "1", "--json",
                                 *extra])
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == ""
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert not out.exists()  # found before the output directory is touched


def test_a_file_level_error_late_in_the_file_leaves_no_index(tmp_path: Path) -> None:
    """A JSON list broken after many good elements: shards already written stay, but there is no index (the
    dataset is incomplete), no temporary file, and exit 2 names the line."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    elements = [json.dumps({"id": i, "images": ["a.png"]}) for i in range(100)]
    elements.insert(70, '{"id": "broken", "images": ["a.png"] "text": "a missing comma"}')  # line 72
    (tmp_path / "m.json").write_text("[\n" + ",\n".join(elements) + "\n]\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["pack", str(tmp_path / "m.json"), "--out", str(out), "--image-size", "8",
                                 "--rows-per-shard", "10", "--workers", "1"])
    assert result.exit_code == 2 and "m.json:72: invalid JSON" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "index.json").exists() and not temp_files(out)


# -- disk full, read-only output ------------------------------------------------------------------------------------


def _cannot_mount(tmp_path: Path) -> str | None:
    try:
        with tmpfs(tmp_path / "probe", "64k"):
            return None
    except OSError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 120-row corpus of incompressible images and its uninterrupted packed output."""
    manifest = write_noise_corpus(tmp_path_factory.mktemp("noise"), rows=120, side=96)
    ref = tmp_path_factory.mktemp("noise_ref") / "out"
    pack(_noise_cfg(manifest, ref), workers=1)
    return manifest, ref


def _noise_cfg(manifest: Path, out: Path) -> PackConfig:
    return PackConfig(manifest=str(manifest), out=str(out), image=ImageConfig(size=(48, 48), resize_mode="stretch"),
                      limit_images=1, rows_per_shard=8)


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_on_a_real_tiny_filesystem_then_resume(noise, tmp_path: Path, workers: int) -> None:
    """A 200 KB tmpfs fills up after a few shards: exit 1 with a clear message, no partial shard or index under a
    final name; after the disk grows, --resume finishes byte-identical to an uninterrupted run."""
    why = _cannot_mount(tmp_path)
    if why:
        pytest.skip(f"no tmpfs ({why}); test_disk_full_while_writing_the_index covers ENOSPC by simulation")
    manifest, ref = noise
    with tmpfs(tmp_path / "small", "200k") as mnt:
        out = mnt / "out"
        with pytest.raises(RunFailed, match="No space left on device") as info:
            pack(_noise_cfg(manifest, out), workers=workers)
        assert "free disk space" in (info.value.hint or "")
        assert not (out / "index.json").exists() and not temp_files(out)
        finished = sorted(p.relative_to(out).as_posix() for p in out.glob("data/train-*"))
        assert finished, "the disk should hold a few shards"
        for name in finished:  # every file under a final name is a complete shard, the same as uninterrupted
            assert (out / name).read_bytes() == (ref / name).read_bytes()
        remount(mnt, "size=8m")
        report = pack(_noise_cfg(manifest, out), workers=workers, resume=True)
        assert report.resumed_shards >= 1
        assert digests(out) == digests(ref)


def test_a_disk_full_before_the_run_starts(noise, tmp_path: Path) -> None:
    """No room even for the lock and state files: one clear error (exit 1), not an internal error."""
    why = _cannot_mount(tmp_path)
    if why:
        pytest.skip(f"no tmpfs ({why})")
    manifest, _ = noise
    with tmpfs(tmp_path / "full", "64k") as mnt:
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        result = runner.invoke(app, ["pack", str(manifest), "--out", str(mnt / "out"), "--image-size", "8",
                                     "--workers", "1"])
        assert result.exit_code == 1, result.stderr
        assert "No space left on device" in result.stderr and "free disk space" in result.stderr
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_disk_full_while_writing_the_index(noise, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC at the very last write (index.json, simulated): exit 1, shards and rejects are there but no index,
    so the dataset is not taken for complete; --resume then only writes the index."""
    import mmprep.runtime.files as shards

    manifest, ref = noise
    out = tmp_path / "out"
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "index.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", replace)
    result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-size", "48", "--resize-mode",
                                 "stretch", "--limit-images", "1", "--rows-per-shard", "8", "--workers", "1"])
    assert result.exit_code == 1 and "cannot write" in result.stderr and "index.json" in result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "index.json").exists() and not temp_files(out)
    monkeypatch.setattr(shards.os, "replace", real_replace)
    report = pack(_noise_cfg(manifest, out), workers=1, resume=True)
    assert report.resumed_shards == len(report.shards)
    assert digests(out) == digests(ref)


@pytest.mark.parametrize("name", ["manifest.jsonl", "63"])  # a named pipe, and what <(zcat m.jsonl.gz) looks like
def test_manifest_from_a_pipe_is_read_once_and_whole(noise, tmp_path: Path, name: str) -> None:
    """A FIFO manifest must be read exactly once: counting rows for the progress bar or hashing the manifest for
    --resume used to consume it (a hang, or rows silently lost after the first 64)."""
    import threading

    manifest, ref = noise
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(manifest.read_bytes())

    out = tmp_path / "out"
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    res = subprocess.run(mmprep_cmd("pack", str(fifo), "--out", str(out), "--image-root", str(manifest.parent),
                                    "--image-size", "48", "--resize-mode", "stretch", "--limit-images", "1",
                                    "--rows-per-shard", "8", "--workers", "1", "--json"),
                         capture_output=True, text=True, env=subprocess_env(), timeout=60, check=False)
    writer.join(timeout=5)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["read"] == 120
    assert {k: v for k, v in digests(out).items() if k.startswith("data/")} == {
        k: v for k, v in digests(ref).items() if k.startswith("data/")}
    resume = runner.invoke(app, ["pack", str(fifo), "--out", str(out), "--resume"])
    assert resume.exit_code == 2 and "not stdin or a pipe" in resume.stderr


def test_resume_rewrites_a_damaged_shard(noise, tmp_path: Path) -> None:
    """A shard changed on disk after the run (one flipped byte, or cut short) fails its recorded sha256, so
    --resume writes it again instead of trusting it."""
    manifest, ref = noise
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    two, five = shard_file(out, 2), shard_file(out, 5)
    data = bytearray(two.read_bytes())
    data[len(data) // 2] ^= 0xFF
    two.write_bytes(bytes(data))
    five.write_bytes(five.read_bytes()[:100])
    report = pack(_noise_cfg(manifest, out), workers=1, resume=True)
    assert report.resumed_shards == len(report.shards) - 2
    assert digests(out) == digests(ref)


def test_read_only_output_directory(noise, tmp_path: Path) -> None:
    manifest, _ = noise
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        ctx: Any = None
    else:
        why = _cannot_mount(tmp_path)
        if why:
            pytest.skip(f"root ignores chmod and no read-only mount is possible ({why})")
        ctx = tmpfs(tmp_path / "ro", "64k", readonly=True)
        ro = ctx.__enter__()
    try:
        for out, fragment in ((ro, "not writable"), (ro / "sub", "cannot create output directory")):
            result = runner.invoke(app, ["pack", str(manifest), "--out", str(out), "--image-size", "8",
                                         "--workers", "1"])
            assert result.exit_code == 2 and fragment in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
        assert list(ro.iterdir()) == []
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


# -- property: nothing is lost, whatever the mix ------------------------------------------------------------------

ROW_KINDS = ("good", "good", "good", "good", "missing", "truncated", "empty_file", "html", "bad_json", "not_utf8",
             "images_number", "tags_string", "surrogate", "blank")
_IMAGE_OF = {"missing": "nope.png", "truncated": "truncated.png", "empty_file": "empty.jpg", "html": "page.jpg"}
_REASON_OF = {"missing": "image_missing", "truncated": "image_truncated", "empty_file": "image_unidentified",
              "html": "image_unidentified", "bad_json": "invalid_json", "not_utf8": "not_utf8",
              "images_number": "bad_type", "tags_string": "bad_type", "surrogate": "not_utf8"}


@pytest.fixture(scope="module")
def prop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prop")
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (root / f"good{k}.png").write_bytes(png_bytes(6, 5, color))
    (root / "truncated.png").write_bytes(png_bytes(40, 40, (9, 9, 9))[:70])
    (root / "empty.jpg").write_bytes(b"")
    (root / "page.jpg").write_bytes(b"<!doctype html><html><body>404 Not Found</body></html>\n")
    return root


@st.composite
def manifests(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Rows as (kind, id); ids come from a small pool so that duplicates happen."""
    n = draw(st.integers(min_value=0, max_value=24))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=n, max_size=n))
    ids = draw(st.lists(st.sampled_from([f"id{i}" for i in range(10)]), min_size=n, max_size=n))
    return list(zip(kinds, ids, strict=True))


def _render(rows: list[tuple[str, str]], fmt: str) -> tuple[bytes, list[tuple[int, str]], dict[int, str]]:
    """The manifest bytes (JSONL, or CSV with a header line), and the model: written (line, id) in order,
    rejected line -> reason."""
    lines: list[bytes] = [b"id,images,tags"] if fmt == "csv" else []
    written: list[tuple[int, str]] = []
    rejected: dict[int, str] = {}
    seen: set[str] = set()
    for kind, sid in rows:
        line = len(lines) + 1
        image = _IMAGE_OF.get(kind, f"good{line % 3}.png")
        if kind == "blank":
            lines.append(b"   " if fmt == "jsonl" else b"")
            continue
        if fmt == "csv":
            if kind in ("bad_json", "images_number", "tags_string", "surrogate"):
                kind = "good"  # not expressible in a CSV cell: a good row instead
            record = f"{sid},{image},x|y".encode()
            if kind == "not_utf8":
                record = record.replace(b"x|y", b"\xff")
        else:
            fields: dict[str, object] = {"id": sid, "images": [image], "tags": ["x", "y"]}
            if kind == "images_number":
                fields["images"] = 7
            if kind == "tags_string":
                fields["tags"] = "x,y"
            record = json.dumps(fields).encode()
            if kind == "bad_json":
                record = record[:-1]
            elif kind == "not_utf8":
                record = record.replace(b'"x"', b'"\xff"', 1)
            elif kind == "surrogate":
                record = record.replace(b'"x"', b'"\\ud834"', 1)
        lines.append(record)
        if kind in ("bad_json", "not_utf8", "surrogate", "images_number", "tags_string"):
            rejected[line] = _REASON_OF[kind]  # rows that do not map onto a sample claim no id
            continue
        if sid in seen:  # the first row that parses claims the id, even if it is rejected later
            rejected[line] = "duplicate_id"
            continue
        seen.add(sid)
        if kind in _REASON_OF:
            rejected[line] = _REASON_OF[kind]
        else:
            written.append((line, sid))
    return b"".join(x + b"\n" for x in lines), written, rejected


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=manifests(), rows_per_shard=st.integers(1, 6), shuffle=st.booleans(), fmt=st.sampled_from(["jsonl", "csv"]),
       workers=st.sampled_from([1, 1, 2]))
def test_property_nothing_lost(prop_root: Path, rows: list[tuple[str, str]], rows_per_shard: int,
                               shuffle: bool, fmt: str, workers: int) -> None:
    body, written, rejected = _render(rows, fmt)
    work = Path(tempfile.mkdtemp(dir=prop_root))
    try:
        manifest = work / f"m.{fmt}"
        manifest.write_bytes(body)
        out = work / "out"
        report = pack(PackConfig(manifest=str(manifest), out=str(out), image_root=str(prop_root),
                                 image=ImageConfig(size=(4, 4), resize_mode="stretch"), limit_images=1,
                                 rows_per_shard=rows_per_shard, shuffle=shuffle, seed=3), workers=workers)
        read = sum(1 for kind, _ in rows if kind != "blank")
        assert report.read == read and report.written == len(written) and report.rejected == len(rejected)
        rej = rejects(out)
        assert {r["line"]: r["reason"] for r in rej} == rejected
        assert [r["line"] for r in rej] == sorted(rejected)  # rejected.jsonl is in input order, each line once
        if not written:  # nothing written (an empty input too): a failed run, which publishes no index
            assert report.failed and not (out / "index.json").exists() and not temp_files(out)
            return
        assert report.failed is None
        got_rows, _ = assert_nothing_lost(out, read=read)
        got = [(r["line"], r["id"]) for r in got_rows]
        assert (sorted(got) if shuffle else got) == written
    finally:
        shutil.rmtree(work)


def test_usage_errors_name_the_problem(tmp_path: Path) -> None:
    """Output-directory misuse is one clear line, exit 2: a file where the directory should be; a dir that is
    not empty (it holds the split already); --resume of a run with other flags."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": 1, "images": ["a.png"]}\n')
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        pack(cfg_for(manifest, afile), workers=1)
    out = tmp_path / "out"
    pack(cfg_for(manifest, out), workers=1)
    with pytest.raises(UsageError, match="already holds split 'train'"):
        pack(cfg_for(manifest, out), workers=1)
    with pytest.raises(UsageError, match="rows_per_shard"):
        pack(cfg_for(manifest, out, rows_per_shard=9), workers=1, resume=True)
    with pytest.raises(InputError):
        pack(cfg_for(tmp_path / "absent.jsonl", tmp_path / "o2"), workers=1)
    with pytest.raises(UsageError, match=r"--image-root .*: no such directory"):
        pack(cfg_for(manifest, tmp_path / "o3", image_root=str(tmp_path / "nowhere")), workers=1)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_an_unexpected_error_in_one_row_is_a_reject_not_a_crash(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that raises for one row (injected here into the image stage) costs that row, with the exception
    named in its reject, and not the run; with MMPREP_DEBUG=1 it propagates so it can be debugged."""
    import mmprep.images.sources as sources

    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "1", "images": ["a.png"]}\n{"id": "2", "images": ["b.png"]}\n'
                        '{"id": "3", "images": ["a.png"]}\n')
    real = sources.load_image

    def flaky(path: Any, cfg: Any) -> Any:
        if str(path).endswith("b.png"):
            raise ZeroDivisionError("injected")
        return real(path, cfg)

    monkeypatch.setattr(sources, "load_image", flaky)
    out = tmp_path / "out"
    pack(cfg_for(manifest, out), workers=1)
    rows, rej = assert_nothing_lost(out, read=3)
    assert [r["id"] for r in rows] == ["1", "3"]
    assert [(r["line"], r["stage"], r["reason"]) for r in rej] == [(2, "internal", "unexpected_error")]
    assert "ZeroDivisionError: injected" in rej[0]["detail"]
    monkeypatch.setenv("MMPREP_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        pack(cfg_for(manifest, tmp_path / "out2"), workers=1)

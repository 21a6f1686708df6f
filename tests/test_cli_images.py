"""`mmprep image-stats` and `mmprep normalize-images` through the CLI, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_FAILED, EXIT_USAGE
from mmprep.images.collect import collect_images
from mmprep.images.decode import NORM_PRESETS, ImageConfig, Normalization, load_image
from mmprep.images.stats import compute_image_stats

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "images"
SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.jsonl"

runner = CliRunner()

N_GOOD = 21 + 3  # tests/data/images: 21 good files + 3 broken/ files that still decode
N_BAD = 9
BAD_REASONS = {"image_unidentified": 3, "image_truncated": 3, "image_too_large": 1, "image_metadata_too_large": 1,
               "image_invalid": 1}


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- image-stats --------------------------------------------------------------------------------------------------


def test_image_stats_folder_json() -> None:
    r = _json(runner.invoke(app, ["image-stats", str(DATA), "--json", "--workers", "1"]))
    assert r["images"] == N_GOOD + N_BAD
    assert r["decoded"] == N_GOOD
    assert r["reasons"] == BAD_REASONS
    assert {u["path"] for u in r["unreadable"]} >= {"broken/pillow_decompression_bomb.gif",
                                                    "broken/pillow_truncated_jpeg.jpg"}
    assert r["modes"] == {"RGB": 12, "RGBA": 5, "P": 3, "1": 1, "L": 1, "I;16": 1, "LA": 1}
    assert r["formats"] == {"JPEG": 10, "PNG": 7, "GIF": 2, "WEBP": 3, "MPO": 1, "TIFF": 1}
    assert r["sizes"]["128x128"] == 7 and r["sizes"]["1x2"] == 1  # upright sizes
    assert r["multi_frame"] == 4  # GIF (5), APNG (3), MPO (2), WebP (42)
    assert r["pixels"] == N_GOOD * 224 * 224
    # the aggregate equals an independent per-image computation
    arrays = []
    for p in sorted(DATA.rglob("*")):
        if p.suffix in (".md",) or p.is_dir():
            continue
        try:
            arrays.append(load_image(p, ImageConfig()).array.reshape(-1, 3).astype(np.float64) / 255)
        except Exception:
            continue
    px = np.concatenate(arrays)
    assert np.allclose(r["mean"], px.mean(axis=0), atol=1e-9)
    assert np.allclose(r["std"], px.std(axis=0), atol=1e-9)
    assert set(r["distance"]) == {"imagenet", "clip"}
    d = r["distance"]["imagenet"]["mean_max_abs"]
    assert d == pytest.approx(max(abs(a - b) for a, b in zip(r["mean"], NORM_PRESETS["imagenet"][0], strict=True)))


def test_image_stats_manifest_and_stats_file_roundtrip(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    result = runner.invoke(app, ["image-stats", str(SAMPLE_MANIFEST), "--out", str(stats_file), "-j", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # human output goes to stderr
    assert "12 of 14 images decoded" in result.stderr
    assert "image_truncated" in result.stderr and "image_missing" in result.stderr
    report = json.loads(stats_file.read_text())
    assert report["decoded"] == 12 and report["images"] == 14
    assert {u["path"]: u["reason"] for u in report["unreadable"]} == {
        "images/coffee_truncated.jpg": "image_truncated", "images/does_not_exist.jpg": "image_missing"}
    assert report["modes"] == {"RGB": 7, "L": 3, "RGBA": 1, "CMYK": 1}
    norm = Normalization.from_spec(stats_file=stats_file, dtype="float32")
    assert list(norm.mean) == report["mean"] and list(norm.std) == report["std"]
    # known values of the sample images (center-crop 224), to a tolerance
    assert np.allclose(report["mean"], [0.4302, 0.3516, 0.3381], atol=2e-3)
    assert np.allclose(report["std"], [0.3235, 0.2864, 0.2947], atol=2e-3)


def test_image_stats_is_the_same_with_a_process_pool() -> None:
    images = collect_images(DATA)
    one = compute_image_stats(images, ImageConfig(size=(64, 64)), workers=1)
    two = compute_image_stats(images, ImageConfig(size=(64, 64)), workers=2)
    assert one.mean == two.mean and one.std == two.std  # exact integer sums
    assert one.unreadable == two.unreadable and one.sizes == two.sizes


def test_image_stats_other_resize_modes() -> None:
    r = _json(runner.invoke(app, ["image-stats", str(DATA), "--json", "-j", "1", "--resize-mode", "none"]))
    assert r["pixels"] > N_GOOD * 64 * 64 and r["config"]["resize_mode"] == "none"
    boxed = []
    for fill in ("black", "white"):
        boxed.append(_json(runner.invoke(app, [
            "image-stats", str(DATA), "--json", "-j", "1", "--resize-mode", "letterbox", "--image-size", "32x48",
            "--fill", fill])))
    black, white = boxed
    assert black["config"]["size"] == [32, 48]
    # only the content boxes count: the padding colour changes nothing
    cfg = ImageConfig(size=(32, 48), resize_mode="letterbox")
    arrays = []
    for p in sorted(DATA.rglob("*")):
        if p.suffix == ".md" or p.is_dir():
            continue
        try:
            d = load_image(p, cfg)
        except Exception:
            continue
        x0, y0, x1, y1 = d.content_box
        arrays.append(d.array[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64) / 255)
    px = np.concatenate(arrays)
    assert len(arrays) == N_GOOD and black["pixels"] == white["pixels"] == px.shape[0] < N_GOOD * 32 * 48
    assert black["mean"] == white["mean"] and black["std"] == white["std"]
    assert np.allclose(black["mean"], px.mean(axis=0), atol=1e-9)
    assert np.allclose(black["std"], px.std(axis=0), atol=1e-9)


def test_manifest_paths_may_not_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    shutil.copy(DATA / "pillow_hopper.jpg", root / "img" / "a.jpg")
    shutil.copy(DATA / "pillow_flower.jpg", tmp_path / "outside.jpg")
    (root / "img" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "images": ["img/a.jpg", "../outside.jpg"]},
        {"id": 2, "images": [str(tmp_path / "outside.jpg"), "img/link.jpg", "./img/a.jpg"]},
        "not an object",
    ]) + "\n")
    r = _json(runner.invoke(app, ["image-stats", str(manifest), "--json", "-j", "1"]))
    assert r["decoded"] == 1 and r["images"] == 4  # ./img/a.jpg is the same file as img/a.jpg
    assert r["reasons"] == {"path_outside_root": 3}
    assert r["manifest_rejects"] == 1
    r = _json(runner.invoke(app, ["image-stats", str(manifest), "--json", "-j", "1", "--allow-outside-root"]))
    # ../outside.jpg, its absolute path and the link to it are one file, decoded once
    assert r["decoded"] == 2 and r["images"] == 2 and r["reasons"] == {}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--resize-mode", "zoom"], "unknown resize mode"),
        (["--image-size", "0"], "--image-size: invalid size"),
        (["--resize-mode", "shortest-edge"], "--shortest-edge"),
        (["--resize-mode", "max-pixels", "--max-pixels", "10", "--min-pixels", "100"], "larger than max-pixels"),
        (["--background", "300,0,0"], "invalid colour"),
        (["--workers", "-1"], "--workers"),
        (["--image-root", "."], "--image-root only applies to a manifest"),
    ],
)
def test_image_stats_usage_errors(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["image-stats", str(DATA), *args])
    assert result.exit_code == EXIT_USAGE
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_image_stats_input_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["image-stats", str(tmp_path / "nope")])
    assert result.exit_code == EXIT_USAGE and "no such file or folder" in result.stderr
    (tmp_path / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["image-stats", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE and "no image files found" in result.stderr
    result = runner.invoke(app, ["image-stats", str(DATA / "pillow_flower.jpg")])
    assert result.exit_code == EXIT_USAGE and "is an image, expected a folder" in result.stderr
    (tmp_path / "empty").write_text("")
    result = runner.invoke(app, ["image-stats", str(tmp_path / "empty")])
    assert result.exit_code == EXIT_USAGE and "--input-format" in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(DATA / "broken" / "pillow_truncated_jpeg.jpg", bad / "x.jpg")
    result = runner.invoke(app, ["image-stats", str(bad), "--json", "--out", str(tmp_path / "st.json")])
    assert result.exit_code == EXIT_FAILED and "none of the 1 images could be decoded" in result.stderr
    assert "st.json was not written" in result.stderr and "the 'unreadable' list of the JSON output" in result.stderr
    assert json.loads(result.stdout)["reasons"] == {"image_truncated": 1}
    assert not (tmp_path / "st.json").exists()  # no statistics file with null mean/std to feed --stats-file


# -- normalize-images -------------------------------------------------------------------------------------------


def _outputs(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_normalize_images_folder_resume_and_rejects(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["normalize-images", str(DATA), "--out", str(out), "--json", "-j", "1"]
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"], r["rejected"]) == (N_GOOD, 0, N_BAD)
    assert r["reasons"] == BAD_REASONS
    files = _outputs(out)
    assert "pillow_flower.png" in files and "broken/pillow_invalid-exif.png" in files
    assert "pillow_hopper_orientation_6.webp.png" in files  # the .jpg of the same name came first
    assert "pillow_iss634.png" in files
    assert r["renamed"] == {  # pillow_transparent.png keeps its name even though .gif sorts first
        "pillow_hopper_orientation_6.webp": "pillow_hopper_orientation_6.webp.png",
        "pillow_transparent.gif": "pillow_transparent.gif.png",
        "pillow_transparent.webp": "pillow_transparent.webp.png",
    }
    assert not [f for f in files if Path(f).name.startswith(".")]  # no temporary files left behind
    with Image.open(out / "pillow_flower.png") as im:
        assert im.size == (224, 224) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), load_image(DATA / "pillow_flower.jpg", ImageConfig()).array)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == N_BAD
    assert [x["path"] for x in rejects] == sorted(x["path"] for x in rejects)
    by_path = {x["path"]: x for x in rejects}
    assert by_path["broken/pillow_decompression_bomb.gif"]["reason"] == "image_too_large"
    assert "pillow_decompression_bomb.gif" in by_path["broken/pillow_decompression_bomb.gif"]["detail"]
    assert all(set(x) == {"path", "reason", "detail"} for x in rejects)
    assert json.loads((out / "normalize-images.json").read_text())["written"] == N_GOOD
    record = [json.loads(line) for line in (out / "normalize-images.outputs.jsonl").read_text().splitlines()]
    outputs = {e["output"]: e for e in record if "output" in e}
    assert set(outputs) == {f for f in files if f.endswith(".png")}
    assert outputs["pillow_flower.png"]["path"] == "pillow_flower.jpg"
    assert outputs["pillow_flower.png"]["original_size"] == [480, 360]
    assert outputs["pillow_flower.png"]["content_box"] == [0, 0, 224, 224]
    assert outputs["pillow_flower.png"]["source_bytes"] == (DATA / "pillow_flower.jpg").stat().st_size

    # a rerun resumes: everything already written is skipped; a deleted output is redone
    (out / "pillow_flower.png").unlink()
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"], r["rejected"]) == (1, N_GOOD - 1, N_BAD)
    r = _json(runner.invoke(app, [*args, "--overwrite"]))
    assert (r["written"], r["skipped"]) == (N_GOOD, 0)


def test_normalize_images_manifest_npy_float16_with_a_pool(tmp_path: Path) -> None:
    out = tmp_path / "arrays"
    r = _json(runner.invoke(app, [
        "normalize-images", str(SAMPLE_MANIFEST), "--out", str(out), "--format", "npy", "--norm", "clip",
        "--dtype", "float16", "--resize-mode", "letterbox", "--image-size", "64x96", "--workers", "2", "--json",
        "--rejects", str(tmp_path / "rej.jsonl"),
    ]))
    assert (r["written"], r["rejected"]) == (12, 2)
    assert r["normalization"]["preset"] == "clip" and r["normalization"]["dtype"] == "float16"
    arr = np.load(out / "images" / "landscape_exif6.npy")
    assert arr.shape == (3, 64, 96) and arr.dtype == np.float16
    dec = load_image(REPO / "sample_data" / "images" / "landscape_exif6.jpg",
                     ImageConfig(size=(64, 96), resize_mode="letterbox"))
    mean, std = NORM_PRESETS["clip"]
    expected = (dec.array.transpose(2, 0, 1) / 255 - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    assert np.allclose(arr.astype(np.float64), expected, atol=5e-3)
    assert dec.content_box == (0, 0, 96, 64)
    reasons = {json.loads(x)["reason"] for x in (tmp_path / "rej.jsonl").read_text().splitlines()}
    assert reasons == {"image_truncated", "image_missing"}


@pytest.mark.parametrize("fmt,ext", [("jpeg", ".jpg"), ("webp", ".webp")])
def test_normalize_images_lossy_formats(tmp_path: Path, fmt: str, ext: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "pillow_flower.jpg", src / "flower.jpg")
    shutil.copy(REPO / "sample_data" / "images" / "sample_cmyk.jpg", src / "cmyk.jpg")
    r = _json(runner.invoke(app, ["normalize-images", str(src), "-o", str(tmp_path / "o"), "-f", fmt,
                                  "--quality", "80", "--resize-mode", "shortest-edge", "--shortest-edge", "50",
                                  "--json"]))
    assert r["written"] == 2
    with Image.open(tmp_path / "o" / f"flower{ext}") as im:
        assert im.size == (67, 50) and im.format == fmt.upper()
    with Image.open(tmp_path / "o" / f"cmyk{ext}") as im:
        assert im.mode == "RGB" and im.size == (50, 50)


def test_normalize_images_output_inside_source_is_not_rescanned(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "pillow_hopper.jpg", src / "h.jpg")
    args = ["normalize-images", str(src), "--out", str(src / "normalized"), "--json", "-j", "1"]
    assert _json(runner.invoke(app, args))["images"] == 1
    assert _json(runner.invoke(app, args))["images"] == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--format", "gif"], "unknown --format"),
        (["--norm", "clip"], "only apply to --format npy"),
        (["--dtype", "float16"], "only apply to --format npy"),
        (["--format", "npy", "--norm", "clip", "--mean", "0.5", "--std", "0.5"], "give only one"),
        (["--format", "npy", "--dtype", "int8"], "unknown dtype"),
        (["--quality", "0"], "--quality"),
    ],
)
def test_normalize_images_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["normalize-images", str(DATA), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == EXIT_USAGE, result.stderr
    assert needle in result.stderr and result.stdout == ""
    assert not (tmp_path / "o").exists()


def test_normalize_images_refuses_to_write_into_the_source(tmp_path: Path) -> None:
    shutil.copy(DATA / "pillow_hopper.jpg", tmp_path / "h.jpg")
    result = runner.invoke(app, ["normalize-images", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE and "--out is the source folder" in result.stderr


def test_normalize_images_rejects_file_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # --rejects NAME without a folder part: written where the command runs
    result = runner.invoke(app, ["normalize-images", str(SAMPLE_MANIFEST), "--out", "o", "--rejects", "rej.jsonl",
                                 "-q", "-j", "1"])
    assert result.exit_code == 0, result.stderr
    assert len((tmp_path / "rej.jsonl").read_text().splitlines()) == 2


def test_normalize_images_fail_on_reject(tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize-images", str(SAMPLE_MANIFEST), "--out", str(tmp_path / "o"),
                                 "--fail-on-reject", "-q", "-j", "1"])
    assert result.exit_code == EXIT_FAILED
    assert len((tmp_path / "o" / "rejects.jsonl").read_text().splitlines()) == 2


def test_config_file_supplies_defaults(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "pillow_flower.jpg", src / "flower.jpg")
    cfg = tmp_path / "mmprep.toml"
    cfg.write_text('[normalize-images]\nformat = "jpeg"\nimage-size = "32x48"\nresize-mode = "stretch"\n'
                   f'out = "{(tmp_path / "o").as_posix()}"\n\n[image-stats]\nresize-mode = "none"\n')
    r = _json(runner.invoke(app, ["--config", str(cfg), "normalize-images", str(src), "--json"]))
    assert r["format"] == "jpeg" and r["written"] == 1
    with Image.open(tmp_path / "o" / "flower.jpg") as im:
        assert im.size == (48, 32)
    r = _json(runner.invoke(app, ["--config", str(cfg), "image-stats", str(src), "--json"]))
    assert r["pixels"] == 480 * 360


# -- normalize-images: resuming never keeps an output that disagrees with the settings or the source ------------------


def _record(out: Path) -> dict[str, dict]:
    lines = (out / "normalize-images.outputs.jsonl").read_text().splitlines()
    return {e["output"]: e for e in map(json.loads, lines) if "output" in e}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _two_images(tmp_path: Path) -> tuple[Path, list[str]]:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "pillow_flower.jpg", src / "a.jpg")
    shutil.copy(DATA / "pillow_hopper.jpg", src / "b.jpg")
    return src, ["normalize-images", str(src), "--out", str(tmp_path / "o"), "--json", "-j", "1"]


def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    out = tmp_path / "o"
    assert _json(runner.invoke(app, args))["written"] == 2
    result = runner.invoke(app, [*args, "--image-size", "64"])
    assert result.exit_code == EXIT_USAGE and result.stdout == ""
    assert "2 existing output(s) were made with other settings" in result.stderr
    assert "config.size [224, 224] -> [64, 64]" in result.stderr and "--overwrite" in result.stderr
    assert _pixels(out / "a.png").shape == (224, 224, 3)  # nothing touched
    assert json.loads((out / "normalize-images.json").read_text())["config"]["size"] == [224, 224]
    r = _json(runner.invoke(app, [*args, "--image-size", "64", "--overwrite"]))
    assert (r["written"], r["skipped"]) == (2, 0) and r["config"]["size"] == [64, 64]
    assert np.array_equal(_pixels(out / "a.png"), load_image(src / "a.jpg", ImageConfig(size=(64, 64))).array)
    # same settings again: everything is skipped, and the record holds one settings line for both outputs
    r = _json(runner.invoke(app, [*args, "--image-size", "64"]))
    assert (r["written"], r["skipped"]) == (0, 2)
    assert {e["settings"] for e in _record(out).values()} == {r["settings_id"]}
    # the pixel limit only decides what is refused: changing it is not a change of settings
    assert _json(runner.invoke(app, [*args, "--image-size", "64", "--pixel-limit", "10000000"]))["skipped"] == 2
    # PNG output does not depend on --quality, so changing it is no change either
    assert _json(runner.invoke(app, [*args, "--image-size", "64", "--quality", "50"]))["skipped"] == 2


def test_a_new_colliding_source_gets_its_own_pixels(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    out = tmp_path / "o"
    assert _json(runner.invoke(app, args))["written"] == 2  # a.jpg -> a.png
    with Image.open(DATA / "pillow_hopper_gray.jpg") as im:
        im.convert("RGB").save(src / "a.png")  # another picture, whose name now claims a.png
    r = _json(runner.invoke(app, args))
    assert r["renamed"] == {"a.jpg": "a.jpg.png"}
    assert (r["written"], r["skipped"]) == (2, 1)  # a.png redone from its own source, a.jpg.png new, b skipped
    assert np.array_equal(_pixels(out / "a.png"), load_image(src / "a.png", ImageConfig()).array)
    assert np.array_equal(_pixels(out / "a.jpg.png"), load_image(src / "a.jpg", ImageConfig()).array)
    rec = _record(out)
    assert rec["a.png"]["path"] == "a.png" and rec["a.jpg.png"]["path"] == "a.jpg"


def test_a_changed_source_is_redone_and_a_broken_one_loses_its_output(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    out = tmp_path / "o"
    assert _json(runner.invoke(app, args))["written"] == 2
    shutil.copy(DATA / "pillow_flower.jpg", src / "b.jpg")  # b.jpg now holds another picture
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"]) == (1, 1)
    assert np.array_equal(_pixels(out / "b.png"), load_image(DATA / "pillow_flower.jpg", ImageConfig()).array)
    shutil.copy(DATA / "broken" / "pillow_truncated_jpeg.jpg", src / "b.jpg")
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"], r["rejected"], r["removed"]) == (0, 1, 1, 1)
    assert not (out / "b.png").exists() and set(_record(out)) == {"a.png"}
    assert json.loads((out / "rejects.jsonl").read_text())["reason"] == "image_truncated"


def test_outputs_the_record_does_not_know_are_redone(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(out / "a.png")  # e.g. left by an older version, or a killed run
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"]) == (2, 0)
    assert np.array_equal(_pixels(out / "a.png"), load_image(src / "a.jpg", ImageConfig()).array)
    # a killed run can leave a torn last line: it is ignored and that output is redone
    record = out / "normalize-images.outputs.jsonl"
    lines = record.read_text().splitlines()
    b_line = next(line for line in lines if '"b.png"' in line)
    record.write_text("\n".join(x for x in lines if x != b_line) + "\n" + b_line[: len(b_line) // 2])
    r = _json(runner.invoke(app, args))
    assert (r["written"], r["skipped"]) == (1, 1)
    assert set(_record(out)) == {"a.png", "b.png"}
    assert all(json.loads(line) for line in record.read_text().splitlines())  # rewritten whole at the end


def test_sources_gone_leave_stale_outputs_counted(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    assert _json(runner.invoke(app, args))["written"] == 2
    (src / "b.jpg").unlink()
    result = runner.invoke(app, args)
    r = _json(result)
    assert (r["images"], r["skipped"], r["stale"]) == (1, 1, 1)
    assert "1 earlier output(s)" in result.stderr and "b.png" in _record(tmp_path / "o")


def test_letterbox_content_boxes_are_recorded(tmp_path: Path) -> None:
    src, args = _two_images(tmp_path)
    shutil.copy(REPO / "sample_data" / "images" / "landscape_exif6.jpg", src / "rot.jpg")
    r = _json(runner.invoke(app, [*args, "--resize-mode", "letterbox", "--format", "npy", "--layout", "HWC"]))
    assert r["written"] == 3
    rec = _record(tmp_path / "o")
    assert rec["a.npy"]["content_box"] == [0, 28, 224, 196] and rec["a.npy"]["original_size"] == [480, 360]
    assert rec["rot.npy"]["content_box"] == [0, 37, 224, 186] and rec["rot.npy"]["original_size"] == [1800, 1200]
    assert rec["b.npy"]["content_box"] == [0, 0, 224, 224] and rec["b.npy"]["size"] == [224, 224]
    arr = np.load(tmp_path / "o" / "rot.npy")
    assert (arr[:37] == 0).all() and (arr[186:] == 0).all() and arr[37:186].any()


def test_unreadable_manifest_rows_go_to_the_rejects_file(tmp_path: Path) -> None:
    shutil.copy(DATA / "pillow_flower.jpg", tmp_path / "a.jpg")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"images": ["a.jpg"]}\nnot json at all\n{"images": 3}\n{"images": ["gone.jpg"]}\n')
    out = tmp_path / "o"
    args = ["normalize-images", str(manifest), "--out", str(out), "-j", "1"]
    result = runner.invoke(app, [*args, "--json"])
    r = _json(result)
    assert (r["written"], r["rejected"], r["manifest_rejects"]) == (1, 1, 2)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(x.get("line"), x["reason"]) for x in rejects] == [
        (2, "invalid_json"), (3, "bad_type"), (None, "image_missing")]
    assert rejects[0]["path"] == str(manifest) and "m.jsonl:2" in rejects[0]["detail"]
    assert runner.invoke(app, [*args, "--fail-on-reject", "-q"]).exit_code == EXIT_FAILED
    manifest.write_text('{"images": ["a.jpg"]}\nnot json at all\n')  # a bad row and no bad image
    assert runner.invoke(app, [*args, "--fail-on-reject", "-q"]).exit_code == EXIT_FAILED
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0


@pytest.mark.parametrize("where,value", [
    ("--out", "s3://bucket/norm"), ("--out", "memory://x/y"), ("--rejects", "gs://b/rejects.jsonl"),
    ("SRC", "s3://bucket/images"), ("--image-root", "memory://root"),
])
def test_remote_uris_are_refused_not_written_as_local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              where: str, value: str) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.jsonl"
    shutil.copy(DATA / "pillow_flower.jpg", tmp_path / "a.jpg")
    manifest.write_text('{"images": ["a.jpg"]}\n')
    opts = {"SRC": str(manifest), "--out": str(tmp_path / "o")}
    opts[where] = value
    args = ["normalize-images", opts.pop("SRC")] + [x for kv in opts.items() for x in kv]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_USAGE, result.stderr
    assert value in result.stderr and "local files only" in result.stderr and "mmprep pack" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "m.jsonl"]  # no ./s3:/ folder, no output
    if where in ("SRC", "--out"):
        stats = ["image-stats", str(manifest)] if where == "--out" else ["image-stats", value]
        stats += ["--out", value] if where == "--out" else []
        result = runner.invoke(app, stats)
        assert result.exit_code == EXIT_USAGE and "local files only" in result.stderr


def test_file_uris_are_local_paths(tmp_path: Path) -> None:
    src, _ = _two_images(tmp_path)
    out = tmp_path / "o"
    r = _json(runner.invoke(app, ["normalize-images", src.as_uri(), "--out", out.as_uri(), "--json", "-j", "1"]))
    assert r["written"] == 2 and (out / "a.png").is_file()
    r = _json(runner.invoke(app, ["image-stats", src.as_uri(), "--json", "-j", "1"]))
    assert r["decoded"] == 2


def test_resampler_option_on_every_image_command(tmp_path: Path) -> None:
    fast = _json(runner.invoke(app, ["image-stats", str(DATA), "--json", "-j", "1"]))
    slow = _json(runner.invoke(app, ["image-stats", str(DATA), "--json", "-j", "1", "--resampler", "pillow"]))
    for key in ("images", "decoded", "unreadable_count", "reasons", "modes", "formats", "multi_frame"):
        assert fast[key] == slow[key], key
    assert fast["config"]["resampler"] == "fast" and slow["config"]["resampler"] == "pillow"
    # the same images, resampled by two filters: close, not equal
    assert fast["mean"] != slow["mean"]
    assert max(abs(a - b) for a, b in zip(fast["mean"], slow["mean"], strict=True)) < 0.01
    out = tmp_path / "n"
    r = runner.invoke(app, ["normalize-images", str(DATA), "--out", str(out), "--resampler", "pillow", "-j", "1",
                            "--quiet"])
    assert r.exit_code in (0, 1), r.stderr  # 1: the broken test files are rejected
    assert any(out.rglob("*.png"))
    for cmd in (["image-stats", str(DATA)], ["normalize-images", str(DATA), "--out", str(tmp_path / "m")],
                ["pack", "sample_data/manifest.jsonl", "--out", str(tmp_path / "p")]):
        bad = runner.invoke(app, [*cmd, "--resampler", "nope"])
        assert bad.exit_code == 2 and "resampler" in bad.stderr, cmd

"""The image stage on real files: decoding of every mode, orientation, broken files, resize modes, normalisation."""

from __future__ import annotations

import io
import math
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from mmprep.errors import InputError, UsageError
from mmprep.images.decode import (
    INTERPOLATIONS,
    NORM_PRESETS,
    RESIZE_MODES,
    ImageConfig,
    ImageError,
    Normalization,
    encode_image,
    load_image,
    parse_color,
    parse_image_size,
    plan_resize,
    resolve_image_path,
    to_output,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "images"
BROKEN = DATA / "broken"
SAMPLE = REPO / "sample_data" / "images"
LANDSCAPE6 = SAMPLE / "landscape_exif6.jpg"  # stored 1200x1800, EXIF orientation 6, upright 1800x1200
CMYK = SAMPLE / "sample_cmyk.jpg"
FLOWER = DATA / "pillow_flower.jpg"  # 480x360 RGB JPEG

NONE = ImageConfig(resize_mode="none")


def _pillow_rgba(path: Path) -> np.ndarray:
    """Independent reference: Pillow's own conversion of the first frame, upright."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGBA"))


def _composite(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    return rgba[..., :3] * a + np.asarray(bg, dtype=np.float64) * (1 - a)


# -- decoding: orientation --------------------------------------------------------------------------------------


def test_exif_orientation_6_swaps_width_and_height() -> None:
    with Image.open(LANDSCAPE6) as im:
        assert im.size == (1200, 1800)  # as stored
    d = load_image(LANDSCAPE6, NONE)
    assert d.original_size == (1800, 1200)
    assert d.array.shape == (1200, 1800, 3)
    assert d.orientation == 6
    assert d.array.dtype == np.uint8 and d.array.flags.c_contiguous
    assert d.content_box == (0, 0, 1800, 1200)
    with Image.open(LANDSCAPE6) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(d.array, ref)
    assert d.array[50, 100].tolist() == [133, 174, 228]  # blue sky at the top of the upright photo
    assert d.array[1000, 1700].tolist() == [8, 6, 9]


@pytest.mark.parametrize("name", ["pillow_hopper_orientation_3.jpg", "pillow_hopper_orientation_6.jpg",
                                  "pillow_hopper_orientation_8.jpg", "pillow_hopper_orientation_6.webp"])
def test_orientation_matches_the_upright_original(name: str) -> None:
    d = load_image(DATA / name, NONE)
    upright = np.asarray(Image.open(DATA / "pillow_hopper.jpg").convert("RGB")).astype(int)
    with Image.open(DATA / name) as im:
        stored = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(d.array.astype(int) - upright).mean() < 8  # same picture (re-encoded JPEG)
    assert np.abs(stored - upright).mean() > 40  # while the stored pixels are rotated
    assert d.orientation == int(name.split("_")[-1].split(".")[0])


def test_orientation_only_in_xmp_is_applied() -> None:
    d = load_image(DATA / "pillow_xmp_tags_orientation.png", NONE)
    assert d.orientation == 3
    ref = _composite(_pillow_rgba(DATA / "pillow_xmp_tags_orientation.png"), (255, 255, 255))
    assert np.abs(d.array - ref).max() <= 1


def test_tiny_rotated_image() -> None:
    d = load_image(DATA / "pillow_orientation_rectangle.jpg", NONE)
    assert d.original_size == (1, 2)
    assert d.array.shape == (2, 1, 3)


@pytest.mark.parametrize("mode", ["stretch", "center-crop", "letterbox", "shortest-edge", "max-pixels"])
def test_resized_orientation_equals_transpose_then_resize(mode: str) -> None:
    """Resizing in stored orientation and transposing the small result gives the upright resize."""
    cfg = ImageConfig(size=(200, 300), resize_mode=mode, shortest_edge=150, max_pixels=40_000, draft=False,
                      reducing_gap=None, resampler="pillow")
    d = load_image(LANDSCAPE6, cfg)
    with Image.open(LANDSCAPE6) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
    plan = plan_resize(*upright.size, cfg)
    ref = upright.resize(plan.resized, Image.Resampling.BICUBIC, box=plan.src_box)
    canvas = Image.new("RGB", plan.out_size, (0, 0, 0))
    canvas.paste(ref, plan.offset)
    diff = np.abs(d.array.astype(int) - np.asarray(canvas).astype(int))
    assert d.array.shape == (plan.out_size[1], plan.out_size[0], 3)
    assert diff.mean() < 0.3  # only the rounding between the two resampling passes differs


# -- decoding: modes ----------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    d = load_image(CMYK, NONE)
    assert d.source_mode == "CMYK" and d.source_format == "JPEG"
    assert d.array.shape == (100, 100, 3)
    with Image.open(CMYK) as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(d.array, ref)
    assert d.array[0, 0].tolist() == [255, 13, 25]  # the red letters
    assert d.array[99, 99].tolist() == [1, 4, 5]  # the black background


@pytest.mark.parametrize("bg", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_palette_png_with_transparency_is_composited(bg: tuple[int, int, int]) -> None:
    path = DATA / "pillow_p_trns_single.png"
    d = load_image(path, ImageConfig(resize_mode="none", background=bg))
    with Image.open(path) as im:
        idx = np.asarray(im)
        transparent = idx == im.info["transparency"]
    assert transparent.sum() == 876
    assert (d.array[transparent] == bg).all()
    ref = _pillow_rgba(path)[..., :3]
    assert np.array_equal(d.array[~transparent], ref[~transparent])


def test_default_background_is_white_not_black() -> None:
    d = load_image(DATA / "pillow_transparent.png", NONE)
    rgba = _pillow_rgba(DATA / "pillow_transparent.png")
    assert d.array[rgba[..., 3] == 0].min() == 255


@pytest.mark.parametrize("name", ["pillow_transparent.png", "pillow_uncompressed_la.png", "pillow_transparent.gif",
                                  "pillow_transparent.webp"])
@pytest.mark.parametrize("bg", [(255, 255, 255), (0, 0, 0)])
def test_alpha_is_blended_over_the_background(name: str, bg: tuple[int, int, int]) -> None:
    d = load_image(DATA / name, ImageConfig(resize_mode="none", background=bg))
    ref = _composite(_pillow_rgba(DATA / name), bg)
    assert d.array.shape == ref.shape
    assert np.abs(d.array - ref).max() <= 1


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    path = DATA / "pillow_i_trns.png"
    bg = (10, 20, 30)
    d = load_image(path, ImageConfig(resize_mode="none", background=bg))
    assert d.source_mode == "I;16"
    with Image.open(path) as im:
        raw = np.asarray(im).astype(np.int64)
        trns = im.info["transparency"]
    expected = (raw * 255 + 32767) // 65535
    opaque = raw != trns
    assert (d.array[~opaque] == bg).all()
    for c in range(3):
        assert np.array_equal(d.array[..., c][opaque], expected[opaque])
    # the file's values are small in 16-bit terms: clipping would have kept e.g. 200 as 200
    assert raw[opaque].max() > 200 and d.array[opaque].max() <= 1


def test_sixteen_bit_photo_roundtrip(tmp_path: Path) -> None:
    """A real 8-bit photo written as a 16-bit PNG (v * 257) decodes back to exactly the same 8-bit values."""
    with Image.open(SAMPLE / "camera.png") as im:
        gray8 = np.asarray(im.convert("L"))
    path = tmp_path / "camera16.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    d = load_image(path, NONE)
    assert np.array_equal(d.array[..., 0], gray8)
    assert np.array_equal(d.array[..., 1], gray8) and np.array_equal(d.array[..., 2], gray8)


def test_sixteen_bit_tiff_and_apng() -> None:
    d = load_image(DATA / "pillow_tiff_16bit_RGB.tiff", NONE)
    assert d.source_format == "TIFF" and d.array.shape == (40, 100, 3)
    with Image.open(DATA / "pillow_tiff_16bit_RGB.tiff") as im:
        assert np.array_equal(d.array, np.asarray(im.convert("RGB")))
    a = load_image(DATA / "pillow_apng_mode_16bit.png", NONE)
    assert a.n_frames == 3 and a.array.shape == (64, 128, 3)
    assert a.array[0, 0].tolist() == [255, 0, 0]


# a GIF declares no frame count: it is reported animated (None) without parsing every frame (issue 19, item 16)
@pytest.mark.parametrize("name,frames", [("pillow_dispose_bgnd.gif", None), ("pillow_sugarshack.mpo", 2),
                                         ("pillow_apng_mode_16bit.png", 3), ("pillow_iss634.webp", 42)])
def test_multi_frame_files_give_the_first_frame(name: str, frames: int | None) -> None:
    d = load_image(DATA / name, NONE)
    assert d.n_frames == frames
    with Image.open(DATA / name) as im:
        im.seek(0)
        ref = _composite(np.asarray(im.convert("RGBA")), (255, 255, 255))
    assert np.abs(d.array - ref).max() <= 1


def test_grayscale_and_bilevel_become_rgb() -> None:
    g = load_image(DATA / "pillow_hopper_gray.jpg", NONE)
    assert g.source_mode == "L"
    assert np.array_equal(g.array[..., 0], g.array[..., 1]) and np.array_equal(g.array[..., 0], g.array[..., 2])
    b = load_image(DATA / "pillow_hopper_bw_500.png", NONE)
    assert b.source_mode == "1" and b.array.shape == (500, 500, 3)
    assert set(np.unique(b.array).tolist()) == {0, 255}


def test_content_decides_format_not_extension(tmp_path: Path) -> None:
    fake = tmp_path / "actually_a_jpeg.png"
    shutil.copy(DATA / "pillow_hopper.jpg", fake)
    d = load_image(fake, NONE)
    assert d.source_format == "JPEG"
    by_bytes = load_image((DATA / "pillow_hopper.jpg").read_bytes(), NONE)
    assert np.array_equal(d.array, by_bytes.array)


# -- decoding: broken files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,reason",
    [
        (BROKEN / "pillow_broken.png", "image_unidentified"),
        (BROKEN / "pillow_zero_width.gif", "image_unidentified"),
        (BROKEN / "pillow_unknown_compression_method.png", "image_unidentified"),
        (BROKEN / "pillow_decompression_bomb.gif", "image_too_large"),
        (BROKEN / "pillow_png_decompression_dos.png", "image_metadata_too_large"),
        (BROKEN / "pillow_truncated_image.png", "image_truncated"),
        (BROKEN / "pillow_truncated_jpeg.jpg", "image_truncated"),
        (BROKEN / "pillow_truncated_end_chunk.png", "image_truncated"),
        (BROKEN / "pillow_broken_data_stream.png", "image_invalid"),
        (SAMPLE / "coffee_truncated.jpg", "image_truncated"),
        (SAMPLE / "does_not_exist.jpg", "image_missing"),
        (SAMPLE, "image_not_a_file"),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
@pytest.mark.parametrize("mode", ["center-crop", "none"])
def test_broken_files_are_rejected_with_a_reason(path: Path, reason: str, mode: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(path, ImageConfig(resize_mode=mode))
    assert info.value.reason == reason
    assert str(path) in info.value.detail


def test_damaged_metadata_does_not_stop_decoding() -> None:
    d = load_image(BROKEN / "pillow_invalid-exif.jpg", NONE)
    assert d.array.shape == (200, 200, 3) and d.orientation == 1
    w = load_image(BROKEN / "pillow_truncated_exif_dpi.jpg", NONE)
    assert w.original_size == (480, 640)
    assert int(w.array.min()) == 255  # the picture is all white


def test_empty_file_and_garbage_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        load_image(empty, NONE)
    assert info.value.reason == "image_unidentified" and "empty" in info.value.detail
    with pytest.raises(ImageError) as info:
        load_image(b"definitely not an image", NONE)
    assert info.value.reason == "image_unidentified"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "secret.jpg"
    shutil.copy(DATA / "pillow_hopper.jpg", p)
    p.chmod(0)
    try:
        with pytest.raises(ImageError) as info:
            load_image(p, NONE)
        assert info.value.reason == "image_unreadable"
    finally:
        p.chmod(0o644)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a size, with one compressed row of pixel data: what a bomb's header looks like."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * width + 1)))


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # a truncated 640x480 file: with a small limit the size check must fire first, before the decoder does
    with pytest.raises(ImageError) as info:
        load_image(BROKEN / "pillow_truncated_image.png", ImageConfig(pixel_limit=100_000))
    assert info.value.reason == "image_too_large" and "640x480" in info.value.detail
    with pytest.raises(ImageError) as info:
        load_image(FLOWER, ImageConfig(pixel_limit=480 * 360 - 1))
    assert info.value.reason == "image_too_large"
    assert load_image(FLOWER, ImageConfig(pixel_limit=480 * 360)).original_size == (480, 360)


def test_bomb_between_pillow_warning_and_error_is_rejected_without_a_warning() -> None:
    header = _png_header_only(10_000, 10_000)  # 100M pixels: Pillow only warns (89M < n < 179M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as info:
            load_image(header, ImageConfig())
    assert info.value.reason == "image_too_large" and "10000x10000" in info.value.detail
    # above twice PIL.Image.MAX_IMAGE_PIXELS Pillow refuses by itself, whatever our limit says
    with pytest.raises(ImageError) as info:
        load_image(BROKEN / "pillow_decompression_bomb.gif", ImageConfig(pixel_limit=10**12))
    assert info.value.reason == "image_too_large" and "Pillow's own limit" in info.value.detail


def test_no_global_pillow_or_warning_state_leaks() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for path in [BROKEN / "pillow_decompression_bomb.gif", BROKEN / "pillow_truncated_jpeg.jpg",
                 BROKEN / "pillow_png_decompression_dos.png"]:
        with pytest.raises(ImageError):
            load_image(path, ImageConfig(pixel_limit=10**12))
    load_image(BROKEN / "pillow_invalid-exif.jpg", NONE)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


def test_decoder_warnings_are_kept_as_notes_not_raised() -> None:
    # pytest turns warnings into errors here: decoding must neither emit nor fail on Pillow's warning
    d = load_image(BROKEN / "pillow_sugarshack_bad_mpo_header.jpg", NONE)
    assert d.array.shape == (480, 640, 3)
    assert any("malformed MPO" in n for n in d.notes)
    assert load_image(DATA / "pillow_sugarshack.mpo", NONE).notes == ()


# -- resize modes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,shape,box",
    [
        (ImageConfig(size=(100, 50), resize_mode="stretch"), (100, 50, 3), (0, 0, 50, 100)),
        (ImageConfig(size=(224, 224), resize_mode="center-crop"), (224, 224, 3), (0, 0, 224, 224)),
        (ImageConfig(size=(224, 224), resize_mode="letterbox"), (224, 224, 3), (0, 28, 224, 196)),
        (ImageConfig(size=(300, 200), resize_mode="letterbox"), (300, 200, 3), (0, 75, 200, 225)),
        (ImageConfig(resize_mode="shortest-edge", shortest_edge=100), (100, 133, 3), (0, 0, 133, 100)),
        (ImageConfig(resize_mode="max-pixels", max_pixels=10_000), (86, 115, 3), (0, 0, 115, 86)),
        # EasyR1 truncates when growing too: 816x612 = 499,392 pixels, just under min_pixels
        (ImageConfig(resize_mode="max-pixels", min_pixels=500_000), (612, 816, 3), (0, 0, 816, 612)),
        (ImageConfig(resize_mode="none"), (360, 480, 3), (0, 0, 480, 360)),
    ],
    ids=lambda v: v.resize_mode if isinstance(v, ImageConfig) else None,
)
def test_resize_modes_exact_sizes_and_content_boxes(cfg: ImageConfig, shape: tuple[int, ...], box: tuple) -> None:
    cfg.validate()
    d = load_image(FLOWER, cfg)
    assert d.array.shape == shape
    assert d.content_box == box
    assert d.original_size == (480, 360)


def test_center_crop_takes_the_middle() -> None:
    plan = plan_resize(480, 360, ImageConfig())
    assert plan.src_box == (60.0, 0.0, 420.0, 360.0)
    d = load_image(FLOWER, ImageConfig(draft=False, reducing_gap=None, resampler="pillow"))
    with Image.open(FLOWER) as im:
        ref = np.asarray(im.convert("RGB").crop((60, 0, 420, 360)).resize((224, 224), Image.Resampling.BICUBIC))
    diff = np.abs(d.array.astype(int) - ref.astype(int))
    # the crop clamps the filter at the cut; resampling the box uses the real neighbours there instead
    assert diff[:, 2:-2].max() <= 1 and diff.mean() < 0.05


def test_letterbox_pads_with_fill_and_keeps_the_picture() -> None:
    d = load_image(FLOWER, ImageConfig(resize_mode="letterbox", fill=(7, 8, 9), draft=False, reducing_gap=None,
                                       resampler="pillow"))
    x0, y0, x1, y1 = d.content_box
    assert (d.array[:y0] == (7, 8, 9)).all() and (d.array[y1:] == (7, 8, 9)).all()
    with Image.open(FLOWER) as im:
        ref = np.asarray(im.convert("RGB").resize((224, 168), Image.Resampling.BICUBIC))
    assert np.array_equal(d.array[y0:y1, x0:x1], ref)


def test_letterbox_on_the_rotated_photo() -> None:
    d = load_image(LANDSCAPE6, ImageConfig(resize_mode="letterbox"))
    assert d.content_box == (0, 37, 224, 186)  # 1800x1200 -> 224x149, centred vertically
    assert (d.array[:37] == 0).all() and (d.array[186:] == 0).all()


def test_draft_is_engaged_when_shrinking_a_jpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None) -> object:
        result = real_draft(self, mode, size)
        calls.append((size, self.size))  # requested size, size the decoder will now produce
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    d = load_image(LANDSCAPE6, ImageConfig(resampler="pillow"))
    assert d.array.shape == (224, 224, 3)
    # stored 1200x1800; the centre crop needs 224 of the 1200 px short side: the DCT decoder scales by 1/4
    assert calls == [((224, 336), (300, 450))]
    calls.clear()
    load_image(LANDSCAPE6, ImageConfig(draft=False, resampler="pillow"))
    load_image(LANDSCAPE6, ImageConfig(resize_mode="none", resampler="pillow"))
    load_image(FLOWER, ImageConfig(resize_mode="max-pixels", min_pixels=500_000, resampler="pillow"))  # growing
    assert calls == []


def test_draft_fast_path_is_visually_equal_to_full_decode() -> None:
    fast = load_image(LANDSCAPE6, ImageConfig())
    slow = load_image(LANDSCAPE6, ImageConfig(draft=False, reducing_gap=None))
    assert fast.array.shape == slow.array.shape == (224, 224, 3)
    assert np.abs(fast.array.astype(int) - slow.array.astype(int)).mean() < 2.0


def test_photo_statistics_after_center_crop() -> None:
    d = load_image(LANDSCAPE6, ImageConfig())
    px = d.array.reshape(-1, 3) / 255.0
    assert np.allclose(px.mean(axis=0), [0.4273, 0.5083, 0.5956], atol=0.005)
    assert np.allclose(px.std(axis=0), [0.2253, 0.2450, 0.2879], atol=0.005)


def test_every_interpolation_is_pillows_filter_and_they_differ() -> None:
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
    assert set(filters) == set(INTERPOLATIONS)
    with Image.open(FLOWER) as im:
        rgb = im.convert("RGB")
    results = {}
    for name, flt in filters.items():
        d = load_image(FLOWER, ImageConfig(size=(64, 64), interpolation=name, draft=False, reducing_gap=None,
                                           resampler="pillow"))
        ref = np.asarray(rgb.resize((64, 64), flt, box=(60, 0, 420, 360)))  # the centre crop of 480x360
        assert np.array_equal(d.array, ref), name
        results[name] = d.array
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(results[a], results[b]), (a, b)


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 6000), h=st.integers(1, 6000), tw=st.integers(1, 1024), th=st.integers(1, 1024),
    mode=st.sampled_from(RESIZE_MODES), edge=st.integers(1, 2048),
    budget=st.tuples(st.integers(1, 4_000_000), st.integers(1, 4_000_000)),
)
def test_plan_resize_invariants(w: int, h: int, tw: int, th: int, mode: str, edge: int,
                                budget: tuple[int, int]) -> None:
    lo, hi = sorted(budget)
    cfg = ImageConfig(size=(th, tw), resize_mode=mode, shortest_edge=edge, max_pixels=hi, min_pixels=lo)
    cfg.validate()
    p = plan_resize(w, h, cfg)
    x0, y0, x1, y1 = p.content_box
    assert 0 <= x0 < x1 <= p.out_size[0] and 0 <= y0 < y1 <= p.out_size[1]
    bx0, by0, bx1, by1 = p.src_box
    assert -1e-6 <= bx0 < bx1 <= w + 1e-6 and -1e-6 <= by0 < by1 <= h + 1e-6
    if mode in ("stretch", "center-crop", "letterbox"):
        assert p.out_size == (tw, th)
    if mode == "center-crop":
        assert abs((bx1 - bx0) / (by1 - by0) - tw / th) < 1e-6 * max(tw / th, th / tw) * 10
        assert abs((bx0 + bx1) / 2 - w / 2) < 1e-6 * w and abs((by0 + by1) / 2 - h / 2) < 1e-6 * h
    if mode == "letterbox":
        nw, nh = p.resized
        assert nw == tw or nh == th  # touches two sides
        assert abs(nw / nh - w / h) <= (w / h) * (1 / min(nw, nh)) + 1e-9 or min(nw, nh) == 1
    if mode == "shortest-edge":
        assert min(p.out_size) == edge
    if mode == "max-pixels":
        ow, oh = p.out_size
        assert ow * oh <= hi  # the upper bound always holds, also when it is close to the lower one
        if w * h < lo:  # grown with truncated sides: short of the lower bound by less than one row and column
            assert (ow + 1) * (oh + 1) > lo
    if mode == "none":
        assert p.out_size == (w, h) and not p.resample


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), hi=st.integers(1, 4_000_000))
def test_max_pixels_upper_bound(w: int, h: int, hi: int) -> None:
    p = plan_resize(w, h, ImageConfig(resize_mode="max-pixels", max_pixels=hi))
    ow, oh = p.out_size
    if w * h <= hi:
        assert (ow, oh) == (w, h) and not p.resample
    else:
        assert ow <= w and oh <= h and ow >= 1 and oh >= 1
        assert ow * oh <= hi  # also when a side was raised from 0 to 1 pixel
        if min(w, h) * (hi / (w * h)) ** 0.5 >= 1:  # no side was clamped up to 1 pixel
            assert abs(ow / oh - w / h) <= (w / h) * 2 / min(ow, oh) + 1e-9  # aspect kept up to rounding


def _easyr1_size(w: int, h: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The sizes of hiyouga/EasyR1 ``verl/utils/dataset.py`` ``ImageProcessMixin.process_image``, as published."""
    if w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = int(w * f), int(h * f)
    if w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = int(w * f), int(h * f)
    return w, h


@settings(max_examples=500, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), lo=st.integers(1, 4_000_000), gap=st.integers(0, 10))
def test_max_pixels_with_both_bounds_close_never_exceeds_max(w: int, h: int, lo: int, gap: int) -> None:
    hi = lo + gap
    p = plan_resize(w, h, ImageConfig(resize_mode="max-pixels", min_pixels=lo, max_pixels=hi))
    ow, oh = p.out_size
    assert ow >= 1 and oh >= 1 and ow * oh <= hi
    if min(w, h) * (hi / (w * h)) ** 0.5 >= 1:  # EasyR1 itself gives a 0-pixel side otherwise
        assert (ow, oh) == _easyr1_size(w, h, lo, hi)


@pytest.mark.parametrize("size,lo,hi,expected", [
    ((480, 360), 500_000, None, (816, 612)),  # grown: int() truncation, as EasyR1
    ((10, 10), 150, 150, (12, 12)),  # a tight budget: 144 <= 150 (rounding up gave 13x13 = 169 before)
    ((1, 1), 2, 2, (1, 1)),
    ((480, 360), None, 10_000, (115, 86)),
    ((1, 5000), None, 100, (1, 100)),  # EasyR1 would give 0x707; mmprep 1 pixel wide, capped to the budget
])
def test_max_pixels_known_sizes(size: tuple[int, int], lo: int | None, hi: int | None,
                                expected: tuple[int, int]) -> None:
    assert plan_resize(*size, ImageConfig(resize_mode="max-pixels", min_pixels=lo, max_pixels=hi)).out_size == expected


# -- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,needle",
    [
        (ImageConfig(resize_mode="zoom"), "unknown resize mode"),
        (ImageConfig(interpolation="cubic"), "unknown interpolation"),
        (ImageConfig(size=None), "needs an image size"),
        (ImageConfig(size=(0, 5)), "two positive integers"),
        (ImageConfig(resize_mode="shortest-edge"), "shortest edge"),
        (ImageConfig(resize_mode="max-pixels"), "pixel budget"),
        (ImageConfig(resize_mode="max-pixels", max_pixels=10, min_pixels=20), "larger than max-pixels"),
        (ImageConfig(background=(0, 0, 256)), "background"),
        (ImageConfig(fill=(0, 0)), "fill"),
        (ImageConfig(pixel_limit=0), "pixel limit"),
    ],
)
def test_config_validation(cfg: ImageConfig, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        cfg.validate()
    assert needle in str(info.value)


def test_parsers() -> None:
    assert parse_image_size("224") == (224, 224)
    assert parse_image_size("336x448") == (336, 448)
    assert parse_image_size(64) == (64, 64)
    for bad in ("0", "x", "12x", "1x2x3", "-4"):
        with pytest.raises(UsageError):
            parse_image_size(bad)
    assert parse_color("255,0,10") == (255, 0, 10)
    assert parse_color("#000080") == (0, 0, 128)
    assert parse_color("white") == (255, 255, 255)
    for bad in ("300,0,0", "1,2", "notacolour"):
        with pytest.raises(UsageError):
            parse_color(bad)


# -- normalisation and encoding ---------------------------------------------------------------------------------


def test_presets_are_the_published_constants() -> None:
    assert NORM_PRESETS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert NORM_PRESETS["clip"] == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_to_output_dtypes_and_layouts() -> None:
    arr = load_image(FLOWER, ImageConfig(size=(32, 48))).array
    u8 = to_output(arr, Normalization())
    assert u8.shape == (3, 32, 48) and u8.dtype == np.uint8 and u8.flags.c_contiguous
    assert np.array_equal(u8.transpose(1, 2, 0), arr)
    hwc = to_output(arr, Normalization(layout="HWC"))
    assert hwc.shape == (32, 48, 3) and np.array_equal(hwc, arr)
    clip = Normalization.from_spec("clip", dtype="float32")
    f32 = to_output(arr, clip)
    mean, std = NORM_PRESETS["clip"]
    y, x = 10, 20
    for c in range(3):
        assert f32[c, y, x] == pytest.approx((arr[y, x, c] / 255 - mean[c]) / std[c], abs=1e-5)
    exact = (arr / 255 - np.asarray(mean)) / np.asarray(std)  # float64 reference, HWC
    for layout, ref in (("HWC", exact), ("CHW", exact.transpose(2, 0, 1))):
        f16 = to_output(arr, Normalization.from_spec("clip", dtype="float16", layout=layout))
        assert f16.dtype == np.float16 and f16.shape == ref.shape and f16.flags.c_contiguous
        assert np.array_equal(f16, ref.astype(np.float16))  # correctly rounded, not float32-then-cast
    assert np.allclose(f32, exact.transpose(2, 0, 1), atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=3, max_size=3),
       st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
       st.tuples(st.floats(0.01, 1), st.floats(0.01, 1), st.floats(0.01, 1)))
def test_normalisation_inverts(pixel: list[int], mean: tuple, std: tuple) -> None:
    arr = np.array(pixel, dtype=np.uint8).reshape(1, 1, 3)
    out = to_output(arr, Normalization(mean, std, "float32", "HWC"))
    back = out[0, 0] * np.asarray(std) + np.asarray(mean)
    assert np.allclose(back * 255, pixel, atol=1e-3)


def test_normalization_from_spec(tmp_path: Path) -> None:
    n = Normalization.from_spec(None, "0.5", "0.25,0.25,0.25", None, "float16", "hwc")
    assert n.mean == (0.5, 0.5, 0.5) and n.std == (0.25, 0.25, 0.25) and n.layout == "HWC"
    stats = tmp_path / "stats.json"
    stats.write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "images": 3}')
    s = Normalization.from_spec(stats_file=stats, dtype="float32")
    assert s.mean == (0.1, 0.2, 0.3) and s.std == (0.4, 0.5, 0.6)
    with pytest.raises(UsageError, match="both set"):
        Normalization.from_spec("clip", mean="0.5", std="0.5")
    with pytest.raises(UsageError, match="together"):
        Normalization.from_spec(mean="0.5")
    with pytest.raises(UsageError, match="unknown normalisation preset"):
        Normalization.from_spec("imagenet21k")
    with pytest.raises(UsageError, match="positive"):
        Normalization.from_spec(mean="0", std="0,1,1")
    with pytest.raises(UsageError, match="dtype"):
        Normalization.from_spec(dtype="int8")
    with pytest.raises(InputError, match="no such statistics file"):
        Normalization.from_spec(stats_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": [0.1, 0.2]')
    with pytest.raises(InputError, match="invalid JSON"):
        Normalization.from_spec(stats_file=bad)
    bad.write_text('{"average": [0.1, 0.2, 0.3]}')
    with pytest.raises(InputError, match="'mean' and 'std'"):
        Normalization.from_spec(stats_file=bad)
    # what `image-stats --json` printed when nothing decoded, and other non-numbers: one line naming the file
    for mean in ("null", "true", "[true, 0.2, 0.3]", '{"r": 0.1}', '"abc"'):
        bad.write_text(f'{{"mean": {mean}, "std": [0.4, 0.5, 0.6]}}')
        with pytest.raises(InputError, match=f"{bad}: mean"):
            Normalization.from_spec(stats_file=bad)


def test_encode_image_roundtrips() -> None:
    arr = load_image(FLOWER, ImageConfig(size=(40, 60))).array
    png = encode_image(arr, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), arr)
    for fmt in ("jpeg", "webp"):
        data = encode_image(arr, fmt, quality=95)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert back.shape == arr.shape and np.abs(back - arr).mean() < 6
    chw = to_output(arr, Normalization.from_spec("imagenet", dtype="float16"))
    assert np.array_equal(np.load(io.BytesIO(encode_image(chw, "npy"))), chw)
    with pytest.raises(UsageError):
        encode_image(arr, "gif")
    with pytest.raises(UsageError):
        encode_image(chw, "png")


# -- paths ------------------------------------------------------------------------------------------------------


def test_resolve_image_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    (root / "link.jpg").symlink_to(outside)
    (root / "inner_link.jpg").symlink_to(root / "sub" / "a.jpg")

    assert resolve_image_path("sub/a.jpg", root) == (root / "sub" / "a.jpg").resolve()
    assert resolve_image_path("sub/../sub/a.jpg", root) == (root / "sub" / "a.jpg").resolve()
    assert resolve_image_path(str(root / "sub" / "a.jpg"), root).name == "a.jpg"  # absolute, inside
    assert resolve_image_path("inner_link.jpg", root).name == "a.jpg"
    assert resolve_image_path("missing.jpg", root).name == "missing.jpg"  # existence is load_image's business
    for ref in ("../outside.jpg", str(outside), "link.jpg", "sub/../../outside.jpg"):
        with pytest.raises(ImageError) as info:
            resolve_image_path(ref, root)
        assert info.value.reason == "path_outside_root"
        assert resolve_image_path(ref, root, allow_outside=True).exists()
    for ref in ("", "   ", "a\x00b"):
        with pytest.raises(ImageError) as info:
            resolve_image_path(ref, root)
        assert info.value.reason == "path_invalid"
    # a sibling folder whose name starts like the root is still outside
    (tmp_path / "root2").mkdir()
    with pytest.raises(ImageError):
        resolve_image_path("../root2/x.jpg", root)


def test_image_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ImageError("image_truncated", "x.jpg: cut")))
    assert (err.reason, err.detail) == ("image_truncated", "x.jpg: cut")

"""The fast image path (simplejpeg + OpenCV) against the Pillow path, on real files of every kind.

For every file: the same accept/reject decision and reason, the same format, mode, orientation, sizes and content
box. Pixels: a file the fast path takes decodes to exactly Pillow's pixels when nothing is resized (the same
libjpeg-turbo / zlib output, orientation applied exactly); resized, it is within a stated tolerance of Pillow's
bilinear result (mean absolute difference <= 5 levels and PSNR >= 30 dB on 0-255; a wrong orientation, channel
order or crop is 20-60 levels away). A file it does not take goes through the Pillow path: the same pixels, bit
for bit, as ``resampler="pillow"``.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from mmprep.images import fast
from mmprep.images.decode import ImageConfig, ImageError, load_image

DATA = Path("tests/data/images")
SAMPLE = Path("sample_data/images")
CHELSEA = SAMPLE / "chelsea.jpg"  # 451x300 real photo (scikit-image), not square: orientation changes the shape
FILES = sorted(p for p in [*DATA.rglob("*"), *SAMPLE.iterdir()] if p.is_file() and p.suffix != ".md")
MEAN_TOL = 5.0
PSNR_TOL = 30.0


def _cfg(resampler: str, **kw) -> ImageConfig:
    base = dict(size=(48, 64), resize_mode="center-crop", interpolation="bilinear")
    base.update(kw)
    return ImageConfig(resampler=resampler, **base)


def _outcome(path: Path | bytes, cfg: ImageConfig):
    try:
        return load_image(path, cfg)
    except ImageError as exc:
        return exc.reason


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _same_facts(a, b) -> None:
    assert (a.source_format, a.source_mode, a.orientation, a.original_size, a.content_box, a.n_frames) == (
        b.source_format, b.source_mode, b.orientation, b.original_size, b.content_box, b.n_frames)
    assert a.array.shape == b.array.shape and a.array.dtype == b.array.dtype == np.uint8


def test_the_test_data_covers_every_kind() -> None:
    taken = {p.name for p in FILES if fast.probe(p.read_bytes()) is not None}
    assert {"pillow_hopper.jpg", "pillow_hopper_gray.jpg", "pillow_hopper_orientation_6.jpg", "camera.png",
            "coffee_truncated.jpg", "landscape_exif6.jpg"} <= taken
    # CMYK, MPO, RGBA / LA / palette+tRNS / 16-bit PNG, GIF, WebP, TIFF, XMP orientation, broken files: Pillow's
    assert not taken & {"sample_cmyk.jpg", "pillow_sugarshack.mpo", "pillow_transparent.png", "horse.png",
                        "pillow_uncompressed_la.png", "pillow_p_trns_single.png", "pillow_i_trns.png",
                        "pillow_apng_mode_16bit.png", "pillow_dispose_bgnd.gif", "pillow_transparent.webp",
                        "pillow_tiff_16bit_RGB.tiff", "pillow_xmp_tags_orientation.png", "pillow_broken.png",
                        "pillow_truncated_image.png", "pillow_png_decompression_dos.png",
                        "pillow_decompression_bomb.gif", "pillow_zero_width.gif"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_file_same_decision_and_close_pixels(path: Path) -> None:
    for kw in ({}, {"size": (40, 40), "resize_mode": "letterbox"}, {"size": (30, 50), "resize_mode": "stretch"}):
        got = _outcome(path, _cfg("fast", **kw))
        want = _outcome(path, _cfg("pillow", **kw))
        if isinstance(want, str) or isinstance(got, str):
            assert got == want, path  # the same reject reason (or both accepted)
            continue
        _same_facts(got, want)
        if fast.probe(path.read_bytes()) is None:  # Pillow's file: the Pillow path, bit for bit
            assert np.array_equal(got.array, want.array), path
        else:
            diff = np.abs(got.array.astype(int) - want.array.astype(int))
            assert diff.mean() <= MEAN_TOL and _psnr(got.array, want.array) >= PSNR_TOL, (path, kw, diff.mean())


@pytest.mark.parametrize("path", [p for p in FILES if fast.probe(p.read_bytes()) is not None], ids=lambda p: p.name)
def test_unresized_fast_decode_is_pillows_decode_exactly(path: Path) -> None:
    got = _outcome(path, ImageConfig(size=None, resize_mode="none", resampler="fast"))
    want = _outcome(path, ImageConfig(size=None, resize_mode="none", resampler="pillow"))
    if isinstance(want, str):
        assert got == want
        return
    _same_facts(got, want)
    assert np.array_equal(got.array, want.array)


def test_enlarging_uses_the_interpolation_filter() -> None:
    small = DATA / "pillow_hopper.jpg"  # 128x128 -> 224x224
    for name in ("bilinear", "bicubic", "lanczos"):
        got = load_image(small, _cfg("fast", size=(224, 224), interpolation=name)).array
        want = load_image(small, _cfg("pillow", size=(224, 224), interpolation=name)).array
        assert _psnr(got, want) >= 35, name
    near = load_image(small, _cfg("fast", size=(256, 256), interpolation="nearest")).array
    assert np.array_equal(near[::2, ::2], np.asarray(Image.open(small).convert("RGB")))  # exact 2x replication


# -- orientation -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oriented(tmp_path_factory) -> dict[int, Path]:
    """The same real photo (same stored pixels) with EXIF orientation 1-8."""
    folder = tmp_path_factory.mktemp("orient")
    with Image.open(CHELSEA) as im:
        rgb = im.convert("RGB")
    out = {}
    for k in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = k
        out[k] = folder / f"o{k}.jpg"
        rgb.save(out[k], quality=90, exif=exif.tobytes())
    return out


@pytest.mark.parametrize("k", range(1, 9))
def test_orientation_is_exact(oriented: dict[int, Path], k: int) -> None:
    path = oriented[k]
    assert fast.probe(path.read_bytes()).orientation == k
    # unresized: exactly Pillow's exif_transpose of its full decode
    full = load_image(path, ImageConfig(size=None, resize_mode="none", resampler="fast"))
    with Image.open(path) as im:
        assert np.array_equal(full.array, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    assert full.original_size == ((300, 451) if k >= 5 else (451, 300)) and full.orientation == k
    # resized: the orientation is applied to the small result exactly (a centred square crop of the stored
    # pixels is the same region whatever the orientation, so the result is the transposed k=1 result)
    square = ImageConfig(size=(64, 64), resampler="fast")
    upright = load_image(oriented[1], square).array
    assert np.array_equal(load_image(path, square).array, fast.orient(upright, k))
    # and a non-square output agrees with the Pillow path
    for mode in ("stretch", "center-crop", "letterbox"):
        got = load_image(path, _cfg("fast", size=(40, 72), resize_mode=mode))
        want = load_image(path, _cfg("pillow", size=(40, 72), resize_mode=mode))
        _same_facts(got, want)
        assert np.abs(got.array.astype(int) - want.array.astype(int)).mean() <= MEAN_TOL, mode


def test_orientation_pillow_reads_elsewhere_goes_to_pillow(tmp_path: Path) -> None:
    with Image.open(CHELSEA) as im:
        rgb = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(tmp_path / "exif.png", exif=exif.tobytes())  # PNG eXIf chunk
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><tiff:Orientation>3</tiff:Orientation></x:xmpmeta>'
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    rgb.save(tmp_path / "xmp.png", pnginfo=info)
    rgb.save(tmp_path / "xmp.jpg", quality=90, xmp=xmp.encode())  # JPEG: XMP orientation, no EXIF
    info1 = PngImagePlugin.PngInfo()
    info1.add_itxt("XML:com.adobe.xmp", xmp.replace(">3<", ">1<"), zip=True)
    rgb.save(tmp_path / "xmp1.png", pnginfo=info1)
    for name, k in (("exif.png", 6), ("xmp.png", 3), ("xmp.jpg", 3)):
        path = tmp_path / name
        assert fast.probe(path.read_bytes()) is None, name
        got, want = load_image(path, _cfg("fast")), load_image(path, _cfg("pillow"))
        assert got.orientation == want.orientation == k and np.array_equal(got.array, want.array)
    assert fast.probe((tmp_path / "xmp1.png").read_bytes()) is not None  # an upright XMP changes nothing


# -- kinds -------------------------------------------------------------------------------------------------------


def test_progressive_gray_and_cmyk(tmp_path: Path) -> None:
    with Image.open(CHELSEA) as im:
        rgb = im.convert("RGB")
    rgb.save(tmp_path / "prog.jpg", quality=90, progressive=True)
    rgb.convert("L").save(tmp_path / "gray.jpg", quality=90)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    heads = {n: fast.probe((tmp_path / n).read_bytes()) for n in ("prog.jpg", "gray.jpg", "cmyk.jpg")}
    assert heads["prog.jpg"].mode == "RGB" and heads["gray.jpg"].mode == "L" and heads["cmyk.jpg"] is None
    for name in heads:
        got = load_image(tmp_path / name, ImageConfig(size=None, resize_mode="none", resampler="fast"))
        want = load_image(tmp_path / name, ImageConfig(size=None, resize_mode="none", resampler="pillow"))
        _same_facts(got, want)
        assert np.array_equal(got.array, want.array), name
        small = load_image(tmp_path / name, _cfg("fast"))
        ref = load_image(tmp_path / name, _cfg("pillow"))
        assert np.abs(small.array.astype(int) - ref.array.astype(int)).mean() <= MEAN_TOL, name


def test_png_kinds_go_where_they_belong(tmp_path: Path) -> None:
    with Image.open(CHELSEA) as im:
        rgb = im.convert("RGB")
    rgb.save(tmp_path / "rgb.png")
    rgb.convert("L").save(tmp_path / "l.png")
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.convert("LA").save(tmp_path / "la.png")
    rgb.convert("P").save(tmp_path / "p.png")
    rgb.save(tmp_path / "trns.png", transparency=(0, 0, 0))
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(tmp_path / "i16.png")
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "a real editor")
    text.add_text("Comment", "zipped", zip=True)
    rgb.save(tmp_path / "text.png", pnginfo=text)
    taken = {p.name for p in tmp_path.iterdir() if fast.probe(p.read_bytes()) is not None}
    assert taken == {"rgb.png", "l.png", "text.png"}
    for p in sorted(tmp_path.iterdir()):
        got, want = load_image(p, _cfg("fast")), load_image(p, _cfg("pillow"))
        _same_facts(got, want)
        if p.name not in taken:
            assert np.array_equal(got.array, want.array), p.name


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(ctype)))


def test_damaged_and_hostile_files_get_pillows_verdict(tmp_path: Path) -> None:
    good = CHELSEA.read_bytes()
    cases = {
        "cut.jpg": good[: len(good) // 2],  # header intact, data cut: the fast decoder fails, Pillow says why
        "cut_header.jpg": good[:300],
    }
    scan = good.index(b"\xff\xda")
    flipped = bytearray(good)
    for i in range(scan + 400, scan + 2400, 97):
        flipped[i] ^= 0x5A  # corrupt entropy-coded data
    cases["corrupt.jpg"] = bytes(flipped)
    with Image.open(SAMPLE / "camera.png") as im:
        buf = io.BytesIO()
        im.save(buf, "PNG")
    png = buf.getvalue()
    cases["cut.png"] = png[: len(png) - 40]
    # a header declaring 100,000 x 100,000 pixels (10^10) over real data: refused before decoding
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    cases["bomb.png"] = png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:]
    bad_crc = bytearray(png)
    bad_crc[29] ^= 1  # IHDR checksum
    cases["crc.png"] = bytes(bad_crc)
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for cfg_kw in ({}, {"pixel_limit": 1000}):
            got = _outcome(path, _cfg("fast", **cfg_kw))
            want = _outcome(path, _cfg("pillow", **cfg_kw))
            assert type(got) is type(want), (name, got, want)
            if isinstance(want, str):
                assert got == want, name
            else:
                _same_facts(got, want)
            assert _outcome(data, _cfg("fast", **cfg_kw)) == got if isinstance(got, str) else True
    assert _outcome(tmp_path / "bomb.png", _cfg("fast")) == "image_too_large"
    assert _outcome(CHELSEA, _cfg("fast", pixel_limit=1000)) == "image_too_large"


def test_fast_bytes_and_paths_agree() -> None:
    for path in (CHELSEA, SAMPLE / "camera.png", DATA / "pillow_hopper_orientation_6.jpg"):
        a = load_image(path, _cfg("fast"))
        b = load_image(path.read_bytes(), _cfg("fast"))
        assert np.array_equal(a.array, b.array) and a.orientation == b.orientation


def test_library_versions_and_decoder_info() -> None:
    from mmprep.images.decode import decoder_info

    info = decoder_info(ImageConfig())
    assert info["resampler"] == "fast" and set(info["libraries"]) == {"pillow", "simplejpeg", "opencv"}
    assert decoder_info(ImageConfig(resampler="pillow"))["libraries"].keys() == {"pillow"}


def test_heavy_libraries_are_not_imported_with_the_module() -> None:
    import subprocess
    import sys

    code = ("import sys, mmprep.images.fast, mmprep.images.decode; "
            "print(int('cv2' in sys.modules), int('simplejpeg' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": "."})
    assert out.stdout.split() == ["0", "0"]


# -- issue 19 item 16: only the first frame of a GIF is used, so its frames are not counted ---------------------


def _read_bytes_so_far() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io to count bytes read")
def test_a_gif_with_a_million_frames_is_read_no_further_than_its_second_frame(tmp_path: Path) -> None:
    # 1x1 frames: image descriptor, LZW minimum code size 2, one sub-block (clear, index 0, end), terminator
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02" + b"\x02\x44\x01\x00"
    head = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\xff\x00\x00\x00\x00\xff"
    path = tmp_path / "million.gif"
    path.write_bytes(head + frame * 1_000_000 + b"\x3b")  # 15 MB
    cfg = ImageConfig(size=None, resize_mode="none")
    load_image(DATA / "pillow_dispose_bgnd.gif", cfg)  # imports and caches warm
    before = _read_bytes_so_far()
    d = load_image(path, cfg)
    read = _read_bytes_so_far() - before
    assert d.array.tolist() == [[[255, 0, 0]]] and d.source_format == "GIF"
    assert d.n_frames is None  # animated; not counted
    assert read < 1_000_000, f"read {read:,} bytes of a 15 MB file to use its first frame"
    still = load_image(DATA / "pillow_transparent.gif", cfg)
    assert still.n_frames == 1


def test_a_missing_fast_library_fails_early_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mmprep.errors import UsageError
    from mmprep.images.decode import decoder_info

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if it were not installed
    with pytest.raises(UsageError, match="simplejpeg") as info:
        decoder_info(ImageConfig())
    assert "--resampler pillow" in (info.value.hint or "")
    assert decoder_info(ImageConfig(resampler="pillow"))["resampler"] == "pillow"

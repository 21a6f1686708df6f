"""The GPU image path of ``pack --device cuda``, in the parts that run without a GPU.

Routing (which files go to the GPU decoder, which to today's CPU path) on real files; the torch resampler against
Pillow's own passes; the whole device pipeline (orientation, resampling, letterbox, normalisation, the one copy
back) on CPU tensors, with Pillow standing in for nvJPEG, against the CPU path's pixels within the tolerance stated
in docs/gpu.md; the pack processor with that device path against the CPU processor (rows, rejects, accounting);
and the device choice (``--device cuda`` without the gpu extra or a GPU is exit 2). Tests marked ``cuda`` run the
real nvJPEG decoder and skip without a device.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _reader_helpers import SAMPLE, pack_config
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from mmprep.errors import UsageError  # noqa: E402
from mmprep.images.decode import (  # noqa: E402
    INTERPOLATIONS,
    ImageConfig,
    Normalization,
    load_image,
    plan_resize,
    to_output,
)
from mmprep.images.gpu import (  # noqa: E402
    GpuImages,
    gpu_problem,
    orient,
    pillow_decoder,
    resize_image,
    resolve_device,
    scan_jpeg,
)
from mmprep.images.sources import LocalImages  # noqa: E402
from mmprep.pack.processor import SampleProcessor  # noqa: E402

IMAGES = SAMPLE / "images"
GPU_PROBLEM = gpu_problem()
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"GPU path unavailable: {GPU_PROBLEM}")

# The stated tolerance of the device path against the CPU path, per image, in pixel levels (0-255): the mean
# absolute difference and its 99th percentile. The CPU path shrinks JPEGs in the DCT domain (draft) and by integer
# factors (reducing_gap) before its last resample; the device path resamples the full image once. Measured with
# Pillow decoding on both sides (docs/gpu.md): at most 1.58 and 14 on the sample photos (a 1200x1800 photo
# letterboxed to 224), 0.36-0.52 and 4-5 over the benchmark corpus.
MEAN_TOL, P99_TOL = 2.0, 16


def within_tolerance(a: np.ndarray, b: np.ndarray) -> bool:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return bool(d.mean() <= MEAN_TOL and np.percentile(d, 99) <= P99_TOL)


def jpeg(size=(96, 64), mode="RGB", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def with_orientation(data: bytes, orientation: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


# -- routing -------------------------------------------------------------------------------------------------------


def test_routing_sends_only_plain_jpegs_to_the_gpu() -> None:
    g = GpuImages(ImageConfig(resampler="pillow", size=(32, 32)), Normalization(), device="cpu")
    routed = {
        "baseline rgb": jpeg(),
        "baseline gray": jpeg(mode="L"),
        "4:4:4": jpeg(subsampling=0),
        "4:2:2": jpeg(subsampling=1),
        "exif rotated": (IMAGES / "landscape_exif6.jpg").read_bytes(),
        "real photo": (IMAGES / "astronaut.jpg").read_bytes(),
    }
    for name, data in routed.items():
        assert g.probe(data) is not None, name
    mpo = io.BytesIO()
    Image.open(io.BytesIO(jpeg())).save(mpo, "MPO", save_all=True, append_images=[Image.open(io.BytesIO(jpeg(seed=1)))])
    arithmetic = bytearray(jpeg())
    arithmetic[arithmetic.index(b"\xff\xc0") + 1] = 0xC9  # SOF9: arithmetic coding
    no_tables = bytearray(jpeg())
    dqt = no_tables.index(b"\xff\xdb")
    del no_tables[dqt:dqt + 2 + int.from_bytes(no_tables[dqt + 2:dqt + 4], "big")]
    cpu = {
        "progressive": jpeg(progressive=True),
        "cmyk": (IMAGES / "sample_cmyk.jpg").read_bytes(),
        "cmyk made here": jpeg(mode="CMYK"),
        "png": (IMAGES / "brick.png").read_bytes(),
        "truncated": (IMAGES / "coffee_truncated.jpg").read_bytes(),
        "cut here": jpeg()[:-200],
        "bytes after EOI": jpeg() + b"trailer",
        "mpo": mpo.getvalue(),
        "arithmetic": bytes(arithmetic),
        "no quantisation table": bytes(no_tables),
        "empty": b"",
        "not an image": b"\xff\xd8 hello \xff\xd9",
    }
    for name, data in cpu.items():
        assert g.probe(data) is None, name
    small_limit = GpuImages(ImageConfig(resampler="pillow", size=(32, 32), pixel_limit=96 * 64 - 1), Normalization(),
                            device="cpu")
    assert small_limit.probe(jpeg()) is None  # the CPU path rejects it (image_too_large)
    scan = scan_jpeg(jpeg(size=(96, 64)))
    assert scan is not None and (scan.width, scan.height, scan.components, scan.sof) == (96, 64, 3, 0xC0)
    rotated = g.probe(with_orientation(jpeg(size=(96, 64)), 6))
    assert rotated is not None and rotated.orientation == 6 and rotated.original_size == (64, 96)
    assert rotated.original_size == load_image(with_orientation(jpeg(size=(96, 64)), 6), g.cfg).original_size


# -- resampling --------------------------------------------------------------------------------------------------------


def test_orientation_matches_pillows_transposes() -> None:
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    transposes = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
    for o in range(1, 9):
        want = np.asarray(Image.fromarray(a).transpose(transposes[o])) if o in transposes else a
        got = orient(torch.from_numpy(a).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), o


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", ["center-crop", "letterbox", "stretch"])
def test_resampling_is_pillows_pass_by_pass(interpolation: str, mode: str) -> None:
    """Each pass equals Pillow's single-axis resize bit for bit (fractional crop boxes included); the two-pass
    result is within 2 levels of Pillow's one-call resize, whose pass order some Pillow builds choose by cost."""
    src = np.asarray(Image.open(IMAGES / "chelsea.jpg").convert("RGB"))
    h, w = src.shape[:2]
    cfg = ImageConfig(resampler="pillow", size=(150, 110), resize_mode=mode, interpolation=interpolation)
    plan = plan_resize(w, h, cfg)
    x0, y0, x1, y1 = plan.src_box
    rw, rh = plan.resized
    resample = getattr(Image.Resampling, interpolation.upper())
    step1 = Image.fromarray(src).resize((rw, h), resample, box=(x0, 0, x1, h))
    want = np.asarray(step1.resize((rw, rh), resample, box=(0, y0, rw, y1)))
    got = resize_image(torch.from_numpy(src.copy()).permute(2, 0, 1), plan, interpolation).permute(1, 2, 0).numpy()
    if interpolation != "nearest":
        assert np.array_equal(got, want)
    one_call = np.asarray(Image.fromarray(src).resize((rw, rh), resample, box=plan.src_box)).astype(int)
    diff = np.abs(got.astype(int) - one_call)
    assert diff.max() <= 2 and (diff == 0).mean() > 0.98


def cpu_path(data: bytes, cfg: ImageConfig, norm: Normalization) -> np.ndarray:
    return to_output(load_image(data, cfg).array, norm)


def render_one(g: GpuImages, data: bytes) -> np.ndarray:
    job = g.probe(data)
    assert job is not None
    pixels, failed = g.render([(0, job)], 1, 1)
    assert not failed
    return pixels[0, 0]


def test_device_pipeline_on_cpu_tensors_matches_the_cpu_path_within_tolerance() -> None:
    """Pillow decodes on both sides here, so what differs is the resampling: the CPU path's draft (DCT-domain
    scaling) and reducing_gap against one full antialiased resample."""
    files = [IMAGES / n for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "retina.jpg",
                                  "hubble_deep_field.jpg", "landscape_exif6.jpg")]
    datas = [f.read_bytes() for f in files] + [jpeg(size=(640, 427), seed=s) for s in range(3)]
    datas += [with_orientation(jpeg(size=(500, 375), seed=9), o) for o in (3, 5, 8)]
    for mode in ("center-crop", "letterbox", "stretch"):
        cfg = ImageConfig(resampler="pillow", size=(224, 224), resize_mode=mode)
        g = GpuImages(cfg, Normalization(), device="cpu", decoder=pillow_decoder)
        diffs = []
        for k, d in enumerate(datas):
            got, want = render_one(g, d), cpu_path(d, cfg, Normalization())
            assert within_tolerance(got, want), (mode, k)
            diffs.append(np.abs(got.astype(int) - want.astype(int)).ravel())
        assert np.concatenate(diffs).mean() <= 1.2 and any(x.any() for x in diffs)  # not exact: draft differs
        # without draft and reducing_gap on the CPU side, only the pass order can differ (a few levels, rarely)
        exact = ImageConfig(resampler="pillow", size=(224, 224), resize_mode=mode, draft=False, reducing_gap=None)
        ge = GpuImages(exact, Normalization(), device="cpu", decoder=pillow_decoder)
        d2 = np.concatenate([np.abs(render_one(ge, d).astype(int) - cpu_path(d, exact, Normalization()).astype(int))
                             .ravel() for d in datas])
        assert d2.max() <= 6 and (d2 == 0).mean() > 0.97, mode


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_normalised_slots_hold_exactly_the_cpu_paths_values_for_their_pixels(dtype: str, layout: str) -> None:
    cfg = ImageConfig(resampler="pillow", size=(40, 56), resize_mode="letterbox", fill=(10, 200, 30))
    norm = Normalization.from_spec("clip", dtype=dtype, layout=layout)
    raw = GpuImages(cfg, Normalization(layout="HWC"), device="cpu", decoder=pillow_decoder)
    g = GpuImages(cfg, norm, device="cpu", decoder=pillow_decoder)
    datas = [jpeg(size=(96, 64), seed=1), jpeg(size=(50, 90), seed=2, mode="L")]
    jobs = [(0, g.probe(datas[0])), (3, g.probe(datas[1]))]
    pixels, failed = g.render(jobs, 2, 2)  # slots 1 and 2 stay empty
    assert not failed and pixels.dtype == np.dtype(dtype)
    assert pixels.shape == ((2, 2, 3, 40, 56) if layout == "CHW" else (2, 2, 40, 56, 3))
    flat = pixels.reshape(4, *pixels.shape[2:])
    for slot, data in ((0, datas[0]), (3, datas[1])):
        uint8 = render_one(raw, data)
        assert np.array_equal(flat[slot], to_output(uint8, norm))  # same LUT values as to_output
    assert not flat[1].any() and not flat[2].any()  # padding slots are zeros, as on the CPU path
    # letterbox bars hold the fill colour
    box = g.probe(datas[1]).content_box
    bar = render_one(raw, datas[1])[:, : box[0]]
    assert bar.size and (bar == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_a_row_group_renders_as_its_images_one_by_one() -> None:
    """Images of one size and geometry are resampled as one batch; the result is the same as one at a time."""
    cfg = ImageConfig(resampler="pillow", size=(48, 40), resize_mode="letterbox", interpolation="lanczos")
    g = GpuImages(cfg, Normalization.from_spec("clip", dtype="float16"), device="cpu", decoder=pillow_decoder)
    datas = [jpeg(size=(120, 80), seed=s) for s in range(3)] + [jpeg(size=(80, 120), seed=7),
                                                                   with_orientation(jpeg(size=(120, 80), seed=8), 6)]
    jobs = [(slot, g.probe(d)) for slot, d in zip((0, 1, 3, 4, 5), datas, strict=True)]
    together, failed = g.render(jobs, 2, 3)
    assert not failed
    for slot, job in jobs:
        alone, _ = g.render([(0, job)], 1, 1)
        assert np.array_equal(together.reshape(6, *together.shape[2:])[slot], alone[0, 0]), slot
    assert not together[0, 2].any()


def test_decoder_failures_are_reported_per_image() -> None:
    cfg = ImageConfig(resampler="pillow", size=(32, 32))

    def picky(datas):  # a decoder that refuses grayscale files (a batch with one fails whole, as nvJPEG's does)
        if any(scan_jpeg(d).components == 1 for d in datas):
            raise RuntimeError("unsupported")
        return pillow_decoder(datas)

    g = GpuImages(cfg, Normalization(), device="cpu", decoder=picky, max_decode_pixels=1)
    jobs = [(k, g.probe(jpeg(mode="L" if k == 1 else "RGB", seed=k))) for k in range(3)]
    pixels, failed = g.render(jobs, 1, 3)
    assert set(failed) == {1} and pixels[0, 0].any() and pixels[0, 2].any() and not pixels[0, 1].any()
    g2 = GpuImages(cfg, Normalization(), device="cpu", decoder=picky)  # one batched call, then image by image
    pixels2, failed2 = g2.render(jobs, 1, 3)
    assert set(failed2) == {1} and np.array_equal(pixels2, pixels)


# -- the pack processor with the device path ----------------------------------------------------------------------


def make_manifest(tmp: Path) -> Path:
    """Sample images plus files made to take each route: routed JPEGs, CPU-only files, one the decoder refuses
    (grayscale, with the picky decoder below), one that passes the header check but fails to decode anywhere."""
    root = tmp / "imgs"
    root.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg", "landscape_exif6.jpg", "brick.png", "sample_cmyk.jpg",
                 "coffee_truncated.jpg", "rocket.jpg"):
        shutil.copy(IMAGES / name, root / name)
    (root / "gray.jpg").write_bytes(jpeg(size=(120, 90), mode="L"))
    (root / "progressive.jpg").write_bytes(jpeg(size=(100, 70), progressive=True))
    broken = bytearray(jpeg(size=(80, 64)))
    sos = broken.index(b"\xff\xda")
    broken[sos + 5] = 9  # the scan names a component the frame does not have
    (root / "broken_scan.jpg").write_bytes(bytes(broken))
    rows = [
        ["astronaut.jpg", "chelsea.jpg"], ["landscape_exif6.jpg"], ["brick.png", "rocket.jpg"], ["sample_cmyk.jpg"],
        ["gray.jpg", "astronaut.jpg"], ["coffee_truncated.jpg"], ["broken_scan.jpg", "chelsea.jpg"],
        ["progressive.jpg"], ["missing.jpg"], ["rocket.jpg", "gray.jpg", "chelsea.jpg"], ["astronaut.jpg"],
    ]
    lines = [json.dumps({"id": f"r{i}", "images": [f"imgs/{r}" for r in refs], "text": f"row {i}", "tags": ["cat"]})
             for i, refs in enumerate(rows)]
    manifest = tmp / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_processor(cfg, gpu) -> tuple[list, object]:
    import pyarrow as pa

    from mmprep.pack.plan import iter_items

    proc = SampleProcessor(cfg, LocalImages(cfg.root), row_group_rows=4, gpu=gpu)
    out = list(proc.process_chunk(0, list(iter_items(cfg, cfg.manifest))))
    batches = [b for b, _ in out if b is not None and b.num_rows]
    return pa.Table.from_batches(batches, schema=proc.schema).to_pylist(), out[-1][1]


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_processor_with_the_device_path_keeps_rows_rejects_and_accounting(tmp_path: Path, dtype: str) -> None:
    manifest = make_manifest(tmp_path)
    norm = Normalization.from_spec("imagenet" if dtype != "uint8" else None, dtype=dtype)
    cfg = pack_config(tmp_path / "out", manifest=str(manifest), tokenizer=None, vocab=None, norm=norm,
                      image=ImageConfig(resampler="pillow", size=(64, 80), resize_mode="center-crop"), limit_images=3)
    cfg.validate()

    def picky(datas):
        if any(scan_jpeg(d).components == 1 for d in datas):
            raise RuntimeError("this decoder takes no grayscale")
        return pillow_decoder(datas)

    gpu = GpuImages(cfg.image, cfg.norm, device="cpu", decoder=picky)
    routed = [name for name in ("astronaut.jpg", "gray.jpg", "broken_scan.jpg", "progressive.jpg", "brick.png")
              if gpu.probe((tmp_path / "imgs" / name).read_bytes()) is not None]
    assert routed == ["astronaut.jpg", "gray.jpg", "broken_scan.jpg"]
    want_rows, want = run_processor(cfg, None)
    got_rows, got = run_processor(cfg, gpu)
    for field in ("rows", "images_written", "images_dropped", "image_count_histogram", "first_line", "last_line"):
        assert getattr(got, field) == getattr(want, field), field
    assert [(r.line, r.reason, r.detail) for r in got.rejected] == [(r.line, r.reason, r.detail) for r in want.rejected]
    assert {r.reason for r in want.rejected} == {"image_truncated", "image_invalid", "image_missing"}
    assert any("broken_scan.jpg" in r.detail for r in got.rejected)  # failed on the device, then on the CPU path
    assert [r["id"] for r in got_rows] == [r["id"] for r in want_rows] == ["r0", "r1", "r2", "r3", "r4", "r7", "r9",
                                                                            "r10"]
    for g, w in zip(got_rows, want_rows, strict=True):
        for key in ("image_count", "image_mask", "image_sizes", "content_boxes", "image_paths", "text", "line"):
            assert g[key] == w[key], key
        a = np.frombuffer(g["pixel_values"], dtype=dtype).reshape(3, 3, 64, 80)
        b = np.frombuffer(w["pixel_values"], dtype=dtype).reshape(3, 3, 64, 80)
        scale = 1.0 if dtype == "uint8" else 255 * 0.224  # normalised units back to levels (at most)
        for k in range(g["image_count"]):
            assert within_tolerance(a[k] * scale, b[k] * scale), (g["id"], k)
        for k, ref in enumerate(g["image_paths"]):  # CPU-path images (PNG, CMYK, progressive, refused) are exact
            if not ref.endswith(("astronaut.jpg", "chelsea.jpg", "rocket.jpg", "landscape_exif6.jpg")):
                assert np.array_equal(a[k], b[k]), (g["id"], ref)
        assert not a[g["image_count"]:].any()


def test_row_groups_without_device_images(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    only_cpu = [line for line in manifest.read_text().splitlines()
                if not any(n in line for n in ("astronaut", "chelsea", "rocket", "landscape", "gray", "broken"))]
    manifest.write_text("\n".join(only_cpu) + "\n")
    cfg = pack_config(tmp_path / "out", manifest=str(manifest), tokenizer=None, vocab=None,
                      image=ImageConfig(resampler="pillow", size=(64, 80), resize_mode="center-crop"), limit_images=3)

    class Untouched(GpuImages):
        def render(self, jobs, rows, limit):
            raise AssertionError("a row group without device images reached the device")

    want_rows, want = run_processor(cfg, None)
    got_rows, got = run_processor(cfg, Untouched(cfg.image, cfg.norm, device="cpu", decoder=pillow_decoder))
    assert [r["id"] for r in got_rows] == [r["id"] for r in want_rows] and len(got_rows) == 2
    assert [r["pixel_values"] for r in got_rows] == [r["pixel_values"] for r in want_rows]
    assert [(r.line, r.reason) for r in got.rejected] == [(r.line, r.reason) for r in want.rejected]


# -- the device choice ---------------------------------------------------------------------------------------------


def test_device_choice_without_a_gpu_path(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmprep.cli import app
    from mmprep.pack.job import pack

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto", padded=False) == "cpu"
    with pytest.raises(UsageError, match="must be one of"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="padded tensors"):
        resolve_device("cuda", padded=False)
    cfg = pack_config(tmp_path / "a", tokenizer=None, vocab=None)
    assert "device" not in cfg.to_dict()  # the CPU path records what it always recorded
    import dataclasses

    with pytest.raises(UsageError, match="local engine"):
        pack(dataclasses.replace(cfg, device="cuda"), engine="ray")
    assert not (tmp_path / "a").exists()

    assert dataclasses.replace(cfg, device="cuda").to_dict()["device"] == "cuda"  # a resume cannot mix the two
    if GPU_PROBLEM is None:
        pytest.skip("this machine has the GPU path")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UsageError, match="--device cuda: ") as info:
        resolve_device("cuda")
    assert "mmprep[gpu]" in (info.value.hint or "")
    auto = pack(dataclasses.replace(cfg, out=str(tmp_path / "auto"), device="auto"), workers=1)
    plain = pack(dataclasses.replace(cfg, out=str(tmp_path / "cpu")), workers=1)
    assert auto.device == plain.device == "cpu"
    assert (tmp_path / "auto" / "index.json").read_bytes() == (tmp_path / "cpu" / "index.json").read_bytes()
    runner = CliRunner()
    manifest = str(SAMPLE / "manifest.jsonl")
    for args, needle in ((["--device", "cuda"], "--device cuda: "),
                         (["--device", "cuda", "--pad", "none"], "padded tensors"),
                         (["--device", "gpu"], "must be one of")):
        result = runner.invoke(app, ["pack", manifest, "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2, result.output
        assert needle in result.stderr
    assert not (tmp_path / "x").exists()


# -- on a GPU ----------------------------------------------------------------------------------------------------------


@cuda
@needs_gpu
def test_nvjpeg_on_cuda_matches_the_cpu_path_within_tolerance() -> None:
    datas = [(IMAGES / n).read_bytes() for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg",
                                                  "landscape_exif6.jpg")] + [jpeg(mode="L"), jpeg(subsampling=0)]
    for mode in ("center-crop", "letterbox"):
        cfg = ImageConfig(resampler="pillow", size=(224, 224), resize_mode=mode)
        g = GpuImages(cfg, Normalization(), device="cuda")
        jobs = [(k, g.probe(d)) for k, d in enumerate(datas)]
        pixels, failed = g.render(jobs, 1, len(datas))
        assert set(failed) <= {5}, failed  # a decoder build without grayscale-to-RGB may refuse the gray one only
        for k, d in enumerate(datas):
            if k not in failed:
                assert within_tolerance(pixels[0, k], cpu_path(d, cfg, Normalization())), (mode, k)
        # the same pipeline with Pillow decoding on the GPU tensors: only the decoders differ
        gp = GpuImages(cfg, Normalization(), device="cuda", decoder=lambda ds: [t.cuda() for t in pillow_decoder(ds)])
        same, _ = gp.render(jobs, 1, len(datas))
        gc = GpuImages(cfg, Normalization(), device="cpu", decoder=pillow_decoder)
        ref, _ = gc.render(jobs, 1, len(datas))
        assert np.array_equal(same, ref)  # the torch resampler gives the same bits on CUDA and CPU


@cuda
@needs_gpu
def test_pack_device_cuda_end_to_end(tmp_path: Path) -> None:
    import dataclasses

    from mmprep.dataset.reader import PackedDataset
    from mmprep.pack.job import pack

    cfg = pack_config(tmp_path / "cpu")
    cpu = pack(cfg, workers=2)
    gpu = pack(dataclasses.replace(cfg, out=str(tmp_path / "cuda"), device="cuda"), workers=2)
    assert gpu.device == "cuda" and gpu.failed is None
    assert (gpu.written, gpu.rejected, gpu.rejected_by_reason, gpu.images_written) == (
        cpu.written, cpu.rejected, cpu.rejected_by_reason, cpu.images_written)
    rejects = "rejected-train.jsonl"
    assert (tmp_path / "cpu" / rejects).read_text() == (tmp_path / "cuda" / rejects).read_text()
    a, b = PackedDataset(tmp_path / "cuda"), PackedDataset(tmp_path / "cpu")
    ba, bb = a.take(list(range(len(a)))), b.take(list(range(len(b))))
    assert ba["id"] == bb["id"] and np.array_equal(ba["content_boxes"], bb["content_boxes"])
    for i in range(len(ba["id"])):
        for k in range(int(ba["image_count"][i])):
            assert within_tolerance(ba["pixel_values"][i, k], bb["pixel_values"][i, k]), (i, k)
    assert json.loads((tmp_path / "cuda" / "index.json").read_text())["config"]["device"] == "cuda"

"""Quality and speed of every way mmprep (and its alternatives) can shrink an image, on the benchmark corpus.

Every method makes the same picture: a ``--size`` x ``--size`` centre crop of each image (upright).

**Reference**: Pillow decodes the whole file (no DCT scaling), applies the EXIF orientation, and resamples each
channel as 32-bit floats (mode ``F``) with Lanczos over the exact centre-crop box, without rounding. A method's
PSNR is ``10 log10(255^2 / MSE)`` of its uint8 output against that reference; the table shows the median over the
corpus sample and its 5th percentile. **Zone plates** (``cos(k r^2)`` rings whose frequency reaches the Nyquist
limit at the edge, 1024x1024 gray, saved as PNG and as JPEG q95) show aliasing: a method without an
antialiasing filter folds the fine rings back into coarse ones, and its PSNR collapses (the bar is 17 dB).

**Speed**: images per CPU-second of one process (``time.process_time``, so a busy shared machine changes it
little; OpenCV kept to one thread, as in pack's workers) over the same files, output kept as an array where the
method produces one; the ratio is to the ``ceiling`` (Pillow ``open`` + ``draft`` + bicubic ``resize``, nothing
else: the figure ``bench_pack.py`` compares pack with). Methods run interleaved, ``--repeats`` rounds, medians.

Methods:

- ``fast``: ``load_image`` with ``resampler="fast"`` (mmprep's default): simplejpeg power-of-2 DCT-scaled decode,
  OpenCV ``INTER_AREA``; Pillow for the files it does not take.
- ``fast, --no-draft``: the same with full-size JPEG decoding.
- ``pillow bicubic`` / ``bilinear`` / ``lanczos``: ``load_image`` with ``resampler="pillow"`` (draft, then
  ``reduce`` + the filter, ``reducing_gap=3``), the ``--interpolation`` filters.
- ``ceiling``: the bare Pillow draft + bicubic resize (no orientation, modes or checks).
- ``n/8 scaled + INTER_AREA``: simplejpeg's finest scale (n/8, not only powers of 2) that covers the crop, then
  ``INTER_AREA`` (a faster decode, measured to show why mmprep does not use it).
- ``OpenCV INTER_LINEAR (no antialiasing)``: full decode + ``cv2.resize(INTER_LINEAR)``, what a hand-written
  OpenCV pipeline often does.

    python benchmarks/bench_quality.py [--samples 2000] [--images 300] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks._harness import ceiling_resize, centre_box, markdown_table  # noqa: E402
from benchmarks.corpus import make_corpus  # noqa: E402

ZONE_SIDE = 1024
PSNR_TARGET = 40.0  # median dB, Pillow-bilinear class
ZONE_FLOOR = 17.0  # dB: below this the zone plate has collapsed into aliasing


def _zone_plates(folder: Path) -> list[Path]:
    """A 1024x1024 zone plate as PNG and JPEG q95 (made once)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    png, jpg = folder / "zone_plate.png", folder / "zone_plate.jpg"
    if not (png.exists() and jpg.exists()):
        n = ZONE_SIDE
        y, x = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2
        k = math.pi / (2 * (n / 2))  # local frequency k r / pi reaches 0.5 cycles/pixel at r = n/2
        img = np.clip(np.rint(127.5 + 127.5 * np.cos(k * (x * x + y * y))), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(img, "L").convert("RGB")
        rgb.save(png)
        rgb.save(jpg, quality=95)
    return [png, jpg]


def _reference(path: Path, size: int) -> np.ndarray:
    """Full decode, upright, per-channel float Lanczos over the exact centre box (float32, HxWx3)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    box = centre_box(*rgb.size, size)
    planes = [np.asarray(Image.fromarray(np.asarray(ch, dtype=np.float32), "F").resize(
        (size, size), Image.Resampling.LANCZOS, box=box)) for ch in rgb.split()]
    return np.stack(planes, axis=-1)


def _psnr(out: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- the methods: path -> HxWx3 uint8 ------------------------------------------------------------------------


def _load(cfg: Any) -> Callable[[Path], np.ndarray]:
    from mmprep.images.decode import load_image

    return lambda p: load_image(p, cfg).array


def _ceiling(size: int) -> Callable[[Path], np.ndarray]:
    from PIL import Image

    def run(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(ceiling_resize(im, size).convert("RGB"))

    return run


def _opencv(size: int, *, n8: bool, antialias: bool) -> Callable[[Path], np.ndarray]:
    import cv2
    import simplejpeg

    def run(p: Path) -> np.ndarray:
        data = p.read_bytes()
        if data[:2] == b"\xff\xd8":
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            scale = max(size / w, size / h)
            need_w, need_h = (math.ceil(w * scale), math.ceil(h * scale)) if n8 else (w, h)
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=need_h, min_width=need_w)
        else:
            arr = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            h, w = arr.shape[:2]
        f = arr.shape[1] / w
        x0, y0, x1, y1 = (round(v * f) for v in centre_box(w, h, size))
        crop = arr[y0:y1, x0:x1]
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if antialias else cv2.INTER_LINEAR)

    return run


def _methods(size: int) -> dict[str, Callable[[Path], np.ndarray]]:
    from mmprep.images.decode import ImageConfig

    def cfg(**kw: Any) -> ImageConfig:
        return ImageConfig(size=(size, size), resize_mode="center-crop", **kw)

    return {
        "fast (default)": _load(cfg(resampler="fast")),
        "fast, --no-draft": _load(cfg(resampler="fast", draft=False)),
        "pillow bicubic": _load(cfg(resampler="pillow", interpolation="bicubic")),
        "pillow bilinear": _load(cfg(resampler="pillow", interpolation="bilinear")),
        "pillow lanczos": _load(cfg(resampler="pillow", interpolation="lanczos")),
        "ceiling: Pillow draft + bicubic": _ceiling(size),
        "n/8 scaled + INTER_AREA": _opencv(size, n8=True, antialias=True),
        "OpenCV INTER_LINEAR (no antialiasing)": _opencv(size, n8=False, antialias=False),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="benchmark corpus to draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=300, help="images of the corpus measured (every k-th)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="60 images, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 60, 1
    print("command: python " + shlex.join(["benchmarks/bench_quality.py", *(sys.argv[1:] if argv is None else argv)]))
    corpus_dir = REPO_ROOT / ".bench" / f"corpus-{args.samples}-{args.seed}"
    make_corpus(corpus_dir, args.samples, args.seed)
    files = sorted((corpus_dir / "images").iterdir())
    step = max(1, len(files) // args.images)
    sample = files[::step][: args.images]
    zones = _zone_plates(REPO_ROOT / ".bench" / "zone-plates")
    import cv2
    import PIL
    import simplejpeg

    cv2.setNumThreads(1)  # as in pack's workers: the processes are the parallelism
    n_png = sum(p.suffix == ".png" for p in sample)
    print(f"images: {len(sample)} of {corpus_dir.relative_to(REPO_ROOT)} ({len(sample) - n_png} JPEG, {n_png} PNG), "
          f"{args.size}x{args.size} centre crop; zone plates {ZONE_SIDE}x{ZONE_SIDE} PNG + JPEG q95; "
          f"Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}, OpenCV {cv2.__version__}; "
          f"OpenCV threads: {cv2.getNumThreads()}")

    methods = _methods(args.size)
    refs = [_reference(p, args.size) for p in sample]
    zone_refs = [_reference(p, args.size) for p in zones]
    quality: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        psnrs = [_psnr(fn(p), ref) for p, ref in zip(sample, refs, strict=True)]
        zone = [_psnr(fn(p), ref) for p, ref in zip(zones, zone_refs, strict=True)]
        quality[name] = {"median": statistics.median(psnrs), "p5": float(np.percentile(psnrs, 5)),
                         "zone_png": zone[0], "zone_jpeg": zone[1]}

    speed: dict[str, list[float]] = {name: [] for name in methods}
    for rnd in range(args.repeats):
        names = list(methods)
        names = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in names:
            fn = methods[name]
            start = time.process_time()
            for p in sample:
                fn(p)
            speed[name].append(len(sample) / (time.process_time() - start))
    ips = {name: statistics.median(v) for name, v in speed.items()}
    base = ips["ceiling: Pillow draft + bicubic"]

    rows = []
    for name in methods:
        q = quality[name]
        ok = q["median"] >= PSNR_TARGET and min(q["zone_png"], q["zone_jpeg"]) >= ZONE_FLOOR
        rows.append([name, f"{q['median']:.1f}", f"{q['p5']:.1f}", f"{q['zone_png']:.1f}", f"{q['zone_jpeg']:.1f}",
                     f"{ips[name]:,.0f}", f"{ips[name] / base:.2f}", "yes" if ok else "no"])
    print()
    print(markdown_table(["method", "PSNR median dB", "PSNR 5th pct dB", "zone plate PNG dB", "zone plate JPEG dB",
                          "images/CPU-s", "vs ceiling", f"bar (>= {PSNR_TARGET:g} dB, zones >= {ZONE_FLOOR:g})"], rows))
    default = quality["fast (default)"]
    print(f"\ndefault (fast): median {default['median']:.1f} dB (target >= {PSNR_TARGET}), zone plates "
          f"{min(default['zone_png'], default['zone_jpeg']):.1f} dB (floor {ZONE_FLOOR}); speed "
          f"{ips['fast (default)'] / base:.2f} x the ceiling per CPU-second")
    headline = [
        {"name": "fast resampler median PSNR vs float Lanczos (dB)", "value": default["median"],
         "target": PSNR_TARGET, "op": ">="},
        {"name": "fast resampler zone-plate PSNR, worst (dB)", "value": min(default["zone_png"], default["zone_jpeg"]),
         "target": ZONE_FLOOR, "op": ">="},
        {"name": "fast resampler / Pillow draft ceiling (images per CPU-s)", "value": ips["fast (default)"] / base,
         "target": 1.0, "op": ">="},
    ]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "quality": quality, "images_per_cpu_s": ips,
                                                   "headline": headline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
